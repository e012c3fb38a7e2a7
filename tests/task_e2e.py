"""`bench run` end to end for one task at tiny settings (shared by the task tests)."""

from __future__ import annotations

import json
from pathlib import Path

from medssl_bench import cli

#: The real MedMNIST 3D file beside the repository (tests using it skip when it is absent).
MEDMNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist3d" / \
    "adrenalmnist3d.npz"

#: The smallest configuration of each 3D backbone for an end-to-end run, and the phantom
#: size it needs (Swin UNETR: 64^3 at least, its inputs are multiples of 32).
TINY_BACKBONE: dict[str, tuple[list[str], int]] = {
    "unet3d": (["backbone.filters=[4,8]"], 16),
    "resenc3d": (["backbone.n_stages=3", "backbone.base_features=4", "backbone.max_features=8",
                  "backbone.blocks_per_stage=[1,1,1]"], 16),
    "swinunetr": ([], 64),  # the quick preset: feature size 12, one block per stage
}
TINY_RUN = ["pretrain.epochs=1", "pretrain.iterations_per_epoch=1", "pretrain.batch_size=2",
            "finetune.epochs=1", "finetune.warmup_epochs=0", "finetune.iterations_per_epoch=1",
            "protocol.seeds=[0]", "protocol.fractions=[100]"]
TINY = [*TINY_BACKBONE["unet3d"][0], *TINY_RUN]
PHANTOM = ["dataset.size=16", "dataset.n_unlabeled=4", "dataset.n_train=4", "dataset.n_val=2",
           "dataset.n_test=2"]


def bench_run_beside_scratch(task: str, tmp_path, monkeypatch, capsys, medmnist: bool,
                             extra: list[str] = (), backbone: str | None = "unet3d",
                             expect_backbone: str | None = None) -> list[dict]:
    """`bench run --protocol data-efficiency --task TASK` at tiny settings on phantom3d or the
    MedMNIST file: exit 0 and every task beside scratch on the leaderboard. ``extra``: the
    task's own settings for tiny volumes. ``backbone=None`` gives no --backbone (the run
    picks one); ``expect_backbone`` is then the one it must pick. Returns the rows."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    chosen = backbone or expect_backbone or "unet3d"
    sets, size = TINY_BACKBONE[chosen]
    phantom = [s if not s.startswith("dataset.size=") else f"dataset.size={size}"
               for s in PHANTOM]
    data = (["--dataset", "medmnist3d"], [f"dataset.path={MEDMNIST}"]) if medmnist else (
        [], phantom)
    flag = ["--backbone", backbone] if backbone else []
    assert cli.main(["run", "--protocol", "data-efficiency", "--task", task, "--device", "cpu",
                     *flag, *data[0], "--set", *sets, *TINY_RUN, *data[1], *extra]) == 0
    capsys.readouterr()
    assert cli.main(["leaderboard", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {*task.split(","), "scratch"} <= {row["task"] for row in rows}
    if expect_backbone:
        assert {row.get("backbone") for row in rows} == {expect_backbone}
    return rows




def train_losses(task, encoder, heads, batches, steps: int, lr: float) -> list[float]:
    """Adam on the encoder and heads for ``steps`` steps; the loss of each step.
    ``batches()`` gives each step's batch (a fixed batch, or a new one per step)."""
    import torch

    optimizer = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = task.compute_loss(encoder, heads, batches())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
