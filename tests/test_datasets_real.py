"""The volume datasets (msd, brats, luna16, nifti-folder) on tiny copies in the real layouts,
the real glioblastoma MRI through nifti-folder, and the preprocessed-volume cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets_fixtures import write_brats, write_folder, write_luna, write_msd

from medssl_bench.errors import DataError
from medssl_bench_datasets.brats import BraTS
from medssl_bench_datasets.luna16 import LUNA16
from medssl_bench_datasets.msd import MSD
from medssl_bench_datasets.nifti_folder import NiftiFolder

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tcga_gbm_brain1_pyradiomics"


def make(cls, root, tmp_path, **kw):
    kw = {"size": 16, "workers": 1, "cache_dir": str(tmp_path / "cache")} | kw
    return cls(cls.Config(root=str(root), **kw))


def test_msd_reads_dataset_json_with_quirks(tmp_path):
    root = write_msd(tmp_path / "Task07_Pancreas")
    ds = make(MSD, root, tmp_path)
    data = ds.load()
    info = data.info
    assert info.kind == "segmentation" and info.num_classes == 3 and info.channels == 1
    assert info.class_names == ("background", "pancreas", "cancer")
    assert info.main_metric == "dice_mean" and info.image_size == (16, 16, 16)
    n = len(data.train) + len(data.val) + len(data.test)
    assert n == 6 and len(data.test) >= 1 and len(data.val) >= 1
    # pool: train + val images (never test) plus the two unlabeled imagesTs volumes
    assert len(data.unlabeled) == len(data.train) + len(data.val) + 2
    assert any(i.startswith("test/") for i in data.unlabeled.ids)
    image, label = data.train[0]
    assert image.shape == (1, 16, 16, 16) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert label.dtype == torch.long and set(label.unique().tolist()) <= {0, 1, 2}
    assert data.train_ids == data.train.ids
    record = json.loads(Path(info.extra["split_file"]).read_text())
    assert record["test"] == data.test.ids
    # deterministic: a fresh instance gives the same split and hash
    again = make(MSD, root, tmp_path).load()
    assert again.split_hash == data.split_hash and again.train_ids == data.train_ids


def test_msd_4d_modalities_become_channels(tmp_path):
    root = write_msd(tmp_path / "Task01", ids=(1, 2, 3), test_ids=(), channels=2)
    data = make(MSD, root, tmp_path, val_fraction=0.3).load()
    assert data.info.channels == 2
    image, _ = data.train[0]
    assert image.shape == (2, 16, 16, 16)


@pytest.mark.parametrize("year", [2018, 2021])
def test_brats_layouts_labels_and_regions(tmp_path, year):
    root = write_brats(tmp_path / f"brats{year}", year)
    data = make(BraTS, root, tmp_path, val_fraction=0.25, test_fraction=0.25).load()
    info = data.info
    assert info.channels == 4 and info.num_classes == 4
    assert info.main_metric == "dice_regions"
    assert info.extra["regions"] == {"wt": [1, 2, 3], "tc": [1, 3], "et": [3]}
    assert {"dice_wt", "dice_tc", "dice_et", "dice_regions"} <= set(info.metrics)
    image, label = data.train[0]
    assert image.shape == (4, 16, 16, 16)
    assert set(label.unique().tolist()) <= {0, 1, 2, 3} and 3 in label.unique()  # 4 -> 3
    if year == 2018:  # two time points of one patient stay in one split
        record = json.loads(Path(info.extra["split_file"]).read_text())
        both = [s for s in ("train", "val", "test")
                if {"Brats18_TCIA01_131_1", "Brats18_TCIA01_131_2"} <= set(record[s])]
        assert len(both) == 1


def test_luna16_is_a_pretraining_corpus_in_hu(tmp_path):
    root = write_luna(tmp_path / "LUNA16")
    data = make(LUNA16, root, tmp_path, foreground_crop=False).load()
    assert len(data.unlabeled) == 3 and data.info.extra["pretraining_only"]
    volume = data.unlabeled[0]
    assert volume.shape == (1, 16, 16, 16) and 0 <= volume.min() and volume.max() <= 1
    with pytest.raises(DataError, match="pretraining corpus only"):
        len(data.train)


def test_luna16_hu_window_is_fixed_not_per_volume(tmp_path):
    """-1000 HU maps to 0 and +1000 to 1 in every scan (no per-volume min-max)."""
    from medssl_bench_datasets.preprocess import Prep, scale_intensity

    hu = torch.tensor([[[[-3024.0, -1000.0, 0.0, 1000.0, 3000.0]]]])
    out = scale_intensity(hu, ct=True, prep=Prep())
    assert out.flatten().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_nifti_folder_mixed_formats_with_labels(tmp_path):
    write_folder(tmp_path / "img", tmp_path / "lab", n=6)
    ds = make(NiftiFolder, tmp_path / "img", tmp_path, labels=str(tmp_path / "lab"))
    data = ds.load()
    assert data.info.num_classes == 2 and data.info.class_names == ("background", "label_1")
    assert len(data.train) + len(data.val) + len(data.test) == 6
    _, label = data.test[0]
    assert label.sum() > 0


def test_nifti_folder_without_labels_is_a_corpus(tmp_path):
    write_folder(tmp_path / "img", None, n=3)
    data = make(NiftiFolder, tmp_path / "img", tmp_path).load()
    assert len(data.unlabeled) == 3 and data.info.extra["pretraining_only"]


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real MRI not present ({SHARED} is absent)")
def test_real_glioblastoma_mri_through_nifti_folder(tmp_path):
    ds = make(NiftiFolder, SHARED, tmp_path, size=32, labels=str(SHARED),
              image_suffix="_image", label_suffix="_label")
    data = ds.load()
    assert data.info.num_classes == 2
    image, label = data.train[0]
    assert image.shape == (1, 32, 32, 32) and 0 <= image.min() and 0.3 < image.max() <= 1
    tumour = int(label.sum())
    # 4,137 tumour voxels of 0.78 x 0.78 x 6.5 mm in a 256 x 256 x 25 grid, resized to 32^3
    expected = 4137 * 32**3 / (256 * 256 * 25)
    assert 0.5 * expected < tumour < 2 * expected
    assert len(data.unlabeled) == 1  # the pretraining copy is foreground-cropped
    with pytest.raises(DataError, match="too few"):
        len(data.test)


def _mtimes(directory: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in directory.rglob("*.npy")}


def test_cache_is_reused_and_invalidated_per_file(tmp_path):
    root = write_msd(tmp_path / "Task07_Pancreas", ids=(1, 2, 3), test_ids=(9,))
    ds = make(MSD, root, tmp_path)
    first = ds.load()
    assert ds.cache_stats.computed == 3 + 3 and ds.cache_stats.reused == 0
    before = _mtimes(tmp_path / "cache")
    second = ds.load()
    assert ds.cache_stats.computed == 0 and ds.cache_stats.reused == 6
    assert _mtimes(tmp_path / "cache") == before
    torch.testing.assert_close(first.train[0][0], second.train[0][0])
    # cached arrays are plain .npy, memory-mapped
    entry = second.train.entries[0]
    assert isinstance(np.load(entry / "image.npy", mmap_mode="r"), np.memmap)
    # touching one source file re-preprocesses only the entries that read it
    path = root / "imagesTs" / "pancreas_009.nii.gz"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    ds.load()
    assert ds.cache_stats.computed == 1
    # a preprocessing setting is part of the key
    other = make(MSD, root, tmp_path, ct_window=(-200.0, 300.0))
    other.load()
    assert other.cache_stats.computed == 6


def test_parallel_workers_match_in_process(tmp_path):
    root = write_msd(tmp_path / "T", ids=(1, 2, 3), test_ids=())
    one = make(MSD, root, tmp_path, cache_dir=str(tmp_path / "c1")).load()
    two_ds = make(MSD, root, tmp_path, cache_dir=str(tmp_path / "c2"), workers=2)
    two = two_ds.load()
    assert two_ds.cache_stats.computed == 3 + 2  # labeled + pretraining copies of train, val
    for a, b in zip(one.unlabeled, two.unlabeled, strict=True):
        torch.testing.assert_close(a, b)


def test_foreground_crop_only_for_pretraining(tmp_path):
    """The pretraining copy of a volume with a wide empty border is cropped to the body, so
    the body fills more of it than of the fine-tuning copy (Taleb et al. appendix)."""
    rng = np.random.default_rng(0)
    from datasets_fixtures import save_nifti

    for i in range(3):
        image = np.zeros((32, 32, 32), np.float32)
        image[12:20, 10:22, 8:24] = rng.uniform(100, 200, (8, 12, 16))
        label = (image > 150).astype(np.uint8)
        save_nifti(tmp_path / "img" / f"c{i}.nii.gz", image)
        save_nifti(tmp_path / "lab" / f"c{i}.nii.gz", label)
    data = make(NiftiFolder, tmp_path / "img", tmp_path, labels=str(tmp_path / "lab"),
                val_fraction=0.34, test_fraction=0.34).load()
    pretrain_fill = float((data.unlabeled[0] > 0.05).float().mean())
    finetune_fill = float((data.train[0][0] > 0.05).float().mean())
    assert pretrain_fill > 0.9 and finetune_fill < 0.3
