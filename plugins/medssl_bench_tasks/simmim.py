"""SimMIM (Xie et al., CVPR 2022): masked image modelling with a learned mask token at the
input, the whole volume through the encoder, a light prediction head, and an L1 loss on the
masked voxels only.

Paper and code facts (microsoft/SimMIM, ``models/simmim.py``, ``config.py``,
``configs/*/simmim_pretrain__swin_base__img192_window6__800ep.yaml``): random masking of
32x32 patches (``DATA.MASK_PATCH_SIZE``) at a ratio of 0.6 (``DATA.MASK_RATIO``), the count
``ceil(L * ratio)`` per image; masked patches replaced by a learned mask token (trunc-normal,
std 0.02); the prediction head is one 1x1 convolution from the deepest features to
``stride^2 * channels`` maps followed by a pixel shuffle back to the input size; the loss is
``sum(|x - x_rec| * mask) / (sum(mask) + 1e-5) / in_chans``: an L1 on raw intensities of the
masked pixels only. The 3D variant in MIC-DKFZ/nnssl (``SimMIMEvaTrainer``, a Primus/Eva
ViT on 160^3 crops) masks 8^3 blocks (its ViT patch) at 0.75 (``BaseMAETrainer``) and uses
an MSE on the masked voxels (``MAEMSELoss``): those are the options below.

Two paths, chosen by what the backbone provides (:meth:`SimMIM3D.build_mask_token`):

- CNN (unet3d, ...): the mask token is a learned per-channel intensity written into the
  input volume at the masked patches; the encoder then sees the whole, token-filled volume.
- ViT (a backbone providing ``"tokens"``, vit3d): as SimMIM's ViT, the token replaces the
  patch embeddings of masked patches before the position embedding is added, every token
  goes through the blocks, and the linear head (a 1x1x1 convolution to ``patch^3 *
  channels``, pixel-shuffled) predicts each patch's voxels from its token. The masked patch
  must be a whole number of ViT patches (SimMIM: 32 over a ViT patch of 16; nnssl: 8 over 8).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from medssl_bench.config import PluginConfig
from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import Backbone, Encoder
from medssl_bench_tasks.masking import PatchMaskingTask, expand_to


class SimMIMConfig(PluginConfig):
    """SimMIM options: paper defaults; the 3D values of nnssl as documented alternatives."""

    mask_ratio: float = Field(
        default=0.6, gt=0, lt=1,
        description="Share of patches masked (SimMIM: 0.6, DATA.MASK_RATIO; nnssl's 3D SimMIM, "
        "BaseMAETrainer.mask_percentage: 0.75). ceil(patches * ratio) per sample.")
    mask_patch_size: int = Field(
        default=32, ge=1,
        description="Side of the cubic masked patches in voxels (SimMIM: 32, "
        "DATA.MASK_PATCH_SIZE; nnssl's 3D SimMIM: 8, its ViT patch, on 160^3 crops). Must "
        "divide every side of the volume.")
    head: Literal["linear", "decoder"] = Field(
        default="linear",
        description="Prediction head. linear: SimMIM's one 1x1x1 convolution from the deepest "
        "features to stride^3 * channels maps, pixel-shuffled back to the input size; decoder "
        "(ours): the backbone's U-Net decoder with skip connections, a heavier head for "
        "CNNs whose deepest features are coarse.")
    loss: Literal["l1", "mse"] = Field(
        default="l1",
        description="Reconstruction loss on the masked voxels: l1 (SimMIM) or mse (nnssl's 3D "
        "SimMIM, MAEMSELoss).")


def pixel_shuffle_3d(x: Tensor, factor: int) -> Tensor:
    """``(B, C * r^3, d, h, w)`` -> ``(B, C, d * r, h * r, w * r)`` (PixelShuffle in 3D)."""
    b, cr, d, h, w = x.shape
    r = factor
    c = cr // r**3
    x = x.reshape(b, c, r, r, r, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, d * r, h * r, w * r)


class LinearHead(nn.Module):
    """SimMIM's head: a 1x1x1 convolution of the deepest features, pixel-shuffled by the
    encoder's total stride."""

    def __init__(self, features: int, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv3d(features, channels * stride**3, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        return pixel_shuffle_3d(self.proj(features[-1]), self.stride)


class InputMaskToken(nn.Module):
    """A learned per-channel intensity written into the input at masked voxels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, channels, 1, 1, 1))
        nn.init.trunc_normal_(self.token, std=0.02)  # SimMIM: trunc_normal_(std=.02)

    def forward(self, images: Tensor, masked: Tensor) -> Tensor:
        """``masked``: ``(B, 1, *spatial)`` bool, True where the token replaces the image."""
        return torch.where(masked, self.token.to(images.dtype), images)


def encoder_stride(backbone: Backbone, encoder: Encoder) -> int:
    """The deepest feature map's downsampling factor, measured by one small forward."""
    side = max(backbone.min_input_size(), backbone.size_multiple())
    side = -(-side // backbone.size_multiple()) * backbone.size_multiple()
    was_training = encoder.training
    param = next(encoder.parameters())
    probe = torch.zeros(1, encoder.in_channels, side, side, side, device=param.device,
                        dtype=param.dtype)
    encoder.eval()
    try:
        with torch.no_grad():
            deepest = encoder(probe)[-1]
    finally:
        encoder.train(was_training)
    return side // deepest.shape[-1]


def reconstruction_loss(prediction: Tensor, target: Tensor, masked: Tensor,
                        kind: str = "l1") -> Tensor:
    """SimMIM's loss: the voxel-wise error summed over masked voxels (``masked`` is
    ``(B, 1, *spatial)`` bool), divided by their count times the channel count."""
    err = (prediction.float() - target.float())
    err = err.abs() if kind == "l1" else err.square()
    weight = masked.to(err.dtype)
    return (err * weight).sum() / ((weight.sum() + 1e-5) * target.shape[1])


class TokenMaskToken(nn.Module):
    """SimMIM's ViT path: a learned token in place of masked patch embeddings; ``forward``
    gives the encoder's deepest features (``(B, D, *grid)``) of the token-filled sequence."""

    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.token = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.token, std=0.02)  # SimMIM: trunc_normal_(std=.02)

    def forward(self, encoder: Encoder, images: Tensor, mask: Tensor) -> list[Tensor]:
        """``mask``: the patch-grid mask ``(B, *grid)`` of :func:`random_patch_mask`."""
        spatial = tuple(images.shape[2:])
        masked = expand_to(mask, tuple(s // self.patch for s in spatial))
        tokens = encoder.tokens(images, masked=masked, mask_token=self.token)
        return [encoder.on_grid(encoder.encode_tokens(tokens), spatial)]


class InputMask(nn.Module):
    """SimMIM's CNN path as :class:`TokenMaskToken`'s interface: the token in the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.input = InputMaskToken(channels)

    def forward(self, encoder: Encoder, images: Tensor, mask: Tensor) -> list[Tensor]:
        return encoder(self.input(images, expand_to(mask, tuple(images.shape[2:]))))


class SimMIM3D(PatchMaskingTask):
    """SimMIM: reconstruct masked 3D patches (learned mask token at the input), L1 on masked voxels."""

    name = "simmim3d"
    family = "masked-modelling"
    spatial_dims = 3
    transfers = ("encoder",)
    paper_input_size = (160, 160, 160)  # nnssl / OpenMind pretraining crops
    # Two 32^3 patches at the default patch size (one hidden, one visible): the least input
    # whose mask is random; smaller volumes need a smaller task.mask_patch_size.
    min_input_size = (32, 32, 64)
    Config = SimMIMConfig
    presets = {
        "quick": {"mask_patch_size": 8},
        "paper": {"mask_ratio": 0.6, "mask_patch_size": 32, "loss": "l1"},
    }

    def build_mask_token(self, backbone: Backbone, encoder: Encoder) -> nn.Module:
        """The module that puts the mask token in and encodes: on the patch embeddings when
        the backbone provides tokens (a ViT), else in the input volume (see the module doc)."""
        if "tokens" not in backbone.provides:
            return InputMask(encoder.in_channels)
        patch, size = encoder.patch_size, self.config.mask_patch_size
        if size % patch:
            raise ConfigError(
                f"Task {self.name!r}: task.mask_patch_size={size} is not a multiple of the ViT "
                f"patch ({patch}, backbone.patch_size): a masked patch must be whole tokens. "
                f"Set task.mask_patch_size to {patch} or a multiple of it.")
        return TokenMaskToken(encoder.feature_channels[-1], patch)

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        token = self.build_mask_token(backbone, encoder)
        if self.config.head == "decoder":
            if isinstance(token, TokenMaskToken):
                raise ConfigError(
                    f"Task {self.name!r}: head=decoder needs the encoder's feature pyramid, "
                    "which a ViT's token-level mask does not give; use task.head=linear "
                    "(SimMIM's head for ViTs).")
            head = backbone.build_decoder(encoder, encoder.in_channels, skip_connections=True)
        else:
            head = LinearHead(encoder.feature_channels[-1], encoder.in_channels,
                              encoder_stride(backbone, encoder))
        return nn.ModuleDict({"mask_token": token, "head": head})

    def compute_loss(self, encoder, heads, batch):
        images, mask = batch["images"], batch["mask"]
        masked = expand_to(mask, tuple(images.shape[2:]))
        prediction = heads["head"](heads["mask_token"](encoder, images, mask))
        return reconstruction_loss(prediction, images, masked, self.config.loss), {}
