"""Whole-volume evaluation for the volume datasets: sliding windows match a direct forward
pass where both apply, random training patches, BraTS region Dice, and `bench run` end to
end on tiny MSD and BraTS copies."""

from __future__ import annotations

import pytest
import torch
from datasets_fixtures import write_brats, write_msd
from torch import nn

from medssl_bench import cli
from medssl_bench.engine import evaluate
from medssl_bench.interfaces import DatasetInfo
from medssl_bench.volumetric import random_patches, region_dice, sliding_window_logits

CPU = torch.device("cpu")


def _pointwise_model(channels=2, classes=3):
    """Each output voxel depends on its own input voxel only, so sliding windows with any
    overlap must reproduce the whole-volume forward pass exactly."""
    torch.manual_seed(0)
    return nn.Conv3d(channels, classes, kernel_size=1).eval()


def _info(**extra):
    return DatasetInfo(kind="segmentation", num_classes=3, channels=2, image_size=(24, 20, 28),
                       class_names=("background", "a", "b"), metrics=("dice_a", "dice_b", "dice_mean"),
                       main_metric="dice_mean", extra=extra)


def test_sliding_window_matches_direct_forward():
    model = _pointwise_model()
    images = torch.rand(2, 2, 24, 20, 28, generator=torch.Generator().manual_seed(1))
    direct = model(images)
    for patch, overlap in ((16, 8), (12, 4), (8, 0)):
        windowed = sliding_window_logits(model, images, patch, overlap, CPU, batch_size=3)
        torch.testing.assert_close(windowed, direct, rtol=1e-5, atol=1e-5)
    # thinner than the patch along an axis: padded, then cropped back
    torch.testing.assert_close(sliding_window_logits(model, images, 22, 6, CPU), direct,
                               rtol=1e-5, atol=1e-5)


def test_evaluate_with_patch_size_equals_whole_volume_metrics():
    model = _pointwise_model()
    g = torch.Generator().manual_seed(2)
    cases = [(torch.rand(2, 24, 20, 28, generator=g), torch.randint(0, 3, (24, 20, 28), generator=g))
             for _ in range(3)]
    whole = evaluate(model, cases, _info(), CPU, batch_size=2)
    windows = evaluate(model, cases, _info(patch_size=12, patch_overlap=4), CPU, batch_size=2)
    assert whole == windows


def test_random_patches_align_image_and_label():
    images = torch.arange(2 * 20 * 20 * 20, dtype=torch.float32).reshape(2, 1, 20, 20, 20)
    labels = images[:, 0].long()
    pi, pl = random_patches(images, labels, 8, torch.Generator().manual_seed(0))
    assert pi.shape == (2, 1, 8, 8, 8) and pl.shape == (2, 8, 8, 8)
    assert torch.equal(pi[:, 0].long(), pl)
    same, _ = random_patches(images, labels, 32, torch.Generator())
    assert same is images


def test_region_dice_brats_regions():
    regions = {"wt": [1, 2, 3], "tc": [1, 3], "et": [3]}
    target = torch.tensor([[0, 1, 2, 3, 3, 0]])
    pred = torch.tensor([[0, 2, 2, 3, 0, 0]])  # ncr called edema, one et voxel missed
    scores = region_dice(pred, target, regions)[0]
    # wt: pred {1,2,3} at 3 voxels, target 4 voxels, overlap 3 -> 6/7
    torch.testing.assert_close(scores, torch.tensor([6 / 7, 2 / 4, 2 / 3]))
    empty = region_dice(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), regions)
    assert empty.tolist() == [[1.0, 1.0, 1.0]]


def _run(tmp_path, monkeypatch, dataset, root, *extra):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    args = ["run", "--protocol", "data-efficiency", "--task", "rotation3d", "--dataset", dataset,
            "--device", "cpu", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--set", f"dataset.root={root}", "dataset.workers=1",
            "pretrain.epochs=1", "pretrain.iterations_per_epoch=1", "finetune.epochs=1",
            "finetune.iterations_per_epoch=1", "protocol.fractions=[100]", "protocol.seeds=[0]",
            "backbone.filters=[8,16,32]", "backbone.width=1.0", *extra]
    return cli.main(args)


@pytest.mark.slow
def test_bench_run_on_msd_and_brats(tmp_path, monkeypatch, capsys):
    root = write_msd(tmp_path / "Task07_Pancreas")
    assert _run(tmp_path, monkeypatch, "msd", root, "dataset.size=32") == 0
    out = capsys.readouterr().out
    assert "Dataset msd" in out and "dice_mean" in out and "3 ran" in out
    # a rerun hits the preprocessed-volume cache and the finished results
    assert _run(tmp_path, monkeypatch, "msd", root, "dataset.size=32") == 0
    assert "reused" in capsys.readouterr().out
    # BraTS with 16^3 patches: random training patches, sliding-window test, region Dice
    broot = write_brats(tmp_path / "brats", 2021)
    assert _run(tmp_path, monkeypatch, "brats", broot, "dataset.size=32", "dataset.patch_size=16",
                "dataset.val_fraction=0.2", "dataset.test_fraction=0.2",
                "protocol.include_scratch=false") == 0
    assert "dice_regions" in capsys.readouterr().out
