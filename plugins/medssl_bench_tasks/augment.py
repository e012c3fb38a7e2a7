"""Batched spatial and intensity augmentation on the batch's device (2D or 3D).

Why this module exists: the reference Exemplar code augments one volume at a time with
``scipy.ndimage`` (cubic ``rotate`` alone costs ~150 ms per 128^3 volume). Here every
sample's flips, plane rotations and zoom are composed into one affine matrix, and the batch
is resampled once with ``F.affine_grid`` + ``F.grid_sample`` (trilinear), so a sample is
interpolated at most once. Samples whose composed transform is a pure signed axis
permutation (flips and 90-degree turns only) skip interpolation and are permuted exactly.

Matrices are homogeneous ``(N, d+1, d+1)`` maps from *output* to *input* coordinates in
centred voxel units, in the tensor's spatial order (D, H, W for 3D), so rotations are rigid
even for non-cubic images. Applying transform A and then B samples ``x(A @ B @ u)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True)
class AffineParams:
    """Probabilities and ranges of the random spatial transforms (defaults: Taleb et al.)."""

    flip_p: float = 0.5  #: per axis
    rotate_p: float = 0.5  #: per plane (alpha)
    quarter_p: float = 0.5  #: share of rotations that are multiples of 90 degrees
    zoom_p: float = 0.2  #: gamma
    zoom_min: float = 0.8
    zoom_max: float = 1.2


def _uniform(n: int, generator: torch.Generator, device, low: float = 0.0, high: float = 1.0,
             dtype=torch.float32) -> Tensor:
    return torch.rand(n, generator=generator, device=device, dtype=dtype) * (high - low) + low


def planes(spatial_dims: int) -> list[tuple[int, int]]:
    """Rotation planes in the reference order: (0, 1), (1, 2), (0, 2) in 3D; (0, 1) in 2D."""
    pairs = list(combinations(range(spatial_dims), 2))
    return sorted(pairs, key=lambda p: (p[1] - p[0], p[0]))


def sample_affine(
    n: int,
    shape: tuple[int, ...],
    params: AffineParams,
    generator: torch.Generator,
    device: torch.device | str,
) -> Tensor:
    """Random ``(n, d+1, d+1)`` output-to-input maps: flips, then one optional rotation per
    plane, then an optional zoom with a random crop (the reference order)."""
    d = len(shape)
    eye = torch.eye(d + 1, device=device).expand(n, d + 1, d + 1)
    # flips: a diagonal of +-1
    flip = torch.where(_uniform(n * d, generator, device).view(n, d) < params.flip_p, -1.0, 1.0)
    total = torch.diag_embed(torch.cat([flip, torch.ones(n, 1, device=device)], 1))
    for a, b in planes(d):
        apply = _uniform(n, generator, device) < params.rotate_p
        quarter = _uniform(n, generator, device) < params.quarter_p
        k = torch.randint(0, 4, (n,), generator=generator, device=device).float()
        free = _uniform(n, generator, device, 0.0, 2 * math.pi)
        angle = torch.where(quarter, k * (math.pi / 2), free)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # exact integers for quarter turns so they map voxel centres onto voxel centres
        cos = torch.where(quarter, cos.round(), cos)
        sin = torch.where(quarter, sin.round(), sin)
        cos = torch.where(apply, cos, torch.ones_like(cos))
        sin = torch.where(apply, sin, torch.zeros_like(sin))
        rot = eye.clone()
        rot[:, a, a], rot[:, a, b], rot[:, b, a], rot[:, b, b] = cos, -sin, sin, cos
        total = total @ rot
    zoom_on = (_uniform(n, generator, device) < params.zoom_p).view(n, 1)
    factor = _uniform(n * d, generator, device, params.zoom_min, params.zoom_max).view(n, d)
    factor = torch.where(zoom_on, factor, torch.ones_like(factor))
    half = torch.tensor([(s - 1) / 2 for s in shape], device=device)
    # zoom in (factor > 1) crops a random window of the enlarged image; zoom out pads centred
    slack = (factor - 1).clamp(min=0) * half
    offset = (_uniform(n * d, generator, device).view(n, d) * 2 - 1) * slack
    zoom = eye.clone()
    zoom[:, :d, :d] = torch.diag_embed(1 / factor)
    zoom[:, :d, d] = offset / factor
    return total @ zoom


def signed_permutation_code(matrices: Tensor, shape: tuple[int, ...]) -> Tensor:
    """For each map, a code >= 0 if it is an exact signed axis permutation that keeps the
    shape and has no translation (so it needs no interpolation), else -1."""
    d = len(shape)
    lin, shift = matrices[:, :d, :d], matrices[:, :d, d]
    rounded = lin.round()
    exact = (lin - rounded).abs().amax((1, 2)) < 1e-6
    exact &= (rounded.abs().sum(1) == 1).all(1) & (rounded.abs().sum(2) == 1).all(1)
    exact &= shift.abs().amax(1) < 1e-6
    # input axis r reads output axis column[r], negated where sign[r]: v[r] = +-u[column[r]]
    column = rounded.abs().argmax(2)
    sizes = torch.tensor(shape, device=matrices.device)
    exact &= (sizes[column] == sizes).all(1)
    sign = (rounded.sum(2) < 0).long()
    code = torch.zeros(matrices.shape[0], dtype=torch.long, device=matrices.device)
    for r in range(d):
        code = code * (2 * d) + column[:, r] * 2 + sign[:, r]
    return torch.where(exact, code, torch.full_like(code, -1))


def _apply_code(x: Tensor, code: int, d: int) -> Tensor:
    """Apply signed permutation ``code`` to ``(N, C, *spatial)`` exactly (flip + permute)."""
    column, sign = [0] * d, [0] * d
    for r in reversed(range(d)):
        code, digit = divmod(code, 2 * d)
        column[r], sign[r] = divmod(digit, 2)
    # out[u] = x[v] with v[r] = +-u[column[r]]: flip the input axes read with a minus sign
    # (negation in centred coordinates), then put input axis r at output position column[r]
    flips = [2 + r for r in range(d) if sign[r]]
    y = x.flip(flips) if flips else x
    inverse = [0] * d
    for r in range(d):
        inverse[column[r]] = r
    return y.permute(0, 1, *[2 + r for r in inverse])


def to_grid_theta(matrices: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Convert voxel-unit maps to ``F.affine_grid``'s normalised, reversed-axis ``theta``
    (align_corners=True: -1 and 1 are the centres of the first and last voxel)."""
    d = len(shape)
    half = torch.tensor([max((s - 1) / 2, 0.5) for s in shape], device=matrices.device,
                        dtype=matrices.dtype)
    lin = matrices[:, :d, :d] * half.view(1, 1, d) / half.view(1, d, 1)
    shift = matrices[:, :d, d] / half.view(1, d)
    theta = torch.cat([lin, shift.unsqueeze(2)], 2)
    rev = list(reversed(range(d)))
    return theta[:, rev][:, :, [*rev, d]]


def affine_grid(theta: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``F.affine_grid(theta, size, align_corners=True)`` built by broadcasting one
    coordinate vector per axis (what ``affine_grid`` computes with a batched matmul over a
    materialised base grid, about twice as slow on the CPU)."""
    n, d = theta.shape[0], len(shape)
    grid = torch.empty(n, *shape, d, device=theta.device, dtype=theta.dtype)
    lines = []
    for axis, size in enumerate(shape):
        view = [1] * (d + 1)
        view[1 + axis] = size
        lines.append(torch.linspace(-1, 1, size, device=theta.device, dtype=theta.dtype)
                     .view(view))
    coeff = theta.view(n, d, d + 1, *([1] * d))
    for row in range(d):
        # grid column ``row`` (x, y[, z] order) = sum_j theta[row, j] * coord_j + theta[row, d];
        # theta's column j multiplies the coordinate of spatial axis d-1-j
        acc = coeff[:, row, d] + coeff[:, row, 0] * lines[d - 1]
        for j in range(1, d):
            acc = acc + coeff[:, row, j] * lines[d - 1 - j]
        grid[..., row] = acc
    return grid


def apply_affine(images: Tensor, matrices: Tensor, exact_fast_path: bool = True) -> Tensor:
    """Resample ``(N, C, *spatial)`` images through output-to-input ``matrices`` (zeros
    outside). Interpolated samples share one ``affine_grid``/``grid_sample`` call; exact signed
    permutations (when ``exact_fast_path``) are flipped/permuted instead, one call per
    distinct permutation present (at most 48 in 3D), never per sample."""
    shape = tuple(images.shape[2:])
    d = len(shape)
    out = torch.empty_like(images)
    codes = signed_permutation_code(matrices, shape) if exact_fast_path else torch.full(
        (images.shape[0],), -1, dtype=torch.long, device=images.device)
    interp = (codes < 0).nonzero().flatten()
    if interp.numel():
        theta = to_grid_theta(matrices[interp].to(images.dtype), shape)
        grid = affine_grid(theta, shape)
        source = images if interp.numel() == images.shape[0] else images[interp]
        sampled = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros",
                                align_corners=True)
        if interp.numel() == images.shape[0]:
            return sampled
        out.index_copy_(0, interp, sampled)
    if exact_fast_path:
        for code in torch.unique(codes[codes >= 0]).tolist():
            index = (codes == code).nonzero().flatten()
            out[index] = _apply_code(images[index], int(code), d)
    return out


def color_jitter(
    images: Tensor,
    p: float,
    generator: torch.Generator,
    brightness: float = 0.125,
    contrast: tuple[float, float] = (0.5, 1.5),
    inplace: bool = False,
) -> Tensor:
    """Per sample with probability ``p``: add U(-brightness, brightness), then scale the
    contrast by U(*contrast) about the sample's mean (the reference's ``_distort_color``),
    fused into one multiply-add."""
    n = images.shape[0]
    device = images.device
    on = _uniform(n, generator, device) < p
    delta = torch.where(on, _uniform(n, generator, device, -brightness, brightness), 0.0)
    factor = torch.where(on, _uniform(n, generator, device, *contrast), 1.0)
    mean = images.flatten(1).mean(1)
    # c * (x + delta - (mean + delta)) + mean + delta = c * x + (1 - c) * mean + delta
    shape = (n,) + (1,) * (images.dim() - 1)
    scale = factor.to(images.dtype).view(shape)
    bias = ((1 - factor) * mean + delta).to(images.dtype).view(shape)
    if inplace:
        return torch.addcmul(bias, images, scale, out=images)  # one pass
    return torch.addcmul(bias, images, scale)
