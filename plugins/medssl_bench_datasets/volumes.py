"""The shared machinery of the 3D volume datasets (msd, brats, luna16, nifti-folder).

A plugin only says what is on disk (:meth:`VolumeDataset.catalog`); this base class splits
the labeled cases by patient, preprocesses and caches them, and builds the
:class:`DataSplits`. It also implements :meth:`VolumeDataset.check`, which ``bench data
check`` calls to list every problem at once instead of stopping at the first.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from medssl_bench.config import DATA_FOLDER, NEUTRAL, PluginConfig
from medssl_bench.errors import DataError
from medssl_bench.interfaces import Dataset, DatasetInfo, DataSplits
from medssl_bench_datasets.common import stable_hash
from medssl_bench_datasets.preprocess import CaseMeta, CaseSource, Prep, read_case
from medssl_bench_datasets.volume_cache import (
    CachedVolumes,
    CacheStats,
    NativeVolumes,
    NoLabels,
    cache_root,
    default_workers,
    ensure_native,
    prepare,
    run_parallel,
)

SPLITS = ("train", "val", "test")


def slug(name: str) -> str:
    """A class name usable in a metric name (``dice_<slug>``): lower case, ``_`` for the rest."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_") or "unnamed"


class VolumeConfig(PluginConfig):
    """Settings shared by every 3D volume dataset (Taleb et al. appendix defaults)."""

    root: str = Field(default="", json_schema_extra=DATA_FOLDER,
                      description="Folder of the dataset as distributed (layouts: "
                      "the README section 'Your own data'). Nothing is downloaded.")
    size: int = Field(default=128, ge=8, le=512, description="Edge length every volume is "
                      "resized to (128 as in Taleb et al.; e.g. 32 on a CPU).")
    patch_size: int | None = Field(
        default=None, ge=8, description="Edge length of the model's input when smaller than "
        "`size`: fine-tuning trains on random patches and evaluation slides overlapping "
        "windows over the whole volume (torchio GridSampler/GridAggregator). null: whole volumes.")
    patch_overlap: int | None = Field(
        default=None, ge=0, description="Overlap of evaluation windows in voxels (even); "
        "null: half the patch size.")
    evaluate_at: Literal["native", "resized"] = Field(
        default="native", description="Where validation and test Dice are computed. native: on "
        "each case's original voxel grid (labels never resized; the predicted class "
        "probabilities, made at `size`, are resampled back trilinearly, then argmax; the "
        "original label maps are cached beside the volumes). resized: on the label map "
        "resized to `size` (nearest neighbour), as the model sees it.")
    foreground_crop: bool = Field(default=True, description="Crop the empty border of "
                                  "pretraining volumes before resizing (Taleb et al.: pretraining "
                                  "only, never for fine-tuning volumes).")
    foreground_threshold: float = Field(default=0.05, ge=0, lt=1, description="Scaled intensity "
                                        "above which a voxel counts as foreground for the crop.")
    ct_window: tuple[float, float] = Field(default=(-1000.0, 1000.0), description="Hounsfield "
                                           "range CT is clipped to before scaling to [0, 1].")
    percentiles: tuple[float, float] = Field(
        default=(0.0, 100.0), description="Intensity percentiles of MRI (non-CT) channels mapped "
        "to 0 and 1 (min-max as in the paper; e.g. [0.5, 99.5] resists outliers).")
    val_fraction: float = Field(default=0.1, ge=0, lt=1, description="Share of patients in the "
                                "validation split.")
    test_fraction: float = Field(default=0.2, ge=0, lt=1, description="Share of patients in the "
                                 "held-out test split.")
    split_seed: int = Field(default=0, description="Seed of the patient-level split.")
    pool: list[Literal["train", "val"]] = Field(
        default=["train", "val"], description="Labeled splits whose images (without labels) join "
        "the pretraining pool, beside the unlabeled images; the test split never does, nor do "
        "unlabeled scans of a patient in a split left out of the pool.")
    workers: int = Field(json_schema_extra=NEUTRAL, default=0, ge=0,
                         description="Preprocessing worker processes (0: one "
                         "per core, at most 4; 1: in this process).")
    cache_dir: str = Field(json_schema_extra=NEUTRAL, default="",
                           description="Cache folder of preprocessed volumes "
                           "(default $BENCH_CACHE_DIR/data or .medssl_bench/cache/data).")

    @field_validator("ct_window", "percentiles")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] >= value[1]:
            raise ValueError(f"{list(value)}: the first value must be below the second")
        return value

    @field_validator("patch_overlap")
    @classmethod
    def _even(cls, value: int | None) -> int | None:
        if value is not None and value % 2:
            raise ValueError(f"{value}: the overlap must be even (torchio GridSampler)")
        return value


QUICK = {"size": 32}


@dataclass
class Catalog:
    """What a plugin found on disk."""

    labeled: list[CaseSource]
    unlabeled: list[CaseSource] = field(default_factory=list)
    #: Raw label value -> class name (None: the values found, in order, named ``label_<v>``).
    labels: Mapping[int, str] | None = None
    #: Region name -> raw label values (BraTS whole tumour, tumour core, enhancing tumour).
    regions: Mapping[str, Sequence[int]] | None = None
    #: Problems found while listing (``bench data check`` reports them with the others).
    problems: list[str] = field(default_factory=list)
    #: Said when someone tries to fine-tune on a corpus without labels.
    no_labels_hint: str = ""


@dataclass
class CheckReport:
    """Everything ``bench data check`` prints about a dataset."""

    dataset: str
    root: str
    problems: list[str]
    good: list[CaseMeta]
    n_labeled: int
    n_unlabeled: int


def split_patients(cases: Sequence[CaseSource], val_fraction: float, test_fraction: float,
                   seed: int) -> dict[str, list[str]]:
    """Case ids per split, whole patients at a time. Patients are ordered by a seeded hash of
    their id, so the assignment is stable across machines and adding a patient moves no other."""
    patients = sorted({c.patient for c in cases},
                      key=lambda p: hashlib.sha256(f"{seed}/{p}".encode()).hexdigest())
    n = len(patients)

    def count(fraction: float) -> int:
        return max(1, round(fraction * n)) if fraction > 0 and n >= 3 else 0

    n_test, n_val = count(test_fraction), count(val_fraction)
    groups = {"test": set(patients[:n_test]), "val": set(patients[n_test:n_test + n_val])}
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for case in sorted(cases, key=lambda c: c.case_id):
        split = next((s for s, members in groups.items() if case.patient in members), "train")
        out[split].append(case.case_id)
    return out


class VolumeDataset(Dataset):
    """Base of the 3D volume datasets; subclasses implement :meth:`catalog`."""

    spatial_dims = 3
    Config = VolumeConfig
    presets = {"quick": QUICK, "paper": {"size": 128}}

    def __init__(self, config: PluginConfig | None = None) -> None:
        super().__init__(config)
        self.cache_stats = CacheStats()

    # ------------------------------------------------------------------ to implement
    def catalog(self) -> Catalog:
        """The cases under ``config.root``; raise DataError when nothing usable is there."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def root(self) -> Path:
        cfg = self.config
        if not cfg.root:
            raise DataError(f"Dataset {self.name!r} needs the folder of the data: "
                            f"--set dataset.root=/path/to/data ({self.summary()})")
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: dataset.root of {self.name!r} is not a folder.")
        return root

    def prep(self, mode: str) -> Prep:
        cfg = self.config
        return Prep(size=cfg.size, foreground_crop=cfg.foreground_crop and mode == "pretrain",
                    foreground_threshold=cfg.foreground_threshold,
                    ct_window=tuple(cfg.ct_window), percentiles=tuple(cfg.percentiles))

    @staticmethod
    def classes(catalog: Catalog, metas: Sequence[CaseMeta]) -> tuple[list[int], list[str]]:
        """Raw label values in class order, and class names."""
        if catalog.labels is not None:
            values = sorted(catalog.labels)
            return values, [slug(catalog.labels[v]) for v in values]
        values = sorted({0, *(v for m in metas for v in m.label_values)})
        return values, ["background" if v == 0 else f"label_{v}" for v in values]

    # ------------------------------------------------------------------ load
    def load(self) -> DataSplits:
        cfg = self.config
        catalog = self.catalog()
        if catalog.problems:
            raise DataError(catalog.problems[0])
        directory = cache_root(cfg.cache_dir) / self.name
        self.cache_stats = CacheStats()
        splits = split_patients(catalog.labeled, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        by_id = {c.case_id: c for c in catalog.labeled}
        labeled = [by_id[i] for s in SPLITS for i in splits[s]]
        # Unlabeled scans of a patient whose labeled cases are held out (test, and val unless
        # it is in the pool) would leak that patient into pretraining: they are left out.
        held_out = {by_id[i].patient for s in SPLITS if s != "train" and s not in cfg.pool
                    for i in splits[s]}
        pool_sources = [by_id[i] for s in cfg.pool for i in splits[s]] + [
            c for c in catalog.unlabeled if c.patient not in held_out]
        lab_entries = prepare(labeled, self.prep("labeled"), "labeled", directory, cfg.workers,
                              self.cache_stats)
        pool_entries = prepare(pool_sources, self.prep("pretrain"), "pretrain", directory,
                               cfg.workers, self.cache_stats)
        metas = [m for _, m in lab_entries + pool_entries]
        if not metas:
            raise DataError(f"{cfg.root}: dataset {self.name!r} found no volumes there.")
        self._check_channels(labeled + pool_sources, metas)
        values, names = self.classes(catalog, [m for _, m in lab_entries])
        lut = np.zeros(max(values) + 1, dtype=np.int64)
        lut[values] = np.arange(len(values))
        entry = {c.case_id: e for c, (e, _) in zip(labeled, lab_entries, strict=True)}
        split_record = {
            "dataset": self.name, "root": str(Path(cfg.root).expanduser().resolve()),
            **{s: splits[s] for s in SPLITS},
            "patients": {c.case_id: c.patient for c in labeled},
            "unlabeled": [c.case_id for c in pool_sources],
            "files": sorted(Path(f).name for c in labeled + pool_sources
                            for f in (*c.images, *([c.label] if c.label else []))),
        }
        split_hash = stable_hash(split_record)
        split_file = directory / "splits" / f"{split_hash}.json"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text(json.dumps(split_record, indent=1))
        info = self._info(catalog, metas[0].channels, values, names, split_file, not labeled)
        pool = CachedVolumes([e for e, _ in pool_entries], labeled=False,
                             ids=[c.case_id for c in pool_sources])
        if not labeled:
            no = NoLabels(f"Dataset {self.name!r} is a pretraining corpus only: it has no labels "
                          f"to fine-tune or evaluate on. {catalog.no_labels_hint}")
            return DataSplits(info, pool, no, no, no, split_hash, [])
        native = cfg.evaluate_at == "native"
        if native:  # the original label maps of the cases Dice is computed on
            evaluated = [by_id[i] for s in ("val", "test") for i in splits[s]]
            ensure_native(evaluated, [entry[c.case_id] for c in evaluated], cfg.workers,
                          self.cache_stats)
        parts: dict[str, Any] = {}
        for s in SPLITS:
            kind = NativeVolumes if native and s != "train" else CachedVolumes
            parts[s] = kind([entry[i] for i in splits[s]], labeled=True, lut=lut, ids=splits[s])
            if not splits[s]:
                parts[s] = NoLabels(
                    f"Dataset {self.name!r}: the {s} split is empty; {len(labeled)} labeled case(s) "
                    f"under {cfg.root} are too few for train/val/test (at least 3 patients), or "
                    "dataset.val_fraction / dataset.test_fraction is 0.")
        return DataSplits(info, pool, parts["train"], parts["val"], parts["test"], split_hash,
                          list(splits["train"]))

    def _check_channels(self, sources: Sequence[CaseSource], metas: Sequence[CaseMeta]) -> None:
        first = metas[0].channels
        for source, meta in zip(sources, metas, strict=True):
            if meta.channels != first:
                raise DataError(f"{source.images[0]}: {meta.channels} channel(s), but "
                                f"{sources[0].images[0]} has {first}; all cases need the same.")

    def _info(self, catalog: Catalog, channels: int, values: list[int], names: list[str],
              split_file: Path, pretraining_only: bool) -> DatasetInfo:
        cfg = self.config
        metrics = [f"dice_{n}" for n in names[1:]] + ["dice_mean"]
        main = "dice_mean"
        extra: dict[str, Any] = {"root": cfg.root, "split_file": str(split_file),
                                 "pretraining_only": pretraining_only,
                                 "label_values": values, "evaluate_at": cfg.evaluate_at}
        if catalog.regions:
            index = {v: i for i, v in enumerate(values)}
            extra["regions"] = {r: [index[v] for v in vs] for r, vs in catalog.regions.items()}
            metrics += [f"dice_{r}" for r in catalog.regions] + ["dice_regions"]
            main = "dice_regions"
        if cfg.patch_size is not None and cfg.patch_size < cfg.size:
            extra["patch_size"] = cfg.patch_size
            overlap = cfg.patch_overlap if cfg.patch_overlap is not None else cfg.patch_size // 2
            extra["patch_overlap"] = overlap - overlap % 2
        return DatasetInfo(kind="segmentation", num_classes=len(values), channels=channels,
                           image_size=(cfg.size,) * 3, class_names=tuple(names),
                           metrics=tuple(metrics), main_metric=main, extra=extra)

    # ------------------------------------------------------------------ check
    def check(self) -> CheckReport:
        """Read and check every case (no preprocessing); collect all problems."""
        cfg = self.config
        try:
            catalog = self.catalog()
        except DataError as exc:
            return CheckReport(self.name, cfg.root, [str(exc)], [], 0, 0)
        sources = list(catalog.labeled) + list(catalog.unlabeled)
        results = run_parallel(_inspect, sources, default_workers(cfg.workers))
        problems = list(catalog.problems) + [str(r) for r in results if isinstance(r, DataError)]
        good = [r for r in results if isinstance(r, CaseMeta)]
        channels = {m.channels for m in good}
        if len(channels) > 1:
            problems.append(f"cases disagree on the channel count: {sorted(channels)}")
        return CheckReport(self.name, cfg.root, problems, good, len(catalog.labeled),
                           len(catalog.unlabeled))


def _inspect(source: CaseSource) -> CaseMeta:
    return read_case(source)[3]
