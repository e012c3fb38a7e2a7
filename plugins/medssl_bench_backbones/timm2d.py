"""2D backbones from timm (Taleb et al. 2020 appendix: DenseNet-121 for the 2D tasks).

The encoder is timm's feature extractor (``features_only=True``), so any timm model that
supports it works and the feature pyramid (channels, reductions) comes from timm's own
``feature_info`` rather than a hand-kept table. Weights are never downloaded: models are
always built with ``pretrained=False``, because the point of the benchmark is to compare
self-supervised initialisations against each other and against scratch.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.nn import functional as F

from medssl_bench.config import PluginConfig
from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import Backbone, Encoder
from medssl_bench_backbones.unet3d import PooledClassifier


def first_conv_key(module: nn.Module, in_channels: int) -> str:
    """The state-dict key of the first convolution-like weight taking ``in_channels`` inputs.

    State dicts list parameters in registration order, so the first 4-D weight whose input
    dimension equals the image channel count is the stem (``conv1.weight`` for ResNets,
    ``features_conv0.weight`` for DenseNets, ``conv_stem.weight`` for EfficientNets).
    """
    for key, value in module.state_dict().items():
        if key.endswith("weight") and value.dim() == 4 and value.shape[1] == in_channels:
            return key
    raise ConfigError(
        f"Cannot find the first convolution of {type(module).__name__} (no 4-D weight with "
        f"{in_channels} input channels); this timm model cannot adapt its input channels."
    )


class Timm2DEncoder(Encoder):
    """A timm feature extractor returning the feature pyramid, highest resolution first."""

    spatial_dims = 2

    def __init__(
        self, model_name: str, in_channels: int, out_indices: list[int] | None,
        model_kwargs: dict[str, Any],
    ) -> None:
        super().__init__()
        kwargs: dict[str, Any] = dict(model_kwargs)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        try:
            import timm  # imported here: it takes seconds, and most runs never need it

            self.model = timm.create_model(
                model_name, pretrained=False, features_only=True, in_chans=in_channels, **kwargs
            )
        except (RuntimeError, TypeError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"backbone.model {model_name!r} cannot be built by timm as a feature extractor "
                f"({type(exc).__name__}: {exc}). Pick a convolutional timm model, e.g. "
                "densenet121, resnet18 or efficientnet_b0 (`timm.list_models()`)."
            ) from None
        self.in_channels = in_channels
        self.feature_channels = list(self.model.feature_info.channels())
        self.reductions = list(self.model.feature_info.reduction())
        self.stem_weight_key = "model." + first_conv_key(self.model, in_channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.dim() != 4:
            raise ConfigError(
                f"Backbone 'timm2d' takes 2D images (B, C, H, W) but got shape {tuple(x.shape)}; "
                "use a 3D backbone such as unet3d for volumes, or the slices dataset adapter."
            )
        return list(self.model(x))


class ConvBlock(nn.Sequential):
    """conv3-BN-ReLU twice: the decoder block of a plain U-Net."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class PyramidDecoder(nn.Module):
    """A U-Net-like decoder over the encoder's feature pyramid.

    From the deepest level up: upsample to the next level's size, concatenate its features
    (unless ``skip_connections`` is off, as Parts2Whole pretrains), one :class:`ConvBlock`.
    A last block runs after upsampling by the first level's reduction, so the output has the
    input's size (timm pyramids usually start at stride 2, not 1).
    """

    def __init__(
        self, feature_channels: list[int], reductions: list[int], out_channels: int,
        decoder_channels: list[int], skip_connections: bool,
    ) -> None:
        super().__init__()
        self.skip_connections = skip_connections
        self.first_reduction = reductions[0]
        levels = len(feature_channels)

        def width(i: int) -> int:
            return decoder_channels[min(i, len(decoder_channels) - 1)]

        self.blocks = nn.ModuleList()
        cin = feature_channels[-1]
        for step, skip in enumerate(feature_channels[-2::-1]):
            cout = width(step)
            self.blocks.append(ConvBlock(cin + (skip if skip_connections else 0), cout))
            cin = cout
        self.final = ConvBlock(cin, width(levels - 1)) if self.first_reduction > 1 else None
        self.out = nn.Conv2d(width(levels - 1) if self.final is not None else cin, out_channels, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, features[-2::-1], strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            if self.skip_connections:
                x = torch.cat([x, skip], dim=1)
            x = block(x)
        if self.final is not None:
            x = self.final(F.interpolate(x, scale_factor=self.first_reduction, mode="nearest"))
        return self.out(x)


class Timm2D(Backbone):
    """Any timm 2D model as encoder (DenseNet-121 by default, as Taleb et al.), with a pooled
    linear classifier and a U-Net-like decoder; never downloads weights."""

    name = "timm2d"
    default = True  # of 2D backbones
    spatial_dims = 2

    class Config(PluginConfig):
        model: str = Field(
            default="densenet121",
            description="timm model name; must support features_only (Taleb et al. appendix: "
            "DenseNet-121 for every 2D task). Built with pretrained=False: nothing downloads.",
        )
        model_kwargs: dict[str, int | float | bool | str | list[int]] = Field(
            default_factory=dict,
            description="Extra keyword arguments for timm.create_model, e.g. "
            "{growth_rate: 8, block_config: [2, 2, 2, 2]} for a narrow DenseNet on a CPU.",
        )
        out_indices: list[int] | None = Field(
            default=None,
            description="Which pyramid levels the encoder returns (timm out_indices); null "
            "means all of them.",
        )
        decoder_channels: list[int] = Field(
            default=[256, 128, 64, 32, 16], min_length=1,
            description="Decoder widths from the deepest level up (the last entry is reused "
            "when the pyramid is deeper); used only for segmentation on slices.",
        )
        head_dropout: float = Field(
            default=0.0, ge=0, lt=1, description="Dropout before the classification layer."
        )

        @field_validator("model")
        @classmethod
        def _known_model(cls, value: str) -> str:
            import timm

            if not timm.is_model(value):
                from medssl_bench.errors import did_you_mean

                raise ValueError(
                    f"timm has no model named {value!r}.{did_you_mean(value, timm.list_models())}"
                )
            return value

    presets = {
        # A narrow DenseNet (growth 8, two layers per block; ~30k parameters) for a 2-core CPU.
        "quick": {"model": "densenet121",
                  "model_kwargs": {"growth_rate": 8, "block_config": [2, 2, 2, 2]}},
        "paper": {"model": "densenet121", "model_kwargs": {}},
    }

    def build_encoder(self, in_channels: int) -> Timm2DEncoder:
        cfg = self.config
        encoder = Timm2DEncoder(cfg.model, in_channels, cfg.out_indices, cfg.model_kwargs)
        self._multiple = max(encoder.reductions)  # spares size_multiple() a throw-away build
        return encoder

    def build_decoder(
        self, encoder: Encoder, out_channels: int, skip_connections: bool = True
    ) -> PyramidDecoder:
        reductions = getattr(encoder, "reductions", None) or [2] * len(encoder.feature_channels)
        return PyramidDecoder(encoder.feature_channels, reductions, out_channels,
                              self.config.decoder_channels, skip_connections)

    def build_classifier(self, encoder: Encoder, num_classes: int) -> PooledClassifier:
        return PooledClassifier(encoder.feature_channels[-1], num_classes, self.config.head_dropout)

    def size_multiple(self) -> int:
        """The deepest reduction (32 for the usual five-level timm pyramids), read from a
        throw-away encoder once, so it is right for any model and ``out_indices``."""
        if getattr(self, "_multiple", None) is None:
            self._multiple = max(self.build_encoder(1).reductions)
        return self._multiple
