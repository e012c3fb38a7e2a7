"""A procedural fundus-photograph-like dataset with diabetic-retinopathy-like grades 0-4:
the embedded 2D default, no download.

Each case is generated deterministically from (dataset seed, split, index). An image is an
RGB photograph of a bright orange retina on a black background, with illumination falloff,
an optic disc, a darker macula and branching vessels leaving the disc; the grade sets the
lesions (the International Clinical DR scale, loosely): grade 1 a few microaneurysms, 2 more
of them plus haemorrhages and hard exudates, 3 many of both plus cotton-wool spots, 4 all
of that plus neovascular tangles and a large preretinal haemorrhage. Lesion count and size
grow with the grade, and camera tint, exposure, gamma, vessel layout and noise vary from
case to case, so grading needs the lesions, not a global colour cue.
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

GENERATOR_VERSION = 1  # bump when the generator changes: it enters the split hash
GRADE_NAMES = ("no DR", "mild", "moderate", "severe", "proliferative")
# Expected lesion counts per grade (0..4): low and high of a uniform integer draw.
MICROANEURYSMS = ((0, 0), (2, 6), (5, 12), (8, 18), (10, 22))
HAEMORRHAGES = ((0, 0), (0, 0), (1, 4), (4, 9), (6, 12))
EXUDATES = ((0, 0), (0, 1), (2, 7), (5, 12), (6, 15))
COTTON_WOOL = ((0, 0), (0, 0), (0, 1), (1, 3), (2, 5))


class _Rng:
    """Uniform draws from a seeded torch generator."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def u(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.g).item()

    def uniform(self, low: float, high: float, n: int) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=self.g)

    def integer(self, low: int, high: int) -> int:
        """Uniform integer in ``[low, high]``."""
        return int(torch.randint(low, high + 1, (), generator=self.g))

    def smooth_noise(self, size: int, cells: int) -> Tensor:
        """Band-limited noise in about [-1, 1] at ``size``^2, from a ``cells``^2 lattice."""
        coarse = torch.randn(1, 1, cells, cells, generator=self.g)
        return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[0, 0]


def _grid(size: int) -> Tensor:
    """``(S, S, 2)`` coordinates (x, y) in [-1, 1]."""
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def _walk(rng: _Rng, start: Tensor, angle: float, length: float, curvature: float,
          step: float) -> tuple[Tensor, Tensor]:
    """A smooth random curve: points ``(n, 2)`` and headings ``(n,)``.

    The heading is a Brownian motion (its spread per unit length does not depend on the
    step) plus a constant ``curvature`` (radians per unit length), so arcades can bend
    around the macula as real vessels do.
    """
    n = max(2, int(length / step))
    turns = torch.randn(n, generator=rng.g) * 1.2 * math.sqrt(step) + curvature * step
    headings = angle + torch.cumsum(turns, 0)
    moves = torch.stack([headings.cos(), headings.sin()], dim=-1) * step
    return start + torch.cumsum(moves, 0), headings


def _raster(points: list[Tensor], size: int, width_px: float) -> Tensor:
    """Draw polylines given as dense points into an anti-aliased ``(S, S)`` mask."""
    mask = torch.zeros(size, size)
    if points:
        p = torch.cat(points)
        idx = ((p + 1) / 2 * (size - 1)).round().long()
        keep = ((idx >= 0) & (idx < size)).all(1)
        idx = idx[keep]
        mask[idx[:, 1], idx[:, 0]] = 1.0
    k = max(1, round(width_px))
    k += 1 - k % 2  # odd kernel keeps the line centred
    if k > 1:
        mask = F.max_pool2d(mask[None, None], k, stride=1, padding=k // 2)[0, 0]
    return F.avg_pool2d(mask[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]


def _blobs(grid: Tensor, centers: Tensor, radii: Tensor, aspect: Tensor, angles: Tensor,
           softness: Tensor, wobble: Tensor | None = None) -> Tensor:
    """Opacity ``(S, S)`` of the union of rotated soft ellipses (``max`` over blobs)."""
    if len(centers) == 0:
        return torch.zeros(grid.shape[:2])
    d = grid[None] - centers[:, None, None, :]  # (N, S, S, 2)
    cos, sin = angles.cos()[:, None, None], angles.sin()[:, None, None]
    u = (d[..., 0] * cos + d[..., 1] * sin) / radii[:, None, None]
    v = (-d[..., 0] * sin + d[..., 1] * cos) / (radii * aspect)[:, None, None]
    level = (u**2 + v**2).sqrt()
    if wobble is not None:
        level = level + wobble[None]
    alpha = ((1 - level) / softness[:, None, None]).clamp(0, 1)
    return alpha.amax(0)


def _inside(rng: _Rng, n: int, radius: float, center: Tensor) -> Tensor:
    """``n`` uniform points inside a disc."""
    r = radius * rng.uniform(0, 1, n).sqrt()
    t = rng.uniform(0, 2 * math.pi, n)
    return center + torch.stack([r * t.cos(), r * t.sin()], dim=-1)


def _paint(image: Tensor, alpha: Tensor, color) -> Tensor:
    color = torch.as_tensor(color, dtype=image.dtype)[:, None, None]
    return image * (1 - alpha) + color * alpha


def generate_case(size: int, seed: int, grade: int) -> tuple[Tensor, Tensor]:
    """One image of ``grade``: ``(image (3,S,S) float32 in [0,1], lesion mask (S,S) bool)``."""
    rng = _Rng(seed)
    grid = _grid(size)
    px = 2.0 / size  # one pixel in grid units
    scale = size / 224  # widths were tuned at the paper's 224 px
    side = 1.0 if rng.u(0, 1) < 0.5 else -1.0  # right or left eye: the disc's side

    # Retina: a bright disc with illumination falloff and choroidal texture.
    center = torch.tensor([rng.u(-0.03, 0.03), rng.u(-0.03, 0.03)])
    radius = rng.u(0.86, 0.95)
    r = (grid - center).norm(dim=-1) / radius
    retina = ((1 - r) / (2.5 * px / radius)).clamp(0, 1)
    tint = torch.tensor([rng.u(0.72, 0.88), rng.u(0.30, 0.42), rng.u(0.10, 0.20)])
    gx, gy = rng.u(-0.12, 0.12), rng.u(-0.12, 0.12)
    light = (1 - rng.u(0.25, 0.45) * r**2) * (1 + gx * grid[..., 0] + gy * grid[..., 1])
    light = light * (1 + 0.05 * rng.smooth_noise(size, max(4, size // 16)))
    image = tint[:, None, None] * light[None]

    # Macula (darker, opposite the disc) and optic disc (bright, with a paler cup).
    macula = center + torch.tensor([-side * rng.u(0.0, 0.1), rng.u(-0.05, 0.05)])
    dm = (grid - macula).norm(dim=-1)
    image = image * (1 - rng.u(0.15, 0.3) * torch.exp(-(dm**2) / (2 * 0.1**2)))[None]
    disc = center + torch.tensor([side * rng.u(0.34, 0.46), rng.u(-0.08, 0.08)])
    disc_r = rng.u(0.09, 0.12)
    dd = (grid - disc).norm(dim=-1)
    image = _paint(image, ((disc_r - dd) / (0.25 * disc_r)).clamp(0, 1) * 0.85,
                   [0.98, 0.86, 0.58])
    image = _paint(image, ((0.45 * disc_r - dd) / (0.2 * disc_r)).clamp(0, 1) * 0.6,
                   [1.0, 0.96, 0.82])

    # Vessels: arcades leaving the disc, curving around the macula, with side branches.
    step = px * 0.7
    toward = math.pi if side > 0 else 0.0  # heading from the disc toward the macula
    main, branches = [], []
    offsets = [0.55, -0.55, 2.3, -2.3]  # temporal arcades (toward the macula), nasal ones
    if rng.u(0, 1) < 0.6:
        offsets.append(rng.u(-3, 3))  # sometimes one more, shorter vessel
    for k, offset in enumerate(offsets):
        bend = (-1 if offset > 0 else 1) * side * (1.3 if abs(offset) < 1 else 0.4)
        length = rng.u(0.9, 1.5) if k < 4 else rng.u(0.4, 0.8)
        pts, heads = _walk(rng, disc, toward + offset + rng.u(-0.25, 0.25), length, bend, step)
        main.append(pts)
        for _ in range(rng.integer(2, 4)):
            j = rng.integer(len(pts) // 5, len(pts) - 2)
            sub, _ = _walk(rng, pts[j], float(heads[j]) + rng.u(0.4, 1.0) * (
                1 if rng.u(0, 1) < 0.5 else -1), rng.u(0.2, 0.5), 0.0, step)
            branches.append(sub)
    thin = 0.7 * _raster(branches, size, 1.8 * scale)
    vessels = torch.maximum(_raster(main, size, 3.2 * scale), thin)
    vessels = vessels * retina
    image = image * (1 - vessels[None] * torch.tensor([0.35, 0.6, 0.55])[:, None, None])

    # Lesions: count and size grow with the grade.
    grow = 1 + 0.2 * grade
    where = center
    lesion = torch.zeros(size, size)
    min_r = 0.8 * px

    def draw(counts, r_low, r_high, color, strength, soft, aspect_low=0.7, wobble=None):
        nonlocal image, lesion
        n = rng.integer(*counts[grade])
        if n == 0:
            return
        centers = _inside(rng, n, 0.75 * radius, where)
        radii = (rng.uniform(r_low, r_high, n) * grow).clamp(min=min_r)
        alpha = _blobs(grid, centers, radii, rng.uniform(aspect_low, 1.0, n),
                       rng.uniform(0, math.pi, n), torch.full((n,), soft), wobble)
        image = _paint(image, alpha * strength, color)
        lesion = torch.maximum(lesion, alpha)

    draw(MICROANEURYSMS, 0.006, 0.011, [0.45, 0.05, 0.04], 0.9, 0.35)
    draw(HAEMORRHAGES, 0.02, 0.045, [0.42, 0.06, 0.05], 0.85, 0.3, 0.4,
         0.25 * rng.smooth_noise(size, max(4, size // 12)))
    draw(EXUDATES, 0.006, 0.016, [0.98, 0.9, 0.35], 0.9, 0.25, 0.5)
    draw(COTTON_WOOL, 0.03, 0.05, [0.95, 0.85, 0.72], 0.55, 0.8, 0.5)
    if grade == 4:  # neovascular tangles and a preretinal haemorrhage
        tangles = []
        for _ in range(rng.integer(1, 2)):
            start = _inside(rng, 1, 0.6 * radius, center)[0]
            for _ in range(6):
                pts, _ = _walk(rng, start, rng.u(0, 2 * math.pi), rng.u(0.08, 0.18),
                               rng.u(-12, 12), step)
                tangles.append(pts)
        neo = _raster(tangles, size, 1.2 * scale) * retina
        image = image * (1 - neo[None] * torch.tensor([0.3, 0.6, 0.6])[:, None, None])
        lesion = torch.maximum(lesion, neo)
        big = _blobs(grid, _inside(rng, 1, 0.6 * radius, center), torch.tensor([rng.u(0.06, 0.1)]),
                     torch.tensor([rng.u(0.5, 1.0)]), torch.tensor([rng.u(0, math.pi)]),
                     torch.tensor([0.3]))
        image = _paint(image, big * 0.9, [0.38, 0.04, 0.04])
        lesion = torch.maximum(lesion, big)
    # Distractors on every grade: small pale dots (reflexes, drusen) that are not lesions.
    n = rng.integer(0, 4)
    dots = _blobs(grid, _inside(rng, n, 0.8 * radius, center),
                  rng.uniform(0.006, 0.012, n).clamp(min=min_r), torch.ones(n),
                  torch.zeros(n), torch.full((n,), 0.6))
    image = _paint(image, dots * 0.35, [0.95, 0.75, 0.55])

    # Camera: exposure, gamma, black surround, sensor noise.
    image = (image * rng.u(0.85, 1.15)).clamp(0, 1) ** rng.u(0.85, 1.2)
    image = image * retina[None] + 0.015 * (1 - retina[None])
    image = image + rng.u(0.004, 0.02) * torch.randn(image.shape, generator=rng.g)
    return image.clamp(0, 1).float(), lesion > 0.5


def draw_grade(seed: int, weights: list[float]) -> int:
    """The grade of a case, drawn from ``weights`` with the case's own seed."""
    g = torch.Generator().manual_seed(seed)
    return int(torch.multinomial(torch.tensor(weights, dtype=torch.float), 1, generator=g))


class _ByteCases(LazyCases):
    """Cases memoised as uint8 (a quarter of float32's memory), served as float in [0, 1]."""

    def __getitem__(self, index: int):
        item = super().__getitem__(index)
        if isinstance(item, tuple):
            return item[0].float() / 255.0, item[1]
        return item.float() / 255.0


class Phantom2D(Dataset):
    """Procedural fundus-like RGB photographs with DR-like grades 0-4 (no download)."""

    name = "phantom2d"
    spatial_dims = 2

    class Config(PluginConfig):
        size: int = Field(default=224, ge=16, le=1024,
                          description="Edge length of the square images (224 as in Taleb et al.).")
        n_unlabeled: int = Field(default=1000, ge=1,
                                 description="Images in the unlabeled pretraining pool.")
        n_train: int = Field(default=500, ge=1, description="Labeled training images.")
        n_val: int = Field(default=100, ge=1, description="Labeled validation images.")
        n_test: int = Field(default=400, ge=1, description="Held-out labeled test images.")
        grade_weights: list[float] = Field(
            default=[1.0, 1.0, 1.0, 1.0, 1.0], min_length=5, max_length=5,
            description="Relative frequency of grades 0-4. Balanced by default so small sets "
            "hold every grade; APTOS 2019 is 1805/370/999/193/295.")
        seed: int = Field(default=0, description="Generator seed; a different seed gives a "
                          "different (but equally distributed) dataset.")
        cache_in_memory: bool = Field(json_schema_extra=NEUTRAL, default=True,
                                      description="Keep generated images in memory (as uint8).")

    presets = {
        "quick": {"size": 64, "n_unlabeled": 48, "n_train": 40, "n_val": 10, "n_test": 20},
        "paper": {"size": 224},
    }

    def _split(self, split: str, count: int, labeled: bool) -> _ByteCases:
        cfg = self.config

        def make(index: int):
            seed = derive_seed("phantom2d", GENERATOR_VERSION, cfg.seed, split, index)
            grade = draw_grade(seed, cfg.grade_weights)
            image, _ = generate_case(cfg.size, seed, grade)
            return (image * 255).round().to(torch.uint8), torch.tensor(grade, dtype=torch.long)

        return _ByteCases(count, make, labeled=labeled, cache=cfg.cache_in_memory)

    def load(self) -> DataSplits:
        cfg = self.config
        if sum(cfg.grade_weights) <= 0 or min(cfg.grade_weights) < 0:
            from medssl_bench.errors import ConfigError

            raise ConfigError("dataset.grade_weights must be non-negative with a positive sum.")
        info = DatasetInfo(
            kind="classification",
            num_classes=5,
            channels=3,
            image_size=(cfg.size, cfg.size),
            class_names=GRADE_NAMES,
            metrics=("kappa", "acc", "auc"),
            main_metric="kappa",
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
