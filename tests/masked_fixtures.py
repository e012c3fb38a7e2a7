"""Shared by the masked-modelling task tests (simmim3d, spark3d): tiny `bench run` settings,
the MedMNIST file beside the checkout, smooth test volumes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.nn import functional as F

from medssl_bench import cli

ADRENAL = (Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist3d"
           / "adrenalmnist3d.npz")


def smooth(batch: int, size: int = 16, seed: int = 0, channels: int = 1) -> torch.Tensor:
    """Low-frequency volumes in [0, 1]: learnable in a few steps, unlike white noise."""
    coarse = torch.rand(batch, channels, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(size,) * 3, mode="trilinear")


TINY = [
    "dataset.size=16", "dataset.n_unlabeled=4", "dataset.n_train=4", "dataset.n_val=2",
    "dataset.n_test=2", "backbone.filters=[4,8]", "task.mask_patch_size=4",
    "pretrain.epochs=1", "pretrain.iterations_per_epoch=1", "pretrain.batch_size=2",
    "finetune.epochs=1", "finetune.warmup_epochs=0", "finetune.iterations_per_epoch=1",
    "protocol.seeds=[0]", "protocol.fractions=[100]",
]


def bench_run_beside_scratch(name, sets, capsys, dataset=()) -> None:
    assert cli.main(["run", "--protocol", "data-efficiency", "--task", name, *dataset,
                     "--device", "cpu", "--set", *sets]) == 0
    capsys.readouterr()
    assert cli.main(["leaderboard", "--format", "json"]) == 0
    tasks = {r["task"] for r in json.loads(capsys.readouterr().out)}
    assert {name, "scratch"} <= tasks


def medmnist_sets(patch: int) -> list[str]:
    return [f"dataset.path={ADRENAL}", "backbone.filters=[4,8]", f"task.mask_patch_size={patch}",
            *[s for s in TINY if s.split("=")[0].split(".")[0] in ("pretrain", "finetune",
                                                                    "protocol")]]
