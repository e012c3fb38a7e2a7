"""Built-in proxy tasks of medssl-bench (and the ``scratch`` baseline)."""

from medssl_bench.hookspecs import hookimpl


@hookimpl
def bench_register_tasks(register):
    from medssl_bench_tasks.cpc import CPC3D
    from medssl_bench_tasks.cpc2d import CPC2D
    from medssl_bench_tasks.exemplar import Exemplar3D
    from medssl_bench_tasks.exemplar2d import Exemplar2D
    from medssl_bench_tasks.genesis import Genesis3D
    from medssl_bench_tasks.jigsaw import Jigsaw3D
    from medssl_bench_tasks.jigsaw2d import Jigsaw2D
    from medssl_bench_tasks.mae import MAE3D
    from medssl_bench_tasks.parts2whole import Parts2Whole3D
    from medssl_bench_tasks.rotation import Rotation3D
    from medssl_bench_tasks.rotation2d import Rotation2D
    from medssl_bench_tasks.rpl import RelativePatchLocation3D
    from medssl_bench_tasks.rpl2d import RelativePatchLocation2D
    from medssl_bench_tasks.scratch import Scratch
    from medssl_bench_tasks.simclr import SimCLR3D
    from medssl_bench_tasks.simmim import SimMIM3D
    from medssl_bench_tasks.spark import SparK3D
    from medssl_bench_tasks.swinssl import SwinSSL3D
    from medssl_bench_tasks.voco import VoCo3D
    from medssl_bench_tasks.volumefusion import VolumeFusion3D

    register(Scratch)
    register(Rotation3D)
    register(Rotation2D)
    register(RelativePatchLocation3D)
    register(Jigsaw3D)
    register(CPC3D)
    register(Exemplar3D)
    register(Genesis3D)
    register(Parts2Whole3D)
    register(RelativePatchLocation2D)
    register(Jigsaw2D)
    register(CPC2D)
    register(Exemplar2D)
    register(SimMIM3D)
    register(SparK3D)
    register(SimCLR3D)
    register(VoCo3D)
    register(VolumeFusion3D)
    register(SwinSSL3D)
    register(MAE3D)
