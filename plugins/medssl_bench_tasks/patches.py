"""Jittered patch grids for the patch-based proxy tasks (relative patch location, jigsaw).

An image of spatial size ``S`` is cut into an ``n x ... x n`` grid of cells of side
``S // n``; from each cell a patch of side ``cell - jitter`` is cropped at a random offset
``0..jitter`` (Taleb et al. 2020: cell 42, patch 39 at 128^3, jitter 3). The random gaps stop
the network from solving the task by continuing edges and textures across patch borders.

Everything is written for any number of spatial dims (2D and 3D tasks share it) and works
on whole batches at once with torch indexing on the images' device: the patches are gathered
as contiguous rows from a strided *view* of the batch, so the only memory traffic is the
single copy of the selected patches.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from medssl_bench.errors import ConfigError
from medssl_bench.interfaces import Backbone, Encoder, global_pool


class BufferPool:
    """Reusable CPU output buffers for batch construction, handed out only when free.

    Why: a batch of 128^3 volumes is over 32 MB, so glibc serves every such tensor with a
    fresh ``mmap`` and returns it with ``munmap`` when freed; the next step's copy then
    page-faults every 4 KB page and the kernel zeroes it first. On a 2-core CPU that costs
    5-10x the copy itself (filling a fresh 8 MB volume: about 7 ms; refilling a used one:
    about 1 ms). The pool keeps up to ``per_key`` buffers per shape and dtype and hands one
    out as a *new* tensor view of it, so it is free exactly when nothing but the pool refers
    to its storage: a caller that keeps a batch (or a view of it, or autograd saving it for
    backward) holds the storage and the pool allocates another buffer instead, so outputs
    never alias. Only for the CPU (CUDA has its own caching allocator) and only for buffers
    of at least ``min_bytes``; at most ``max_keys`` shapes and ``max_bytes`` in all are kept
    (least recently used shapes are dropped first).
    """

    def __init__(self, per_key: int = 3, max_keys: int = 16, min_bytes: int = 1 << 20,
                 max_bytes: int = 1 << 30) -> None:
        self.per_key, self.max_keys, self.min_bytes = per_key, max_keys, min_bytes
        self.max_bytes = max_bytes
        self.enabled = True
        self._buffers: OrderedDict[tuple, list[Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _free(base: Tensor) -> bool:
        # one reference from ``base`` itself and one from the temporary storage object
        return torch._C._storage_Use_Count(base.untyped_storage()._cdata) <= 2

    def empty(self, shape: Sequence[int], dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> Tensor:
        """An uninitialised tensor like ``torch.empty(shape, dtype=dtype, device=device)``."""
        shape = tuple(int(s) for s in shape)
        device = torch.device(device)
        numel = 1
        for size in shape:
            numel *= size
        itemsize = torch.empty((), dtype=dtype).element_size()
        if (not self.enabled or device.type != "cpu" or numel * itemsize < self.min_bytes):
            return torch.empty(shape, dtype=dtype, device=device)
        key = (shape, dtype)
        with self._lock:
            entries = self._buffers.setdefault(key, [])
            self._buffers.move_to_end(key)
            for base in entries:
                if self._free(base):
                    return base.view(shape)
            with torch.inference_mode(False):  # usable in and outside inference mode
                base = torch.empty(shape, dtype=dtype)
            if len(entries) < self.per_key:
                entries.append(base)
            while len(self._buffers) > 1 and (len(self._buffers) > self.max_keys
                                              or self._held_bytes() > self.max_bytes):
                self._buffers.popitem(last=False)
            return base.view(shape)

    def _held_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for e in self._buffers.values() for b in e)

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()


#: The pool the batch-construction code of the proxy tasks draws its outputs from.
BUFFERS = BufferPool()


@dataclass(frozen=True)
class PatchGrid:
    """The geometry of a jittered patch grid over an image of a given spatial size."""

    grid: int
    jitter: int
    cell: tuple[int, ...]
    patch: tuple[int, ...]

    @classmethod
    def for_size(cls, spatial_size: Sequence[int], grid: int, jitter: int) -> PatchGrid:
        """Geometry for ``spatial_size``; raises :class:`ConfigError` if no patch fits."""
        cell = tuple(int(s) // grid for s in spatial_size)
        patch = tuple(c - jitter for c in cell)
        if min(patch) < 1:
            raise ConfigError(
                f"A {grid}-per-side patch grid with jitter {jitter} leaves no room for patches in "
                f"images of size {tuple(spatial_size)} (cells of {cell}). Use larger images, a "
                f"smaller grid or a smaller jitter."
            )
        return cls(grid=grid, jitter=jitter, cell=cell, patch=patch)

    @property
    def spatial_dims(self) -> int:
        return len(self.cell)

    @property
    def num_cells(self) -> int:
        return self.grid**self.spatial_dims

    @property
    def centre(self) -> int:
        """Row-major index of the centre cell (odd grids only; 13 for a 3x3x3 grid)."""
        return self.num_cells // 2

    def cell_coords(self, device: torch.device | str | None = None) -> Tensor:
        """``(num_cells, spatial_dims)`` grid coordinates of every cell, row-major order."""
        axes = [torch.arange(self.grid, device=device)] * self.spatial_dims
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, self.spatial_dims)

    def random_starts(self, cells: Tensor, generator: torch.Generator) -> Tensor:
        """Corner voxel of a jittered patch in each of ``cells``.

        ``cells`` is a ``(B, K)`` long tensor of row-major cell indices; the result is
        ``(B, K, spatial_dims)``: the cell's corner plus an offset drawn from ``0..jitter``
        per axis, independently for every patch and sample.
        """
        device = cells.device
        offsets = torch.randint(
            self.jitter + 1, (*cells.shape, self.spatial_dims), generator=generator, device=device
        )
        cell = torch.tensor(self.cell, device=device)
        return self.cell_coords(device)[cells] * cell + offsets


def extract_patches(images: Tensor, starts: Tensor, patch: Sequence[int]) -> Tensor:
    """Crop ``patch``-sized boxes at ``starts`` from every image, without a Python loop.

    ``images`` is ``(B, C, *spatial)``, ``starts`` is ``(B, K, spatial_dims)`` (the first voxel
    of each box); returns ``(B, K, C, *patch)``.

    Why rows: a box is a stack of contiguous runs ("rows") of ``patch[-1]`` voxels along the
    last axis. The flat batch is viewed (``as_strided``, no copy) as a matrix whose row ``i``
    is the run starting at flat element ``i``, and one ``index_select`` copies the wanted rows.
    That copies whole runs at memory speed, about 3x faster on the CPU than an element-wise
    advanced index of a sliding-window view, and works the same on CUDA.
    """
    dims = images.dim() - 2
    if starts.shape[-1] != dims or len(patch) != dims:
        raise ValueError(
            f"starts {tuple(starts.shape)} and patch {tuple(patch)} do not match "
            f"{dims} spatial dims of images {tuple(images.shape)}"
        )
    images = images.contiguous()
    batch, channels = images.shape[:2]
    count = starts.shape[1]
    device = images.device
    strides = images.stride()
    # Flat offset of each row's first voxel, shape (B, K, C, *patch[:-1]).
    lead = (1,) * (dims - 1)
    offset = (
        torch.arange(batch, device=device).view(batch, 1, 1, *lead) * strides[0]
        + torch.arange(channels, device=device).view(1, 1, channels, *lead) * strides[1]
        + (starts[..., -1] * strides[-1]).view(batch, count, 1, *lead)
    )
    for axis in range(dims - 1):
        shape = [1] * (dims - 1)
        shape[axis] = int(patch[axis])
        steps = torch.arange(int(patch[axis]), device=device).view(1, 1, 1, *shape)
        offset = offset + (starts[..., axis].view(batch, count, 1, *lead) + steps) * strides[
            2 + axis
        ]
    row = int(patch[-1])
    flat = images.view(-1)
    rows = flat.as_strided((flat.numel() - row + 1, row), (1, 1))
    index = offset.reshape(-1)
    out = BUFFERS.empty((index.numel(), row), images.dtype, device)
    torch.index_select(rows, 0, index, out=out)
    return out.view(batch, count, channels, *patch)


def extract_grid_patches(
    images: Tensor,
    grid: int,
    jitter: int,
    generator: torch.Generator,
    cells: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Jittered patches of the given grid ``cells`` (default: all, row-major) of each image.

    ``cells`` is ``(B, K)`` or ``(K,)`` (the same cells for every image). Returns the patches
    ``(B, K, C, *patch)`` and their corners ``(B, K, spatial_dims)``, from which a caller or a
    test can recompute every patch.
    """
    geometry = PatchGrid.for_size(images.shape[2:], grid, jitter)
    batch = images.shape[0]
    if cells is None:
        cells = torch.arange(geometry.num_cells, device=images.device)
    if cells.dim() == 1:
        cells = cells.expand(batch, -1)
    starts = geometry.random_starts(cells.to(images.device), generator)
    return extract_patches(images, starts, geometry.patch), starts


class PatchEmbedder(torch.nn.Module):
    """Shared encoder -> global pooling -> Linear to the per-patch embedding (64 in Taleb et
    al.'s appendix), for a batch of patches ``(N, C, *patch)``.

    Patches are smaller than the images the backbone was built for (7^3 at 32^3, 39^3 at
    128^3), so they are zero-padded symmetrically: to at least the backbone's
    ``min_input_size`` (an instance-norm U-Net needs more than one voxel at its deepest
    level), and either to the next ``size_multiple`` (``"multiple"``, what the backbone
    contract promises to accept) or no further (``"minimum"``, enough for a pooling U-Net,
    which floors odd sizes as the reference Keras code did with its 39^3 patches).
    """

    def __init__(
        self, in_features: int, embed_dim: int, size_multiple: int, min_size: int, padding: str
    ) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(in_features, embed_dim)
        self.size_multiple = int(size_multiple)
        self.min_size = int(min_size)
        self.padding = padding

    @classmethod
    def for_backbone(
        cls, backbone: Backbone, encoder: Encoder, embed_dim: int, padding: str
    ) -> PatchEmbedder:
        return cls(encoder.embed_dim, embed_dim, backbone.size_multiple(),
                   backbone.min_input_size(), padding)

    def pad(self, patches: Tensor) -> Tensor:
        m = self.size_multiple
        pads: list[int] = []
        for size in reversed(patches.shape[2:]):
            target = -(-size // m) * m if self.padding == "multiple" else size
            target = max(target, self.min_size)
            extra = target - size
            pads += [extra // 2, extra - extra // 2]
        return torch.nn.functional.pad(patches, pads) if any(pads) else patches

    def forward(self, encoder: Encoder, patches: Tensor) -> Tensor:
        return self.proj(global_pool(encoder(self.pad(patches))))
