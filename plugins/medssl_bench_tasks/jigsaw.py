"""Jigsaw puzzles (Noroozi & Favaro 2016; 3D version of Taleb et al. 2020, section 3.3).

The n x n x n jittered patches of a volume are shuffled by one of P fixed permutations; the
network embeds every patch with the shared encoder, concatenates the embeddings in the
shuffled order and predicts which permutation was used. How hard the task is depends on how
different the permutations are, so the set is chosen by the maximal-Hamming-distance greedy
algorithm of Noroozi & Favaro (the appendix); the reference code's uniformly random set is an
option.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from medssl_bench.config import PluginConfig
from medssl_bench.interfaces import Backbone, Encoder, ProxyTask
from medssl_bench_tasks.common import MLPHead, classification_loss, randint
from medssl_bench_tasks.patches import PatchEmbedder, PatchGrid, extract_patches

#: Bump when the selection algorithm changes, so stale cached sets are not reused.
_ALGORITHM_VERSION = 1


# ------------------------------------------------------------------ permutation sets


def random_permutations(count: int, items: int, seed: int) -> np.ndarray:
    """``count`` distinct uniformly random permutations of ``items`` (the reference code's
    set; duplicates, likely for small puzzles, would make two classes indistinguishable)."""
    if count > math.factorial(items):
        raise ValueError(f"{items} items have only {math.factorial(items)} permutations, "
                         f"fewer than {count}")
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((count, items)), axis=1)
    while True:
        _, first = np.unique(perms, axis=0, return_index=True)
        if len(first) >= count:
            return perms[np.sort(first)[:count]].astype(np.int64)
        extra = np.argsort(rng.random((count, items)), axis=1)
        perms = np.concatenate([perms[np.sort(first)], extra])


def candidate_pool(candidates: int, items: int, seed: int) -> np.ndarray:
    """The pool the greedy selection draws from: ``candidates`` distinct random permutations,
    or, when that is at least ``items!`` (9! = 362,880 for a 2D 3x3 puzzle), every
    permutation in a seeded random order, so the search is exhaustive."""
    if candidates < math.factorial(items):
        return random_permutations(candidates, items, seed)
    every = np.array(list(itertools.permutations(range(items))), dtype=np.int64)
    return every[np.random.default_rng(seed).permutation(len(every))]


def hamming_permutations(count: int, items: int, candidates: int, seed: int) -> np.ndarray:
    """Greedy maximal-Hamming-distance selection (Noroozi & Favaro 2016, Algorithm 1).

    From a pool of ``candidates`` random permutations, start with a random one and repeatedly
    add the candidate whose *minimum* Hamming distance to the chosen set is largest, breaking
    ties by the largest *total* distance (the average the appendix mentions), then the first
    index. Only the running minimum and sum per candidate are kept, so each step is one
    vectorised comparison of the pool with the newest choice: O(count * candidates * items).
    """
    if candidates < count:
        raise ValueError(f"need at least {count} candidates, got {candidates}")
    pool = candidate_pool(candidates, items, seed)
    chosen = [0]
    distance = (pool != pool[0]).sum(axis=1)
    min_distance = distance.copy()
    total = distance.astype(np.int64)
    scale = items * count + 1  # total < scale, so min dominates in the combined score
    for _ in range(count - 1):
        index = int(np.argmax(min_distance.astype(np.int64) * scale + total))
        chosen.append(index)
        distance = (pool != pool[index]).sum(axis=1)
        np.minimum(min_distance, distance, out=min_distance)
        total += distance
    return pool[chosen]


def hamming_stats(permutations: np.ndarray | Tensor) -> dict[str, float]:
    """Minimum, mean and maximum pairwise Hamming distance of a permutation set."""
    perms = torch.as_tensor(np.asarray(permutations))
    distances = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    off_diagonal = distances[~torch.eye(len(perms), dtype=torch.bool)].double()
    return {
        "min": float(off_diagonal.min()),
        "mean": float(off_diagonal.mean()),
        "max": float(off_diagonal.max()),
    }


def cache_dir() -> Path:
    """Where computed permutation sets live: ``$BENCH_CACHE_DIR`` or ``~/.cache/medssl_bench``."""
    root = os.environ.get("BENCH_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "medssl_bench"


@functools.lru_cache(maxsize=32)
def permutation_set(
    method: str, count: int, items: int, candidates: int, seed: int
) -> np.ndarray:
    """The permutation set for these settings, computed once per machine and process.

    Stored as ``.npy`` (loaded with ``allow_pickle=False``) under :func:`cache_dir`; a
    corrupt or mismatching file is recomputed. The result is read-only.
    """
    exhaustive = candidates >= math.factorial(items)
    tag = ("all_" if exhaustive else f"c{candidates}_") if method == "hamming" else ""
    path = cache_dir() / "jigsaw" / (
        f"{method}_v{_ALGORITHM_VERSION}_n{items}_p{count}_{tag}s{seed}.npy"
    )
    perms: np.ndarray | None = None
    try:
        loaded = np.load(path, allow_pickle=False)
        if loaded.shape == (count, items) and loaded.dtype == np.int64:
            perms = loaded
    except (OSError, ValueError):
        perms = None
    if perms is None:
        if method == "hamming":
            perms = hamming_permutations(count, items, candidates, seed)
        else:
            perms = random_permutations(count, items, seed)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, perms, allow_pickle=False)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs recomputation
    perms.setflags(write=False)
    return perms


# ------------------------------------------------------------------ the task


def unshuffle(shuffled: Tensor, permutations: Tensor) -> Tensor:
    """Undo :meth:`Jigsaw3D.make_batch`'s shuffle: slot ``i`` holds grid cell ``perm[i]``.

    ``shuffled`` is ``(B, K, ...)``, ``permutations`` ``(B, K)``; returns grid order.
    """
    order = permutations.argsort(dim=1)
    index = order.view(*order.shape, *([1] * (shuffled.dim() - 2))).expand_as(shuffled)
    return shuffled.gather(1, index)


class Jigsaw3D(ProxyTask):
    """3D jigsaw puzzles: which of P maximally different permutations shuffled the patches."""

    name = "jigsaw3d"
    family = "pretext-classification"
    spatial_dims = 3
    min_input_size = (16, 16, 16)

    class Config(PluginConfig):
        grid: int = Field(
            default=3, ge=2, le=5,
            description="Cells per side of the puzzle grid (appendix: 3x3x3, 27 pieces).",
        )
        jitter: int = Field(
            default=3, ge=0,
            description="Random gap per axis between neighbouring pieces: each piece is "
            "(cell - jitter) voxels, cropped at an offset 0..jitter inside its cell (appendix: 3; "
            "cell 42 and piece 39 at 128^3).",
        )
        num_permutations: int = Field(
            default=100, ge=2, le=10000,
            description="Number of permutations P, i.e. classes (reference code: 100; the "
            "appendix also mentions a subset of 1000).",
        )
        permutations: Literal["hamming", "random"] = Field(
            default="hamming",
            description="How the permutation set is chosen: 'hamming' = greedy maximal minimum "
            "Hamming distance from a random pool (Noroozi & Favaro, as the paper says); "
            "'random' = uniformly random permutations (what the reference 3D code ships).",
        )
        candidates: int = Field(
            default=10000, ge=2,
            description="Size of the random candidate pool for 'hamming' selection (27! "
            "permutations cannot be enumerated, so the pool is sampled).",
        )
        permutation_seed: int = Field(
            default=0,
            description="Seed of the permutation set; the set is fixed for a seed and cached "
            "on disk, independent of the training seed.",
        )
        embed_dim: int = Field(
            default=64, ge=1,
            description="Size of each piece's embedding before concatenation (appendix: 64).",
        )
        hidden: int = Field(
            default=1024, ge=1,
            description="Width of the hidden ReLU layer of the classifier head (appendix).",
        )
        patch_padding: Literal["multiple", "minimum"] = Field(
            default="multiple",
            description="How pieces are zero-padded for the backbone: to the next multiple of "
            "its size multiple (what every backbone accepts) or only up to one multiple (enough "
            "for the pooling U-Net; the reference code fed unpadded 39^3 pieces).",
        )

        @model_validator(mode="after")
        def _enough_candidates(self):
            if self.permutations == "hamming" and self.candidates < self.num_permutations:
                raise ValueError(
                    f"candidates ({self.candidates}) must be at least num_permutations "
                    f"({self.num_permutations})"
                )
            return self

    #: ``quick``: a 2x2x2 puzzle. Small CPU volumes give pieces far smaller than the U-Net's
    #: input multiple, so every piece is padded to about the image size and 27 of them per
    #: volume make a 2-core CPU step about 5 s; 8 pieces keep the quick protocol in minutes.
    presets = {"quick": {"grid": 2}, "paper": {"grid": 3, "num_permutations": 100}}

    def __init__(self, config: PluginConfig | None = None) -> None:
        super().__init__(config)
        self._on_device: dict[torch.device, Tensor] = {}

    @property
    def num_pieces(self) -> int:
        return self.config.grid**self.spatial_dims

    def permutation_table(self, device: torch.device | str = "cpu") -> Tensor:
        """``(P, pieces)`` long tensor of the permutation set, cached per device."""
        device = torch.device(device)
        if device not in self._on_device:
            cfg = self.config
            perms = permutation_set(
                cfg.permutations, cfg.num_permutations, self.num_pieces, cfg.candidates,
                cfg.permutation_seed,
            )
            self._on_device[device] = torch.from_numpy(perms.copy()).to(device)
        return self._on_device[device]

    def _grid(self, spatial: tuple[int, ...]) -> PatchGrid:
        return PatchGrid.for_size(spatial, self.config.grid, self.config.jitter)

    def check_input(self, image_shape: tuple[int, ...], channels: int) -> None:
        super().check_input(image_shape, channels)
        self._grid(tuple(image_shape))

    def build_heads(self, backbone: Backbone, encoder: Encoder) -> nn.ModuleDict:
        cfg = self.config
        return nn.ModuleDict({
            "patch_embed": PatchEmbedder.for_backbone(
                backbone, encoder, cfg.embed_dim, cfg.patch_padding
            ),
            "classifier": MLPHead(
                self.num_pieces * cfg.embed_dim, cfg.hidden, cfg.num_permutations
            ),
        })

    def make_batch(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """``patches`` ``(B, pieces, C, *piece)`` in shuffled order: slot ``i`` holds grid cell
        ``permutations[labels][i]``; ``starts`` are the pieces' corner voxels, slot by slot.

        The pieces are gathered straight into shuffled order (one copy, no reshuffle)."""
        geometry = self._grid(tuple(images.shape[2:]))
        table = self.permutation_table(images.device)
        labels = randint(len(table), (images.shape[0],), generator, images.device)
        cells = table[labels]
        starts = geometry.random_starts(cells, generator)
        patches = extract_patches(images, starts, geometry.patch)
        return {"patches": patches, "labels": labels, "starts": starts}

    def compute_loss(self, encoder, heads, batch):
        patches = batch["patches"]
        batch_size = patches.shape[0]
        embeddings = heads["patch_embed"](encoder, patches.flatten(0, 1))
        logits = heads["classifier"](embeddings.reshape(batch_size, -1))
        return classification_loss(logits, batch["labels"])
