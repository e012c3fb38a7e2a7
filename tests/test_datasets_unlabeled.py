"""nifti-folder with label maps for some images only: ``unlabeled_images=pretrain`` puts the
others in the pretraining pool (never in a labeled split), and scans of a held-out patient
never reach pretraining."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datasets_fixtures import blob_case, save_nifti

from medssl_bench.errors import DataError
from medssl_bench_datasets.nifti_folder import NiftiFolder


def _write(root: Path, labeled: list[str], unlabeled: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for case in labeled + unlabeled:
        image, label = blob_case(rng, values=(1,), lo=0, hi=200)
        save_nifti(root / "img" / f"{case}.nii.gz", image)
        if case in labeled:
            save_nifti(root / "lab" / f"{case}.nii.gz", label)


def _dataset(root: Path, cache: Path, **kw) -> NiftiFolder:
    kw = {"size": 16, "workers": 1, "cache_dir": str(cache)} | kw
    return NiftiFolder(NiftiFolder.Config(root=str(root / "img"), labels=str(root / "lab"), **kw))


def _splits(data) -> dict[str, list[str]]:
    return {s: list(getattr(data, s).ids) for s in ("train", "val", "test")}


def test_unlabeled_image_is_an_error_that_names_the_option(tmp_path):
    _write(tmp_path, [f"case{i}" for i in range(4)], ["case10"])
    with pytest.raises(DataError) as info:
        _dataset(tmp_path, tmp_path / "cache").load()
    text = str(info.value)
    assert "case10.nii.gz" in text and "image without its label" in text
    assert "dataset.unlabeled_images=pretrain" in text
    report = _dataset(tmp_path, tmp_path / "cache").check()
    assert any("unlabeled_images" in p for p in report.problems)


def test_pretrain_puts_unlabeled_images_in_the_pool_only(tmp_path):
    labeled = [f"case{i}" for i in range(6)]
    extra = ["scan_a", "scan_b"]
    _write(tmp_path / "mixed", labeled, extra)
    _write(tmp_path / "plain", labeled, [])
    ds = _dataset(tmp_path / "mixed", tmp_path / "cache", unlabeled_images="pretrain")
    report = ds.check()
    assert report.problems == [] and report.n_labeled == 6 and report.n_unlabeled == 2
    data = ds.load()
    splits = _splits(data)
    assert not data.info.extra["pretraining_only"]
    assert sorted(i for ids in splits.values() for i in ids) == labeled
    # the labeled split is the one the folder gives without the unlabeled scans
    plain = _dataset(tmp_path / "plain", tmp_path / "cache2").load()
    assert _splits(plain) == splits
    # pool: labeled train + val (the existing rule, dataset.pool) plus the unlabeled scans
    pool = list(data.unlabeled.ids)
    assert sorted(pool) == sorted(splits["train"] + splits["val"] + extra)
    assert not set(pool) & set(splits["test"])
    assert len(data.unlabeled) == len(pool)
    assert data.unlabeled[0].shape == (1, 16, 16, 16)
    record = json.loads(Path(data.info.extra["split_file"]).read_text())
    assert set(extra) <= set(record["unlabeled"])
    assert data.split_hash != plain.split_hash


@pytest.mark.parametrize("pool", [["train", "val"], ["train"]])
def test_unlabeled_scans_of_held_out_patients_stay_out_of_pretraining(tmp_path, pool):
    """A patient's labeled scan in test (or in val when val is not pretrained on) keeps that
    patient's unlabeled scans out of the pool, which would otherwise leak it."""
    patients = [f"p{i}" for i in range(6)]
    _write(tmp_path, [f"{p}_base" for p in patients], [f"{p}_followup" for p in patients])
    ds = _dataset(tmp_path, tmp_path / "cache", unlabeled_images="pretrain",
                  patient_regex=r"^(p\d+)_", pool=pool)
    data = ds.load()
    splits = _splits(data)
    of = {s: {i.split("_")[0] for i in ids} for s, ids in splits.items()}
    assert of["test"] and of["val"] and of["train"]
    held_out = of["test"] | (set() if "val" in pool else of["val"])
    pooled = set(data.unlabeled.ids)
    assert pooled == ({f"{p}_base" for s in pool for p in of[s]}
                      | {f"{p}_followup" for p in patients if p not in held_out})
    assert not {i.split("_")[0] for i in pooled} & held_out
    for s in ("train", "val", "test"):  # unlabeled scans never become labeled cases
        assert not any(i.endswith("_followup") for i in splits[s])


def test_label_maps_in_the_image_folder_never_become_pretraining_images(tmp_path):
    """Images and label maps in one folder (labels named <case>_label) without an image
    suffix: with unlabeled_images=pretrain the label maps must not join the pool."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "all"
    for i in range(5):
        image, label = blob_case(rng, values=(1,), lo=0, hi=200)
        save_nifti(folder / f"case{i}.nii.gz", image)
        save_nifti(folder / f"case{i}_label.nii.gz", label)
    ds = NiftiFolder(NiftiFolder.Config(
        root=str(folder), labels=str(folder), label_suffix="_label", size=16, workers=1,
        cache_dir=str(tmp_path / "cache"), unlabeled_images="pretrain"))
    data = ds.load()
    every = list(data.unlabeled.ids) + [i for ids in _splits(data).values() for i in ids]
    assert not [i for i in every if i.endswith("_label")]
    assert sorted(i for ids in _splits(data).values() for i in ids) == [f"case{i}" for i in range(5)]
