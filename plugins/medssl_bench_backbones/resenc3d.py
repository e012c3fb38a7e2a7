"""nnU-Net's residual-encoder U-Net (ResEnc, Isensee et al. 2024) from the
dynamic-network-architectures package nnU-Net itself uses, ResEnc-L by default.

Layout (nnU-Net v2's ``ResEncUNetPlanner``, the configuration nnssl/OpenMind pretrain): a stem
(one conv-norm-nonlin block at full resolution), then ``n_stages`` stages of residual
``BasicBlockD`` blocks; the first stage keeps the resolution, every later stage halves it
(stride 2, ``conv`` pooling, i.e. a strided first conv). Features start at 32 and double per
stage up to 320; blocks per stage are (1, 3, 4, 6, 6, 6, 6, ...); 3^3 kernels, conv bias,
instance norm (eps 1e-5, affine), leaky ReLU (slope 0.01). The decoder is nnU-Net's
``UNetDecoder``: per stage a transposed conv (kernel = stride) to the skip's channels,
concatenation with the skip, one conv-norm-nonlin block; deep supervision off.

Sizes: nnU-Net's M/L/XL planners share that rule and differ only in the GPU memory they plan
for (8/24/40 GB), which buys a larger patch; the number of stages follows from the patch
(pool while the coarsest edge stays >= 4 voxels). On isotropic data: ``L`` is the 6-stage
network of OpenMind's 160^3 crops (32, 64, 128, 256, 320, 320; nnssl's ResEnc-L), ``M`` the
5-stage one the 8 GB target gives (a patch near 112^3) and ``XL`` the 6-stage one of a
~192^3 patch (the same layout as L; a larger patch, not more stages). ``n_stages``,
``base_features``, ``max_features``, ``blocks_per_stage`` override any of them.

KEY LAYOUT (for weight import; :data:`LIBRARY_PREFIXES`, :meth:`ResEnc3D.library_key_rules`).
The library's ``ResidualEncoderUNet`` state dict maps onto ours by prefixes alone:

- ``encoder.*`` -> our encoder, prefix removed: ``stem.convs.0.conv.weight``,
  ``stages.S.blocks.B.conv1.conv.weight``, ``stages.S.blocks.B.skip.1.conv.weight`` ...
- ``decoder.transpconvs.*``, ``decoder.stages.*`` -> our decoder, ``decoder.`` removed.
- ``decoder.seg_layers.{n_stages-2}.*`` (the full-resolution segmentation layer) -> our
  decoder's ``out.*`` (the interface's replaceable final layer).
- dropped: ``decoder.seg_layers.{0..n_stages-3}.*`` (deep-supervision heads, off here) and
  ``decoder.encoder.*`` (the library decoder keeps a reference to the encoder, so every
  encoder tensor appears twice in its state dict).
- dropped everywhere: ``*.all_modules.N.*``. The library's ``ConvDropoutNormReLU`` registers
  its conv and norm twice (as ``conv``/``norm`` and inside the ``all_modules`` sequence it
  runs); our modules keep ``all_modules`` as a plain attribute, so each tensor is stored once
  (safetensors refuses tensors that share memory) under its ``conv``/``norm`` name.

A checkpoint that followed those rules loads strictly and computes what the library network
computes (tests/test_backbone_resenc3d.py checks both).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import (
    InitWeights_He,
    init_last_bn_before_add_to_0,
)
from pydantic import Field, model_validator
from torch import Tensor, nn

from medssl_bench.config import PluginConfig
from medssl_bench.interfaces import Backbone, Encoder
from medssl_bench_backbones.library_keys import PrefixRule, SplitState, split_library_state
from medssl_bench_backbones.unet3d import PooledClassifier

#: Where our parts sit in the library network's state dict (see the module docstring for the
#: renamed output layer and the dropped duplicates).
LIBRARY_PREFIXES: dict[str, str] = {"encoder": "encoder.", "decoder": "decoder."}
#: The path segment of the library's duplicate registrations, dropped from every state dict.
ALIAS_SEGMENT = "all_modules."
#: nnU-Net's encoder blocks per stage (``ResEncUNetPlanner.UNet_blocks_per_stage_encoder``).
NNUNET_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
#: Stages per size on isotropic data (see the module docstring).
SIZES: dict[str, int] = {"M": 5, "L": 6, "XL": 6}


def _unregister_aliases(module: nn.Module) -> None:
    """Keep every ``all_modules`` sequence as a plain attribute: its members stay registered
    under their own names (``conv``, ``norm``, ``nonlin``, ``dropout``), so ``.to()``,
    ``train()`` and the optimizer still reach them, but each tensor is stored once."""
    for sub in list(module.modules()):
        seq = sub._modules.pop("all_modules", None)
        if seq is not None:
            object.__setattr__(sub, "all_modules", seq)


class ResEncEncoder(Encoder):
    """The library's ``ResidualEncoder`` (its ``stem`` and ``stages``), returning every
    stage's output, highest resolution first."""

    spatial_dims = 3

    def __init__(self, in_channels: int, cfg: ResEnc3D.Config) -> None:
        super().__init__()
        kw = cfg.library_kwargs()
        lib = ResidualEncoder(in_channels, kw["n_stages"], kw["features_per_stage"], nn.Conv3d,
                              kw["kernel_sizes"], kw["strides"], kw["n_blocks_per_stage"],
                              kw["conv_bias"], kw["norm_op"], kw["norm_op_kwargs"], None, None,
                              nn.LeakyReLU, kw["nonlin_kwargs"], return_skips=True)
        self.stem = lib.stem
        self.stages = lib.stages
        self.in_channels = in_channels
        self.feature_channels = list(kw["features_per_stage"])
        self.feature_strides = [2 ** i for i in range(kw["n_stages"])]
        self.stem_weight_key = "stem.convs.0.conv.weight"
        self.kernel_sizes = kw["kernel_sizes"]
        _unregister_aliases(self)
        _initialize(self, cfg.negative_slope)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class ResEncDecoder(nn.Module):
    """nnU-Net's ``UNetDecoder`` without deep supervision, its full-resolution segmentation
    layer as ``out``. ``skip_connections=False`` (Parts2Whole's plain encoder-decoder): the
    stage blocks take the upsampled features alone."""

    def __init__(self, encoder: ResEncEncoder, out_channels: int, cfg: ResEnc3D.Config,
                 skip_connections: bool) -> None:
        super().__init__()
        kw = cfg.library_kwargs()
        self.skip_connections = skip_connections
        chans, kernels = encoder.feature_channels, encoder.kernel_sizes
        transpconvs, stages = [], []
        for s in range(1, len(chans)):
            below, skip = chans[-s], chans[-(s + 1)]
            transpconvs.append(nn.ConvTranspose3d(below, skip, 2, 2, bias=kw["conv_bias"]))
            stages.append(StackedConvBlocks(
                cfg.decoder_convs, nn.Conv3d, 2 * skip if skip_connections else skip, skip,
                kernels[-(s + 1)], 1, kw["conv_bias"], kw["norm_op"], kw["norm_op_kwargs"],
                None, None, nn.LeakyReLU, kw["nonlin_kwargs"]))
        self.stages = nn.ModuleList(stages)
        self.transpconvs = nn.ModuleList(transpconvs)
        self.out = nn.Conv3d(chans[0], out_channels, 1, 1, 0, bias=True)
        _unregister_aliases(self)
        _initialize(self, cfg.negative_slope)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages, strict=True)):
            x = up(x)
            if self.skip_connections:
                x = torch.cat((x, features[-(s + 2)]), 1)
            x = stage(x)
        return self.out(x)


def _initialize(module: nn.Module, negative_slope: float) -> None:
    """nnU-Net's initialisation (``ResidualEncoderUNet.initialize``): He-normal convs, zero
    bias, and each residual block's last norm at zero so blocks start as identities."""
    module.apply(InitWeights_He(negative_slope))
    module.apply(init_last_bn_before_add_to_0)


class ResEnc3D(Backbone):
    """nnU-Net's residual-encoder U-Net (ResEnc-L by default; M, XL), from nnU-Net's own code.

    Built from dynamic-network-architectures' modules, so nnU-Net and OpenMind ResEnc
    checkpoints load by key prefix (module docstring: KEY LAYOUT)."""

    name = "resenc3d"
    spatial_dims = 3

    class Config(PluginConfig):
        size: Literal["M", "L", "XL"] = Field(
            default="L",
            description="nnU-Net's ResEnc preset: L (6 stages, 32-320 features; OpenMind's "
            "ResEnc-L), M (5 stages), XL (6 stages; nnU-Net's XL plans a larger patch, not a "
            "deeper network). n_stages etc. override it.")
        n_stages: int | None = Field(
            default=None, ge=2, le=8,
            description="Resolution stages (the first at full resolution, each later one "
            "halves it); None: the size's. Inputs must be multiples of 2**(n_stages-1).")
        base_features: int = Field(
            default=32, ge=1, description="Features of the first stage (nnU-Net: 32); each "
            "later stage doubles them up to max_features.")
        max_features: int = Field(
            default=320, ge=1, description="Cap on features per stage (nnU-Net 3D: 320).")
        blocks_per_stage: list[int] | None = Field(
            default=None, min_length=2,
            description="Residual blocks per encoder stage; None: nnU-Net's 1, 3, 4, 6, 6, "
            "6, ... for the stages.")
        decoder_convs: int = Field(
            default=1, ge=1, description="Conv blocks per decoder stage (nnU-Net: 1).")
        kernel_size: Literal[3, 5] = Field(
            default=3, description="Conv kernel side (nnU-Net on isotropic data: 3).")
        norm: Literal["instance", "batch"] = Field(
            default="instance",
            description="Normalisation (nnU-Net: instance norm, eps 1e-5, affine).")
        negative_slope: float = Field(
            default=0.01, ge=0, lt=1, description="Leaky ReLU slope (nnU-Net: 0.01).")
        head_dropout: float = Field(
            default=0.0, ge=0, lt=1, description="Dropout before the classification layer.")

        @model_validator(mode="after")
        def _blocks_match_stages(self):
            if self.blocks_per_stage is not None and len(self.blocks_per_stage) != self.stages():
                raise ValueError(
                    f"blocks_per_stage has {len(self.blocks_per_stage)} entries for "
                    f"{self.stages()} stages: give one per stage or set n_stages to match")
            return self

        def stages(self) -> int:
            return self.n_stages or (len(self.blocks_per_stage) if self.blocks_per_stage
                                     else SIZES[self.size])

        def library_kwargs(self) -> dict:
            """The dynamic-network-architectures arguments (nnU-Net's plans'
            ``arch_kwargs``), without input channels and classes."""
            n = self.stages()
            norm = nn.InstanceNorm3d if self.norm == "instance" else nn.BatchNorm3d
            return {
                "n_stages": n,
                "features_per_stage": [min(self.max_features, self.base_features * 2 ** i)
                                       for i in range(n)],
                "kernel_sizes": [[self.kernel_size] * 3] * n,
                "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                "n_blocks_per_stage": list(self.blocks_per_stage or NNUNET_BLOCKS[:n]),
                "n_conv_per_stage_decoder": [self.decoder_convs] * (n - 1),
                "conv_bias": True,
                "norm_op": norm,
                "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                "nonlin_kwargs": {"negative_slope": self.negative_slope, "inplace": True},
            }

    presets = {
        # 4 stages, 8-64 features, fewer blocks: a CPU minute, the same modules and keys
        "quick": {"n_stages": 4, "base_features": 8, "max_features": 64,
                  "blocks_per_stage": [1, 2, 2, 2]},
        "paper": {"size": "L"},
    }

    def build_encoder(self, in_channels: int) -> ResEncEncoder:
        return ResEncEncoder(in_channels, self.config)

    def build_decoder(self, encoder: Encoder, out_channels: int,
                      skip_connections: bool = True) -> ResEncDecoder:
        return ResEncDecoder(encoder, out_channels, self.config, skip_connections)

    def build_classifier(self, encoder: Encoder, num_classes: int) -> PooledClassifier:
        return PooledClassifier(encoder.feature_channels[-1], num_classes, self.config.head_dropout)

    def size_multiple(self) -> int:
        return 2 ** (self.config.stages() - 1)

    def min_input_size(self) -> int:
        """Instance norm needs more than one voxel at the deepest stage."""
        return self.size_multiple() * (2 if self.config.norm == "instance" else 1)

    def library_key_rules(self) -> list[PrefixRule]:
        """How a ``ResidualEncoderUNet`` state dict (nnU-Net, nnssl/OpenMind) maps onto our
        encoder and decoder (module docstring): apply with
        :func:`medssl_bench_backbones.library_keys.split_library_state`."""
        last = self.config.stages() - 2
        enc, dec = LIBRARY_PREFIXES["encoder"], LIBRARY_PREFIXES["decoder"]
        return [
            PrefixRule(f"{dec}encoder.", None, reason="the library decoder's reference to "
                       "the encoder: duplicates encoder.*"),
            PrefixRule(f"{dec}seg_layers.{last}.", "decoder", "out."),
            PrefixRule(f"{dec}seg_layers.", None, reason="deep-supervision output (off)"),
            PrefixRule(enc, "encoder", ""),
            PrefixRule(dec, "decoder", ""),
        ]

    def split_library_state(self, state: Mapping[str, Tensor]) -> SplitState:
        """A ``ResidualEncoderUNet`` state dict as our ``encoder`` and ``decoder`` states
        (aliases and deep-supervision layers dropped, with reasons)."""
        return split_library_state(state, self.library_key_rules(), {
            ALIAS_SEGMENT: "duplicate registration of a conv/norm stored under its own name"})
