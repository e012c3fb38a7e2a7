"""Segmentation Dice on each case's original voxel grid (``dataset.evaluate_at: native``):
the reorientation is undone exactly, a perfect prediction at the preprocessed size scores
close to 1 on the native grid, the option switches the grid, sliding windows still apply,
and the original label maps are cached once."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from datasets_fixtures import write_msd
from torch import nn
from torch.nn import functional as F

import medssl_bench.engine as engine
from medssl_bench.volumetric import NativeTarget, to_native
from medssl_bench_datasets.msd import MSD
from medssl_bench_datasets.preprocess import canonical_orientation

SHAPE = (20, 24, 16)
#: Not RAS: axis 0 runs superior (1.2 mm), axis 1 left (0.8 mm), axis 2 anterior (2.5 mm).
AFFINE = np.array([[0, -0.8, 0, 10], [0, 0, 2.5, -5], [1.2, 0, 0, 3], [0, 0, 0, 1]], float)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_msd(tmp_path_factory.mktemp("native") / "Task07_Pancreas", ids=(1, 4, 5, 10, 12),
                     test_ids=(), shape=SHAPE, affine=AFFINE)


def make(root, cache, **kw):
    return MSD(MSD.Config(root=str(root), size=16, workers=1, cache_dir=str(cache), **kw))


class Lookup(nn.Module):
    """The one-hot of the resized label of whichever cached case it is shown, as logits."""

    def __init__(self, split):
        super().__init__()
        self.cases = [split[i] for i in range(len(split))]

    def forward(self, x):
        out = []
        for image in x:
            label = next(lab for img, lab in self.cases if torch.equal(img, image))
            out.append(F.one_hot(label, 3).permute(3, 0, 1, 2).float() * 10)
        return torch.stack(out)


def spy_shapes(monkeypatch):
    shapes = []
    real = engine.dice_per_case

    def spy(pred, target, k):
        shapes.append(tuple(target.shape[1:]))
        assert pred.shape == target.shape
        return real(pred, target, k)

    monkeypatch.setattr(engine, "dice_per_case", spy)
    return shapes


def test_to_native_undoes_reorientation_and_crop():
    import torchio as tio

    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, SHAPE).astype(np.int16)
    label[:1], label[:, -2:] = 0, 0
    ornt = canonical_orientation(AFFINE)
    canon = tio.ToCanonical()(tio.LabelMap(tensor=torch.from_numpy(label)[None], affine=AFFINE))
    canonical = canon.data[0]
    assert canonical.shape == (24, 16, 20)  # RAS: from axes 1, 2, 0
    logits = F.one_hot(canonical.long(), 3).permute(3, 0, 1, 2).float()
    target = NativeTarget(torch.from_numpy(label).long(), ornt)
    assert torch.equal(to_native(logits, target), target.label)
    # original axis 1 is canonical axis 0 flipped: its last two voxels come first there
    crop = (2, 0, 0, 0, 1, 0)
    inner = logits[:, 2:, :, 1:]
    assert torch.equal(to_native(inner, NativeTarget(target.label, ornt, crop)), target.label)


def test_perfect_prediction_scores_about_one_on_the_native_grid(root, tmp_path, monkeypatch):
    data = make(root, tmp_path / "cache").load()
    assert data.info.extra["evaluate_at"] == "native"
    assert tuple(data.test.native_target(0).label.shape) == SHAPE
    shapes = spy_shapes(monkeypatch)
    metrics = engine.evaluate(Lookup(data.test), data.test, data.info, CPU, batch_size=2, amp=False)
    assert shapes == [SHAPE] * len(data.test)
    # 16^3 keeps the 10-voxel blob and its 4-voxel core only to about a native voxel
    assert metrics["dice_mean"] > 0.9 and min(metrics.values()) > 0.8
    # the same prediction on the resized labels is exact, on the native grid only close
    ds = make(root, tmp_path / "other", evaluate_at="resized")
    resized = ds.load()
    shapes.clear()
    exact = engine.evaluate(Lookup(resized.test), resized.test, resized.info, CPU, amp=False)
    assert shapes == [(16, 16, 16)] * len(resized.test)
    assert exact["dice_mean"] == 1.0 and metrics["dice_mean"] < 1.0
    assert not hasattr(resized.test, "native_target") and ds.cache_stats.native_computed == 0
    assert not any((e / "native_label.npy").exists() for e in resized.test.entries)


def test_sliding_windows_then_native(root, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Conv3d(1, 3, 1)  # pointwise: windows give exactly the whole-volume logits
    whole = make(root, tmp_path / "cache").load()
    patched = make(root, tmp_path / "cache", patch_size=8, patch_overlap=4).load()
    assert patched.info.extra["patch_size"] == 8
    calls = []
    real = engine.sliding_window_logits
    monkeypatch.setattr(engine, "sliding_window_logits",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    shapes = spy_shapes(monkeypatch)
    a = engine.evaluate(model, whole.val, whole.info, CPU, amp=False)
    assert not calls
    b = engine.evaluate(model, patched.val, patched.info, CPU, amp=False)
    assert calls and shapes == [SHAPE] * (2 * len(whole.val))
    assert a == pytest.approx(b)


def test_native_labels_cached_once(root, tmp_path):
    ds = make(root, tmp_path / "cache")
    data = ds.load()
    n_eval = len(data.val) + len(data.test)
    assert ds.cache_stats.native_computed == n_eval and ds.cache_stats.computed > 0
    has = {s: [(e / "native_label.npy").is_file() for e in getattr(data, s).entries]
           for s in ("train", "val", "test")}
    assert all(has["val"] + has["test"]) and not any(has["train"])
    stored = np.load(data.test.entries[0] / "native_label.npy", mmap_mode="r")
    assert isinstance(stored, np.memmap) and stored.dtype == np.int16 and stored.shape == SHAPE
    case = data.test.ids[0]
    original = nib.load(str(root / "labelsTr" / f"{case}.nii.gz")).get_fdata()
    assert np.array_equal(np.asarray(stored), original)
    again = make(root, tmp_path / "cache")
    again.load()
    assert again.cache_stats.computed == 0 and again.cache_stats.native_computed == 0
    assert again.cache_stats.reused == ds.cache_stats.computed + ds.cache_stats.reused
