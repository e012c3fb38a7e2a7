"""Residual 3D U-Net (Taleb et al. 2020 appendix): five levels of residual blocks with
32/64/128/256/512 filters, max-pooling between levels, transposed-convolution decoder with
skip connections."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from medssl_bench.config import PluginConfig
from medssl_bench.interfaces import Backbone, Encoder


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.InstanceNorm3d(channels, affine=True)


class ResidualBlock(nn.Module):
    """conv3-norm-ReLU-conv3-norm plus a 1x1x1 projection of the input, then ReLU."""

    def __init__(self, cin: int, cout: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1, bias=False),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
            nn.Dropout3d(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False),
            _norm(norm, cout),
        )
        self.skip = nn.Conv3d(cin, cout, 1, bias=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.skip(x))


class UNet3DEncoder(Encoder):
    spatial_dims = 3

    def __init__(self, in_channels: int, filters: list[int], norm: str, dropout: float) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.feature_channels = list(filters)
        self.stem_weight_key = "blocks.0.body.0.weight"
        chans = [in_channels, *filters]
        self.blocks = nn.ModuleList(
            ResidualBlock(chans[i], chans[i + 1], norm, dropout) for i in range(len(filters))
        )
        self.pool = nn.MaxPool3d(2)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for i, block in enumerate(self.blocks):
            if i:
                x = self.pool(x)
            x = block(x)
            features.append(x)
        return features


class UNet3DDecoder(nn.Module):
    """Upsampling path: transposed conv x2, concatenation with the skip (optional), block;
    then, where the finest features are coarser than the input (a ViT's patch grid), one
    transposed conv by ``final_stride`` before the output layer ``out``."""

    def __init__(
        self, filters: list[int], out_channels: int, norm: str, skip_connections: bool,
        final_stride: int = 1,
    ) -> None:
        super().__init__()
        self.skip_connections = skip_connections
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for deep, shallow in zip(filters[:0:-1], filters[-2::-1], strict=True):
            self.ups.append(nn.ConvTranspose3d(deep, shallow, 2, stride=2))
            cin = 2 * shallow if skip_connections else shallow
            self.blocks.append(ResidualBlock(cin, shallow, norm, 0.0))
        finest = filters[0]
        self.final_up = (nn.ConvTranspose3d(finest, finest, final_stride, stride=final_stride)
                         if final_stride > 1 else nn.Identity())
        self.out = nn.Conv3d(finest, out_channels, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        for up, block, skip in zip(self.ups, self.blocks, features[-2::-1], strict=True):
            x = up(x)
            if self.skip_connections:
                x = torch.cat([x, skip], dim=1)
            x = block(x)
        return self.out(self.final_up(x))


class PooledClassifier(nn.Module):
    """Global average pooling of the deepest features, dropout, then a linear layer."""

    def __init__(self, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.fc(self.dropout(features[-1].flatten(2).mean(-1)))


class UNet3D(Backbone):
    """Residual 3D U-Net, 5 levels, 32-512 filters (Taleb et al. appendix)."""

    name = "unet3d"
    default = True  # of 3D backbones
    spatial_dims = 3

    class Config(PluginConfig):
        filters: list[int] = Field(
            default=[32, 64, 128, 256, 512],
            min_length=2,
            description="Filters per encoder level, highest resolution first (Taleb et al. "
            "appendix: 32, 64, 128, 256, 512). Input sizes must be multiples of 2**(levels-1).",
        )
        width: float = Field(
            default=1.0,
            gt=0,
            le=4,
            description="Multiplier on every level's filter count (0.25 for CPU runs).",
        )
        norm: Literal["instance", "batch", "group"] = Field(
            default="instance",
            description="Normalisation layer. The papers do not say; the Taleb code uses batch "
            "norm, which is unstable at the batch sizes of 3D training, so instance norm is the "
            "default.",
        )
        dropout: float = Field(
            default=0.0,
            ge=0,
            lt=1,
            description="Dropout inside encoder blocks (the Taleb code uses 0.5; the appendix "
            "does not mention it).",
        )
        head_dropout: float = Field(
            default=0.0, ge=0, lt=1, description="Dropout before the classification layer."
        )

    presets = {"quick": {"width": 0.25}, "paper": {"width": 1.0}}

    def _filters(self) -> list[int]:
        return [max(1, round(f * self.config.width)) for f in self.config.filters]

    def build_encoder(self, in_channels: int) -> UNet3DEncoder:
        return UNet3DEncoder(in_channels, self._filters(), self.config.norm, self.config.dropout)

    def build_decoder(
        self, encoder: Encoder, out_channels: int, skip_connections: bool = True
    ) -> UNet3DDecoder:
        return UNet3DDecoder(
            encoder.feature_channels, out_channels, self.config.norm, skip_connections
        )

    def build_classifier(self, encoder: Encoder, num_classes: int) -> PooledClassifier:
        return PooledClassifier(encoder.feature_channels[-1], num_classes, self.config.head_dropout)

    def size_multiple(self) -> int:
        return 2 ** (len(self.config.filters) - 1)

    def min_input_size(self) -> int:
        """Instance norm needs more than one voxel at the deepest level."""
        return self.size_multiple() * (2 if self.config.norm == "instance" else 1)
