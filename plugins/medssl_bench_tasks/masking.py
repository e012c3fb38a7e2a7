"""Pieces shared by the masked-modelling tasks (SimMIM, SparK): patch-grid masks drawn in
one batched op, their expansion to any feature resolution, per-patch target normalisation,
and masked normalisation (statistics over the visible voxels only).

Masks live on a patch grid: ``(B, gD, gH, gW)`` bool, True where a patch is masked (hidden).
Every sample hides exactly the same number of patches (as both reference codes do).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import ProxyTask
from medssl_bench.sync_norm import batch_moments, update_running_stats


def patch_grid(spatial: tuple[int, ...], patch: int, field: str) -> tuple[int, ...]:
    """The patch grid of a volume; a ConfigError naming ``field`` if a side is no multiple."""
    if any(s % patch for s in spatial):
        raise ConfigError(
            f"{field}={patch} does not divide the volume size {tuple(spatial)}: masks lie on a "
            f"grid of {patch}^3 patches. Set {field} to a divisor of every side.")
    return tuple(s // patch for s in spatial)


def masked_count(patches: int, ratio: float, rounding: str) -> int:
    """How many of ``patches`` are hidden at ``ratio``: ``"ceil"`` as SimMIM's MaskGenerator
    (``ceil(L * ratio)``), ``"keep_round"`` as SparK (``L - round(L * (1 - ratio))``). At least
    one patch is hidden and, where there are two or more, at least one stays visible."""
    if rounding == "ceil":
        count = math.ceil(patches * ratio - 1e-9)
    else:
        count = patches - round(patches * (1 - ratio))
    return max(1, min(count, patches - 1)) if patches > 1 else 1


def random_patch_mask(batch: int, grid: tuple[int, ...], count: int, generator,
                      device) -> Tensor:
    """``(B, *grid)`` bool masks hiding exactly ``count`` patches per sample, uniformly at
    random (argsort of random keys: one batched op, no per-sample loop)."""
    total = math.prod(grid)
    keys = torch.rand((batch, total), generator=generator, device=device)
    order = keys.argsort(1)
    mask = torch.zeros(batch, total, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :count], True)
    return mask.view(batch, *grid)


def expand_to(grid_mask: Tensor, size: tuple[int, ...]) -> Tensor:
    """A ``(B, *grid)`` bool grid mask at spatial ``size``, as ``(B, 1, *size)`` bool.

    Finer than the grid: each patch repeated (nearest, exact when the size is a multiple).
    Coarser: a coarse cell is True only if every patch it covers is (so "visible" = any
    visible patch: a strided sparse convolution's output is active where any input is)."""
    grid = tuple(grid_mask.shape[1:])
    m = grid_mask[:, None]
    if tuple(size) == grid:
        return m
    if all(s % g == 0 for s, g in zip(size, grid, strict=True)):
        for axis, (s, g) in enumerate(zip(size, grid, strict=True)):
            if s != g:
                m = m.repeat_interleave(s // g, dim=axis + 2)
        return m
    if all(g % s == 0 for s, g in zip(size, grid, strict=True)):
        visible = F.adaptive_max_pool3d((~m).float(), size) > 0
        return ~visible
    return F.interpolate(m.float(), size=size, mode="nearest") > 0.5


def patchify(x: Tensor, patch: int) -> Tensor:
    """``(B, C, D, H, W)`` -> ``(B, L, C * patch^3)``, patches in grid (row-major) order."""
    b, c, d, h, w = x.shape
    p = patch
    x = x.reshape(b, c, d // p, p, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (d // p) * (h // p) * (w // p), p**3 * c)


def normalise_patches(target: Tensor, patch: int, eps: float = 1e-6) -> Tensor:
    """Per-patch normalised target, ``(B, L, C * patch^3)``: each patch (all its channels
    together) minus its mean over its standard deviation (unbiased variance plus ``eps``
    under the root, as SparK's ``(var + 1e-6) ** .5`` and MAE's ``norm_pix_loss``)."""
    t = patchify(target, patch)
    mean = t.mean(-1, keepdim=True)
    var = t.var(-1, keepdim=True)
    return (t - mean) / (var + eps).sqrt()


# --------------------------------------------------------------------------- masked norms

SUPPORTED_NORMS = (nn.InstanceNorm3d, nn.BatchNorm3d, nn.GroupNorm)


def masked_norm(module: nn.Module, x: Tensor, active: Tensor,
                stashed: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``module``'s normalisation of ``x`` with statistics over the ``active`` voxels only
    (``(B, 1, *spatial)`` bool), zero at inactive ones: SparK's sparse batch norm (and
    nnssl's sparse instance norm) emulated densely, in float32.

    BatchNorm in training mode also updates its running statistics from the active voxels;
    ``stashed`` holds the running statistics as they were before the module's own (dense)
    forward, which are restored first."""
    xf, m = x.float(), active.to(torch.float32)
    spatial = tuple(range(2, x.dim()))
    if isinstance(module, nn.GroupNorm):
        b, c = x.shape[:2]
        g = module.num_groups
        xg = xf.reshape(b, g, c // g, *x.shape[2:])
        mg = m.reshape(b, 1, 1, *x.shape[2:])
        dims = tuple(range(2, xg.dim()))
        n = (mg.sum(dims, keepdim=True) * (c // g)).clamp_min(1)
        mean = (xg * mg).sum(dims, keepdim=True) / n
        var = ((xg - mean) ** 2 * mg).sum(dims, keepdim=True) / n
        y = ((xg - mean) / (var + module.eps).sqrt()).reshape(x.shape)
        affine = module.affine
    else:
        batch_stats = isinstance(module, nn.BatchNorm3d) and (
            module.training or module.running_mean is None)
        use_running = module.running_mean is not None and not module.training
        if use_running:
            mean = module.running_mean.float().view(1, -1, *([1] * len(spatial)))
            var = module.running_var.float().view(1, -1, *([1] * len(spatial)))
        else:
            dims = (0, *spatial) if batch_stats else spatial
            # the global batch's statistics under DDP (one process's at the global batch)
            mean, var, n = batch_moments(module, xf, dims, m)
            if batch_stats and module.training and module.track_running_stats:
                if stashed is not None:
                    module.running_mean.copy_(stashed[0])
                    module.running_var.copy_(stashed[1])
                update_running_stats(module, mean, var, n)
        y = (xf - mean) / (var + module.eps).sqrt()
        affine = module.affine
    if affine:
        shape = (1, -1, *([1] * len(spatial)))
        y = y * module.weight.float().view(shape) + module.bias.float().view(shape)
    return (y * m).to(x.dtype)


class PatchMaskingTask(ProxyTask):
    """What SimMIM and SparK share: volumes cut into ``config.mask_patch_size`` patches, a
    random share ``config.mask_ratio`` of them masked per volume (rounded by
    :attr:`mask_rounding`, see :func:`masked_count`). ``make_batch`` returns the images and the
    patch-grid mask ``(B, *grid)``, True where masked."""

    mask_rounding: ClassVar[str] = "ceil"

    def check_input(self, image_shape: tuple[int, ...], channels: int) -> None:
        """3D volumes whose every side the mask patch divides (checked before training)."""
        super().check_input(image_shape, channels)
        patch_grid(tuple(image_shape), self.config.mask_patch_size, "task.mask_patch_size")

    def make_batch(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        cfg = self.config
        grid = patch_grid(tuple(images.shape[2:]), cfg.mask_patch_size, "task.mask_patch_size")
        count = masked_count(int(torch.tensor(grid).prod()), cfg.mask_ratio, self.mask_rounding)
        mask = random_patch_mask(images.shape[0], grid, count, generator, images.device)
        return {"images": images, "mask": mask}
