"""SparK (Tian et al., ICLR 2023), in 3D as in Wald et al. 2025 ("Revisiting MAE pre-training
for 3D medical image segmentation", MIC-DKFZ/nnssl): masked image modelling for CNNs.

Masked patches are *empty* through the whole encoder: sparse convolution emulated densely,
as both reference codes do (keyu-tian/SparK ``pretrain/encoder.py``; nnssl
``architectures/spark_utils.py``): every convolution's and pooling's output is multiplied by
the mask at its resolution, and every normalisation computes its statistics over the visible
voxels only. The decoder is U-Net-like and "densifies": at every scale the empty positions of
the encoder's features are filled with a learned mask token (one per scale) after a sparse
normalisation, then projected (3^3 convolution; identity at the deepest scale), and the
backbone's own decoder with skip connections reconstructs the volume. The loss is an MSE on
the masked patches only, against per-patch normalised intensities. The encoder transfers
unchanged: nothing of it is replaced.

How the encoder is made sparse without touching the backbone's code: :meth:`SparK3D.build_heads`
registers forward hooks on the given encoder: a pre-hook on the encoder zeroes the masked
input voxels; a hook on every ``Conv3d``, ``MaxPool3d`` and ``AvgPool3d`` multiplies its output
by the mask at the output's resolution; a hook on every ``InstanceNorm3d``, ``BatchNorm3d`` and
``GroupNorm`` replaces its output by the masked normalisation of its input (BatchNorm's running
statistics too). The hooks read the current mask from the task; outside ``compute_loss`` no
mask is set and they change nothing, so fine-tuning (which builds a new encoder anyway) is
unaffected. Any 3D backbone built from these layers (and parameter-free pointwise ones) works;
an encoder holding another layer with parameters (a linear layer, attention, layer norm, a
transposed convolution) is refused with a ConfigError naming the layer.

Paper and code facts: SparK masks on the grid of the deepest feature map (patch = the
encoder's downsampling ratio, 32 for ResNet/ConvNeXt) at a ratio of 0.6 (``arg_util.py``
``mask: 0.6``), keeps ``round(L * (1 - ratio))`` patches, fills the masked input with zeros,
densifies with a sparse batch norm for ResNets (layer norm for ConvNeXt), mask tokens
(trunc-normal, std 0.02) and projections (1x1 at the deepest scale unless the widths match,
3x3 elsewhere), decodes with a light U-Net decoder, and computes the MSE on masked patches
against per-patch normalised targets (``(x - mean) / (var + 1e-6) ** .5``). nnssl's
Spark-3D (``SparkTrainer``, ``SparK3D``, ``SparkLoss``) uses a ResEnc-L with its own U-Net
decoder, 160^3 crops, 16^3 mask blocks (``mask_creation(block_size=16)``), a ratio of
0.75, a sparse *instance* norm in the densifier, and a plain MSE on raw intensities of the
masked voxels: those are options here.
Our decoder is always the backbone's U-Net decoder (as nnssl), not SparK's 2D LightDecoder.
At scales coarser than the mask grid (a patch smaller than the encoder's stride, as nnssl's
16^3 blocks under a stride-32 encoder) nnssl counts every position as visible; we keep a
coarse cell empty when every patch it covers is masked and visible otherwise (the rule of a
strided sparse convolution), which equals nnssl's wherever a cell covers any visible patch.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from medssl_bench.config import PluginConfig
from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import Backbone, Encoder
from medssl_bench.sync_norm import SyncedBatchNorm
from medssl_bench_tasks.masking import (
    SUPPORTED_NORMS,
    PatchMaskingTask,
    expand_to,
    masked_norm,
    normalise_patches,
    patchify,
)

MASKED_OUTPUT = (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)


class SparKConfig(PluginConfig):
    """SparK options: the paper's (and its code's) defaults; nnssl's 3D values as options."""

    mask_ratio: float = Field(
        default=0.6, gt=0, lt=1,
        description="Share of patches masked (SparK: 0.6, arg_util.py; nnssl Spark-3D and Wald "
        "et al. 2025: 0.75). L - round(L * (1 - ratio)) per sample.")
    mask_patch_size: int = Field(
        default=32, ge=2,
        description="Side of the cubic masked patches in voxels (SparK: the encoder's "
        "downsampling ratio, 32 for ResNet/ConvNeXt; nnssl Spark-3D: 16, mask_creation "
        "block_size, with a stride-32 ResEnc-L). Must divide every side of the volume; it is "
        "also the patch of the per-patch target normalisation.")
    target_norm: Literal["patch", "none"] = Field(
        default="patch",
        description="patch: each target patch minus its mean over its standard deviation "
        "(SparK spark.py); none: raw intensities (nnssl SparkLoss).")
    densify_norm: Literal["batch", "instance", "none"] = Field(
        default="batch",
        description="Sparse normalisation of each scale's features before the mask tokens "
        "fill them: batch (SparK's sparse batch norm for ResNets), instance (nnssl Spark-3D's "
        "SparseInstanceNorm3d), none (nnssl EfficientSpark3D).")
    densify_proj: bool = Field(
        default=True,
        description="Project each densified scale (3^3 convolution; identity at the deepest, "
        "where encoder and decoder widths match) before the decoder (SparK and nnssl SparK3D); "
        "false: the token fill alone (nnssl EfficientSpark3D).")
    mask_tokens: bool = Field(
        default=True,
        description="Fill the empty positions with a learned token per scale (SparK); false: "
        "they stay zero (nnssl SparkNoTokenTrainer, use_mask_token=False).")


class SparseMask:
    """The current mask, read by the encoder's hooks; ``None`` outside ``compute_loss``."""

    def __init__(self) -> None:
        self.mask: Tensor | None = None  # (B, *grid) bool, True = masked
        self.cache: dict[tuple[int, ...], Tensor] = {}
        self.calls = 0

    def set(self, mask: Tensor | None) -> None:
        self.mask, self.cache, self.calls = mask, {}, 0

    def active(self, size: tuple[int, ...]) -> Tensor:
        """``(B, 1, *size)`` bool: the visible voxels at a feature resolution."""
        if size not in self.cache:
            self.cache[size] = ~expand_to(self.mask, size)
        return self.cache[size]


def _unsupported(encoder: nn.Module) -> list[str]:
    bad = []
    for name, module in encoder.named_modules():
        if list(module.children()) or isinstance(module, MASKED_OUTPUT + SUPPORTED_NORMS):
            continue
        if any(True for _ in module.parameters(recurse=False)) or any(
                True for _ in module.buffers(recurse=False)):
            bad.append(f"{name} ({type(module).__name__})")
    return bad


def sparsify(encoder: Encoder, state: SparseMask) -> list:
    """Register SparK's hooks on ``encoder`` (see the module doc); returns their handles."""
    bad = _unsupported(encoder)
    if bad:
        raise ConfigError(
            "Task 'spark3d' emulates sparse convolution with hooks on Conv3d, pooling and "
            "InstanceNorm3d/BatchNorm3d/GroupNorm layers; this encoder also has "
            f"{', '.join(bad[:5])}, which cannot keep masked regions empty. Use a CNN backbone "
            "built from those layers (e.g. unet3d).")

    def zero_input(module, args):
        if state.mask is None:
            return None
        state.calls += 1
        x = args[0]
        return (x * state.active(tuple(x.shape[2:])).to(x.dtype), *args[1:])

    def mask_output(module, args, out):
        if state.mask is None:
            return None
        return out * state.active(tuple(out.shape[2:])).to(out.dtype)

    def stash(module, args):
        if state.mask is None:
            return
        if getattr(module, "running_mean", None) is not None:
            module._spark_stash = (module.running_mean.clone(), module.running_var.clone())
        if isinstance(module, SyncedBatchNorm):  # DDP: no all-gather for the dense output
            module.output_replaced = True

    def renormalise(module, args, out):
        if state.mask is None:
            return None
        stashed = getattr(module, "_spark_stash", None)
        module._spark_stash = None
        if isinstance(module, SyncedBatchNorm):
            module.output_replaced = False
        return masked_norm(module, args[0], state.active(tuple(out.shape[2:])), stashed)

    handles = [encoder.register_forward_pre_hook(zero_input)]
    for module in encoder.modules():
        if isinstance(module, MASKED_OUTPUT):
            handles.append(module.register_forward_hook(mask_output))
        elif isinstance(module, SUPPORTED_NORMS):
            if isinstance(module, nn.BatchNorm3d):
                handles.append(module.register_forward_pre_hook(stash))
            handles.append(module.register_forward_hook(renormalise))
    return handles


class Densify(nn.Module):
    """One scale of SparK's densifier: sparse norm, mask token at empty positions, projection."""

    def __init__(self, channels: int, norm: str, token: bool, project: bool) -> None:
        super().__init__()
        if norm == "batch":
            self.norm = nn.BatchNorm3d(channels)
        elif norm == "instance":
            self.norm = nn.InstanceNorm3d(channels, affine=True)
        else:
            self.norm = None
        self.token = nn.Parameter(torch.zeros(1, channels, 1, 1, 1)) if token else None
        if self.token is not None:
            nn.init.trunc_normal_(self.token, std=0.02, a=-0.02, b=0.02)
        self.proj = nn.Conv3d(channels, channels, 3, padding=1) if project else nn.Identity()

    def forward(self, x: Tensor, active: Tensor) -> Tensor:
        if self.norm is not None:
            x = masked_norm(self.norm, x, active)
        if self.token is not None:
            x = torch.where(active, x, self.token.to(x.dtype))
        return self.proj(x)


class SparKDecoder(nn.Module):
    """Densifiers at every scale, then the backbone's U-Net decoder."""

    def __init__(self, densify: nn.ModuleList, decoder: nn.Module) -> None:
        super().__init__()
        self.densify = densify
        self.decoder = decoder

    def forward(self, features: list[Tensor], mask: Tensor) -> Tensor:
        dense = [d(f, ~expand_to(mask, tuple(f.shape[2:])))
                 for d, f in zip(self.densify, features, strict=True)]
        return self.decoder(dense)


def reconstruction_loss(prediction: Tensor, target: Tensor, mask: Tensor, patch: int,
                        target_norm: str = "patch") -> Tensor:
    """SparK's loss: the MSE per patch (over its voxels and channels), averaged over the
    masked patches only (``mask``: ``(B, *grid)`` bool, True = masked); the target is per-patch
    normalised when ``target_norm == "patch"``."""
    pred = patchify(prediction.float(), patch)
    if target_norm == "patch":
        tgt = normalise_patches(target.float(), patch)
    else:
        tgt = patchify(target.float(), patch)
    per_patch = (pred - tgt).square().mean(-1)  # (B, L)
    weight = mask.flatten(1).to(per_patch.dtype)
    return (per_patch * weight).sum() / (weight.sum() + 1e-8)


class SparK3D(PatchMaskingTask):
    """SparK: masked modelling for CNNs, masked regions kept empty through the encoder (sparse conv)."""

    name = "spark3d"
    refuses = ("tokens", "attention")  # sparse convolution emulated on a CNN's layers
    mask_rounding = "keep_round"  # SparK keeps round(L * (1 - ratio)) patches
    family = "masked-modelling"
    spatial_dims = 3
    transfers = ("encoder",)
    paper_input_size = (160, 160, 160)  # nnssl / Wald et al. 2025 pretraining crops
    # Two 32^3 patches at the default patch size (one hidden, one visible): the least input
    # whose mask is random; smaller volumes need a smaller task.mask_patch_size.
    min_input_size = (32, 32, 64)
    Config = SparKConfig
    presets = {
        "quick": {"mask_patch_size": 8, "densify_norm": "instance"},
        "paper": {"mask_ratio": 0.6, "mask_patch_size": 32, "target_norm": "patch",
                  "densify_norm": "batch"},
    }

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.sparse = SparseMask()

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        cfg = self.config
        sparsify(encoder, self.sparse)
        channels = encoder.feature_channels
        densify = nn.ModuleList(
            Densify(c, cfg.densify_norm, cfg.mask_tokens,
                    cfg.densify_proj and i < len(channels) - 1)
            for i, c in enumerate(channels))
        decoder = backbone.build_decoder(encoder, encoder.in_channels, skip_connections=True)
        return nn.ModuleDict({"reconstruct": SparKDecoder(densify, decoder)})

    def encode(self, encoder, images: Tensor, mask: Tensor) -> list[Tensor]:
        """The encoder's features with ``mask`` hidden (empty) throughout, through ``encoder(x)``."""
        self.sparse.set(mask)
        try:
            features = encoder(images)
            if self.sparse.calls == 0:
                raise RuntimeError(
                    "spark3d: the encoder has no SparK hooks; build_heads must be given the "
                    "encoder that is trained.")
            # Each stage's output, masked once more: pointwise layers after a stage's last
            # masked layer (a bias, an activation with f(0) != 0) cannot leak into the decoder.
            return [f * self.sparse.active(tuple(f.shape[2:])).to(f.dtype) for f in features]
        finally:
            self.sparse.set(None)

    def compute_loss(self, encoder, heads, batch):
        images, mask = batch["images"], batch["mask"]
        features = self.encode(encoder, images, mask)
        prediction = heads["reconstruct"](features, mask)
        loss = reconstruction_loss(prediction, images, mask, self.config.mask_patch_size,
                                   self.config.target_norm)
        return loss, {}
