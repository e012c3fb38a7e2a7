"""The 3D U-Net of Models Genesis (Zhou et al. 2019/2021), layer for layer and name for name
as its published PyTorch model definition (``pytorch/unet3d.py`` of MrGiovanni/ModelsGenesis),
so the published weights (``Genesis_Chest_CT.pt``) load by their own keys.

The published network, as its code builds it (channels at ``width`` 1):

- four ``DownTransition``\\ s ``down_tr64``/``down_tr128``/``down_tr256``/``down_tr512``, each
  ``ops`` = two ``LUConv`` (``conv1``: 3x3x3 conv with bias, ``bn1``: batch norm,
  ``activation``): 1->32->64, 64->64->128, 128->128->256, 256->256->512, a 2x max-pool
  after each but the last;
- three ``UpTransition``\\ s ``up_tr256``/``up_tr128``/``up_tr64``: ``up_conv`` (2x2x2
  transposed conv, stride 2, keeping the channels: 512->512, 256->256, 128->128), the
  skip concatenated, ``ops`` = two ``LUConv`` (768->256->256, 384->128->128, 192->64->64);
- ``out_tr.final_conv``: a 1x1x1 conv to ``n_class`` maps, then a sigmoid.

Our split: the encoder holds the four ``down_tr*`` modules under the same names; the decoder
the three ``up_tr*`` modules and, as every backbone's decoder must (``Backbone.build_decoder``),
its final layer as ``out``: the published ``out_tr.final_conv`` (importing renames that one
prefix; the sigmoid is left to the loss, which takes logits). The published normalisation,
``ContBatchNorm3d``, always normalises with the batch's statistics (training and evaluation
alike; its running statistics are updated in training but never used): ``norm: contbatch``,
the default.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from medssl_bench.config import PluginConfig
from medssl_bench.interfaces import Backbone, Encoder
from medssl_bench_backbones.unet3d import PooledClassifier

#: The published names of the encoder's and decoder's levels, highest resolution first.
DOWN = ("down_tr64", "down_tr128", "down_tr256", "down_tr512")
UP = ("up_tr64", "up_tr128", "up_tr256")


class ContBatchNorm3d(nn.BatchNorm3d):
    """Batch norm that always uses the batch's statistics (Models Genesis' ``ContBatchNorm3d``):
    the same output in ``train()`` and ``eval()``; the state dict of ``nn.BatchNorm3d``, whose
    subclass it is so that code handling batch norm (SparK's masked normalisation) handles it
    (in training, where the two agree).

    Unlike the published layer, evaluation leaves the running statistics alone (the published
    one moves them towards every validation and test batch): an evaluation must not change
    the model, and under DDP each process evaluates other batches, so the stored statistics
    would depend on the number of processes. The layer never uses them itself; they matter
    to weights loaded with ``norm: batch``."""

    #: In training, plain batch norm: under DDP it may take the global batch's statistics
    #: (:mod:`medssl_bench.sync_norm`); in evaluation it keeps its own batch's.
    training_forward_is_batch_norm = True

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        track = self.training and self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        if track:  # counted as nn.BatchNorm3d counts
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # nn.BatchNorm3d's cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(input, self.running_mean if track else None,
                            self.running_var if track else None, self.weight, self.bias,
                            True, momentum, self.eps)


def _activation(kind: str, channels: int) -> nn.Module:
    if kind == "prelu":
        return nn.PReLU(channels)
    if kind == "elu":
        return nn.ELU(inplace=True)
    return nn.ReLU(inplace=True)


class LUConv(nn.Module):
    """3x3x3 convolution (with bias), batch norm, activation: ``conv1``, ``bn1``, ``activation``."""

    def __init__(self, cin: int, cout: int, norm: str, act: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
        self.bn1 = ContBatchNorm3d(cout) if norm == "contbatch" else nn.BatchNorm3d(cout)
        self.activation = _activation(act, cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.bn1(self.conv1(x)))


class DownTransition(nn.Module):
    """Two LUConvs (``ops``); the caller max-pools between levels."""

    def __init__(self, cin: int, mid: int, cout: int, norm: str, act: str) -> None:
        super().__init__()
        self.ops = nn.Sequential(LUConv(cin, mid, norm, act), LUConv(mid, cout, norm, act))

    def forward(self, x: Tensor) -> Tensor:
        return self.ops(x)


class UpTransition(nn.Module):
    """``up_conv`` (2x transposed conv, channels kept), concatenation with the skip, ``ops``."""

    def __init__(self, cin: int, skip: int, cout: int, norm: str, act: str) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(cin, cin, kernel_size=2, stride=2)
        self.ops = nn.Sequential(LUConv(cin + skip, cout, norm, act),
                                 LUConv(cout, cout, norm, act))

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        x = self.up_conv(x)
        if skip is not None:
            x = torch.cat((x, skip), 1)
        return self.ops(x)


class GenesisEncoder(Encoder):
    """``down_tr64`` .. ``down_tr512``; features are each level's output before pooling."""

    spatial_dims = 3

    def __init__(self, in_channels: int, base: int, norm: str, act: str) -> None:
        super().__init__()
        self.in_channels = in_channels
        chans = [base * 2**d for d in range(5)]  # 32, 64, 128, 256, 512 at width 1
        self.feature_channels = chans[1:]
        self.stem_weight_key = "down_tr64.ops.0.conv1.weight"
        cin = in_channels
        for depth, name in enumerate(DOWN):
            setattr(self, name, DownTransition(cin, chans[depth], chans[depth + 1], norm, act))
            cin = chans[depth + 1]
        self.maxpool = nn.MaxPool3d(2)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for depth, name in enumerate(DOWN):
            if depth:
                x = self.maxpool(x)
            x = getattr(self, name)(x)
            features.append(x)
        return features


class GenesisDecoder(nn.Module):
    """``up_tr256``, ``up_tr128``, ``up_tr64``, then ``out`` (the published
    ``out_tr.final_conv``)."""

    def __init__(self, feature_channels: list[int], out_channels: int, norm: str, act: str,
                 skip_connections: bool) -> None:
        super().__init__()
        self.skip_connections = skip_connections
        for level in reversed(range(len(UP))):  # up_tr256 first, as published
            name = UP[level]  # up_tr64 joins features 0 and 1, ...
            deep, shallow = feature_channels[level + 1], feature_channels[level]
            setattr(self, name, UpTransition(deep, shallow if skip_connections else 0, shallow,
                                             norm, act))
        self.out = nn.Conv3d(feature_channels[0], out_channels, kernel_size=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        for level in reversed(range(len(UP))):
            skip = features[level] if self.skip_connections else None
            x = getattr(self, UP[level])(x, skip)
        return self.out(x)


class GenesisUNet3D(Backbone):
    """The Models Genesis 3D U-Net, named as its published code (its weights load as they are)."""

    name = "genesis-unet3d"
    spatial_dims = 3

    class Config(PluginConfig):
        width: float = Field(
            default=1.0, gt=0, le=4,
            description="Multiplier on every level's channels (published: 1.0, i.e. 32/64 .. "
            "256/512; the published weights need 1.0; 0.25 for CPU trials).")
        norm: Literal["contbatch", "batch"] = Field(
            default="contbatch",
            description="contbatch: the published ContBatchNorm3d (the batch's statistics in "
            "training and evaluation alike); batch: PyTorch's BatchNorm3d (running statistics "
            "at evaluation). Both have the same weights.")
        act: Literal["relu", "prelu", "elu"] = Field(
            default="relu", description="The activation of every LUConv (published weights: "
            "relu; prelu and elu are the definition's other options).")
        head_dropout: float = Field(
            default=0.0, ge=0, lt=1, description="Dropout before the classification layer.")

    presets = {"quick": {"width": 0.25}, "paper": {"width": 1.0}}

    def _base(self) -> int:
        return max(1, round(32 * self.config.width))

    def build_encoder(self, in_channels: int) -> GenesisEncoder:
        return GenesisEncoder(in_channels, self._base(), self.config.norm, self.config.act)

    def build_decoder(self, encoder: Encoder, out_channels: int,
                      skip_connections: bool = True) -> GenesisDecoder:
        return GenesisDecoder(encoder.feature_channels, out_channels, self.config.norm,
                              self.config.act, skip_connections)

    def build_classifier(self, encoder: Encoder, num_classes: int) -> PooledClassifier:
        return PooledClassifier(encoder.feature_channels[-1], num_classes,
                                self.config.head_dropout)

    def size_multiple(self) -> int:
        return 2 ** (len(DOWN) - 1)

    def min_input_size(self) -> int:
        """Batch statistics (in evaluation too, with contbatch) need more than one voxel per
        channel at the deepest level, even for one image."""
        return 2 * self.size_multiple()
