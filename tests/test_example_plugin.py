"""The example third-party package: installed for real, discovered through its entry point,
listed by `bench plugins` and run by `bench run` (subprocesses, so nothing leaks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "medssl-bench-example"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(EXAMPLE)],
        check=True, capture_output=True, text=True,
    )
    # the example first, then whatever PYTHONPATH says (a worktree's own medssl_bench)
    path = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, BENCH_DISABLE_PLUGIN_AUTOLOAD="0")
    return env


def _bench(env, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", "medssl_bench.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_example_plugin_listed(installed):
    out = _bench(installed, "plugins", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["flip3d"]["distribution"] == "medssl-bench-example"
    assert rows["flip3d"]["status"] == "ok" and rows["flip3d"]["kind"] == "task"
    # a third-party protocol, its spec beside its module (run below)
    assert rows["few-cases"]["kind"] == "protocol"
    assert rows["few-cases"]["distribution"] == "medssl-bench-example"


def test_example_plugin_runs(installed, tmp_path):
    out = _bench(installed, "run", "--protocol", "data-efficiency", "--task", "flip3d",
                 "--device", "cpu", "--set", "dataset.size=16", "dataset.n_unlabeled=4",
                 "dataset.n_train=2", "dataset.n_val=1", "dataset.n_test=1",
                 "backbone.filters=[4,8]", "pretrain.epochs=1", "pretrain.iterations_per_epoch=1",
                 "finetune.epochs=1", "finetune.iterations_per_epoch=1", "protocol.seeds=[0]",
                 "protocol.fractions=[100]", cwd=tmp_path)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "flip3d 100% seed 0" in out.stdout
    board = _bench(installed, "leaderboard", "--format", "json", cwd=tmp_path)
    assert {r["task"] for r in json.loads(board.stdout)} == {"flip3d", "scratch"}


def test_example_protocol_ships_its_spec_and_runs(installed, tmp_path):
    """A third-party protocol (few-cases) with its spec beside its module (listed: see
    test_example_plugin_listed): planned (--dry-run trains nothing), run through
    `bench run`, and ranked beside scratch."""
    args = ["run", "--protocol", "few-cases", "--task", "flip3d", "--device", "cpu",
            "--set", "dataset.size=16", "dataset.n_unlabeled=4", "dataset.n_train=4",
            "dataset.n_val=1", "dataset.n_test=1", "backbone.filters=[4,8]",
            "pretrain.epochs=1", "pretrain.iterations_per_epoch=1", "finetune.epochs=1",
            "finetune.iterations_per_epoch=1", "protocol.seeds=[0]", "protocol.cases=[1,2]"]
    dry = _bench(installed, *args, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr + dry.stdout
    assert "flip3d 25% seed 0" in dry.stdout and "flip3d 50% seed 0" in dry.stdout
    assert not (tmp_path / "mlflow.db").exists()  # a dry run creates no store
    out = _bench(installed, *args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr + out.stdout
    board = json.loads(_bench(installed, "leaderboard", "--format", "json", cwd=tmp_path).stdout)
    assert {(r["protocol"], r["task"], r["fraction"]) for r in board} == {
        ("few-cases", task, fraction) for task in ("flip3d", "scratch") for fraction in (25, 50)}


def test_flip_labels_are_right():
    sys.path.insert(0, str(EXAMPLE))
    try:
        from medssl_bench_example import flip_batch
    finally:
        sys.path.remove(str(EXAMPLE))
    x = torch.rand(8, 1, 4, 5, 6)
    labels = torch.arange(8)
    flipped = flip_batch(x, labels)
    for i in range(8):
        axes = [a + 1 for a in range(3) if (i >> a) & 1]
        expected = x[i].flip(axes) if axes else x[i]
        torch.testing.assert_close(flipped[i], expected)
    torch.testing.assert_close(flip_batch(flipped, labels), x)  # flipping twice undoes it
