"""The regression sweep: the seven 3D tasks of 0.1 on phantom3d at tiny settings, fine-tuned on two
fractions x two seeds beside scratch. Its run keys, test metrics and leaderboard were
recorded before the core was restructured (``fixtures/regression_sweep.json``);
``test_regression_sweep.py`` reruns it and compares, so a refactoring of the core that
changes a number, a key or a ranking fails.

Regenerate (only when a change of results is intended, and say why in the commit)::

    python tests/regression_sweep.py tests/fixtures/regression_sweep.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ARGS = [
    # the tasks by name, not "all": a task added later must not change the recorded sweep
    "run", "--protocol", "data-efficiency", "--device", "cpu", "--task",
    "cpc3d,exemplar3d,genesis3d,jigsaw3d,parts2whole3d,rotation3d,rpl3d",
    "--set", "dataset.size=32", "dataset.n_unlabeled=4", "dataset.n_train=4", "dataset.n_val=2",
    "dataset.n_test=2", "backbone.filters=[4,8,16]", "pretrain.epochs=1",
    "pretrain.iterations_per_epoch=1", "pretrain.batch_size=2", "finetune.epochs=2",
    "finetune.warmup_epochs=1", "finetune.iterations_per_epoch=1", "protocol.seeds=[0,1]",
    "protocol.fractions=[50,100]",
]


def finetunes(db: Path) -> list[dict[str, Any]]:
    """Per finished fine-tune: its identity and its test metrics, sorted."""
    from bench_helpers import all_runs

    out = []
    for run in all_runs(f"sqlite:///{db}"):
        tags = run.data.tags
        if tags.get("medssl_bench.kind") != "finetune" or run.info.status != "FINISHED":
            continue
        out.append({
            "task": tags["task"], "fraction": float(tags["fraction"]), "seed": int(tags["seed"]),
            "run_key": tags["medssl_bench.run_key"], "setup": tags.get("setup", ""),
            "task_setup": tags.get("task_setup", ""),
            "test": {k.removeprefix("test_"): v for k, v in run.data.metrics.items()
                     if k.startswith("test_")},
        })
    return sorted(out, key=lambda r: (r["task"], r["fraction"], r["seed"]))


def run_sweep(workdir: Path) -> dict[str, Any]:
    """Run the sweep in ``workdir`` (its own store and cache); the recorded outcome."""
    import contextlib
    import io
    import os

    from medssl_bench import cli

    old = Path.cwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(ARGS)
        assert code == 0, f"the regression sweep failed (exit {code})"
        board = io.StringIO()
        with contextlib.redirect_stdout(board):
            assert cli.main(["leaderboard", "--format", "json", "--summary"]) == 0
    finally:
        os.chdir(old)
    return {"args": ARGS, "finetunes": finetunes(workdir / "mlflow.db"),
            "leaderboard": json.loads(board.getvalue())}


if __name__ == "__main__":
    import tempfile

    target = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        result = run_sweep(Path(tmp))
    target.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {target}: {len(result['finetunes'])} fine-tunes")
