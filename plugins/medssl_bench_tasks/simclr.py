"""SimCLR in 3D (Chen et al. 2020): two augmented views per volume, NT-Xent over the batch.

Every volume of a batch gives two views, each an independent draw of the augmentations: a
random resized crop (a box of a random share of the volume, stretched back to the input
size), flips, a brightness/contrast change and a Gaussian blur. The encoder's pooled
features go through a projection head (Linear - ReLU - Linear); the NT-Xent loss with a
temperature makes each view pick its partner out of all the other ``2B - 1`` views of the
batch, so every other volume's two views are negatives.

How it is built (batched, on the device, all randomness from the generator): the crop and
the flips of a view are one output-to-input affine map per sample, resampled in one
trilinear pass by :func:`medssl_bench_tasks.augment.apply_affine` (the exemplar
augmentations' resampler); the exemplar's plane rotations are an option (``rotate_p``), its
brightness/contrast jitter another (``intensity: exemplar``); the blur is one separable
grouped convolution per axis with a kernel per sample.

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
    AffineParams,
    apply_affine,
    color_jitter,
    sample_affine,
)


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
    samples where ``apply`` holds (the others are returned unchanged): one grouped
    convolution per axis, zero padding (``kernel`` odd)."""
    n, c = images.shape[:2]
    d = images.dim() - 2
    radius = kernel // 2
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    weights = torch.exp(-0.5 * (taps.view(1, -1) / sigma.to(images.dtype).view(-1, 1)) ** 2)
    weights = weights / weights.sum(1, keepdim=True)
    identity = torch.zeros_like(weights)
    identity[:, radius] = 1.0
    weights = torch.where(apply.view(-1, 1), weights, identity)
    weights = weights.repeat_interleave(c, 0)  # (n * c, kernel)
    x = images.reshape(1, n * c, *images.shape[2:])
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    for axis in range(d):
        shape = [n * c, 1] + [1] * d
        shape[2 + axis] = kernel
        padding = [0] * d
        padding[axis] = radius
        x = conv(x, weights.view(shape), padding=padding, groups=n * c)
    return x.view_as(images)


def gather_with_grad(z: Tensor) -> tuple[Tensor, int]:
    """The rows of ``z`` from every DDP rank, concatenated in rank order, with this rank's
    own rows still carrying their gradient; and the offset of this rank's rows. Without an
    initialised process group (or with one rank) ``z`` itself and 0."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(z) for _ in range(world)]
    dist.all_gather(parts, z.detach().contiguous())
    parts[rank] = z
    return torch.cat(parts), rank * z.shape[0]


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
            maps = sample_affine(n, shape, rotations, generator, device) @ maps
        views = apply_affine(images, maps)
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
