"""`bench run` end to end for one task at tiny settings (shared by the task tests)."""

from __future__ import annotations

import json
from pathlib import Path

from medssl_bench import cli

#: The real MedMNIST 3D file beside the repository (tests using it skip when it is absent).
MEDMNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist3d" / \
    "adrenalmnist3d.npz"

TINY = ["backbone.filters=[4,8]", "pretrain.epochs=1", "pretrain.iterations_per_epoch=1",
        "pretrain.batch_size=2", "finetune.epochs=1", "finetune.warmup_epochs=0",
        "finetune.iterations_per_epoch=1", "protocol.seeds=[0]", "protocol.fractions=[100]"]
PHANTOM = ["dataset.size=16", "dataset.n_unlabeled=4", "dataset.n_train=4", "dataset.n_val=2",
           "dataset.n_test=2"]


def bench_run_beside_scratch(task: str, tmp_path, monkeypatch, capsys, medmnist: bool,
                             extra: list[str] = ()) -> None:
    """`bench run --protocol data-efficiency --task TASK` at tiny settings on phantom3d or the
    MedMNIST file: exit 0 and the task beside scratch on the leaderboard. ``extra``: the
    task's own settings for tiny volumes."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = (["--dataset", "medmnist3d"], [f"dataset.path={MEDMNIST}"]) if medmnist else (
        [], PHANTOM)
    assert cli.main(["run", "--protocol", "data-efficiency", "--task", task, "--device", "cpu",
                     *data[0], "--set", *TINY, *data[1], *extra]) == 0
    capsys.readouterr()
    assert cli.main(["leaderboard", "--format", "json"]) == 0
    tasks = {row["task"] for row in json.loads(capsys.readouterr().out)}
    assert {task, "scratch"} <= tasks




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
