"""3D Contrastive Predictive Coding (Taleb et al. 2020, section 3.1, Fig. 1a; appendix).

A volume is cut into an n x n x n grid of equally sized, overlapping patches (grid axes x, y,
z follow the tensor's D, H, W). Every patch goes through the shared encoder and a linear
layer to a 64-d patch embedding z (appendix: "each extracted patch is represented using an
embedding vector of size 64"). For a centre patch (x, y, z) a GRU reads its inverted-pyramid
context, top row first: the (2d+1)^2 patches of row x-d, ..., the 3x3 patches of row x-1,
then the patch itself (d = 1 gives the reference's 10 terms; borders are mirrored as in the
reference). Its final state is the context vector c of size 1024 (appendix: "code size
1024"), and one linear predictor per step l maps c to an estimate of z at (x+l, y, z).

Reconciling the appendix's two sizes: the reference code's patch latent is Dense(1024) and its
GRU has 256 units (``embed_dim`` 64 is unused there). We read 1024 as the context code and 64
as the patch latent that is predicted; ``patch_embedding=1024, code_size=256`` gives the
reference sizes.

Every patch is encoded once per step; contexts, targets and negatives are index tensors into
the encoded patches (the reference copies each patch into every example that uses it).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from medssl_bench.config import PluginConfig, since
from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import Backbone, Encoder, ProxyTask
from medssl_bench_tasks.common import gather_with_grad, process_group
from medssl_bench_tasks.patches import BUFFERS, PatchEmbedder


@dataclass(frozen=True)
class Grid:
    """Where the patches lie along each spatial axis."""

    n: int
    patch: tuple[int, ...]
    stride: tuple[int, ...]
    start: tuple[int, ...]


def grid_geometry(shape: tuple[int, ...], n: int, overlap: float) -> Grid:
    """``n`` patches per axis, neighbours sharing ``overlap`` of a patch, centred in the
    image. 128^3 with n=7, overlap 0.5 gives 32^3 patches at stride 16; n=4, overlap 0 gives
    the reference's disjoint 32^3 patches."""
    patch, stride, start = [], [], []
    for size in shape:
        p = int(size / (1 + (n - 1) * (1 - overlap)))
        s = max(1, round(p * (1 - overlap))) if n > 1 else p
        while p > 1 and p + (n - 1) * s > size:
            p -= 1
        if p < 1:
            raise ConfigError(f"cpc: an axis of {size} voxels cannot hold {n} patches; lower "
                              "task.patches_per_side.")
        patch.append(p)
        stride.append(s)
        start.append((size - p - (n - 1) * s) // 2)
    return Grid(n, tuple(patch), tuple(stride), tuple(start))


def extract_patches(images: Tensor, grid: Grid) -> Tensor:
    """All grid patches as a view (no copy): ``(B, n, ..., n, C, *patch)`` (any dims)."""
    d = images.dim() - 2
    x = images
    for axis in range(d):
        length = grid.patch[axis] + (grid.n - 1) * grid.stride[axis]
        x = x.narrow(2 + axis, grid.start[axis], length)
    for axis in range(d):
        x = x.unfold(2 + axis, grid.patch[axis], grid.stride[axis])
    return x.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))


def grid_patches(images: Tensor, grid: Grid) -> Tensor:
    """All grid patches, copied once into a contiguous ``(B, n, ..., n, C, *patch)`` tensor.

    The overlapping patches must be materialised for the encoder anyway (a batch of them is
    its input); doing it here makes it part of batch construction, where it is timed, and
    writes it into a reused buffer (:data:`~medssl_bench_tasks.patches.BUFFERS`): at 128^3
    the 343 patches of 32^3 are 45 MB per volume, and filling freshly mapped memory costs
    several times the copy itself."""
    view = extract_patches(images, grid)
    return BUFFERS.empty(view.shape, view.dtype, view.device).copy_(view)


def _mirror(index: int, n: int) -> int:
    """Reflect an out-of-grid index back inside (the reference's ``mirror=True``)."""
    if index < 0:
        index = -index
    if index >= n:
        index = 2 * (n - 1) - index
    return min(max(index, 0), n - 1)


@lru_cache(maxsize=64)
def pyramid_context(
    n: int, depth: int, steps: int, centre_rows: str, dims: int = 3, gap: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Grid coordinates of the CPC examples of one image (``dims`` = 3 for volumes).

    Returns ``centres (Q, dims)``, ``context (Q, T, dims)`` and ``targets (Q, steps, dims)``.
    In 3D the context of centre (x, y, z) lists, top row first, the (2k+1)^2 patches of row
    x-k for k = depth..1 (y-major, mirrored at the grid border), then the centre itself, so
    ``T = 1 + sum_k (2k+1)^2``; in 2D row x-k contributes its 2k+1 patches. Targets are
    (x+gap+1, y, z), ..., (x+gap+steps, y, z): ``gap`` rows are skipped (the reference's 2D
    code skips one, since with half-patch overlap the next row shares half the centre
    patch). Centre rows are every row with ``depth`` rows above and ``gap + steps`` below
    (``all``; the paper's loss sums over every position), or only row n//2 - 1 (``middle``;
    the reference).
    """
    reach = gap + steps
    if centre_rows == "middle":
        rows = [n // 2 - 1]
    else:
        rows = list(range(depth, n - reach))
    rows = [x for x in rows if x - depth >= 0 and x + reach <= n - 1]
    if not rows:
        raise ConfigError(
            f"cpc: a grid of {n} patches per side has no row with {depth} context row(s) above "
            f"and {reach} row(s) below (skipped plus predicted); raise task.patches_per_side "
            "or lower task.context_depth / task.predict_steps / task.target_gap."
        )
    centres, context, targets = [], [], []
    for x in rows:
        for column in itertools.product(range(n), repeat=dims - 1):
            terms = []
            for k in range(depth, 0, -1):
                for offset in itertools.product(range(-k, k + 1), repeat=dims - 1):
                    terms.append((x - k, *(_mirror(c + o, n) for c, o in
                                           zip(column, offset, strict=True))))
            terms.append((x, *column))
            centres.append((x, *column))
            context.append(terms)
            targets.append([(x + gap + step, *column) for step in range(1, steps + 1)])
    return torch.tensor(centres), torch.tensor(context), torch.tensor(targets)


def flat_index(coords: Tensor, n: int) -> Tensor:
    """Grid coordinates ``(..., dims)`` to positions in the flattened ``n^dims`` grid."""
    index = coords[..., 0]
    for axis in range(1, coords.shape[-1]):
        index = index * n + coords[..., axis]
    return index


class CPC3D(ProxyTask):
    """3D Contrastive Predictive Coding over an inverted-pyramid context of patches."""

    name = "cpc3d"
    family = "contrastive"
    spatial_dims = 3
    paper_input_size = (128, 128, 128)
    min_input_size = (32, 32, 32)
    #: quick: the reference code's non-overlapping 4x4x4 grid (64 patches, not 343) on two
    #: volumes per step, so a CPU step stays affordable when every patch is padded up to the
    #: backbone's input size.
    presets = {"quick": {"patches_per_side": 4, "overlap": 0.0, "volumes_per_step": 2}}

    class Config(PluginConfig):
        patches_per_side: int = Field(
            default=7, ge=3, description="Patches per axis. 7 with half-patch overlap gives "
            "32^3 patches at 128^3 (the paper's overlapping patches; the same 7 per side as "
            "the reference's 2D CPC); the reference 3D code uses 4 without overlap.")
        overlap: float = Field(
            default=0.5, ge=0, lt=1, description="Fraction of a patch shared with its "
            "neighbour. The paper says overlapping without an amount; 0.5 follows the "
            "reference's 2D CPC; 0 is the reference's 3D grid.")
        context_depth: int = Field(
            default=1, ge=1, description="Rows of the inverted pyramid above the centre "
            "patch; row x-k contributes (2k+1)^2 patches. 1 gives the 10 terms of the "
            "reference and Fig. 1a (centre + 3x3 above).")
        predict_steps: int = Field(
            default=2, ge=1, description="Rows below the centre whose latents are predicted, "
            "one linear predictor each (Fig. 1a: z_{i+1}, z_{i+2}; reference: rows 2 and 3).")
        target_gap: int | None = Field(
            default=None, ge=0, description="Rows skipped between the centre and the first "
            "predicted row. null: 1 when patches overlap, so no predicted patch shares voxels "
            "with the centre patch (with half-patch overlap, row x+1 would be half the centre "
            "itself: a shortcut), else 0 (Fig. 1a and the reference's non-overlapping 3D code; "
            "its 2D code skips 1).")
        centre_rows: Literal["all", "middle"] = Field(
            default="all", description="all: every row with a full context above and targets "
            "below is a centre (the paper's loss sums over all positions); middle: only row "
            "n//2-1, as the reference code.")
        patch_embedding: int = Field(
            default=64, ge=1, description="Size of the patch latent z that is predicted "
            "(appendix: patch embedding 64; the reference's Dense(code_size)=1024).")
        code_size: int = Field(
            default=1024, ge=1, description="Size of the GRU context vector c (appendix: "
            "code size 1024; the reference's GRU has 256 units).")
        loss: Literal["infonce", "binary"] = Field(
            default="infonce", description="infonce: N-way classification of the true latent "
            "among negatives (the paper, Eq. 1); binary: the reference's 1:1 pairs, "
            "sigmoid of the mean dot product with binary cross-entropy.")
        num_negatives: int = Field(
            default=127, ge=1, description="InfoNCE negatives per prediction, drawn at random "
            "from the other patches of the batch (other positions of the same volume and "
            "patches of other volumes; the paper draws them at random without a count).")
        gather_negatives: bool = Field(
            default=True, json_schema_extra=since("0.2"), description="Under DDP, draw the "
            "InfoNCE negatives from the patches of every rank's volumes (the global batch, as "
            "one process would), gathering the patch embeddings with gradient for the local "
            "part; a no-op in one process and for the binary loss.")
        volumes_per_step: int | None = Field(
            default=None, ge=1, description="Use only the first N volumes of each batch: every "
            "patch passes through the full encoder, so a CPC step costs patches-per-volume times "
            "a whole-volume step (the reference trains on about one volume per step). null: the "
            "whole batch.")
        augment: bool = Field(
            default=False, description="The reference code's augmentation: random 95% crop "
            "of the volume zero-padded back, per patch a random 7/8 crop zero-padded back and "
            "a flip along x with p=0.5. The paper describes none, so it is off by default.")

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        c = self.config
        return nn.ModuleDict({
            # patches smaller than the backbone accepts are zero-padded up to it
            "patch": PatchEmbedder.for_backbone(backbone, encoder, c.patch_embedding, "multiple"),
            "context": nn.GRU(c.patch_embedding, c.code_size, batch_first=True),
            # one linear predictor per step, stored as one layer with steps * dim outputs
            "predict": nn.Linear(c.code_size, c.predict_steps * c.patch_embedding),
        })

    @property
    def target_gap(self) -> int:
        gap = self.config.target_gap
        return gap if gap is not None else int(self.config.overlap > 0)

    def check_input(self, image_shape, channels) -> None:
        super().check_input(image_shape, channels)
        c = self.config
        grid_geometry(tuple(image_shape), c.patches_per_side, c.overlap)
        pyramid_context(c.patches_per_side, c.context_depth, c.predict_steps, c.centre_rows,
                        self.spatial_dims, self.target_gap)

    def grid(self, shape: tuple[int, ...]) -> Grid:
        return grid_geometry(shape, self.config.patches_per_side, self.config.overlap)

    # ------------------------------------------------------------------ batches

    def make_batch(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        c = self.config
        if c.volumes_per_step is not None:
            images = images[: c.volumes_per_step]
        b, n, device = images.shape[0], c.patches_per_side, images.device
        d = images.dim() - 2
        grid = self.grid(tuple(images.shape[2:]))
        if c.augment:
            patches = augmented_patches(images, grid, generator)
        else:
            patches = grid_patches(images, grid)
        centres, context, targets = (
            t.to(device) for t in pyramid_context(n, c.context_depth, c.predict_steps,
                                                  c.centre_rows, d, self.target_gap))
        per_volume = n**d
        offset = (torch.arange(b, device=device) * per_volume).view(b, 1, 1)
        context_index = (flat_index(context, n).unsqueeze(0) + offset).flatten(0, 1)
        target_index = (flat_index(targets, n).unsqueeze(0) + offset).flatten(0, 1)
        queries = target_index.shape[0]
        if c.loss == "infonce":
            # every patch of the pool (this rank's, or every rank's: this one's start at
            # rank * total) but the positive
            total = b * per_volume
            rank, world = self._pool()
            draw = torch.randint(0, world * total - 1, (queries, c.predict_steps, c.num_negatives),
                                 generator=generator, device=device)
            negative_index = draw.add_(draw >= target_index.unsqueeze(-1) + rank * total)
        else:
            # a random other (volume, y[, z]) column, same target rows (reference)
            per_row = n ** (d - 1)
            columns = b * per_row
            own = (torch.arange(b, device=device).view(b, 1) * per_row
                   + flat_index(centres[:, 1:], n).view(1, -1)).flatten()
            draw = torch.randint(0, columns - 1, (queries,), generator=generator, device=device)
            other = draw.add_(draw >= own)  # skip the own column
            vol, col = other // per_row, other % per_row
            rows = targets[:, :, 0].repeat(b, 1)
            negative_index = (vol.view(-1, 1) * per_volume + rows * per_row + col.view(-1, 1))
        return {"patches": patches, "context_index": context_index,
                "target_index": target_index, "negative_index": negative_index}

    # ------------------------------------------------------------------ loss

    def _pool(self) -> tuple[int, int]:
        """(rank, world) whose patches are InfoNCE negatives (see ``gather_negatives``)."""
        c = self.config
        return process_group() if c.gather_negatives and c.loss == "infonce" else (0, 1)

    def compute_loss(self, encoder, heads, batch):
        c = self.config
        patches = batch["patches"]
        d = (patches.dim() - 2) // 2
        flat = patches.reshape(-1, *patches.shape[1 + d:])
        z = heads["patch"](encoder, flat)  # (P, dim)
        # The GRU and the scores in fp32 even under bf16 autocast: CUDA autocast casts cuDNN
        # RNNs to fp16 (no grad scaler here) and einsum to bf16 (logits to ~3 digits).
        with torch.autocast(z.device.type, enabled=False):
            _, state = heads["context"](z[batch["context_index"]].float())
            preds = heads["predict"](state[-1]).view(-1, c.predict_steps, c.patch_embedding)
            keys, offset = gather_with_grad(z.float()) if self._pool()[1] > 1 else (z, 0)
            scores = torch.einsum("qsd,pd->qsp", preds.float(), keys.float())  # every patch
        positive = scores.gather(2, batch["target_index"].unsqueeze(-1) + offset)
        if c.loss == "infonce":
            negative = scores.gather(2, batch["negative_index"])
            logits = torch.cat([positive, negative], 2).flatten(0, 1)
            labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            loss = F.cross_entropy(logits, labels)
            with torch.no_grad():
                acc = (logits.argmax(1) == 0).float().mean().item()
            return loss, {"acc": acc}
        negative = scores.gather(2, batch["negative_index"].unsqueeze(-1))
        # mean over steps of the mean elementwise product, as the reference's CPCLayer
        pos_logit = positive.squeeze(-1).mean(1) / c.patch_embedding
        neg_logit = negative.squeeze(-1).mean(1) / c.patch_embedding
        logits = torch.cat([pos_logit, neg_logit])
        labels = torch.cat([torch.ones_like(pos_logit), torch.zeros_like(neg_logit)])
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        with torch.no_grad():
            acc = ((logits > 0).float() == labels).float().mean().item()
        return loss, {"acc": acc}


def augmented_patches(images: Tensor, grid: Grid, generator: torch.Generator,
                      volume_crop: float = 0.95, patch_crop: float = 7 / 8) -> Tensor:
    """The reference's CPC augmentation in one gather: a random ``volume_crop`` crop of each
    volume zero-padded back to size, then per patch a random ``patch_crop`` crop zero-padded
    back (centred) and a flip along x with p=0.5. Both crops are shifts plus zero frames, so
    each output patch is a window of the (padded) volume at a shifted start, masked; flipped
    patches are windows of the x-flipped volume. Works for any number of spatial dims;
    returns ``(B, n, ..., n, C, *patch)``."""
    b = images.shape[0]
    n, device = grid.n, images.device
    shape = images.shape[2:]
    d = len(shape)
    cells = (b, *([n] * d))
    starts, masks = [], []
    flip = torch.rand(cells, generator=generator, device=device) < 0.5
    margins = []
    for axis in range(d):
        size, p = shape[axis], grid.patch[axis]
        crop_v, crop_p = int(volume_crop * size), int(patch_crop * p)
        margins.append((size - crop_v) + (p - crop_p) + 1)
    padded = F.pad(images, [m for m in reversed(margins) for _ in range(2)])
    for axis in range(d):
        size, p, m = shape[axis], grid.patch[axis], margins[axis]
        crop_v, crop_p = int(volume_crop * size), int(patch_crop * p)
        pad_v, pad_p = (size - crop_v) // 2, (p - crop_p) // 2
        shift_v = torch.randint(0, size - crop_v + 1, (b,), generator=generator,
                                device=device) - pad_v
        shift_p = torch.randint(0, p - crop_p + 1, cells, generator=generator,
                                device=device) - pad_p
        origin = grid.start[axis] + torch.arange(n, device=device) * grid.stride[axis]
        view = [1] * (d + 1)
        view[1 + axis] = n
        origin = origin.view(view)
        start = origin + shift_p + shift_v.view(b, *([1] * d)) + m  # in padded coordinates
        i = torch.arange(p, device=device)
        in_patch = (i >= pad_p) & (i < pad_p + crop_p)
        position = (origin + shift_p).unsqueeze(-1) + i  # in cropped-volume coordinates
        mask = in_patch & (position >= pad_v) & (position < pad_v + crop_v)
        if axis == 0:
            start = torch.where(flip, padded.shape[2] - p - start, start)
            mask = torch.where(flip.unsqueeze(-1), mask.flip(-1), mask)
        starts.append(start)
        masks.append(mask)
    source = torch.cat([padded, padded.flip(2)])
    windows = source
    for axis in range(d):
        windows = windows.unfold(2 + axis, grid.patch[axis], 1)
    volume = torch.arange(b, device=device).view(b, *([1] * d)) + b * flip.long()
    out = windows[(volume, slice(None), *starts)]
    mask = masks[0].view(*cells, grid.patch[0], *([1] * (d - 1)))
    for axis in range(1, d):
        view = [1] * d
        view[axis] = grid.patch[axis]
        mask = mask & masks[axis].view(*cells, *view)
    return out.mul_(mask.unsqueeze(1 + d).to(out.dtype))
