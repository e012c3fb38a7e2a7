"""Rotation prediction (Gidaris et al.; 3D version of Taleb et al. 2020, section 3.4)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from medssl_bench.config import PluginConfig
from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import Backbone, Encoder, ProxyTask, global_pool
from medssl_bench_tasks.augment import permuted_copy
from medssl_bench_tasks.common import MLPHead, classification_loss, randint
from medssl_bench_tasks.patches import BUFFERS

#: The 10 classes of the reference code (preprocess_rotation.py): (k, spatial axes) for
#: ``torch.rot90``; class 0 is the identity. Axes index the spatial dims (D, H, W).
ROTATIONS_3D: tuple[tuple[int, tuple[int, int]], ...] = (
    (0, (0, 1)),
    (1, (0, 1)), (2, (0, 1)), (3, (0, 1)),
    (3, (1, 2)), (2, (1, 2)), (1, (1, 2)),
    (3, (0, 2)), (2, (0, 2)), (1, (0, 2)),
)


RotationTable = tuple[tuple[int, tuple[int, int]], ...]


def rotate(
    volumes: Tensor, label: int, inverse: bool = False, table: RotationTable = ROTATIONS_3D
) -> Tensor:
    """Rotate ``(N, C, *spatial)`` images by rotation class ``label`` of ``table`` (or undo it)."""
    k, (a, b) = table[label]
    return torch.rot90(volumes, -k if inverse else k, dims=(a + 2, b + 2))


def rotated_copies(
    images: Tensor, labels: Tensor, copies: int = 1, table: RotationTable = ROTATIONS_3D,
    sources: Tensor | None = None,
) -> Tensor:
    """Rotated copies of ``images``: output row ``r`` is image ``sources[r]`` rotated by
    ``labels[r]``; by default ``copies`` per image, copy ``j`` of image ``i`` at row
    ``i * copies + j``.

    One gather and one ``rot90`` per class present, never per sample, and no intermediate
    batch of unrotated copies: at 128^3 this is memory-bound, so every avoided copy counts.
    Where a class's rows are one contiguous block (labels sorted, as
    :meth:`Rotation3D.make_batch` arranges them) its copies are written straight into that
    block of the output; scattered rows cost one more copy (``index_copy_``). The output and
    scratch come from the reused buffers of :data:`~medssl_bench_tasks.patches.BUFFERS`
    (fresh 128^3 batches cost page faults several times the copy).
    """
    if sources is None:
        sources = torch.arange(images.shape[0], device=images.device).repeat_interleave(copies)
    shape = (len(sources), *images.shape[1:])
    out = BUFFERS.empty(shape, images.dtype, images.device)
    fast = images.dim() == 5 and images.device.type == "cpu"
    images = images.contiguous()
    for label in torch.unique(labels).tolist():
        rows = (labels == label).nonzero().flatten()
        first, count = int(rows[0]), rows.numel()
        block = out[first:first + count] if int(rows[-1]) - first + 1 == count else None
        if fast:
            rotated = _rotated_rows(images, sources[rows], *table[label], out=block)
        else:
            gathered = torch.index_select(images, 0, sources[rows])
            rotated = _rotated(gathered, *table[label])
            if block is not None:
                block.copy_(rotated)
                continue
        if block is None:
            out.index_copy_(0, rows, rotated)
        elif rotated.data_ptr() != block.data_ptr():
            block.copy_(rotated)
    return out


def _gather_rows(x: Tensor, volumes: Tensor, grid: Tensor, out: Tensor | None = None) -> Tensor:
    """``x[volumes]`` with its (D, H) grid of W-rows rearranged: output row ``(d, h)`` is input
    row ``grid[d, h]`` (a flattened (D, H) index). One ``index_select`` of whole contiguous
    rows into ``out`` (or a reused buffer), so flips of D and H and turns in the (D, H) plane
    cost one copy at memory speed."""
    n, channels, depth, height, width = x.shape
    plane = depth * height
    base = (volumes.view(-1, 1) * channels + torch.arange(channels, device=x.device)) * plane
    index = (base.view(-1, channels, 1) + grid.reshape(1, 1, plane)).flatten()
    if out is None:
        out = BUFFERS.empty((volumes.numel(), channels, depth, height, width), x.dtype, x.device)
    torch.index_select(x.view(-1, width), 0, index, out=out.view(-1, width))
    return out


def _rotated_rows(
    x: Tensor, volumes: Tensor, k: int, axes: tuple[int, int], out: Tensor | None = None
) -> Tensor:
    """``torch.rot90(x[volumes], k, spatial axes)`` for a contiguous cubic ``(N, C, D, H, W)``
    batch, built from whole-row gathers (:func:`_gather_rows`) and at most one
    :func:`~medssl_bench_tasks.augment.permuted_copy`, the last step written into ``out``
    when given; only a half turn in a plane with W reverses rows (``flip``)."""
    depth, height = x.shape[2], x.shape[3]
    ids = torch.arange(depth * height, device=x.device).view(depth, height)
    k %= 4
    a, b = axes
    if k == 0:
        return _gather_rows(x, volumes, ids, out)
    if b != 2:  # the (D, H) plane: whole W-rows move
        return _gather_rows(x, volumes, torch.rot90(ids, k, (a, b)), out)
    order = [0, 1, 2, 3, 4]
    order[a + 2], order[4] = 4, a + 2
    if k == 2:
        return _gather_rows(x, volumes, ids.flip(a)).flip(4)
    if k == 3:  # flip a, then swap a and W
        return permuted_copy(_gather_rows(x, volumes, ids.flip(a)), order, out)
    # k == 1: flip W, then swap a and W == swap a and W, then flip the new axis a
    swapped = permuted_copy(_gather_rows(x, volumes, ids), order)
    return _gather_rows(swapped, torch.arange(volumes.numel(), device=x.device), ids.flip(a),
                        out)


def _rotated(x: Tensor, k: int, axes: tuple[int, int]) -> Tensor:
    """``torch.rot90(x, k, spatial axes)`` of a contiguous ``(N, C, D, H, W)`` batch, the same
    flips then axis swap, with the swap done by :func:`~medssl_bench_tasks.augment.
    permuted_copy` (a plain strided copy that moves D innermost is several times slower)."""
    k %= 4
    if k == 0:
        return x  # rot90 would return a fresh copy
    a, b = axes[0] + 2, axes[1] + 2
    if k == 2:
        return x.flip((a, b))
    flipped = x.flip(b if k == 1 else a)
    order = list(range(x.dim()))
    order[a], order[b] = order[b], order[a]
    return permuted_copy(flipped, order) if x.dim() == 5 else flipped.transpose(a, b)


def rotate_batch(volumes: Tensor, labels: Tensor, table: RotationTable = ROTATIONS_3D) -> Tensor:
    """Rotate each volume by its own class."""
    return rotated_copies(volumes, labels, 1, table)


class Rotation3D(ProxyTask):
    """3D rotation prediction: 10 classes of multiples of 90 degrees about the three axes."""

    name = "rotation3d"
    family = "pretext-classification"
    spatial_dims = 3

    class Config(PluginConfig):
        copies_per_volume: int = Field(
            default=4, ge=1, le=10,
            description="Rotated copies of each volume per step, each with its own random class "
            "(the paper creates multiple rotated versions per scan; the reference code uses 1).",
        )
        hidden: int = Field(
            default=1024, ge=1,
            description="Width of the hidden ReLU layer before the classifier (appendix).",
        )

    def check_input(self, image_shape, channels) -> None:
        super().check_input(image_shape, channels)
        if len(set(image_shape)) != 1:
            raise ConfigError(
                f"Task 'rotation3d' rotates by 90 degrees about every axis and needs cubic "
                f"volumes, but the dataset gives {tuple(image_shape)}. Resize the dataset to a cube."
            )

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        return nn.ModuleDict(
            {"classifier": MLPHead(encoder.embed_dim, self.config.hidden, len(self.rotations))}
        )

    rotations: RotationTable = ROTATIONS_3D

    @property
    def copies(self) -> int:
        return self.config.copies_per_volume

    def make_batch(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """``inputs`` row ``r`` is image ``sources[r]`` rotated by class ``labels[r]``, each
        image ``copies`` times. Rows are ordered by class (the loss and the network's
        normalisation do not depend on row order), so each class is written straight into
        its block of the batch, one copy less than a scatter."""
        count = images.shape[0] * self.copies
        labels = randint(len(self.rotations), (count,), generator, images.device)
        labels, order = labels.sort(stable=True)
        sources = torch.arange(images.shape[0], device=images.device).repeat_interleave(
            self.copies)[order]
        return {"inputs": rotated_copies(images, labels, self.copies, self.rotations, sources),
                "labels": labels, "sources": sources}

    def compute_loss(self, encoder, heads, batch):
        logits = heads["classifier"](global_pool(encoder(batch["inputs"])))
        return classification_loss(logits, batch["labels"])
