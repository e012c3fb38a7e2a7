"""Built-in backbones of medssl-bench."""

from medssl_bench.hookspecs import hookimpl


@hookimpl
def bench_register_backbones(register):
    from medssl_bench_backbones.genesis_unet3d import GenesisUNet3D
    from medssl_bench_backbones.resenc3d import ResEnc3D
    from medssl_bench_backbones.swinunetr import SwinUNETR
    from medssl_bench_backbones.timm2d import Timm2D
    from medssl_bench_backbones.unet3d import UNet3D
    from medssl_bench_backbones.vit3d import ViT3D

    register(UNet3D)
    register(Timm2D)
    register(ViT3D)
    register(GenesisUNet3D)
    register(ResEnc3D)
    register(SwinUNETR)


@hookimpl
def bench_register_weight_formats(register):
    from medssl_bench_backbones import weight_formats as f

    for cls in (f.GenesisFormat, f.SwinUNETRFormat, f.VoCoFormat, f.NNUNetFormat,
                f.OpenMindFormat, f.SafetensorsFormat):
        register(cls)
