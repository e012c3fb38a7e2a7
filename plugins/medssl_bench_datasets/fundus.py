"""Diabetic-retinopathy grading from fundus photographs: APTOS 2019 and EyePACS (Kaggle DR
2015) in their Kaggle layouts (Taleb et al. 2020, 2D experiments: 5 grades, quadratic
weighted kappa, 224 px, 5-fold cross-validation).

Layouts under ``dataset.root`` (detected automatically):

* APTOS 2019: ``train.csv`` (``id_code,diagnosis``), ``train_images/<id_code>.png``,
  optionally ``test_images/`` (unlabeled);
* EyePACS: ``trainLabels.csv`` (``image,level``), ``train/<image>.jpeg``, optionally
  ``test/`` (unlabeled).

Preprocessing is the usual fundus one: crop the black border (threshold the grey image,
take the bounding box), pad to a square so the retina keeps its shape, resize. The result is
cached once as a uint8 ``.npy`` (memory-mapped afterwards; nothing is ever unpickled).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from medssl_bench.config import DATA_FOLDER, NEUTRAL, PluginConfig
from medssl_bench.errors import DataError
from medssl_bench.interfaces import Dataset, DatasetInfo, DataSplits
from medssl_bench_datasets.common import ArrayCases, stable_hash
from medssl_bench_datasets.phantom2d import GRADE_NAMES

PREPROCESS_VERSION = 1  # bump when preprocessing changes: it enters the cache key and split hash
IMAGE_SUFFIXES = (".png", ".jpeg", ".jpg", ".tif", ".tiff")


@dataclass(frozen=True)
class Layout:
    """Where a Kaggle DR layout keeps its labels and images."""

    name: str
    csv: str
    id_column: str
    label_column: str
    images: str
    suffix: str
    unlabeled: str


LAYOUTS = {
    "aptos": Layout("aptos", "train.csv", "id_code", "diagnosis", "train_images", ".png",
                    "test_images"),
    "eyepacs": Layout("eyepacs", "trainLabels.csv", "image", "level", "train", ".jpeg", "test"),
}


def detect_layout(root: Path, wanted: str) -> Layout:
    """The layout named ``wanted``, or the one whose label CSV exists under ``root``."""
    if not root.is_dir():
        raise DataError(
            f"Fundus dataset root {str(root)!r} is not a directory. Set dataset.root to the "
            "folder holding train.csv + train_images/ (APTOS 2019) or trainLabels.csv + train/ "
            "(EyePACS)."
        )
    if wanted != "auto":
        layout = LAYOUTS[wanted]
        if not (root / layout.csv).is_file():
            raise DataError(f"Fundus label file {str(root / layout.csv)!r} does not exist "
                            f"(dataset.layout={wanted}).")
        return layout
    for layout in LAYOUTS.values():
        if (root / layout.csv).is_file():
            return layout
    raise DataError(
        f"No fundus label file under {str(root)!r}: expected train.csv (APTOS 2019, columns "
        "id_code,diagnosis) or trainLabels.csv (EyePACS, columns image,level)."
    )


def read_labels(root: Path, layout: Layout, num_classes: int) -> tuple[list[str], list[int]]:
    """Image ids and grades from the layout's CSV, checked row by row."""
    path = root / layout.csv
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            missing = [c for c in (layout.id_column, layout.label_column) if c not in columns]
            if missing:
                raise DataError(
                    f"Fundus label file {str(path)!r} lacks the column(s) {', '.join(missing)}; "
                    f"it has {', '.join(columns) or 'none'}. Expected "
                    f"{layout.id_column},{layout.label_column}."
                )
            ids, labels = [], []
            for line, row in enumerate(reader, start=2):
                image_id = (row[layout.id_column] or "").strip()
                value = (row[layout.label_column] or "").strip()
                try:
                    number = float(value)
                except ValueError:
                    number = -1.0
                label = int(number) if number.is_integer() else -1
                if not image_id or not 0 <= label < num_classes:
                    raise DataError(
                        f"Fundus label file {str(path)!r}, line {line}: {layout.label_column}="
                        f"{value!r} for {image_id!r}; grades must be integers 0-{num_classes - 1}."
                    )
                ids.append(image_id)
                labels.append(label)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"Fundus label file {str(path)!r} cannot be read ({exc}).") from None
    if not ids:
        raise DataError(f"Fundus label file {str(path)!r} has no rows.")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"Fundus label file {str(path)!r} lists {dup!r} more than once.")
    return ids, labels


def load_fundus_image(path: Path, size: int, threshold: int) -> np.ndarray:
    """``(3, size, size)`` uint8: dark border cropped, padded to a square, resized.

    The border is what a grey value at or below ``threshold`` marks; the crop is the
    bounding box of the brighter pixels (the whole image when none are brighter).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as raw:
            image = raw.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(
            f"Fundus image {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); it is "
            "truncated or not an image. Replace or remove it (and its CSV row)."
        ) from None
    grey = np.asarray(image.convert("L"))
    rows = np.flatnonzero((grey > threshold).any(1))
    cols = np.flatnonzero((grey > threshold).any(0))
    if rows.size and cols.size:
        image = image.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))
    side = max(image.size)
    square = Image.new("RGB", (side, side))
    square.paste(image, ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
    square = square.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(square, dtype=np.uint8).transpose(2, 0, 1).copy()


def _listing_key(paths: list[Path]) -> str:
    """Identity of a set of files by path, size and modification time (cheap; reading every
    byte of 35,000 photographs is not). A changed file changes the key, so the cache rebuilds."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def cached_images(paths: list[Path], size: int, threshold: int, cache_dir: Path,
                  tag: str) -> np.ndarray:
    """The preprocessed images of ``paths`` as a memory-mapped ``(N, 3, S, S)`` uint8 array.

    Built once into ``cache_dir`` (written image by image into a ``.tmp`` then renamed, so an
    interrupted build never leaves a half file that looks complete).
    """
    key = stable_hash([PREPROCESS_VERSION, size, threshold, _listing_key(paths), tag])
    target = cache_dir / f"fundus-{tag}-{size}px-{key}.npy"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")  # concurrent builders
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                            shape=(len(paths), 3, size, size))
            for i, path in enumerate(paths):
                out[i] = load_fundus_image(path, size, threshold)
            out.flush()
            del out
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)  # a failed build leaves nothing behind
    try:
        return np.load(target, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"Fundus cache {str(target)!r} is corrupt ({exc}); delete it.") from None


def patient_of(image_id: str) -> str:
    """The patient of an image id: EyePACS ``10_left`` and ``10_right`` are patient ``10``."""
    return re.sub(r"_(left|right)$", "", image_id)


def stratified_order(ids: list[str], labels: list[int], seed: int) -> list[int]:
    """Indices sorted by grade, then by a seeded hash of the id: deterministic whatever the
    CSV's row order, and every contiguous stretch of it is stratified."""
    def rank(i: int) -> str:
        return hashlib.sha256(f"{seed}/{ids[i]}".encode()).hexdigest()

    return sorted(range(len(ids)), key=lambda i: (labels[i], rank(i)))


def systematic(order: list[int], fraction: float) -> tuple[list[int], list[int]]:
    """Take ``round(fraction * n)`` (at least one) evenly spaced entries of ``order``, so
    per-grade shares are kept: (taken, rest)."""
    n = len(order)
    count = min(n, max(1, round(fraction * n)))
    positions = {int((i + 0.5) * n / count) for i in range(count)} if n else set()
    taken = [index for p, index in enumerate(order) if p in positions]
    rest = [index for p, index in enumerate(order) if p not in positions]
    return taken, rest


class Fundus(Dataset):
    """Diabetic-retinopathy grading from APTOS 2019 or EyePACS fundus photographs (kappa)."""

    name = "fundus"
    spatial_dims = 2

    class Config(PluginConfig):
        root: str = Field(
            json_schema_extra=DATA_FOLDER,
            default="",
            description="Folder with train.csv + train_images/ (APTOS 2019) or trainLabels.csv "
            "+ train/ (EyePACS). Nothing is downloaded (Kaggle forbids redistribution).",
        )
        layout: Literal["auto", "aptos", "eyepacs"] = Field(
            default="auto", description="Which Kaggle layout; auto detects it by its CSV.")
        image_size: int = Field(default=224, ge=16, le=1024,
                                description="Edge of the square images after preprocessing "
                                "(224 as in Taleb et al.).")
        border_threshold: int = Field(
            default=10, ge=0, le=254,
            description="Grey level (0-255) at or below which pixels count as the black "
            "border that is cropped away.")
        test_fraction: float = Field(default=0.2, gt=0, lt=1,
                                     description="Share of labeled images held out for testing "
                                     "when no fold is chosen.")
        val_fraction: float = Field(default=0.05, gt=0, lt=1,
                                    description="Share of the non-test images used for "
                                    "validation (reference configs: val_split 0.05).")
        folds: int = Field(default=5, ge=2, le=20,
                           description="Cross-validation folds (Taleb et al.: 5).")
        fold: int | None = Field(
            default=None, ge=0,
            description="Test fold for cross-validation (0 to folds-1; the paper ran all five); "
            "null uses a single stratified hold-out of test_fraction.")
        seed: int = Field(default=0, description="Seed of the stratified split.")
        include_unlabeled_test: bool = Field(
            default=True,
            description="Add the Kaggle test images (test_images/ or test/, unlabeled) to the "
            "pretraining pool. Held-out labeled test images never join it.")
        cache_dir: str = Field(
            json_schema_extra=NEUTRAL,
            default="",
            description="Where the preprocessed uint8 arrays go; empty means "
            "$BENCH_CACHE_DIR/fundus or .medssl_bench/cache/fundus.")

        @model_validator(mode="after")
        def _fold_in_range(self):
            if self.fold is not None and self.fold >= self.folds:
                raise ValueError(f"fold {self.fold} must be below folds={self.folds}")
            return self

    presets = {"quick": {"image_size": 64}, "paper": {"image_size": 224}}

    def _cache_dir(self) -> Path:
        if self.config.cache_dir:
            return Path(self.config.cache_dir).expanduser()
        base = os.environ.get("BENCH_CACHE_DIR") or ".medssl_bench/cache"
        return Path(base) / "fundus"

    def split_indices(self, ids: list[str], labels: list[int]) -> dict[str, list[int]]:
        """Deterministic, stratified, patient-level train/val/test indices (sorted).

        EyePACS images ``<patient>_left`` and ``<patient>_right`` are one patient, whose eyes
        usually share a grade: they always land in the same split (split by patient,
        stratified by the patient's worst grade). APTOS ids are one image per patient.
        """
        cfg = self.config
        members: dict[str, list[int]] = {}
        for index, image_id in enumerate(ids):
            members.setdefault(patient_of(image_id), []).append(index)
        patients = sorted(members)
        grades = [max(labels[i] for i in members[p]) for p in patients]
        order = stratified_order(patients, grades, cfg.seed)
        if cfg.fold is None:
            test, rest = systematic(order, cfg.test_fraction)
        else:
            test = [index for position, index in enumerate(order)
                    if position % cfg.folds == cfg.fold]
            chosen = set(test)
            rest = [index for index in order if index not in chosen]
        val, train = systematic(rest, cfg.val_fraction)

        def images(group: list[int]) -> list[int]:
            return sorted(i for p in group for i in members[patients[p]])

        splits = {"train": images(train), "val": images(val), "test": images(test)}
        empty = [name for name, part in splits.items() if not part]
        if empty:
            raise DataError(
                f"Fundus dataset {cfg.root!r}: {len(ids)} labeled images leave the "
                f"{' and '.join(empty)} split(s) empty; add images or raise the fractions."
            )
        return splits

    def load(self) -> DataSplits:
        cfg = self.config
        if not cfg.root:
            raise DataError("Dataset 'fundus' needs its folder: --set dataset.root=/data/aptos2019")
        root = Path(cfg.root).expanduser()
        layout = detect_layout(root, cfg.layout)
        ids, labels = read_labels(root, layout, len(GRADE_NAMES))
        paths = [root / layout.images / f"{image_id}{layout.suffix}" for image_id in ids]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(
                f"Fundus image {str(missing[0])!r} is listed in {str(root / layout.csv)!r} but "
                f"does not exist{more}."
            )
        images = cached_images(paths, cfg.image_size, cfg.border_threshold, self._cache_dir(),
                               f"{layout.name}-labeled")
        splits = self.split_indices(ids, labels)
        label_array = np.asarray(labels, dtype=np.int64)

        def part(name: str) -> ArrayCases:
            index = splits[name]
            return ArrayCases(_Rows(images, index), label_array[index].tolist(),
                              channel_axis=True)

        pool: list[np.ndarray] = [_Rows(images, splits["train"] + splits["val"])]
        extra_dir = root / layout.unlabeled
        if cfg.include_unlabeled_test and extra_dir.is_dir():
            extra = sorted(p for p in extra_dir.iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            if extra:
                pool.append(cached_images(extra, cfg.image_size, cfg.border_threshold,
                                          self._cache_dir(), f"{layout.name}-unlabeled"))
        info = DatasetInfo(
            kind="classification",
            num_classes=len(GRADE_NAMES),
            channels=3,
            image_size=(cfg.image_size, cfg.image_size),
            class_names=GRADE_NAMES,
            metrics=("kappa", "acc", "auc"),
            main_metric="kappa",
            extra={"layout": layout.name},
        )
        split_hash = stable_hash({
            "layout": layout.name, "version": PREPROCESS_VERSION,
            "splits": {k: [ids[i] for i in v] for k, v in splits.items()},
            "labels": labels, "size": cfg.image_size, "threshold": cfg.border_threshold,
        })
        return DataSplits(
            info=info,
            unlabeled=ArrayCases(_Concat(pool), None, channel_axis=True),
            train=part("train"),
            val=part("val"),
            test=part("test"),
            split_hash=split_hash,
            train_ids=[ids[i] for i in splits["train"]],
        )


class _Rows:
    """A lazy row selection of an array (keeps the memory map; no copy)."""

    def __init__(self, array: np.ndarray, index: list[int]) -> None:
        self.array, self.index = array, list(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.array[self.index[i]])


class _Concat:
    """Several array-likes read as one, without copying."""

    def __init__(self, parts: list) -> None:
        self.parts = [p for p in parts if len(p)]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, i: int) -> np.ndarray:
        for part in self.parts:
            if i < len(part):
                return np.asarray(part[i])
            i -= len(part)
        raise IndexError(i)
