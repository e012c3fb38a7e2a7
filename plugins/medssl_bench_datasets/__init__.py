"""Built-in datasets of medssl-bench."""

from medssl_bench.hookspecs import hookimpl


@hookimpl
def bench_register_datasets(register):
    from medssl_bench_datasets.medmnist3d import MedMNIST3D
    from medssl_bench_datasets.phantom3d import Phantom3D

    register(Phantom3D)
    register(MedMNIST3D)
