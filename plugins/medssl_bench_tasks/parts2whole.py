"""Parts2Whole (Feng et al., DART 2020): reconstruct a whole sub-volume from one of its parts.

A part is a random crop covering between 1/16 and 1/4 of the volume, with a random aspect
ratio, resized back to the input size; an encoder-decoder *without* skip connections (so
the bottleneck must encode the whole) reconstructs the whole under an MSE (the paper's
Euclidean distance). Only the encoder transfers: the paper fine-tunes with a randomly
initialised decoder.

All crops of a batch are one ``affine_grid`` + ``grid_sample``: a crop box is an affine
scale and translation of the normalised grid, so there is no per-sample loop. The paper
does not say what size parts are resized to; we use the input size (the decoder outputs
the whole at that size).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from medssl_bench.config import PluginConfig
from medssl_bench.interfaces import Backbone, Encoder, ProxyTask
from medssl_bench_tasks.restoration import dirichlet3, rand


class Parts2WholeConfig(PluginConfig):
    """Parts2Whole options (paper 002, section 2)."""

    min_fraction: float = Field(
        default=1 / 16, gt=0, le=1,
        description="Smallest part, as a fraction of the volume (paper: more than 1/16).")
    max_fraction: float = Field(
        default=1 / 4, gt=0, le=1,
        description="Largest part, as a fraction of the volume (paper: less than 1/4).")
    aspect_concentration: int = Field(
        default=2, ge=1, le=100,
        description="Random aspect ratio: the part's log-volume is split over the three axes "
        "by Dirichlet(k, k, k) weights; larger k gives more cube-like parts (the paper only "
        "says 'random aspect ratios'; 2 is our choice, side ratios rarely beyond 4:1).")
    interpolation: str = Field(
        default="bilinear", pattern="^(bilinear|nearest)$",
        description="Resampling when a part is resized to the input size (bilinear is "
        "trilinear in 3D; the paper does not say).")

    @model_validator(mode="after")
    def _ordered(self) -> Parts2WholeConfig:
        if self.min_fraction > self.max_fraction:
            raise ValueError("min_fraction must not exceed max_fraction")
        return self


def sample_parts(
    batch: int, low: float, high: float, concentration: int, generator, device
) -> tuple[Tensor, Tensor]:
    """Crop boxes in normalised coordinates: ``scale`` (side fractions, ``(B, 3)`` in D, H, W
    order, product = volume fraction in [low, high]) and ``centre`` (``(B, 3)`` in [-1, 1],
    keeping the box inside the volume)."""
    fraction = low + (high - low) * rand((batch, 1), generator, device)
    weights = dirichlet3(batch, concentration, generator, device)
    scale = fraction.pow(weights)  # each side in [fraction, 1], product = fraction
    centre = (2 * rand((batch, 3), generator, device) - 1) * (1 - scale)
    return scale, centre


def crop_and_resize(images: Tensor, scale: Tensor, centre: Tensor, mode: str) -> Tensor:
    """Each sample's box ``centre +- scale`` (normalised, D/H/W order) resampled to the full
    input size with one batched ``grid_sample``."""
    batch = images.shape[0]
    theta = torch.zeros(batch, 3, 4, device=images.device, dtype=images.dtype)
    # affine_grid's x, y, z are W, H, D.
    for row, axis in enumerate((2, 1, 0)):
        theta[:, row, row] = scale[:, axis]
        theta[:, row, 3] = centre[:, axis]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


class Parts2Whole3D(ProxyTask):
    """Parts2Whole: reconstruct the whole 3D sub-volume from a resized random part of it."""

    name = "parts2whole3d"
    family = "restoration"
    spatial_dims = 3
    transfers = ("encoder",)
    paper_input_size = (128, 128, 64)
    min_input_size = (16, 16, 16)
    Config = Parts2WholeConfig

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        decoder = backbone.build_decoder(encoder, encoder.in_channels, skip_connections=False)
        return nn.ModuleDict({"decoder": decoder})

    def make_batch(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        cfg = self.config
        with torch.autocast(images.device.type, enabled=False):
            images = images.float()
            scale, centre = sample_parts(images.shape[0], cfg.min_fraction, cfg.max_fraction,
                                         cfg.aspect_concentration, generator, images.device)
            parts = crop_and_resize(images, scale, centre, cfg.interpolation)
        return {"inputs": parts, "targets": images}

    def compute_loss(self, encoder, heads, batch):
        whole = torch.sigmoid(heads["decoder"](encoder(batch["inputs"])).float())
        return F.mse_loss(whole, batch["targets"].float()), {}
