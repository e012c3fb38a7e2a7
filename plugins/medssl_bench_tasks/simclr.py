"""SimCLR in 3D (Chen et al. 2020): two augmented views per volume, NT-Xent over the batch.

Every volume of a batch gives two views, each an independent draw of the augmentations: a
random resized crop (a box of a random share of the volume, stretched back to the input
size), flips, a brightness/contrast change and a Gaussian blur. The encoder's pooled
features go through a projection head (Linear - ReLU - Linear); the NT-Xent loss with a
temperature makes each view pick its partner out of all the other ``2B - 1`` views of the
batch, so every other volume's two views are negatives.

How it is built (batched, on the device, all randomness from the generator): the crop and
the flips of a view are one axis-aligned output-to-input map per sample, resampled by the
exemplar augmentations' resampler (:func:`medssl_bench_tasks.augment.apply_factored`: a 1D
lerp and one 2D pass, exactly trilinear); the exemplar's plane rotations are an option (``rotate_p``), its
brightness/contrast jitter another (``intensity: exemplar``); the blur is one banded
matrix per sample and axis, applied by batched matmuls.

Under DDP (``gather_negatives``) the projections of every rank are gathered, so negatives
come from the global batch; the local part keeps its gradient (the others are constants).
Without an initialised process group this is a no-op.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from medssl_bench.config import PluginConfig
from medssl_bench.interfaces import Backbone, Encoder, ProxyTask, global_pool
from medssl_bench_tasks.augment import (
    AffineFactors,
    AffineParams,
    apply_affine,
    apply_factored,
    color_jitter,
    sample_affine,
)
from medssl_bench_tasks.common import gather_with_grad


def _uniform(n: int, generator: torch.Generator, device, low: float, high: float) -> Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def resized_crop_maps(
    n: int,
    shape: tuple[int, ...],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip_p: float,
    generator: torch.Generator,
    device,
) -> Tensor:
    """``(n, d+1, d+1)`` output-to-input maps (centred voxel units, as in ``augment``) of a
    random resized crop with random flips: the box keeps a share ``U(*scale)`` of the
    volume, its sides differ by log-uniform aspect factors in ``ratio`` (normalised so their
    product is one, then each side clipped to the volume), it lies at a uniform position
    inside the volume and is stretched back to the full size; each axis is flipped with
    probability ``flip_p``."""
    d = len(shape)
    share = _uniform(n, generator, device, *scale)
    log_ratio = _uniform(n * d, generator, device, math.log(ratio[0]),
                         math.log(ratio[1])).view(n, d)
    log_ratio = log_ratio - log_ratio.mean(1, keepdim=True)
    side = (share.pow(1.0 / d).view(n, 1) * log_ratio.exp()).clamp(max=1.0)
    half = torch.tensor([(s - 1) / 2 for s in shape], device=device)
    slack = (1 - side) * half
    centre = (_uniform(n * d, generator, device, -1.0, 1.0).view(n, d)) * slack
    flip = torch.where(_uniform(n * d, generator, device, 0.0, 1.0).view(n, d) < flip_p,
                       -1.0, 1.0)
    maps = torch.zeros(n, d + 1, d + 1, device=device)
    maps[:, :d, :d] = torch.diag_embed(side * flip)
    maps[:, :d, d] = centre
    maps[:, d, d] = 1.0
    return maps


def gaussian_blur(images: Tensor, sigma: Tensor, apply: Tensor, kernel: int) -> Tensor:
    """Separable Gaussian blur of ``(N, C, *spatial)`` with one ``sigma`` per sample, on the
    samples where ``apply`` holds (the others are returned unchanged), zero padding,
    ``kernel`` taps (odd), weights normalised over the whole kernel.

    Why matrices: a per-sample kernel would need a grouped convolution, whose CPU kernel is
    slow for 3D depthwise filters (~170 ms per 128^3 volume); along each axis the blur is a
    banded ``L x L`` matrix per sample, applied by one batched matmul without moving any
    axis (about 4x faster on the CPU, and a plain GEMM on the GPU)."""
    index = apply.nonzero().flatten()
    if index.numel() == 0:
        return images
    sub = images.index_select(0, index)
    m, c = sub.shape[:2]
    shape = tuple(sub.shape[2:])
    radius = kernel // 2
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    s = sigma.index_select(0, index).float().view(m, 1)
    norm = torch.exp(-0.5 * (taps.view(1, -1) / s) ** 2).sum(1).view(m, 1, 1)
    for axis, length in enumerate(shape):
        pos = torch.arange(length, device=images.device, dtype=torch.float32)
        offset = pos.view(-1, 1) - pos.view(1, -1)
        band = torch.exp(-0.5 * (offset.view(1, length, length) / s.view(m, 1, 1)) ** 2)
        band = (band * (offset.abs() <= radius)) / norm
        band = band.to(images.dtype)
        lead = math.prod(shape[:axis])
        trail = math.prod(shape[axis + 1:])
        # out[..., i, ...] = sum_j band[i, j] x[..., j, ...]
        if trail == 1:  # the contiguous axis: rows times band^T, one GEMM per sample
            rows = sub.reshape(m, c * lead, length)
            sub = torch.bmm(rows, band.transpose(1, 2)).view(m, c, *shape)
        else:
            rows = sub.reshape(m, c * lead, length, trail)
            sub = torch.matmul(band.view(m, 1, length, length), rows).view(m, c, *shape)
    out = images.clone()
    out.index_copy_(0, index, sub)
    return out


def nt_xent(z: Tensor, positive: Tensor, temperature: float, gather: bool) -> tuple[Tensor, Tensor]:
    """NT-Xent (Chen et al. 2020, eq. 1) averaged over every view of ``z`` (``(2B, D)``): the
    cross-entropy of picking view ``positive[i]`` among all other views (of this rank, or of
    every rank when ``gather``) by cosine similarity over ``temperature``. Also returns the
    top-1 accuracy of that choice."""
    with torch.autocast(z.device.type, enabled=False):  # fp32 scores under mixed precision
        z = F.normalize(z.float(), dim=1)
        keys, offset = gather_with_grad(z) if gather else (z, 0)
        logits = z @ keys.T / temperature
    rows = torch.arange(z.shape[0], device=z.device)
    logits[rows, rows + offset] = float("-inf")  # a view is never its own negative
    target = positive + offset
    loss = F.cross_entropy(logits, target)
    with torch.no_grad():
        acc = (logits.argmax(1) == target).float().mean()
    return loss, acc


class SimCLR3D(ProxyTask):
    """SimCLR in 3D: two augmented views per volume, NT-Xent against the rest of the batch."""

    name = "simclr3d"
    family = "contrastive"
    spatial_dims = 3
    paper_input_size = (128, 128, 128)
    min_input_size = (16, 16, 16)
    presets = {"quick": {"projection_dim": 64}}

    class Config(PluginConfig):
        temperature: float = Field(default=0.1, gt=0, description="NT-Xent temperature tau "
                                   "(paper: 0.1 at batch 4096 for ImageNet, its best value in "
                                   "the temperature table; OpenMind/nnssl's SimCLR trainer: "
                                   "0.5).")
        projection_dim: int = Field(default=128, ge=1, description="Output size of the "
                                    "projection head g (paper: 128).")
        projection_hidden: int = Field(default=0, ge=0, description="Hidden width of the "
                                       "projection head (paper: the representation's size, "
                                       "2048 for ResNet-50; 0 = the encoder's embed_dim).")
        gather_negatives: bool = Field(default=True, description="Under DDP, take the "
                                       "negatives from every rank's views (paper: the "
                                       "global batch over all TPU cores), gathering the "
                                       "projections with gradient for the local part; a "
                                       "no-op unless torch.distributed is initialised.")
        crop_scale_min: float = Field(default=0.08, gt=0, le=1, description="Smallest share "
                                      "of the volume a random resized crop keeps (paper: "
                                      "0.08, as Inception's crop, here a share of volume).")
        crop_scale_max: float = Field(default=1.0, gt=0, le=1, description="Largest share "
                                      "of the volume a crop keeps (paper: 1.0).")
        crop_ratio_min: float = Field(default=3 / 4, gt=0, description="Smallest aspect "
                                      "factor between crop sides (paper: 3/4).")
        crop_ratio_max: float = Field(default=4 / 3, gt=0, description="Largest aspect "
                                      "factor between crop sides (paper: 4/3).")
        flip_p: float = Field(default=0.5, ge=0, le=1, description="Flip probability per "
                              "axis (paper: horizontal flips, p 0.5; in 3D every axis).")
        rotate_p: float = Field(default=0.0, ge=0, le=1, description="Probability of the "
                                "exemplar augmentation's rotation per plane (Taleb et al.; "
                                "not in SimCLR's default set, where rotation was studied but "
                                "not kept: 0).")
        intensity: Literal["simclr", "exemplar"] = Field(
            default="simclr", description="simclr: the paper's colour distortion reduced to "
            "one grey channel: brightness and contrast factors U(1 - 0.8 s, 1 + 0.8 s) "
            "(torchvision ColorJitter(0.8 s); saturation and hue do not exist in grey); "
            "exemplar: the exemplar task's additive brightness (+-0.125) and contrast "
            "(0.5-1.5) jitter (Taleb et al. reference code).")
        color_p: float = Field(default=0.8, ge=0, le=1, description="Probability of the "
                               "intensity change per view (paper: 0.8).")
        color_strength: float = Field(default=1.0, ge=0, le=1.25, description="Colour "
                                      "distortion strength s (paper: 1.0 for ImageNet).")
        blur_p: float = Field(default=0.5, ge=0, le=1, description="Gaussian blur probability "
                              "per view (paper: 0.5).")
        blur_sigma_min: float = Field(default=0.1, gt=0, description="Smallest blur sigma in "
                                      "voxels (paper: 0.1).")
        blur_sigma_max: float = Field(default=2.0, gt=0, description="Largest blur sigma in "
                                      "voxels (paper: 2.0).")
        blur_kernel_share: float = Field(default=0.1, gt=0, le=1, description="Blur kernel "
                                         "side as a share of the smallest image side, made "
                                         "odd (paper: 10% of the image side).")

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        c = self.config
        hidden = c.projection_hidden or encoder.embed_dim
        return nn.ModuleDict({"projection": nn.Sequential(
            nn.Linear(encoder.embed_dim, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, c.projection_dim))})

    def augment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """One independent view of every volume (see the module docstring)."""
        c = self.config
        n, shape, device = images.shape[0], tuple(images.shape[2:]), images.device
        maps = resized_crop_maps(n, shape, (c.crop_scale_min, c.crop_scale_max),
                                 (c.crop_ratio_min, c.crop_ratio_max), c.flip_p, generator,
                                 device)
        if c.rotate_p > 0:
            rotations = AffineParams(flip_p=0.0, rotate_p=c.rotate_p, zoom_p=0.0)
            views = apply_affine(images,
                                 sample_affine(n, shape, rotations, generator, device) @ maps)
        else:
            # axis-aligned: a "planar" factor of the exemplar's factored resampler (a 1D lerp
            # and one 2D pass on the CPU, half the cost of a trilinear grid_sample there)
            eye = torch.eye(len(shape) + 1, device=device).expand(n, 2, -1, -1)
            views = apply_factored(images, AffineFactors(eye, maps.unsqueeze(1)))
        if c.intensity == "exemplar":
            views = color_jitter(views, c.color_p, generator)
        else:
            on = _uniform(n, generator, device, 0.0, 1.0) < c.color_p
            spread = 0.8 * c.color_strength
            brightness = _uniform(n, generator, device, 1 - spread, 1 + spread)
            contrast = _uniform(n, generator, device, 1 - spread, 1 + spread)
            brightness = torch.where(on, brightness, 1.0)
            contrast = torch.where(on, contrast, 1.0)
            # brightness then contrast about the mean: b * (c * x + (1 - c) * mean(x)); the
            # two commute, so torchvision's random order does not matter
            mean = views.flatten(1).mean(1)
            view = (n,) + (1,) * (views.dim() - 1)
            views = torch.addcmul(((1 - contrast) * brightness * mean).view(view), views,
                                  (contrast * brightness).view(view))
        blur_on = _uniform(n, generator, device, 0.0, 1.0) < c.blur_p
        sigma = _uniform(n, generator, device, c.blur_sigma_min, c.blur_sigma_max)
        if bool(blur_on.any()):
            kernel = max(3, int(min(shape) * c.blur_kernel_share) // 2 * 2 + 1)
            views = gaussian_blur(views, sigma, blur_on, kernel)
        return views

    def make_batch(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        n = images.shape[0]
        device = images.device
        first = self.augment(images, generator)
        second = self.augment(images, generator)
        index = torch.arange(n, device=device)
        return {
            "views": torch.cat([first, second]),
            # view i and view i + n come from volume i; each is the other's positive
            "source": torch.cat([index, index]),
            "positive": torch.cat([index + n, index]),
        }

    def compute_loss(self, encoder, heads, batch):
        z = heads["projection"](global_pool(encoder(batch["views"])))
        loss, acc = nt_xent(z, batch["positive"], self.config.temperature,
                            self.config.gather_negatives)
        return loss, {"acc": acc.item()}
