"""A procedural abdominal-CT-like phantom: the embedded default dataset, no download.

Each case is generated deterministically from (dataset seed, split, index): a body with a
fat rim, liver, kidneys, spine, bowel and one target organ built from a chain of three
rotated ellipsoids (pancreas-like), carrying a lesion with some probability. Labels follow
the MSD pancreas task: 0 background, 1 organ, 2 lesion. Position, size, shape (smooth
random deformation), per-tissue intensity, texture, bias field and noise all vary, so the
segmentation is not trivial: the organ differs from surrounding soft tissue by a few
hundredths of the intensity range, the lesion by less.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor
from torch.nn import functional as F

from medssl_bench.config import NEUTRAL, PluginConfig
from medssl_bench.interfaces import Dataset, DatasetInfo, DataSplits
from medssl_bench_datasets.common import LazyCases, derive_seed, stable_hash

# Tissue indices and their base intensity in the first channel (a CT soft-tissue window).
TISSUES = ("air", "fat", "soft", "liver", "kidney", "bone", "bowel", "organ", "lesion")
BASE_INTENSITY = torch.tensor([0.0, 0.28, 0.45, 0.56, 0.62, 0.92, 0.36, 0.51, 0.43])
GENERATOR_VERSION = 1  # bump when the generator changes: it enters the split hash


class _Rng:
    """Uniform draws from a seeded torch generator."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def u(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.g).item()

    def vec(self, low, high) -> Tensor:
        low, high = torch.tensor(low), torch.tensor(high)
        return low + (high - low) * torch.rand(low.shape, generator=self.g)

    def rotation(self, max_angle: float = math.pi) -> Tensor:
        """A random rotation matrix with angle at most ``max_angle`` about a random axis."""
        axis = torch.randn(3, generator=self.g)
        axis = axis / axis.norm()
        angle = self.u(-max_angle, max_angle)
        k = torch.tensor(
            [[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]]
        )
        return torch.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)

    def smooth_noise(self, size: int, cells: int) -> Tensor:
        """Band-limited noise in about [-1, 1] at ``size``^3, from a ``cells``^3 lattice."""
        coarse = torch.randn(1, 1, cells, cells, cells, generator=self.g)
        return F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)[0, 0]


def _grid(size: int) -> Tensor:
    axis = torch.linspace(-1, 1, size)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)  # (S,S,S,3)


def _ellipsoid(grid: Tensor, center, radii, rotation: Tensor, wobble: Tensor | None) -> Tensor:
    """Boolean mask of a rotated ellipsoid whose surface is perturbed by ``wobble``."""
    local = (grid - torch.as_tensor(center)) @ rotation
    level = ((local / torch.as_tensor(radii)) ** 2).sum(-1)
    if wobble is not None:
        level = level + wobble
    return level < 1


def generate_case(size: int, channels: int, seed: int, lesion_probability: float):
    """One phantom case: ``(image (C,S,S,S) float32 in [0,1], labels (S,S,S) int64)``."""
    rng = _Rng(seed)
    grid = _grid(size)
    cells = max(3, size // 16)
    tissue = torch.zeros((size,) * 3, dtype=torch.long)

    def wobble(amount: float) -> Tensor:
        return amount * rng.smooth_noise(size, cells)

    body_c = rng.vec([-0.05, -0.05, -0.05], [0.05, 0.05, 0.05])
    body_r = rng.vec([0.85, 0.62, 0.75], [0.97, 0.8, 0.92])
    body_rot = rng.rotation(0.15)
    body = _ellipsoid(grid, body_c, body_r, body_rot, wobble(0.05))
    tissue[body] = TISSUES.index("fat")
    inner = _ellipsoid(grid, body_c, body_r * rng.u(0.82, 0.9), body_rot, wobble(0.08))
    tissue[inner & body] = TISSUES.index("soft")

    def place(name: str, center, radii, max_angle=math.pi, wob=0.15) -> Tensor:
        mask = _ellipsoid(grid, center, radii, rng.rotation(max_angle), wobble(wob)) & inner
        tissue[mask] = TISSUES.index(name)
        return mask

    side = 1 if rng.u(0, 1) < 0.5 else -1  # situs: mirror the whole layout sometimes
    place("liver", [rng.u(-0.3, 0.3), rng.u(-0.15, 0.1), side * rng.u(0.25, 0.4)],
          rng.vec([0.3, 0.25, 0.25], [0.45, 0.35, 0.38]), 0.6)
    spine_c = [0.0, rng.u(0.4, 0.52), rng.u(-0.05, 0.05)]
    place("bone", spine_c, [1.2, rng.u(0.08, 0.12), rng.u(0.08, 0.12)], 0.15, 0.05)
    for s in (-1, 1):
        place("kidney", [rng.u(-0.15, 0.15), rng.u(0.2, 0.35), s * rng.u(0.3, 0.42)],
              rng.vec([0.14, 0.08, 0.07], [0.2, 0.11, 0.1]), 0.5)
    for _ in range(int(rng.u(1, 4))):
        place("bowel", rng.vec([-0.5, -0.5, -0.5], [0.5, 0.0, 0.5]),
              rng.vec([0.08, 0.08, 0.08], [0.2, 0.16, 0.2]), math.pi, 0.3)

    # Target organ: a curved chain of three ellipsoids across the upper abdomen.
    start = torch.tensor([rng.u(-0.25, 0.25), rng.u(-0.05, 0.15), -side * rng.u(0.2, 0.35)])
    direction = torch.tensor([rng.u(-0.3, 0.3), rng.u(-0.2, 0.2), side * 1.0])
    direction = direction / direction.norm()
    length = rng.u(0.7, 1.0)
    bend = rng.vec([-0.12, -0.12, -0.05], [0.12, 0.12, 0.05])
    thickness = rng.u(0.18, 0.26)
    centers = [start + direction * length * t + bend * 4 * t * (1 - t) for t in (0.15, 0.5, 0.85)]
    organ = torch.zeros_like(tissue, dtype=torch.bool)
    for i, center in enumerate(centers):
        radii = [thickness * rng.u(0.9, 1.3), thickness * rng.u(0.7, 1.0), length * 0.3]
        # align the long axis with the chain direction
        z = direction
        x = torch.linalg.cross(z, torch.tensor([1.0, 0.0, 0.0]))
        x = x / x.norm()
        y = torch.linalg.cross(z, x)
        frame = torch.stack([x, y, z], dim=1) @ rng.rotation(0.25)
        organ |= _ellipsoid(grid, center, radii, frame, wobble(0.2 if i != 1 else 0.25))
    organ &= inner
    tissue[organ] = TISSUES.index("organ")
    labels = organ.long()

    if rng.u(0, 1) < lesion_probability and organ.any():
        anchor = centers[int(rng.u(0, 3)) % 3]
        radius = thickness * rng.u(0.5, 1.1)
        center = anchor + rng.vec([-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]) * thickness
        lesion = _ellipsoid(grid, center, [radius] * 3, torch.eye(3), wobble(0.15)) & inner
        tissue[lesion] = TISSUES.index("lesion")
        labels[lesion] = 2

    images = []
    for c in range(channels):
        table = BASE_INTENSITY.clone()
        if c:  # another "modality": a fixed, different contrast between tissues
            cg = torch.Generator().manual_seed(1000 + c)
            table[1:] = 0.15 + 0.8 * torch.rand(len(TISSUES) - 1, generator=cg)
            table[TISSUES.index("lesion")] = table[TISSUES.index("organ")] - 0.07
        table = table + torch.cat([torch.zeros(1), 0.025 * torch.randn(len(TISSUES) - 1, generator=rng.g)])
        texture_amp = torch.full((len(TISSUES),), 0.02)
        texture_amp[TISSUES.index("liver")] = 0.03
        texture_amp[TISSUES.index("bowel")] = 0.06
        texture_amp[0] = 0.0
        image = table[tissue] + texture_amp[tissue] * rng.smooth_noise(size, max(4, size // 4))
        bias = 1 + rng.u(0.02, 0.1) * rng.smooth_noise(size, 3)
        noise = rng.u(0.01, 0.04) * torch.randn(image.shape, generator=rng.g)
        images.append((image * bias + noise).clamp(0, 1))
    return torch.stack(images).float(), labels


class Phantom3D(Dataset):
    """Procedural abdominal-CT-like volumes with an organ and lesion to segment (no download)."""

    name = "phantom3d"
    default = True  # what `bench run` uses without --dataset: no download needed
    spatial_dims = 3

    class Config(PluginConfig):
        size: int = Field(default=128, ge=8, le=512,
                          description="Edge length of the cubic volumes (128 as in Taleb et al.).")
        channels: int = Field(default=1, ge=1, le=8,
                              description="Image channels; channels beyond the first behave like "
                              "other MRI modalities (a different contrast between tissues).")
        n_unlabeled: int = Field(default=200, ge=1,
                                 description="Volumes in the unlabeled pretraining pool.")
        n_train: int = Field(default=80, ge=1, description="Labeled training volumes.")
        n_val: int = Field(default=10, ge=1, description="Labeled validation volumes.")
        n_test: int = Field(default=40, ge=1, description="Held-out labeled test volumes.")
        lesion_probability: float = Field(default=0.7, ge=0, le=1,
                                          description="Chance that the organ carries a lesion.")
        seed: int = Field(default=0, description="Generator seed; a different seed gives a "
                          "different (but equally distributed) dataset.")
        cache_in_memory: bool = Field(json_schema_extra=NEUTRAL, default=True,
                                      description="Keep generated cases in memory.")

    presets = {
        "quick": {"size": 32, "n_unlabeled": 48, "n_train": 24, "n_val": 6, "n_test": 12},
        "paper": {"size": 128},
    }

    def _split(self, split: str, count: int, labeled: bool) -> LazyCases:
        cfg = self.config

        def make(index: int):
            seed = derive_seed("phantom3d", GENERATOR_VERSION, cfg.seed, split, index)
            return generate_case(cfg.size, cfg.channels, seed, cfg.lesion_probability)

        return LazyCases(count, make, labeled=labeled, cache=cfg.cache_in_memory)

    def load(self) -> DataSplits:
        cfg = self.config
        info = DatasetInfo(
            kind="segmentation",
            num_classes=3,
            channels=cfg.channels,
            image_size=(cfg.size,) * 3,
            class_names=("background", "organ", "lesion"),
            metrics=("dice_organ", "dice_lesion", "dice_mean"),
            main_metric="dice_mean",
        )
        payload = cfg.model_dump(exclude={"cache_in_memory"}) | {"version": GENERATOR_VERSION}
        return DataSplits(
            info=info,
            unlabeled=self._split("unlabeled", cfg.n_unlabeled, labeled=False),
            train=self._split("train", cfg.n_train, labeled=True),
            val=self._split("val", cfg.n_val, labeled=True),
            test=self._split("test", cfg.n_test, labeled=True),
            split_hash=stable_hash(payload),
            train_ids=[f"train-{i:04d}" for i in range(cfg.n_train)],
        )
