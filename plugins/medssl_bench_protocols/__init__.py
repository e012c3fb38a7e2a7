"""Built-in protocols of medssl-bench, each with its spec (``NAME.yaml``) beside its module."""

from medssl_bench.hookspecs import hookimpl


@hookimpl
def bench_register_protocols(register):
    from medssl_bench_protocols.convergence import Convergence
    from medssl_bench_protocols.data_efficiency import DataEfficiency
    from medssl_bench_protocols.few_shot import FewShot
    from medssl_bench_protocols.knn import KNN
    from medssl_bench_protocols.linear_probe import LinearProbe
    from medssl_bench_protocols.transfer import Transfer

    register(DataEfficiency)
    register(Transfer)
    register(Convergence)
    register(LinearProbe)
    register(KNN)
    register(FewShot)
