"""Bad data gives one clear DataError naming the file and the problem, and `bench data check`
lists every problem of a dataset at once."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets_fixtures import AFFINE, SHAPE, save_nifti, write_brats, write_msd

from medssl_bench import cli
from medssl_bench.errors import DataError
from medssl_bench_datasets.brats import BraTS
from medssl_bench_datasets.msd import MSD
from medssl_bench_datasets.nifti_folder import NiftiFolder


def _good_case(root, name, image=None, label=None, label_affine=AFFINE):
    rng = np.random.default_rng(len(name))
    image = rng.uniform(0, 100, SHAPE).astype(np.float32) if image is None else image
    label = np.zeros(SHAPE, np.uint8) if label is None else label
    label[5:9, 5:9, 5:9] = 1
    save_nifti(root / "img" / name, image)
    save_nifti(root / "lab" / name, label, label_affine)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


FAULTS = {
    "truncated": (lambda r: _truncate(r / "img" / "bad.nii.gz"), "corrupt, truncated"),
    "no_label": (lambda r: (r / "lab" / "bad.nii.gz").unlink(), "image without its label"),
    "shape": (lambda r: save_nifti(r / "lab" / "bad.nii.gz", np.zeros((24, 20, 15), np.uint8)),
              "has shape (24, 20, 15)"),
    "affine": (lambda r: save_nifti(r / "lab" / "bad.nii.gz", np.zeros(SHAPE, np.uint8),
                                    np.diag([1.0, 0.8, 2.5, 1.0])), "affine"),
    "nan": (lambda r: save_nifti(r / "img" / "bad.nii.gz",
                                 np.where(np.arange(np.prod(SHAPE)).reshape(SHAPE) % 7 == 0, np.nan,
                                          1.0).astype(np.float32)), "NaN"),
    "float_label": (lambda r: save_nifti(r / "lab" / "bad.nii.gz",
                                         np.full(SHAPE, 0.5, np.float32)), "non-integer"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_gives_one_clear_error(tmp_path, fault):
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz", "bad.nii.gz"):
        _good_case(tmp_path, name)
    plant, message = FAULTS[fault]
    plant(tmp_path)
    ds = NiftiFolder(NiftiFolder.Config(root=str(tmp_path / "img"), labels=str(tmp_path / "lab"),
                                        size=16, workers=1, cache_dir=str(tmp_path / "cache")))
    with pytest.raises(DataError) as info:
        ds.load()
    text = str(info.value)
    assert "bad.nii.gz" in text and message in text, text
    assert "\n" not in text.strip()


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    ds = NiftiFolder(NiftiFolder.Config(root=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="empty"):
        ds.load()
    with pytest.raises(DataError, match="no dataset.json"):
        MSD(MSD.Config(root=str(tmp_path / "empty"))).load()
    with pytest.raises(DataError, match="needs the folder"):
        MSD().load()


def test_unknown_label_value_in_msd(tmp_path):
    root = write_msd(tmp_path / "T", ids=(1, 2, 3), test_ids=())
    label = np.zeros(SHAPE, np.uint8)
    label[2, 2, 2] = 3
    save_nifti(root / "labelsTr" / "pancreas_002.nii.gz", label)
    ds = MSD(MSD.Config(root=str(root), size=16, workers=1, cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match=r"pancreas_002\.nii\.gz: unknown label value\(s\) \[3\]"):
        ds.load()


def test_brats_label_3_and_missing_seg(tmp_path):
    root = write_brats(tmp_path / "B", 2021)
    seg = root / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz"
    seg.unlink()
    ds = BraTS(BraTS.Config(root=str(root), size=16, workers=1, cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match="BraTS2021_00002_flair.nii.gz: image without its label"):
        ds.load()


def test_data_check_lists_every_problem(tmp_path, capsys):
    root = write_msd(tmp_path / "Task07_Pancreas", ids=(1, 2, 3, 4, 5, 6), test_ids=(7,))
    _truncate(root / "imagesTr" / "pancreas_001.nii.gz")
    (root / "labelsTr" / "pancreas_002.nii.gz").unlink()
    bad = np.zeros(SHAPE, np.uint8)
    bad[1, 1, 1] = 7
    save_nifti(root / "labelsTr" / "pancreas_003.nii.gz", bad)
    save_nifti(root / "labelsTr" / "pancreas_004.nii.gz", np.zeros((5, 5, 5), np.uint8))
    code = cli.main(["data", "check", "--dataset", "msd", "--set", f"dataset.root={root}",
                     "dataset.workers=1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "4 problem(s)" in out
    for needle in ("pancreas_001.nii.gz", "pancreas_002.nii.gz", "pancreas_003.nii.gz",
                   "pancreas_004.nii.gz", "unknown label value", "truncated", "has shape"):
        assert needle in out, needle
    assert "good: 3" in out and "24x20x16 (3)" in out and "0.8x0.8x2.5" in out

    code = cli.main(["data", "check", "--dataset", "msd", "--json", "--set",
                     f"dataset.root={root}", "dataset.workers=1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and len(report["problems"]) == 4 and report["label_values"] == {
        "0": 2, "1": 2, "2": 2}


def test_data_check_clean_dataset_exits_zero(tmp_path, capsys):
    root = write_brats(tmp_path / "B", 2018)
    code = cli.main(["data", "check", "--dataset", "brats", "--set", f"dataset.root={root}",
                     "dataset.workers=1"])
    out = capsys.readouterr().out
    assert code == 0 and "no problems found" in out and "5 labeled" in out


def test_data_check_of_a_dataset_without_file_checks_reports_its_splits(capsys):
    """phantom3d has no per-file check: loading it is the check, and the report gives the
    split sizes it produced (not a 'cases' count that does not add up)."""
    from medssl_bench import cli

    code = cli.main(["data", "check", "--dataset", "phantom3d", "--json", "--set",
                     "dataset.size=16", "dataset.n_unlabeled=3", "dataset.n_train=4",
                     "dataset.n_val=2", "dataset.n_test=1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["problems"] == []
    assert report["splits"] == {"train": 4, "val": 2, "test": 1, "unlabeled": report["splits"]["unlabeled"]}
    assert report["splits"]["unlabeled"] >= 3
    assert cli.main(["data", "check", "--dataset", "phantom3d", "--set", "dataset.size=16",
                     "dataset.n_unlabeled=3", "dataset.n_train=4", "dataset.n_val=2",
                     "dataset.n_test=1"]) == 0
    assert "labeled: train 4, val 2, test 1" in capsys.readouterr().out
