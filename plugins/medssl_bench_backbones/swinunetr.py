"""MONAI's Swin UNETR (Hatamizadeh et al. 2022; v2: He et al. 2023), the network Swin UNETR
pretraining (Tang et al. 2022) and VoCo (Wu et al. 2024) are defined on.

Built from MONAI's own ``SwinUNETR`` modules (MONAI is a dependency for this: the released
Swin UNETR and VoCo weights are state dicts of that class, and re-implementing it would only
add ways for them not to load). A Swin transformer (``swinViT``: patch embedding 2^3, four
stages of shifted-window attention with patch merging, ``feature_size`` 48 doubling per stage,
depths 2/2/2/2, heads 3/6/12/24, window 7; ``use_v2`` adds a residual conv block before each
stage) gives five outputs at strides 2..32, each layer-normalised (MONAI's ``normalize``).

Encoder features, highest resolution first (channels for feature_size F):
``encoder1(x)`` (F, stride 1), ``encoder2(h0)`` (F, 2), ``encoder3(h1)`` (2F, 4),
``encoder4(h2)`` (4F, 8), ``h3`` (8F, 16), ``h4`` (16F, 32). The deepest is the Swin
transformer's own output, so ``global_pool`` and the pretraining heads of Swin UNETR
pretraining and VoCo (which sit on ``swinViT``'s last output) read the transformer, and
released ``swinViT``-only weights leave no random layer between it and a probe. Decoder:
``encoder10`` (a residual block on ``h4``; MONAI names it an encoder, it feeds only the
decoder), ``decoder5`` .. ``decoder1`` (transposed conv x2, concatenation with the skip, a
residual block) and ``out`` (1x1x1 conv), exactly MONAI's forward. ``skip_connections=False``
(Parts2Whole) replaces each up block by one with the same ``transp_conv``/``conv_block`` names
whose block takes the upsampled features alone.

KEY LAYOUT (for weight import; :data:`LIBRARY_PREFIXES`): a MONAI ``SwinUNETR`` state dict
splits by prefix with every key kept as it is, nothing renamed:

- encoder: ``swinViT.*``, ``encoder1.*``, ``encoder2.*``, ``encoder3.*``, ``encoder4.*``
- decoder: ``encoder10.*``, ``decoder5.*`` .. ``decoder1.*``, ``out.*`` (``out.conv.conv.*``)

Released checkpoints need their own prefix fixes first (``module.``; VoCo's ``swin_vit`` ->
``swinViT``; the Swin UNETR pretraining's ``model_swinvit.pt`` has ``module.`` keys in the
layout ``SwinUNETR.load_from`` reads). Inputs must be multiples of 32 (2 * 2^4).
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field
from torch import Tensor, nn

from medssl_bench.config import PluginConfig
from medssl_bench.interfaces import Backbone, Encoder
from medssl_bench_backbones.library_keys import PrefixRule, SplitState, split_library_state
from medssl_bench_backbones.unet3d import PooledClassifier

#: MONAI ``SwinUNETR`` key prefixes per part; keys keep these prefixes in our state dicts.
LIBRARY_PREFIXES: dict[str, tuple[str, ...]] = {
    "encoder": ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4."),
    "decoder": ("encoder10.", "decoder5.", "decoder4.", "decoder3.", "decoder2.", "decoder1.",
                "out."),
}
ENCODER_MODULES = tuple(p.rstrip(".") for p in LIBRARY_PREFIXES["encoder"])
DECODER_MODULES = tuple(p.rstrip(".") for p in LIBRARY_PREFIXES["decoder"])


def _monai(cfg: SwinUNETR.Config, in_channels: int, out_channels: int) -> nn.Module:
    # MONAI is imported where it is used: the registry imports every plugin in every `bench`
    # process and parallel worker, and MONAI takes seconds to import
    from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

    return MonaiSwinUNETR(
        in_channels=in_channels, out_channels=out_channels, feature_size=cfg.feature_size,
        depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads), window_size=cfg.window_size,
        drop_rate=cfg.drop_rate, attn_drop_rate=cfg.attn_drop_rate,
        dropout_path_rate=cfg.dropout_path_rate, use_v2=cfg.use_v2, spatial_dims=3)


class SwinUNETREncoder(Encoder):
    """``swinViT`` and ``encoder1``..``encoder4`` of a MONAI SwinUNETR (MONAI's names)."""

    spatial_dims = 3

    def __init__(self, in_channels: int, cfg: SwinUNETR.Config) -> None:
        super().__init__()
        net = _monai(cfg, in_channels, 1)
        for name in ENCODER_MODULES:
            setattr(self, name, getattr(net, name))
        f = cfg.feature_size
        self.in_channels = in_channels
        self.feature_channels = [f, f, 2 * f, 4 * f, 8 * f, 16 * f]
        self.feature_strides = [1, 2, 4, 8, 16, 32]
        self.stem_weight_key = "swinViT.patch_embed.proj.weight"
        self.normalize = True

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.swinViT(x, self.normalize)
        return [self.encoder1(x), self.encoder2(h[0]), self.encoder3(h[1]),
                self.encoder4(h[2]), h[3], h[4]]


class _PlainUp(nn.Module):
    """A Swin UNETR up block without the skip: transposed conv x2, then a residual block on
    the upsampled features alone (MONAI's ``UnetrUpBlock`` with its input halved)."""

    def __init__(self, cin: int, cout: int) -> None:
        from monai.networks.blocks.dynunet_block import UnetResBlock, get_conv_layer

        super().__init__()
        self.transp_conv = get_conv_layer(3, cin, cout, kernel_size=2, stride=2, conv_only=True,
                                          is_transposed=True)
        self.conv_block = UnetResBlock(3, cout, cout, kernel_size=3, stride=1,
                                       norm_name="instance")

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_block(self.transp_conv(x))


class SwinUNETRDecoder(nn.Module):
    """``encoder10``, ``decoder5``..``decoder1`` and ``out`` of a MONAI SwinUNETR."""

    def __init__(self, cfg: SwinUNETR.Config, out_channels: int, skip_connections: bool) -> None:
        super().__init__()
        net = _monai(cfg, 1, out_channels)
        for name in DECODER_MODULES:
            setattr(self, name, getattr(net, name))
        self.skip_connections = skip_connections
        if not skip_connections:
            f = cfg.feature_size
            for name, cin, cout in (("decoder5", 16 * f, 8 * f), ("decoder4", 8 * f, 4 * f),
                                    ("decoder3", 4 * f, 2 * f), ("decoder2", 2 * f, f),
                                    ("decoder1", f, f)):
                setattr(self, name, _PlainUp(cin, cout))

    def forward(self, features: list[Tensor]) -> Tensor:
        enc0, enc1, enc2, enc3, h3, h4 = features
        x = self.encoder10(h4)
        ups = (self.decoder5, self.decoder4, self.decoder3, self.decoder2, self.decoder1)
        for up, skip in zip(ups, (h3, enc3, enc2, enc1, enc0), strict=True):
            x = up(x, skip) if self.skip_connections else up(x)
        return self.out(x)


class SwinUNETR(Backbone):
    """MONAI's Swin UNETR (v2 option), feature size 48; MONAI checkpoints load by key prefix."""

    name = "swinunetr"
    spatial_dims = 3
    #: shifted-window attention: no patch-token API (``tokens``), but not a plain CNN either
    provides = ("attention",)

    class Config(PluginConfig):
        feature_size: int = Field(
            default=48, ge=12, multiple_of=12,
            description="Swin UNETR's feature_size: the patch embedding's width, doubling per "
            "stage (48 in Swin UNETR pretraining and VoCo-B; VoCo also 96/192). A multiple "
            "of 12.")
        use_v2: bool = Field(
            default=False,
            description="Swin UNETR v2: a residual conv block before each Swin stage (VoCo's "
            "released models use it).")
        depths: list[int] = Field(
            default=[2, 2, 2, 2], min_length=4, max_length=4,
            description="Swin blocks per stage (Swin UNETR: 2, 2, 2, 2).")
        num_heads: list[int] = Field(
            default=[3, 6, 12, 24], min_length=4, max_length=4,
            description="Attention heads per stage (Swin UNETR: 3, 6, 12, 24).")
        window_size: int = Field(default=7, ge=1, description="Attention window side (7).")
        drop_rate: float = Field(default=0.0, ge=0, le=1, description="Dropout.")
        attn_drop_rate: float = Field(default=0.0, ge=0, le=1, description="Attention dropout.")
        dropout_path_rate: float = Field(
            default=0.0, ge=0, le=1, description="Stochastic depth (Swin UNETR: 0).")
        head_dropout: float = Field(
            default=0.0, ge=0, lt=1, description="Dropout before the classification layer.")

    presets = {
        # the smallest MONAI accepts (feature size 12), one block per stage, small windows
        "quick": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
                  "window_size": 2},
        "paper": {"feature_size": 48},
    }

    def build_encoder(self, in_channels: int) -> SwinUNETREncoder:
        return SwinUNETREncoder(in_channels, self.config)

    def build_decoder(self, encoder: Encoder, out_channels: int,
                      skip_connections: bool = True) -> SwinUNETRDecoder:
        return SwinUNETRDecoder(self.config, out_channels, skip_connections)

    def build_classifier(self, encoder: Encoder, num_classes: int) -> PooledClassifier:
        return PooledClassifier(encoder.feature_channels[-1], num_classes, self.config.head_dropout)

    def size_multiple(self) -> int:
        """Patch embedding 2 and four patch mergings: 2**5 (MONAI checks the same)."""
        return 32

    def min_input_size(self) -> int:
        """Instance norm in ``encoder10`` needs more than one voxel at stride 32."""
        return 64

    def library_key_rules(self) -> list[PrefixRule]:
        """A MONAI ``SwinUNETR`` state dict onto our parts, keys unchanged."""
        return [PrefixRule(prefix, part, prefix)
                for part, prefixes in LIBRARY_PREFIXES.items() for prefix in prefixes]

    def split_library_state(self, state: Mapping[str, Tensor]) -> SplitState:
        """A MONAI ``SwinUNETR`` state dict as our ``encoder`` and ``decoder`` states."""
        return split_library_state(state, self.library_key_rules())
