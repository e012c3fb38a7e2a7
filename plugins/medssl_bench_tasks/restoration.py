"""Batched image transforms of the restoration proxy tasks (Models Genesis, Parts2Whole).

Every function takes a ``(B, C, D, H, W)`` batch and a ``torch.Generator`` on the batch's
device and draws independent random parameters per sample, with torch ops only: the
reference code loops over samples (and, for local shuffling, over 10,000 windows) in
NumPy on the CPU, which costs ~44 ms per 64x64x32 sample (reference/performance.md).
Per-sample parameters are small tensors; voxel-sized work is a handful of broadcasts,
gathers and cumulative sums, so the same code runs on the GPU.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

# --------------------------------------------------------------------------- randomness


def rand(shape: tuple[int, ...], generator: torch.Generator, device) -> Tensor:
    """U[0, 1) floats drawn from ``generator`` (which must live on ``device``)."""
    return torch.rand(shape, generator=generator, device=device)


def randint_between(low: Tensor, high: Tensor, generator: torch.Generator) -> Tensor:
    """Integers uniform in ``[low, high]`` (inclusive, elementwise; ``high >= low``)."""
    u = rand(tuple(low.shape), generator, low.device)
    return low + (u * (high - low + 1).to(u.dtype)).long().minimum(high - low)


def leading_successes(p: float, trials: int, batch: int, generator, device) -> Tensor:
    """How many of ``trials`` Bernoulli(p) draws succeed before the first failure, per sample:
    the reference's ``while random.random() < p and count < trials`` loops, vectorized."""
    if trials == 0:
        return torch.zeros(batch, dtype=torch.long, device=device)
    hits = rand((batch, trials), generator, device) < p
    return hits.long().cumprod(1).sum(1)


def dirichlet3(batch: int, concentration: int, generator, device) -> Tensor:
    """``(batch, 3)`` Dirichlet weights (sum 1): how a box's log-volume splits over its axes,
    i.e. its random aspect ratio. torch's Gamma sampler takes no generator, so the shape is
    an integer and Gamma(k) is drawn as a sum of k exponentials."""
    k = max(1, int(concentration))
    return dirichlet_weights(rand((batch, 3, k), generator, device))


def dirichlet_weights(uniform: Tensor) -> Tensor:
    """Dirichlet weights over the second-to-last axis from ``(..., 3, k)`` U[0, 1) draws:
    Gamma(k) variables as sums of k exponentials, normalised (see :func:`dirichlet3`)."""
    e = -torch.log1p(-uniform).sum(-1)
    return e / e.sum(-1, keepdim=True)


# --------------------------------------------------------------------------- flips


def random_flips(
    volumes: Tensor, rate: float, max_flips: int, choices: list[int | None], generator
) -> Tensor:
    """Flip each sample up to ``max_flips`` times while U[0,1) < ``rate``, each time about an
    axis drawn uniformly from ``choices`` (spatial axes; ``None`` is a no-op, as the reference
    draws numpy axis 0, the channel axis of a 1-channel CT cube). Flips commute, so only the
    parity of each axis's count matters: one flip of the affected samples per axis."""
    batch, device = volumes.shape[0], volumes.device
    if rate <= 0 or max_flips == 0 or not choices:
        return volumes
    count = leading_successes(rate, max_flips, batch, generator, device)
    pick = (rand((batch, max_flips), generator, device) * len(choices)).long()
    pick = pick.clamp(max=len(choices) - 1)
    used = torch.arange(max_flips, device=device)[None] < count[:, None]
    out = volumes.clone()
    for axis in sorted({c for c in choices if c is not None}):
        codes = [i for i, c in enumerate(choices) if c == axis]
        hits = (torch.isin(pick, torch.tensor(codes, device=device)) & used).sum(1)
        index = (hits % 2 == 1).nonzero().flatten()
        if index.numel():
            out[index] = out[index].flip(axis + 1)
    return out


# --------------------------------------------------------------------------- Bezier curve


def bezier_table(
    control: Tensor, decreasing: Tensor, curve_points: int, table_size: int
) -> Tensor:
    """Intensity look-up tables, ``(B, table_size)`` on a uniform [0, 1] grid, for the cubic
    Bezier curves P0=(0,0), P1, P2, P3=(1,1) with ``control = (B, 2, 2)`` (P1, P2 as (x, y)).

    The curve is sampled at ``curve_points`` parameters t; each grid intensity x is mapped to
    its t by ``searchsorted`` plus linear interpolation (np.interp in torch), then to y(t),
    or to y(1 - t) for a ``decreasing`` curve (as the reference pairs sorted x with reversed
    y). With control points in [0,1], x(t) and y(t) are non-decreasing, so the table is
    monotone; cummax guards against rounding, and the ends are pinned to 0 and 1.
    """
    batch, device = control.shape[0], control.device
    basis = _bezier_basis(curve_points, str(device))  # (3, M)
    pts = torch.cat([control, torch.ones(batch, 1, 2, device=device)], 1)  # (B, 3, 2)
    xs = torch.einsum("bkd,km->bdm", pts, basis)  # (B, 2, M)
    cx = xs[:, 0].cummax(1).values.contiguous()
    cy = xs[:, 1].cummax(1).values.contiguous()
    grid = _unit_grid(table_size, str(device)).expand(batch, -1).contiguous()
    hi = torch.searchsorted(cx, grid).clamp(1, curve_points - 1)
    x0, x1 = cx.gather(1, hi - 1), cx.gather(1, hi)
    w = ((grid - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0, 1)
    param = ((hi - 1).to(w.dtype) + w) / (curve_points - 1)  # t at each grid x
    param = torch.where(decreasing[:, None], 1 - param, param)
    table = interp_uniform(param, cy)
    table[:, 0] = torch.where(decreasing, 1.0, 0.0)
    table[:, -1] = torch.where(decreasing, 0.0, 1.0)
    return table


@functools.lru_cache(maxsize=16)
def _bezier_basis(curve_points: int, device: str) -> Tensor:
    """``(3, M)`` weights of P1, P2, P3 in a cubic Bezier curve at ``M`` uniform parameters
    (P0 = 0 adds nothing); made once (never written to)."""
    t = torch.linspace(0.0, 1.0, curve_points, device=device)
    return torch.stack([3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3])


@functools.lru_cache(maxsize=16)
def _unit_grid(size: int, device: str) -> Tensor:
    """``linspace(0, 1, size)`` on ``device``, made once (never written to)."""
    return torch.linspace(0.0, 1.0, size, device=device)


def interp_uniform(values: Tensor, table: Tensor) -> Tensor:
    """Piecewise-linear ``table`` (``(B, L)`` samples of a function on a uniform [0, 1] grid)
    evaluated at ``values`` (``(B, ...)``; outside [0, 1] the end values), like np.interp.
    One 2D ``grid_sample`` per batch does the index, gathers and lerp in a single kernel:
    measured ~3x faster on the CPU than separate index/gather/lerp passes."""
    batch, size = table.shape
    count = values[0].numel()
    grid = torch.zeros(batch, 1, count, 2, device=values.device, dtype=table.dtype)
    torch.mul(values.reshape(batch, 1, count), 2, out=grid[..., 0])
    grid[..., 0] -= 1
    out = F.grid_sample(table.view(batch, 1, 1, size), grid, mode="bilinear",
                        padding_mode="border", align_corners=True)
    return out.view(values.shape)


def nonlinear_intensity(
    volumes: Tensor, generator, curve_points: int = 2048, table_size: int = 2048,
    decreasing_rate: float = 0.5, active: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Map each sample's intensities through its own random monotone Bezier curve (the
    identity for samples where ``active`` is False, so no blend pass is needed).

    Returns the mapped volumes, the control points ``(B, 2, 2)`` and the ``decreasing``
    flags, so tests can check the curve that was drawn.
    """
    batch, device = volumes.shape[0], volumes.device
    control = rand((batch, 2, 2), generator, device)
    decreasing = rand((batch,), generator, device) < decreasing_rate
    table = bezier_table(control, decreasing, curve_points, table_size)
    if active is not None:
        identity = _unit_grid(table_size, str(device))
        table = torch.where(active[:, None], table, identity)
    return interp_uniform(volumes.float(), table).to(volumes.dtype), control, decreasing


# --------------------------------------------------------------------------- local shuffling


def shuffle_window_sides(spatial: tuple[int, ...], fraction: float) -> tuple[int, ...]:
    """Largest window side per axis: ``max(1, floor(fraction * dim))`` (reference: dim // 10)."""
    return tuple(max(1, math.floor(fraction * s + 1e-9)) for s in spatial)


def _to_axis(t: Tensor, axis: int, cw: int) -> Tensor:
    """``(B, KD, KH, KW, c)`` per-cell values along ``axis`` -> a tensor broadcastable over
    the block layout ``(B, KD, cD, KH, cH, PW)`` of the padded volume (PW = KW * cW). The
    W position stays the innermost, contiguous dimension of every operand, so broadcast ops
    vectorize (a size-3 innermost block dimension would not)."""
    batch, kd, kh, kw, c = t.shape
    if axis == 2:
        return t.reshape(batch, kd, 1, kh, 1, kw * c)
    t = t.permute(0, 1, 2, 4, 3).repeat_interleave(cw, -1)  # (B, KD, KH, c, PW)
    if axis == 1:
        return t.unsqueeze(2)
    return t.permute(0, 1, 3, 2, 4).unsqueeze(4)


def _masked_permutation(lengths: Tensor, capacity: int, generator) -> Tensor:
    """``(*lengths.shape, capacity)``: entries ``[:length]`` are a random permutation of
    ``0..length-1`` (argsort of random keys, keys past the length pushed to the end)."""
    keys = rand((*lengths.shape, capacity), generator, lengths.device)
    pos = _arange(capacity, str(lengths.device))
    keys = keys + (pos >= lengths[..., None]).float() * 2
    return keys.argsort(-1)


def local_shuffle_round(
    volumes: Tensor, windows: int, max_sides: tuple[int, ...], generator,
    active: Tensor | None = None, separable: bool = True, return_windows: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Shuffle the voxels inside up to ``windows`` disjoint random windows per sample.

    The volume is cut into a grid of cells of ``max_sides`` (shifted by a random offset per
    call, so window borders can fall anywhere); each chosen cell holds one window with random
    sides in ``[1, max_sides]`` at a random place inside the cell. Disjoint windows make the
    round a single gather: every voxel reads a voxel of its own window. The source index is
    the voxel's own index plus per-axis displacements broadcast from tiny per-cell tables.

    ``separable=True`` permutes the window's rows, columns and slices (the paper's P W P');
    ``False`` draws a full permutation of its voxels (the reference's flatten-and-shuffle).
    ``active`` (``(B,)`` bool) limits the round to some samples. ``return_windows`` also
    returns a ``(B, D, H, W)`` window id per voxel (-1 outside every window), for tests.
    """
    batch, channels, *spatial = volumes.shape
    device = volumes.device
    cap = _constant(tuple(max_sides), str(device))
    offsets = (rand((3,), generator, device) * cap).long().minimum(cap - 1).tolist()
    counts = [-(-(s + o) // c) for s, c, o in zip(spatial, max_sides, offsets, strict=True)]
    kd, kh, kw = counts
    n_cells = kd * kh * kw
    padded = [k * c for k, c in zip(counts, max_sides, strict=True)]
    layout = _cell_layout(tuple(spatial), tuple(max_sides), tuple(offsets), str(device))
    low, length = layout.low, layout.length
    shape = (batch, kd, kh, kw)
    sides = 1 + (rand((*shape, 3), generator, device) * cap).long().minimum(cap - 1)
    sides = torch.minimum(sides, length)
    room = length - sides
    start = low + (rand((*shape, 3), generator, device) * (room + 1)).long().minimum(room)
    keys = rand((batch, n_cells), generator, device)
    chosen = torch.zeros(batch, n_cells, dtype=torch.bool, device=device)
    chosen.scatter_(1, keys.argsort(1)[:, : min(windows, n_cells)], True)
    if active is not None:
        chosen &= active[:, None]
    chosen = chosen.view(shape)
    # Per axis and cell, a table of each position's source coordinate times the axis stride
    # (the own coordinate outside the window, the permuted one inside), or ``NEG`` where the
    # position lies outside the window along that axis (or the cell is not chosen). The three
    # tables broadcast-add into the flat source index of every voxel: a sum is negative iff
    # the voxel lies outside its window, and then reads itself. The index is int32 when it
    # fits (two full-volume adds, a compare-and-select and one ``index_select``).
    numel = volumes.numel()
    dtype = torch.int32 if numel < 2**27 else torch.long
    neg = -(2**29) if dtype == torch.int32 else -(2**60)
    strides = (spatial[1] * spatial[2], spatial[2], 1)
    tables = []
    view = [(1, kd, 1, 1, -1), (1, 1, kh, 1, -1), (1, 1, 1, kw, -1)]
    for a, c in enumerate(max_sides):
        p = layout.positions[a]
        rel = p - start[..., a:a + 1]
        inside = (rel >= 0) & (rel < sides[..., a:a + 1])
        if a == 0:
            inside &= chosen[..., None]
        own = layout.own[a].view(view[a]) * strides[a]
        if separable:
            perm = _masked_permutation(sides[..., a], c, generator)
            move = (start[..., a:a + 1] + perm.gather(-1, rel.clamp(0, c - 1)) - p) * strides[a]
            own = own + move
        else:
            own = own.expand(inside.shape)
        if a == 2:  # the sample's offset in the flat batch
            own = own + (_arange(batch, str(device)) * (numel // batch)).view(-1, 1, 1, 1, 1)
        tables.append(_to_axis(torch.where(inside, own, neg).to(dtype), a, max_sides[2]))
    summed = torch.empty(torch.broadcast_shapes(*[t.shape for t in tables]), dtype=dtype,
                         device=device)
    torch.add(tables[0], tables[1], out=summed).add_(tables[2])
    if not separable:
        summed += _full_permutation_delta(start, sides, max_sides, strides, generator).to(dtype)
    crop = tuple(slice(o, o + s) for o, s in zip(offsets, spatial, strict=True))
    padded_sum = summed.view(batch, *padded)
    source = padded_sum[(slice(None), *crop)].contiguous()
    # max(source, own & sign): the sign mask (all ones iff negative, an arithmetic shift)
    # keeps the own index outside windows; integer bit ops vectorize where ``where`` does not.
    sign = source >> (31 if dtype == torch.int32 else 63)
    index = torch.maximum(source, sign.bitwise_and_(_own_index(batch, tuple(spatial), numel // batch,
                                                               dtype, str(device))))
    index = index.view(batch, 1, -1)
    if channels > 1:
        index = index + (torch.arange(channels, device=device, dtype=dtype)
                         * math.prod(spatial)).view(1, -1, 1)
    out = volumes.reshape(-1).index_select(0, index.reshape(-1)).view(volumes.shape)
    if not return_windows:
        return out
    cell = torch.arange(n_cells, device=device).view(1, kd, 1, kh, 1, kw, 1)
    cell = cell.expand(1, kd, 1, kh, 1, kw, max_sides[2]).reshape(1, kd, 1, kh, 1, padded[2])
    cell = cell.expand(batch, kd, max_sides[0], kh, max_sides[1], padded[2])
    ids = cell.reshape(batch, *padded)[(slice(None), *crop)]
    return out, torch.where(source < 0, torch.full((), -1, device=device), ids)


class _CellLayout(NamedTuple):
    """What a shuffling round's grid of cells is, given the volume, the cell sides and the
    round's offsets: each cell's valid part (``low``, ``length``: ``(KD, KH, KW, 3)``; the
    first and last cells are clipped), and per axis the positions inside a cell
    (``arange(c)``) and each padded position's own coordinate (``arange(K * c) - offset``)."""

    low: Tensor
    length: Tensor
    positions: tuple[Tensor, ...]
    own: tuple[Tensor, ...]


@functools.lru_cache(maxsize=1024)
def _cell_layout(spatial: tuple[int, ...], max_sides: tuple[int, ...], offsets: tuple[int, ...],
                 device: str) -> _CellLayout:
    """The :class:`_CellLayout` of a round (cached: a handful of offsets per volume size, and
    on a GPU each of these small tensors would cost kernel launches every batch; never
    written to)."""
    counts = [-(-(s + o) // c) for s, c, o in zip(spatial, max_sides, offsets, strict=True)]
    lows, lengths = [], []
    for s, c, o, k in zip(spatial, max_sides, offsets, counts, strict=True):
        first = torch.arange(k, device=device) * c
        low = (o - first).clamp(0, c)
        lows.append(low)
        lengths.append((o + s - first).clamp(max=c) - low)
    grid = torch.meshgrid(*[torch.arange(k, device=device) for k in counts], indexing="ij")
    return _CellLayout(
        low=torch.stack([lows[a][grid[a]] for a in range(3)], -1),
        length=torch.stack([lengths[a][grid[a]] for a in range(3)], -1),
        positions=tuple(torch.arange(c, device=device) for c in max_sides),
        own=tuple(torch.arange(k * c, device=device) - o
                  for c, o, k in zip(max_sides, offsets, counts, strict=True)),
    )


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: str) -> Tensor:
    """``torch.arange(n)`` on ``device``, made once (never written to)."""
    return torch.arange(n, device=device)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, device: str) -> Tensor:
    """``torch.tensor(values)`` on ``device``, made once (never written to)."""
    return torch.tensor(values, device=device)


@functools.lru_cache(maxsize=16)
def _own_index(batch: int, spatial: tuple[int, ...], stride: int, dtype, device: str) -> Tensor:
    """``(B, D, H, W)`` flat index of every voxel in a batch of samples ``stride`` apart
    (cached: never written to)."""
    own = torch.arange(math.prod(spatial), device=device, dtype=dtype).view(1, *spatial)
    return own + (torch.arange(batch, device=device, dtype=dtype) * stride).view(-1, 1, 1, 1)


def _full_permutation_delta(
    start: Tensor, sides: Tensor, max_sides: tuple[int, ...], strides: tuple[int, ...],
    generator,
) -> Tensor:
    """Block-layout displacements for a full random permutation of each window's voxels:
    a voxel of rank r in its window reads the voxel of rank perm[r]."""
    batch, kd, kh, kw, _ = start.shape
    cvol = math.prod(max_sides)
    perm = _masked_permutation(sides.prod(-1), cvol, generator).view(batch, -1)
    rel, side = [], []
    for a, c in enumerate(max_sides):
        offset = (torch.arange(c, device=start.device) - start[..., a:a + 1]).clamp_min(0)
        rel.append(_to_axis(offset, a, max_sides[2]))
        side.append(_to_axis(sides[..., a:a + 1].expand(*offset.shape), a, max_sides[2]))
    rank = ((rel[0] * side[1] + rel[1]) * side[2] + rel[2]).clamp(max=cvol - 1)
    cell = torch.arange(kd * kh * kw, device=start.device).view(1, kd, 1, kh, 1, kw, 1)
    cell = cell.expand(1, kd, 1, kh, 1, kw, max_sides[2]).reshape(1, kd, 1, kh, 1, -1)
    src = perm.gather(1, (rank + cell * cvol).reshape(batch, -1)).view(rank.shape)
    plane = side[1] * side[2]
    moved = (src // plane - rel[0]) * strides[0] + ((src % plane) // side[2] - rel[1]) * strides[1]
    return moved + (src % side[2] - rel[2]) * strides[2]


def local_shuffle(
    volumes: Tensor, windows: int, max_sides: tuple[int, ...], generator,
    active: Tensor | None = None, separable: bool = True,
) -> Tensor:
    """Local pixel shuffling with ``windows`` windows per sample, in as few disjoint rounds as
    the grid allows (one round for the paper's 1,000 on 64x64x32; rounds compose)."""
    cells = math.prod(-(-s // c) for s, c in zip(volumes.shape[2:], max_sides, strict=True))
    rounds = max(1, -(-windows // cells))
    per_round = -(-windows // rounds)
    # Shuffle only the active samples (a host sync for their count): half the voxel work at
    # the reference's rate of 0.5.
    index = None if active is None else active.nonzero().flatten()
    out = volumes if index is None else volumes.index_select(0, index)
    for _ in range(rounds if out.shape[0] else 0):
        out = local_shuffle_round(out, per_round, max_sides, generator, None, separable)
    return out if index is None else volumes.index_copy(0, index, out)


# --------------------------------------------------------------------------- cutouts


def box_mask(start: Tensor, sides: Tensor, used: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """``(B, D, H, W)`` union of ``K`` boxes per sample (``start``/``sides`` ``(B, K, 3)``,
    ``used`` ``(B, K)`` bool), from per-axis 1D interval masks: the number of boxes covering
    a voxel is a batched matmul of the boxes' (D, H) slabs by their W intervals."""
    batch, k = used.shape
    device = start.device
    d, h, w = spatial
    end = start + sides
    rows = [(torch.arange(n, device=device) >= start[..., a:a + 1])
            & (torch.arange(n, device=device) < end[..., a:a + 1]) for a, n in ((0, d), (1, h))]
    slab = rows[0][..., :, None] & rows[1][..., None, :] & used[..., None, None]  # (B,K,D,H)
    span = (torch.arange(w, device=device) >= start[..., 2:3]) & (
        torch.arange(w, device=device) < end[..., 2:3])  # (B, K, W)
    # Boxes covering each voxel: sum over k of slab_k (D, H) x span_k (W), one batched matmul
    # of 0/1 floats (exact counts).
    count = torch.bmm(slab.flatten(2).transpose(1, 2).float(), span.float())
    return count.view(batch, d, h, w) > 0.5


@functools.lru_cache(maxsize=64)
def _fallback_box(spatial: tuple[int, ...], low: float, high: float) -> tuple[int, int, int]:
    """A box whose volume fraction lies in [low, high] (the most cube-like one), used when
    random candidates all miss the range after rounding to whole voxels."""
    total = math.prod(spatial)
    best, best_score = None, math.inf
    for sd in range(1, spatial[0] + 1):
        for sh in range(1, spatial[1] + 1):
            for sw in {max(1, math.ceil(low * total / (sd * sh))),
                       min(spatial[2], math.floor(high * total / (sd * sh)))}:
                if not 1 <= sw <= spatial[2] or not low <= sd * sh * sw / total <= high:
                    continue
                r = [sd / spatial[0], sh / spatial[1], sw / spatial[2]]
                score = max(r) / min(r)
                if score < best_score:
                    best, best_score = (sd, sh, sw), score
    if best is None:
        raise ValueError(f"no box of {spatial} covers a fraction in [{low}, {high}]")
    return best


def boxes_with_volume(
    batch: int, spatial: tuple[int, ...], low: float, high: float, generator, device,
    candidates: int = 16,
) -> Tensor:
    """``(B, 3)`` integer box sides whose volume fraction lies in ``[low, high]`` exactly: a
    target fraction v ~ U[low, high] split over the axes with random (Dirichlet) log-weights
    gives a random aspect ratio; rounding to voxels may leave the range, so ``candidates``
    draws are made and the first that fits is used (a fixed box if none does)."""
    dims = torch.tensor(spatial, device=device, dtype=torch.float32)
    target = low + (high - low) * rand((batch, candidates, 1), generator, device)
    weights = dirichlet3(batch * candidates, 1.0, generator, device).view(batch, candidates, 3)
    sides = (dims * target.pow(weights)).round().long()
    sides = torch.minimum(sides.clamp_min(1), dims.long())
    frac = sides.prod(-1).double() / math.prod(spatial)
    fits = (frac >= low) & (frac <= high)
    first = fits.float().argmax(1)
    pick = sides.gather(1, first.view(-1, 1, 1).expand(-1, 1, 3)).squeeze(1)
    fallback = torch.tensor(_fallback_box(tuple(spatial), low, high), device=device)
    return torch.where(fits.any(1, keepdim=True), pick, fallback)


def place(sides: Tensor, spatial: tuple[int, ...], margin: int, generator) -> Tensor:
    """Uniform random starts for boxes of ``sides`` inside the volume, keeping ``margin``
    voxels from the border where the box leaves room (the reference uses 3)."""
    dims = torch.tensor(spatial, device=sides.device)
    room = dims - sides
    m = torch.minimum(torch.full_like(room, margin), room // 2)
    return randint_between(m, room - m, generator)


def paper_cutout_boxes(
    batch: int, spatial: tuple[int, ...], window_fraction: tuple[float, float],
    max_windows: int, generator, device,
) -> tuple[Tensor, Tensor, Tensor]:
    """Up to ``max_windows`` superimposed boxes (paper: "an arbitrary number (<= 10) of
    windows, with various sizes and aspect ratios") whose union covers a fraction of the
    volume inside ``window_fraction``: the first box alone covers a fraction in the range,
    and each further box is kept only while the boxes' summed volume stays under the upper
    bound (the union never exceeds the sum). Returns starts, sides ``(B, K, 3)`` and used
    flags ``(B, K)``.

    The further boxes' random numbers are drawn box by box (the order of the generator's
    stream, which results depend on), their sides computed for all boxes at once, and only
    the budget (a running sum) is kept box by box: on a GPU every small operation is a kernel
    launch, and this function was most of genesis3d's batch construction."""
    low, high = window_fraction
    total = math.prod(spatial)
    dims = torch.tensor(spatial, device=device, dtype=torch.float32)
    first = boxes_with_volume(batch, spatial, low, high, generator, device)
    count = 1 + (rand((batch,), generator, device) * max_windows).long().clamp(max=max_windows - 1)
    sides, used = [first[:, None]], [torch.ones(batch, 1, dtype=torch.bool, device=device)]
    if max_windows > 1:
        draws = [(rand((batch, 1), generator, device), rand((batch, 3, 1), generator, device))
                 for _ in range(1, max_windows)]
        target = torch.stack([t for t, _ in draws], 1) * (high - low)  # (B, K-1, 1)
        weights = dirichlet_weights(torch.stack([u for _, u in draws], 1))  # (B, K-1, 3)
        side = torch.minimum((dims * target.pow(weights)).round().long().clamp_min(1),
                             dims.long())
        volume = side.prod(-1).double()
        allowed = torch.arange(1, max_windows, device=device) < count[:, None]
        budget = high * total - first.prod(-1).double()
        keeps = []
        for k in range(max_windows - 1):
            keep = allowed[:, k] & (volume[:, k] <= budget)
            budget = torch.where(keep, budget - volume[:, k], budget)
            keeps.append(keep)
        sides.append(side)
        used.append(torch.stack(keeps, 1))
    sides_t = torch.cat(sides, 1)
    return place(sides_t, spatial, 0, generator), sides_t, torch.cat(used, 1)


def code_cutout_boxes(
    batch: int, spatial: tuple[int, ...], kind: str, generator, device,
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference code's boxes (ModelsGenesis pytorch/utils.py image_in/out_painting):
    inner: while U < 0.95, at most 5 boxes of sides U{d//6..d//3}; outer: one box plus, while
    U < 0.95, at most 4 more, sides d - U{3d//7..4d//7}; 3-voxel margins."""
    dims = torch.tensor(spatial, device=device)
    if kind == "inner":
        low, high = dims // 6, dims // 3
        used = torch.arange(5, device=device) < leading_successes(0.95, 5, batch, generator,
                                                                   device)[:, None]
    else:
        low, high = dims - 4 * dims // 7, dims - 3 * dims // 7
        more = leading_successes(0.95, 4, batch, generator, device)
        used = torch.arange(5, device=device) <= more[:, None]
    low, high = low.clamp_min(1), high.clamp_min(1)
    sides = randint_between(low.expand(batch, 5, 3), high.expand(batch, 5, 3), generator)
    return place(sides, spatial, 3, generator), sides, used
