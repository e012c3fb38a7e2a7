"""Built-in datasets of medssl-bench."""

from medssl_bench.hookspecs import hookimpl


@hookimpl
def bench_register_datasets(register):
    from medssl_bench_datasets.medmnist3d import MedMNIST3D
    from medssl_bench_datasets.phantom3d import Phantom3D

    register(Phantom3D)
    register(MedMNIST3D)
    from medssl_bench_datasets.fundus import Fundus
    from medssl_bench_datasets.phantom2d import Phantom2D
    from medssl_bench_datasets.slices import Slices

    register(Phantom2D)
    register(Fundus)
    register(Slices)
    from medssl_bench_datasets.brats import BraTS
    from medssl_bench_datasets.luna16 import LUNA16
    from medssl_bench_datasets.msd import MSD
    from medssl_bench_datasets.nifti_folder import NiftiFolder

    register(MSD)
    register(BraTS)
    register(LUNA16)
    register(NiftiFolder)
