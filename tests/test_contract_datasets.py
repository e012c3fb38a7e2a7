"""Every registered dataset, tested the moment it registers (as tests/test_contract_tasks.py
does for tasks): built at a tiny size (procedural datasets from a small config, file-backed
ones from tiny copies of their real layouts written here, or the small real data beside the
checkout when it is there), it must give

- labeled splits that share no case, and a pretraining pool without test cases;
- a ``split_hash`` that is the same for two loads (and in another process) and changes when
  the split settings change;
- a ``DatasetInfo`` that matches its items: channels, spatial size, target dtype and class
  range, class names, metrics;
- finite images in [0, 1].

A newly registered dataset fails ``test_dataset_contract`` until it gets a builder in
``BUILDERS`` below (or an entry in ``NOT_BUILDABLE`` saying why it cannot have one).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets_fixtures import write_aptos, write_brats, write_folder, write_luna, write_msd

from medssl_bench.errors import DataError
from medssl_bench.interfaces import DatasetInfo, DataSplits
from medssl_bench.plugins import build_registry

REGISTRY = build_registry(autoload=False)
DATASETS = REGISTRY.names("dataset")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LABELED = ("train", "val", "test")

Config = dict[str, Any]


@dataclass(frozen=True)
class Build:
    """One tiny instance of a dataset.

    ``config(folder)`` writes whatever files the dataset reads into ``folder`` (its own, empty)
    and returns the dataset's config values; ``changed(folder)`` returns values that, put over
    those, change the split, so the split hash must change too. ``needs``: a file outside the
    repository without which the build is skipped.
    """

    config: Callable[[Path], Config]
    changed: Callable[[Path], Config]
    needs: Path | None = None


def _volumes(folder: Path, **values: Any) -> Config:
    return {"size": 16, "workers": 1, "cache_dir": str(folder / "cache"), **values}


def _npz(path: Path, seed: int = 0, size: int = 8) -> Path:
    """A MedMNIST v2 3D file in the official format: six arrays, uint8, labels (N, 1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 6), ("val", 3), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).astype(np.uint8)[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


PHANTOM3D = {"size": 16, "n_unlabeled": 3, "n_train": 3, "n_val": 2, "n_test": 2}
PHANTOM2D = {"size": 16, "n_unlabeled": 3, "n_train": 4, "n_val": 2, "n_test": 3}
ADRENAL = SHARED / "medmnist3d" / "adrenalmnist3d.npz"


def _msd(folder: Path) -> Config:
    return _volumes(folder, root=str(write_msd(folder / "Task07_Pancreas")))


def _brats(folder: Path) -> Config:
    root = write_brats(folder / "MICCAI_BraTS_2018_Data_Training", 2018)
    return _volumes(folder, root=str(root), val_fraction=0.25, test_fraction=0.25)


def _luna(folder: Path) -> Config:
    return _volumes(folder, root=str(write_luna(folder / "LUNA16", n=4)))


def _labeled_folder(folder: Path) -> Config:
    write_folder(folder / "images", folder / "labels", n=5)
    return _volumes(folder, root=str(folder / "images"), labels=str(folder / "labels"))


def _corpus(folder: Path, name: str = "images", n: int = 4) -> Config:
    write_folder(folder / name, None, n=n)
    return _volumes(folder, root=str(folder / name))


def _aptos(folder: Path) -> Config:
    write_aptos(folder / "aptos2019", per_grade=2, unlabeled=2)
    return {"root": str(folder / "aptos2019"), "image_size": 16, "cache_dir": str(folder / "cache")}


#: Dataset name -> {variant: Build}. Every registered dataset needs an entry here or in
#: NOT_BUILDABLE.
BUILDERS: dict[str, dict[str, Build]] = {
    "phantom3d": {"tiny": Build(lambda f: dict(PHANTOM3D), lambda f: {"seed": 1})},
    "phantom2d": {"tiny": Build(lambda f: dict(PHANTOM2D), lambda f: {"seed": 1})},
    "medmnist3d": {
        # the official splits are the file's own: another file is the only other split
        "npz": Build(lambda f: {"path": str(_npz(f / "organmnist3d.npz"))},
                     lambda f: {"path": str(_npz(f / "other.npz", seed=1))}),
        "adrenalmnist3d": Build(lambda f: {"path": str(ADRENAL)},
                                lambda f: {"path": str(ADRENAL.with_name("adrenalmnist3d_64.npz"))},
                                needs=ADRENAL),
    },
    "fundus": {"aptos": Build(_aptos, lambda f: {"fold": 0})},
    "slices": {"phantom3d": Build(
        lambda f: {"source": "phantom3d", "source_config": dict(PHANTOM3D), "stride": 4},
        lambda f: {"axis": 1})},
    "msd": {"pancreas": Build(_msd, lambda f: {"split_seed": 1})},
    "brats": {"2018": Build(_brats, lambda f: {"split_seed": 2})},
    "luna16": {"corpus": Build(_luna, lambda f: {"subsets": [0]})},
    "nifti-folder": {
        "labeled": Build(_labeled_folder, lambda f: {"split_seed": 1}),
        "corpus": Build(_corpus, lambda f: {"root": _corpus(f, "fewer", n=3)["root"]}),
    },
}

#: Dataset name -> why no tiny instance of it can be built in a test.
NOT_BUILDABLE: dict[str, str] = {}


def _params() -> list:
    params = []
    for name in DATASETS:
        variants = BUILDERS.get(name) or {"": None}
        for variant in variants:
            params.append(pytest.param(name, variant, id=f"{name}-{variant}" if variant else name))
    return params


PARAMS = _params()
_LOADED: dict[tuple[str, str], tuple[Config, DataSplits]] = {}


def _build(name: str, variant: str) -> Build:
    if name in NOT_BUILDABLE:
        pytest.skip(f"dataset {name!r} cannot be built here: {NOT_BUILDABLE[name]}")
    build = BUILDERS.get(name, {}).get(variant)
    if build is None:
        pytest.fail(f"dataset {name!r} is registered but tests/test_contract_datasets.py cannot "
                    "build it: add a tiny builder to BUILDERS (or its reason to NOT_BUILDABLE)")
    if build.needs is not None and not build.needs.exists():
        pytest.skip(f"{build.needs} is not beside the checkout")
    return build


def _make(name: str, values: Config):
    cls = REGISTRY.get("dataset", name)
    return cls(cls.Config.model_validate(values))


def _load(name: str, variant: str, factory) -> tuple[Config, DataSplits]:
    """The dataset built and loaded once per test session (the checks only read it)."""
    if (name, variant) not in _LOADED:
        build = _build(name, variant)
        folder = factory.mktemp(f"{name}-{variant}")
        values = build.config(folder)
        _LOADED[name, variant] = (values, _make(name, values).load())
    return _LOADED[name, variant]


# --------------------------------------------------------------------------- coverage


def test_every_registered_dataset_has_a_builder():
    missing = [n for n in DATASETS if n not in BUILDERS and n not in NOT_BUILDABLE]
    assert not missing, f"no tiny builder for {missing}: add them to BUILDERS or NOT_BUILDABLE"
    stale = (set(BUILDERS) | set(NOT_BUILDABLE)) - set(DATASETS)
    assert not stale, f"builders for datasets that are not registered: {sorted(stale)}"
    assert not set(BUILDERS) & set(NOT_BUILDABLE)


# --------------------------------------------------------------------------- checks


def check_info(cls, info: DatasetInfo) -> None:
    assert info.kind in ("segmentation", "classification")
    assert len(info.image_size) == info.spatial_dims == cls.spatial_dims
    assert all(isinstance(s, int) and s > 0 for s in info.image_size)
    assert info.channels >= 1
    assert len(info.class_names) == info.num_classes, "one class name per class"
    assert len(set(info.class_names)) == info.num_classes, "class names must be distinct"
    assert info.metrics and len(set(info.metrics)) == len(info.metrics)
    assert info.main_metric in info.metrics
    assert set(getattr(info, "lower_is_better", ())) <= set(info.metrics)
    for region, classes in (info.extra.get("regions") or {}).items():
        assert classes and all(0 < c < info.num_classes for c in classes), region


def check_image(image: Any, info: DatasetInfo, where: str) -> torch.Tensor:
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32, where
    assert tuple(image.shape) == (info.channels, *info.image_size), (
        f"{where}: image shape {tuple(image.shape)}, info says {(info.channels, *info.image_size)}")
    assert torch.isfinite(image).all(), f"{where}: non-finite values"
    assert image.min() >= 0 and image.max() <= 1, f"{where}: values outside [0, 1]"
    return image


def check_target(target: Any, info: DatasetInfo, where: str) -> None:
    assert isinstance(target, torch.Tensor) and target.dtype == torch.long, where
    if info.kind == "segmentation":
        assert tuple(target.shape) == info.image_size, f"{where}: label map {tuple(target.shape)}"
    else:
        assert target.dim() == 0, f"{where}: a class index is a scalar, got {tuple(target.shape)}"
    assert 0 <= target.min() and target.max() < info.num_classes, (
        f"{where}: label values {target.unique().tolist()} outside 0..{info.num_classes - 1}")


def identities(split, images: list[torch.Tensor]) -> tuple[str, list[str]]:
    """The case ids of a split where it has them, else a hash of each image's content."""
    ids = getattr(split, "ids", None)
    if ids:
        assert len(ids) == len(images) and len(set(ids)) == len(ids), "case ids must be unique"
        return "id", list(ids)
    return "content", [hashlib.sha256(i.numpy().tobytes()).hexdigest() for i in images]


def check_disjoint(identity: dict[str, tuple[str, list[str]]]) -> None:
    for a, b in [*combinations(LABELED, 2), ("unlabeled", "test")]:
        if a in identity and b in identity and identity[a][0] == identity[b][0]:
            shared = set(identity[a][1]) & set(identity[b][1])
            assert not shared, f"{a} and {b} share cases ({identity[a][0]}): {sorted(shared)[:3]}"


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize(("name", "variant"), PARAMS)
def test_dataset_contract(name, variant, tmp_path_factory):
    cls = REGISTRY.get("dataset", name)
    _, data = _load(name, variant, tmp_path_factory)
    info = data.info
    check_info(cls, info)
    assert isinstance(data.split_hash, str) and len(data.split_hash) >= 8
    identity = {}
    pool = [check_image(data.unlabeled[i], info, f"unlabeled[{i}]") for i in range(len(data.unlabeled))]
    assert pool, "the pretraining pool is empty"
    identity["unlabeled"] = identities(data.unlabeled, pool)
    if info.extra.get("pretraining_only"):
        for split in LABELED:
            with pytest.raises(DataError):
                len(getattr(data, split))
        assert not data.train_ids
        return
    assert info.num_classes >= 2
    for split in LABELED:
        part = getattr(data, split)
        assert len(part) > 0, f"the {split} split is empty"
        images = []
        for i in range(len(part)):
            item = part[i]
            assert isinstance(item, tuple) and len(item) == 2, f"{split}[{i}] is not (image, target)"
            images.append(check_image(item[0], info, f"{split}[{i}]"))
            check_target(item[1], info, f"{split}[{i}]")
        identity[split] = identities(part, images)
    check_disjoint(identity)
    assert len(data.train_ids) == len(data.train) and len(set(data.train_ids)) == len(data.train)
    if identity["train"][0] == "id":
        assert data.train_ids == identity["train"][1]
    assert not data.train_groups or len(data.train_groups) == len(data.train)


@pytest.mark.parametrize(("name", "variant"), PARAMS)
def test_split_hash_stable_and_follows_the_split(name, variant, tmp_path_factory):
    build = _build(name, variant)
    values, data = _load(name, variant, tmp_path_factory)
    again = _make(name, values).load()
    assert again.split_hash == data.split_hash, "two loads of one dataset give different hashes"
    assert again.train_ids == data.train_ids
    folder = tmp_path_factory.mktemp(f"{name}-{variant}-changed")
    changed = _make(name, {**values, **build.changed(folder)}).load()
    assert changed.split_hash != data.split_hash, "another split, the same split hash"


def test_split_hashes_are_the_same_in_another_process(tmp_path_factory):
    """Nothing process-specific (``hash()``, object ids, dict order) enters a split hash."""
    cases = {}
    for param in PARAMS:
        name, variant = param.values
        if name in NOT_BUILDABLE or variant not in BUILDERS.get(name, {}):
            continue
        build = BUILDERS[name][variant]
        if build.needs is not None and not build.needs.exists():
            continue
        values, data = _load(name, variant, tmp_path_factory)
        cases[param.id] = {"name": name, "values": values, "hash": data.split_hash}
    script = (
        "import json, sys\n"
        "from medssl_bench.plugins import build_registry\n"
        "registry = build_registry(autoload=False)\n"
        "out = {}\n"
        "for key, case in json.load(sys.stdin).items():\n"
        "    cls = registry.get('dataset', case['name'])\n"
        "    out[key] = cls(cls.Config.model_validate(case['values'])).load().split_hash\n"
        "print(json.dumps(out))\n"
    )
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    result = subprocess.run([sys.executable, "-c", script], input=json.dumps(cases), text=True,
                            capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed},
                            check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    hashes = json.loads(result.stdout.strip().splitlines()[-1])
    assert hashes == {key: case["hash"] for key, case in cases.items()}
