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
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import torch
from torch import Tensor
from torch.nn import functional as F

from medssl_bench_tasks.patches import BUFFERS


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


@dataclass(frozen=True)
class AffineFactors:
    """A batch of random spatial transforms, factored for cheap resampling.

    Each sample's output-to-input map is ``M = S_0 A_1 S_1 ... A_k S_k`` (k = number of
    rotation planes). ``exact`` holds the ``S_i``: signed axis permutations without
    translation (flips, quarter turns and axis relabellings), applied exactly as index ops.
    ``planar`` holds the ``A_i``: maps that act on the last two spatial axes as a 2D affine
    and on every other axis as a 1D scale and shift, so one 2D bilinear ``grid_sample`` with
    the leading axis folded into channels (plus a 1D lerp along it for zoom) resamples them.
    An arbitrary-angle rotation in plane (a, b) becomes ``P R P^T`` with ``R`` in the last
    two axes and the axis relabelling ``P`` moved into the neighbouring ``S``; the zoom is
    moved past the trailing ``S`` and merged into the last ``A``. Unused factors are exact
    identities, so samples that need no interpolation are never resampled.
    """

    exact: Tensor  #: (n, k + 1, d + 1, d + 1)
    planar: Tensor  #: (n, k, d + 1, d + 1)

    def compose(self) -> Tensor:
        """The composed ``(n, d + 1, d + 1)`` maps (for the single-resampling path)."""
        total = self.exact[:, 0]
        for i in range(self.planar.shape[1]):
            total = total @ self.planar[:, i] @ self.exact[:, i + 1]
        return total


def _plane_relabelling(d: int, a: int, b: int, device) -> Tensor:
    """The permutation ``P`` with ``P e_{d-2} = e_a``, ``P e_{d-1} = e_b`` and the other
    axes in order, so a rotation in plane (a, b) is ``P R P^T`` with ``R`` in the last two."""
    rest = [axis for axis in range(d) if axis not in (a, b)]
    perm = torch.zeros(d + 1, d + 1, device=device)
    for canonical, actual in enumerate([*rest, a, b, d]):
        perm[actual, canonical] = 1.0
    return perm


def sample_affine_factors(
    n: int,
    shape: tuple[int, ...],
    params: AffineParams,
    generator: torch.Generator,
    device: torch.device | str,
) -> AffineFactors:
    """Random flips, then one optional rotation per plane, then an optional zoom with a
    random crop (the reference order), as :class:`AffineFactors`."""
    d = len(shape)
    eye = torch.eye(d + 1, device=device).expand(n, d + 1, d + 1)
    # flips: a diagonal of +-1
    flip = torch.where(_uniform(n * d, generator, device).view(n, d) < params.flip_p, -1.0, 1.0)
    acc = torch.diag_embed(torch.cat([flip, torch.ones(n, 1, device=device)], 1))
    exact, planar, arbitrary = [], [], []
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
        canon = eye.clone()
        canon[:, d - 2, d - 2], canon[:, d - 2, d - 1] = cos, -sin
        canon[:, d - 1, d - 2], canon[:, d - 1, d - 1] = sin, cos
        relabel = _plane_relabelling(d, a, b, device)
        free_angle = (apply & ~quarter).view(n, 1, 1)
        exact.append(torch.where(free_angle, acc @ relabel, eye))
        planar.append(torch.where(free_angle, canon, eye))
        acc = torch.where(free_angle, relabel.T.expand(n, -1, -1), acc @ rot)
        arbitrary.append(free_angle.view(n))
    exact.append(acc)
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
    # S Z = (S Z S^T) S: move the zoom before the trailing permutation, into the last A
    moved = acc @ zoom @ acc.transpose(1, 2)
    flags = torch.stack(arbitrary, 1)
    count = flags.shape[1]
    last = torch.where(flags.any(1), count - 1 - flags.flip(1).long().argmax(1), 0)
    for i in range(count):
        planar[i] = torch.where((last == i).view(n, 1, 1), planar[i] @ moved, planar[i])
    return AffineFactors(torch.stack(exact, 1), torch.stack(planar, 1))


def sample_affine(
    n: int,
    shape: tuple[int, ...],
    params: AffineParams,
    generator: torch.Generator,
    device: torch.device | str,
) -> Tensor:
    """Random ``(n, d+1, d+1)`` output-to-input maps: flips, then one optional rotation per
    plane, then an optional zoom with a random crop (the reference order)."""
    return sample_affine_factors(n, shape, params, generator, device).compose()


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


def _decode(code: int, d: int) -> tuple[list[int], list[int]]:
    """The flipped input axes and the output order (``permute`` dims) of a signed
    permutation code, both as positions in ``(N, C, *spatial)``."""
    column, sign = [0] * d, [0] * d
    for r in reversed(range(d)):
        code, digit = divmod(code, 2 * d)
        column[r], sign[r] = divmod(digit, 2)
    # out[u] = x[v] with v[r] = +-u[column[r]]: flip the input axes read with a minus sign
    # (negation in centred coordinates), then put input axis r at output position column[r]
    flips = [2 + r for r in range(d) if sign[r]]
    inverse = [0] * d
    for r in range(d):
        inverse[column[r]] = r
    return flips, [0, 1, *[2 + r for r in inverse]]


def _apply_code(x: Tensor, code: int, d: int) -> Tensor:
    """Apply signed permutation ``code`` to ``(N, C, *spatial)`` exactly (flip + permute)."""
    flips, order = _decode(code, d)
    y = x.flip(flips) if flips else x
    return y.permute(*order)


def permuted_copy(x: Tensor, order: Sequence[int], out: Tensor | None = None) -> Tensor:
    """``x.permute(*order)`` of a contiguous ``(N, C, D, H, W)`` tensor as a new contiguous
    tensor (from :data:`BUFFERS`), with batch and channel kept in place.

    Why: a permuted copy whose innermost output axis is a far-strided input axis (the D axis
    moving last) costs 5-10x a plain copy in torch's element-wise copy on the CPU, while a
    2D transpose is copied blockwise at near memory speed. (H, W, D) and (W, D, H) are per
    slab one 2D transpose, ``(D, H W)^T`` and ``(D H, W)^T`` (one per slab is about 1.5x
    faster than a batched 3D transpose); (W, H, D) is the 2D transpose of ``(N C D, H W)``
    and one more copy that keeps whole rows of D contiguous. Other orders are copied
    directly. The result goes into ``out`` (contiguous, of the permuted shape) when given."""
    order = tuple(int(o) for o in order)
    n, c, *spatial = x.shape
    slabs = n * c
    shape = (n, c, *[x.shape[o] for o in order[2:]])
    x = x.contiguous()
    d, h, w = spatial if len(spatial) == 3 else (0, 0, 0)
    if x.dim() == 5 and x.device.type == "cpu" and order[2:] in ((3, 4, 2), (4, 2, 3)):
        rows, cols = (d, h * w) if order[2:] == (3, 4, 2) else (d * h, w)
        out = BUFFERS.empty(shape, x.dtype, x.device) if out is None else out
        src, dst = x.view(slabs, rows, cols), out.view(slabs, cols, rows)
        for slab in range(slabs):
            dst[slab].copy_(src[slab].t())
        return out
    out = BUFFERS.empty(shape, x.dtype, x.device) if out is None else out
    if x.dim() != 5 or order[2:] != (4, 3, 2) or x.device.type != "cpu":
        return out.copy_(x.permute(*order))
    # (W, H, D): (slabs D, H W)^T = (H W, slabs, D), then rows of D reordered
    t = BUFFERS.empty((h * w, slabs * d), x.dtype, x.device).copy_(x.view(-1, h * w).t())
    rows = t.view(h, w, n, c, d)
    return out.copy_(rows.permute(2, 3, 1, 0, 4))


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


def _identity_code(d: int) -> int:
    code = 0
    for r in range(d):
        code = code * (2 * d) + r * 2
    return code


def _apply_exact(work: Tensor, maps: Tensor, owned: bool) -> tuple[Tensor, bool]:
    """Apply signed permutations ``maps`` exactly, one flip/permute per distinct permutation
    present (at most 48 in 3D), skipping identities. ``owned``: ``work`` may be written."""
    shape = tuple(work.shape[2:])
    d = len(shape)
    codes = signed_permutation_code(maps, shape)
    identity = _identity_code(d)
    present = [c for c in torch.unique(codes).tolist() if c != identity]
    if not present:
        return work, owned
    if len(present) == 1 and bool((codes == present[0]).all()):
        return _signed_permuted_copy(work, present[0], d), True
    # mixed permutations: each run of consecutive samples with the same one is permuted from
    # its slice straight into the output's slice (no gather, no scatter, no copy of the rest)
    out = work if owned else BUFFERS.empty(work.shape, work.dtype, work.device)
    flat = codes.tolist()
    start = 0
    while start < len(flat):
        stop = start + 1
        while stop < len(flat) and flat[stop] == flat[start]:
            stop += 1
        if flat[start] != identity:
            out[start:stop].copy_(_signed_permuted_copy(work[start:stop], flat[start], d))
        elif not owned:
            out[start:stop].copy_(work[start:stop])
        start = stop
    return out, True


def _signed_permuted_copy(x: Tensor, code: int, d: int) -> Tensor:
    """Signed permutation ``code`` of ``x`` as a new contiguous tensor: flips, then the axis
    permutation by :func:`permuted_copy`."""
    flips, order = _decode(code, d)
    y = x.flip(flips) if flips else x
    if order == list(range(d + 2)):
        return y if flips else BUFFERS.empty(x.shape, x.dtype, x.device).copy_(x)
    return permuted_copy(y, order)


def _lerp_axis(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Linear resampling of ``(n, C, L, R)`` along ``L`` through ``v = scale * u + shift`` in
    centred coordinates, zeros outside. Every output row is a weighted sum of two whole
    contiguous ``R``-rows of the input (one ``embedding_bag``, a single pass at memory
    speed); used for the zoom along the axis folded into channels."""
    n, channels, length, rest = x.shape
    half = (length - 1) / 2
    u = torch.arange(length, device=x.device, dtype=scale.dtype) - half
    position = scale.view(n, 1) * u + shift.view(n, 1) + half
    low = position.floor()
    weight = (position - low).to(x.dtype)
    low = low.long()
    base = (torch.arange(n * channels, device=x.device) * length).view(n, channels, 1)
    rows = x.reshape(n * channels * length, rest)
    if not bool(weight.any()) and bool(((low >= 0) & (low < length)).all()):
        # integral positions (a flip along the axis): one row gather, no arithmetic
        index = (base + low.view(n, 1, length)).flatten()
        out = BUFFERS.empty((index.numel(), rest), x.dtype, x.device)
        return torch.index_select(rows, 0, index, out=out).view(x.shape)
    # each output row is the weighted sum of two input rows: one fused embedding_bag pass
    index, weights = [], []
    for at, w in ((low, 1 - weight), (low + 1, weight)):
        inside = (at >= 0) & (at < length)
        index.append((base + at.clamp(0, length - 1).view(n, 1, length)).flatten())
        weights.append((w * inside).view(n, 1, length).expand(n, channels, length).flatten())
    return F.embedding_bag(torch.stack(index, 1), rows, per_sample_weights=torch.stack(
        weights, 1).to(x.dtype), mode="sum").view(x.shape)


def _bilinear_taps(maps: Tensor, height: int, width: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The four bilinear taps of every output pixel of a ``(height, width)`` plane under
    per-sample 2D ``maps`` (centred voxel coordinates, ``grid_sample``'s align_corners=True):
    flat source indices ``(n, height, width, 4)`` and weights, zero for taps outside."""
    n, device = maps.shape[0], maps.device
    m = maps.to(torch.float64)
    half_h, half_w = (height - 1) / 2, (width - 1) / 2
    ui = (torch.arange(height, device=device, dtype=torch.float64) - half_h).view(1, height, 1)
    uj = (torch.arange(width, device=device, dtype=torch.float64) - half_w).view(1, 1, width)
    y = m[:, 0, 0].view(n, 1, 1) * ui + m[:, 0, 1].view(n, 1, 1) * uj + (m[:, 0, 2] + half_h).view(
        n, 1, 1)
    x = m[:, 1, 0].view(n, 1, 1) * ui + m[:, 1, 1].view(n, 1, 1) * uj + (m[:, 1, 2] + half_w).view(
        n, 1, 1)
    y0, x0 = y.floor(), x.floor()
    wy, wx = (y - y0).float(), (x - x0).float()
    y0, x0 = y0.long(), x0.long()
    index, weight = [], []
    for dy, fy in ((0, 1 - wy), (1, wy)):
        for dx, fx in ((0, 1 - wx), (1, wx)):
            yi, xi = y0 + dy, x0 + dx
            inside = (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
            index.append(yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1))
            weight.append(fy * fx * inside)
    return torch.stack(index, -1), torch.stack(weight, -1).to(dtype)


def _bilinear_rows(sub: Tensor, maps: Tensor) -> Tensor:
    """2D bilinear resampling (zeros outside) of ``(n, C, L, H, W)`` over ``(H, W)`` through
    the 2D parts of ``maps``, the leading axis ``L`` carried along as a vector per pixel.

    Why not ``grid_sample``: its CPU kernel interpolates every one of the ``C * L`` channels
    separately (about 15 ms per 128^3 volume on one core). Here the volume is transposed to
    pixel-major rows of ``L`` values and every output row is one ``embedding_bag``: the
    weighted sum of its four neighbouring input rows, contiguous vectors, in one fused pass
    (under 1 ms per volume). The weights are ``grid_sample``'s (align_corners=True in voxel
    units); the two transposes cost about as much as two copies."""
    n, channels, length, height, width = sub.shape
    pixels = height * width
    slabs = n * channels
    device = sub.device
    # pixel-major rows: (pixels, slabs * length), row p * slabs + s is slab s's pixel p; one
    # 2D transpose, which torch copies blockwise (a batched 3D transpose is several times
    # slower: its inner loop strides through memory)
    rows = BUFFERS.empty((pixels, slabs * length), sub.dtype, device)
    rows.copy_(sub.reshape(slabs * length, pixels).t())
    index, weight = _bilinear_taps(maps, height, width, sub.dtype)
    # bags in (output pixel, slab) order, so each result is again pixel-major
    index = index.view(n, 1, pixels, 4) * slabs
    index = (index + torch.arange(slabs, device=device).view(n, channels, 1, 1)).view(
        slabs, pixels, 4).transpose(0, 1)
    weight = weight.view(n, 1, pixels, 4).expand(
        n, channels, pixels, 4).reshape(slabs, pixels, 4).transpose(0, 1)
    out = BUFFERS.empty(sub.shape, sub.dtype, device)
    flat = out.view(slabs * length, pixels)
    # a few slabs per embedding_bag call: its output is a fresh tensor, and below glibc's
    # mmap threshold (32 MB) freed ones are reused instead of page-faulted in anew
    step = max(1, (16 << 20) // (pixels * length * sub.element_size()))
    for first in range(0, slabs, step):
        last = min(first + step, slabs)
        sampled = F.embedding_bag(index[:, first:last].reshape(-1, 4), rows.view(-1, length),
                                  per_sample_weights=weight[:, first:last].reshape(-1, 4),
                                  mode="sum")
        flat[first * length:last * length].copy_(
            sampled.view(pixels, (last - first) * length).t())
        del sampled
    return out


def _apply_planar(work: Tensor, maps: Tensor, owned: bool) -> tuple[Tensor, bool]:
    """Resample the samples whose planar map is not the identity: (zoom) a 1D lerp along the
    leading axis, then one 2D bilinear resampling over the last two axes with the leading
    axis folded into channels (:func:`_bilinear_rows` on the CPU, ``grid_sample`` elsewhere).
    Both factor exactly out of trilinear interpolation because the map does not mix the
    leading axis with the other two, so their order does not matter either."""
    n, channels = work.shape[:2]
    shape = tuple(work.shape[2:])
    d = len(shape)
    eye = torch.eye(d + 1, device=maps.device, dtype=maps.dtype)
    moving = (maps - eye).abs().amax((1, 2)) > 0
    index = moving.nonzero().flatten()
    count = index.numel()
    if count == 0:
        return work, owned
    every = count == n
    if every:
        sub = work.contiguous()
    else:
        sub = torch.index_select(work, 0, index,
                                 out=BUFFERS.empty((count, *work.shape[1:]), work.dtype,
                                                   work.device))
    chosen = maps if every else maps[index]
    if d == 3:
        scale, shift = chosen[:, 0, 0], chosen[:, 0, d]
        along = ((scale != 1) | (shift != 0)).nonzero().flatten()
        if along.numel():
            if sub is work:
                sub = BUFFERS.empty(work.shape, work.dtype, work.device).copy_(work)
            rows = sub.view(count, channels, shape[0], -1)
            lerped = _lerp_axis(rows.index_select(0, along), scale[along], shift[along])
            rows.index_copy_(0, along, lerped)
            del lerped
    keep = [d - 2, d - 1, d]
    plane = chosen[:, keep][:, :, keep]
    if d == 3 and work.device.type == "cpu":
        sampled = _bilinear_rows(sub, plane)
    else:
        theta = to_grid_theta(plane.to(work.dtype), shape[-2:])
        grid = affine_grid(theta, shape[-2:])
        folded = sub.reshape(count * channels, -1, *shape[-2:])
        sampled = F.grid_sample(folded, grid.repeat_interleave(channels, 0), mode="bilinear",
                                padding_mode="zeros", align_corners=True)
        sampled = sampled.view(count, channels, *shape)
    del sub
    if every:
        return sampled, True
    if not owned:
        # a new batch: only the samples that did not move are copied over
        out = BUFFERS.empty(work.shape, work.dtype, work.device)
        _copy_runs(out, work, ~moving)
        work = out
    work.index_copy_(0, index, sampled)
    return work, True


def _copy_runs(out: Tensor, source: Tensor, mask: Tensor) -> None:
    """Copy the samples where ``mask`` holds from ``source`` into ``out``, one slice copy per
    run of consecutive samples (no gather)."""
    flags = mask.tolist()
    start = 0
    while start < len(flags):
        stop = start + 1
        while stop < len(flags) and flags[stop] == flags[start]:
            stop += 1
        if flags[start]:
            out[start:stop].copy_(source[start:stop])
        start = stop


def _bilinear_last(sub: Tensor, maps: Tensor, moving: Tensor) -> Tensor:
    """2D bilinear resampling (zeros outside) of contiguous ``(n, C, D, H, W)`` over ``(D, H)``
    through the ``(3, 3)`` 2D ``maps``, the contiguous ``W`` rows carried along; samples not
    ``moving`` are copied unchanged.

    Why: the rows are already in memory order, so every output row is one ``embedding_bag``
    bag (the weighted sum of its four neighbouring input rows) without any transpose, and the
    output lands in the input's layout, a new pooled batch. A sample that does not move is a
    bag of one row each (a plain row copy in the same pass), so no sample is gathered out of
    or scattered back into the batch. Same weights as :func:`_bilinear_rows`."""
    n, channels, depth, height, width = sub.shape
    pixels = depth * height
    device = sub.device
    index, weight = _bilinear_taps(maps, depth, height, sub.dtype)
    index, weight = index.view(n, pixels, 4), weight.view(n, pixels, 4)
    rows = sub.reshape(-1, width)
    out = BUFFERS.empty(sub.shape, sub.dtype, device)
    flat = out.view(n, channels, pixels, width)
    # chunks of a few thousand rows: embedding_bag returns a fresh tensor; one that stays in
    # cache and in the allocator's free lists makes the copy into the pooled output cheap
    step = max(1, (1 << 21) // (width * sub.element_size()))
    moves = moving.tolist()
    for slab in range(n * channels):
        sample, channel = divmod(slab, channels)
        if not moves[sample]:
            # a still sample is copied as it is (one contiguous copy, no gather)
            flat[sample, channel].copy_(sub[sample, channel].view(pixels, width))
            continue
        shifted = index[sample] + slab * pixels
        for first in range(0, pixels, step):
            last = min(first + step, pixels)
            flat[sample, channel, first:last] = F.embedding_bag(
                shifted[first:last], rows, per_sample_weights=weight[sample, first:last],
                mode="sum")
    return out


def _apply_planar_last(work: Tensor, maps: Tensor, owned: bool) -> tuple[Tensor, bool]:
    """Like :func:`_apply_planar` for maps that mix the first two spatial axes and act on the
    last (contiguous) one as a 1D scale and shift: that 1D part (a zoom) is one
    :func:`_apply_planar` pass, the 2D part one :func:`_bilinear_last` pass; they act on
    disjoint axes, so they factor exactly out of trilinear interpolation."""
    n = work.shape[0]
    eye = torch.eye(4, device=maps.device, dtype=maps.dtype)
    along = eye.expand(n, 4, 4).clone()
    along[:, 2, 2], along[:, 2, 3] = maps[:, 2, 2], maps[:, 2, 3]
    work, owned = _apply_planar(work, along, owned)
    plane = maps[:, [0, 1, 3]][:, :, [0, 1, 3]]
    moving = (plane - eye[:3, :3]).abs().amax((1, 2)) > 0
    if not bool(moving.any()):
        return work, owned
    return _bilinear_last(work.contiguous(), plane, moving), True


def _apply_factored_cpu3d(images: Tensor, exact: Tensor, planar: Tensor) -> Tensor:
    """:func:`apply_factored` for cubic 3D images on the CPU, with the axis relabellings kept
    as views: each sample carries a signed permutation ``V`` (its logical image is
    ``x(V u)``), an exact factor only updates ``V``, and a planar map ``A`` is applied in
    physical coordinates, ``V A V^T``, so the carried axis is whichever physical axis ``V``
    puts there. Carried ``W`` (rotations in the ``(D, H)`` plane): whole contiguous rows, no
    transpose (:func:`_bilinear_last`); carried ``D``: :func:`_bilinear_rows`; carried ``H``:
    one ``H``/``W`` swap first, then as ``W``. ``V`` is applied once at the end."""
    n = images.shape[0]
    eye = torch.eye(4, device=exact.device, dtype=exact.dtype)
    swap_hw = eye[[0, 2, 1, 3]]
    flip_last = torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0], device=eye.device,
                                        dtype=eye.dtype))
    view = eye.expand(n, 4, 4).clone()
    work, owned = images, False
    for i in range(planar.shape[1]):
        view = view @ exact[:, i]
        a_map = planar[:, i]
        active = (a_map - eye).abs().amax((1, 2)) > 0
        if not bool(active.any()):
            continue
        carried = view[:, :3, 0].abs().argmax(1)
        swap = active & (carried == 1)
        if bool(swap.any()):
            # x(V u) = x'(T V u) with x' the H/W-swapped copy
            work, owned = _apply_exact(work, torch.where(swap.view(n, 1, 1), swap_hw, eye),
                                       owned)
            view = torch.where(swap.view(n, 1, 1), swap_hw @ view, view)
            carried = view[:, :3, 0].abs().argmax(1)
        phys = view @ a_map @ view.transpose(1, 2)
        group = (active & (carried == 0)).view(n, 1, 1)
        if bool(group.any()):
            work, owned = _apply_planar(work, torch.where(group, phys, eye), owned)
        group = (active & (carried == 2)).view(n, 1, 1)
        if bool(group.any()):
            # a flip of the carried W axis stays a view: V A V^T = A' Z with Z that flip,
            # x(A' Z V u) = x'(Z V u) for x' the image resampled through A'
            flip = group & (phys[:, 2:3, 2:3] < 0)
            flip_w = torch.where(flip, flip_last, eye)
            work, owned = _apply_planar_last(work, torch.where(group, phys @ flip_w, eye),
                                             owned)
            view = flip_w @ view
    view = view @ exact[:, -1]
    work, owned = _apply_exact(work, view, owned)
    return work if owned else BUFFERS.empty(work.shape, work.dtype, work.device).copy_(work)


def _swap_with_first(rows: Tensor, d: int) -> Tensor:
    """``(n, d+1, d+1)`` transpositions exchanging axis 0 with axis ``rows[i]`` (identity
    where ``rows[i] == 0``); symmetric, so each is its own inverse."""
    n = rows.shape[0]
    order = torch.arange(d + 1, device=rows.device).repeat(n, 1)
    order[:, 0] = rows
    order[torch.arange(n, device=rows.device), rows] = 0
    return torch.eye(d + 1, device=rows.device)[order].transpose(1, 2)


def _fold_idle_exact(factors: AffineFactors) -> AffineFactors:
    """Compose the exact factors on both sides of every identity planar factor into one
    (``S_i I S_{i+1} = I (S_i S_{i+1})``), so a sample is permuted at most once between two
    resamplings, and a sample without any resampling is permuted exactly once. Idle factors
    before a sample's first resampling fold forward and those after its last fold backward,
    so every exact factor left next to a resampling can be merged into it."""
    exact = list(factors.exact.unbind(1))
    planar = list(factors.planar.unbind(1))
    n, size = exact[0].shape[:2]
    eye = torch.eye(size, device=exact[0].device)
    count = len(planar)
    idle = torch.stack([(a_map - eye).abs().amax((1, 2)) == 0 for a_map in planar], 1)
    steps = torch.arange(count, device=idle.device).expand(n, count)
    any_active = (~idle).any(1, keepdim=True)
    first = torch.where(~idle, steps, count).amin(1, keepdim=True)
    last = torch.where(~idle, steps, -1).amax(1, keepdim=True)
    forward = idle & ((steps < first) | ~any_active)
    backward = idle & (steps > last) & any_active
    for i in range(count):
        fold = forward[:, i].view(n, 1, 1)
        exact[i + 1] = torch.where(fold, exact[i] @ exact[i + 1], exact[i + 1])
        exact[i] = torch.where(fold, eye.expand(n, size, size), exact[i])
    for i in reversed(range(count)):
        fold = backward[:, i].view(n, 1, 1)
        exact[i] = torch.where(fold, exact[i] @ exact[i + 1], exact[i])
        exact[i + 1] = torch.where(fold, eye.expand(n, size, size), exact[i + 1])
    return AffineFactors(torch.stack(exact, 1), torch.stack(planar, 1))


def _merge_into_planar(factors: AffineFactors) -> AffineFactors:
    """Move every part of an exact factor that a neighbouring planar map can absorb into it.

    A planar map may flip, swap and scale the last two axes freely and flip or scale the
    folded leading axis, so of a neighbouring signed permutation only a transposition that
    moves the leading axis must stay exact: ``S = Q B`` on the left of ``A`` and ``S = B Q``
    on its right, with ``B`` block-preserving (merged: ``B A`` and ``A B``) and ``Q`` that
    transposition (an axis relabelling, i.e. a view). In 2D nothing is folded, so the exact
    factors around a planar one vanish. This saves the flip copies of the exact path."""
    exact = list(factors.exact.unbind(1))
    planar = list(factors.planar.unbind(1))
    n, size = exact[0].shape[:2]
    d = size - 1
    eye = torch.eye(size, device=exact[0].device)
    for i, a_map in enumerate(planar):
        active = ((a_map - eye).abs().amax((1, 2)) > 0).view(n, 1, 1)
        left, right = exact[i], exact[i + 1]
        if d == 2:
            q_left = q_right = eye.expand(n, size, size)
        else:
            q_left = _swap_with_first(left[:, :d, 0].abs().argmax(1), d)  # row holding column 0
            q_right = _swap_with_first(right[:, 0, :d].abs().argmax(1), d)  # column of row 0
        b_left = q_left.transpose(1, 2) @ left
        b_right = right @ q_right
        planar[i] = torch.where(active, b_left @ a_map @ b_right, a_map)
        exact[i] = torch.where(active, q_left, left)
        exact[i + 1] = torch.where(active, q_right, right)
    return AffineFactors(torch.stack(exact, 1), torch.stack(planar, 1))


def apply_factored(images: Tensor, factors: AffineFactors) -> Tensor:
    """Resample ``(N, C, *spatial)`` images through :class:`AffineFactors` (zeros outside).

    Why: a 3D trilinear ``grid_sample`` at 128^3 costs about 45 ms of CPU per volume, a 2D
    bilinear one over the same voxels (the third axis as channels) about a fifth of that,
    the same 2D pass as an ``embedding_bag`` over pixel-major rows (:func:`_bilinear_rows`)
    about 5 ms including its two transposes, and exact permutations a copy or two. Only the
    factors a sample drew are applied: a volume with flips and quarter turns is only
    permuted, one with one arbitrary-angle plane rotation (with or without zoom) gets
    exactly the trilinear result in one 2D pass, and only volumes with several arbitrary
    planes are interpolated once per plane, as the reference code does with one
    ``ndimage.rotate`` per plane. Images that are not square or cubic (where axis
    relabellings change the shape) use the single composed resampling. Cubic 3D images on
    the CPU keep the relabellings as views (:func:`_apply_factored_cpu3d`), so a rotation in
    the (D, H) plane resamples whole W rows in place order without any transpose.
    """
    shape = tuple(images.shape[2:])
    if len(shape) not in (2, 3) or len(set(shape)) != 1:
        return apply_affine(images, factors.compose())
    merged = _merge_into_planar(_fold_idle_exact(factors))
    exact = merged.exact.to(images.device)
    planar = merged.planar.to(images.device)
    if len(shape) == 3 and images.device.type == "cpu":
        return _apply_factored_cpu3d(images, exact, planar)
    work, owned = images, False
    for i in range(planar.shape[1] + 1):
        work, owned = _apply_exact(work, exact[:, i], owned)
        if i < planar.shape[1]:
            work, owned = _apply_planar(work, planar[:, i], owned)
    return work if owned else BUFFERS.empty(work.shape, work.dtype, work.device).copy_(work)


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
    shape = (n,) + (1,) * (images.dim() - 1)
    scale = factor.to(images.dtype).view(shape)
    # c * (x + delta - (mean + delta)) + mean + delta = c * x + (1 - c) * mean + delta
    if not inplace:
        mean = images.flatten(1).mean(1)
        bias = ((1 - factor) * mean + delta).to(images.dtype).view(shape)
        return torch.addcmul(bias, images, scale)
    # in place, samples left unchanged are not touched at all: one mean and one multiply-add
    # per run of consecutive jittered samples (each a slice, no copy)
    flags = on.tolist()
    start = 0
    while start < n:
        if not flags[start]:
            start += 1
            continue
        stop = start
        while stop < n and flags[stop]:
            stop += 1
        run = images[start:stop]
        mean = run.flatten(1).mean(1)
        bias = ((1 - factor[start:stop]) * mean + delta[start:stop]).to(images.dtype)
        torch.addcmul(bias.view(-1, *shape[1:]), run, scale[start:stop],
                      out=run)  # one pass
        start = stop
    return images
