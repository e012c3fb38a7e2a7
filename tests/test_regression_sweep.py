"""Same seed, same numbers: the regression sweep (``regression_sweep.py``) recorded before
the core was restructured must give the same run keys, test metrics and leaderboard now.

Keys are compared exactly (a changed key would rerun every stored result); metrics to 1e-6
(the recording host's float arithmetic; other CPUs may differ in the last bits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from regression_sweep import ARGS, run_sweep

FIXTURE = Path(__file__).parent / "fixtures" / "regression_sweep.json"


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float | int):
        assert b == pytest.approx(a, abs=1e-6, nan_ok=True), f"{path}: {b} != {a}"
    else:
        assert a == b, f"{path}: {b!r} != {a!r}"


@pytest.mark.slow
def test_regression_sweep_gives_the_recorded_keys_metrics_and_leaderboard(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    expected = json.loads(FIXTURE.read_text())
    assert expected["args"] == ARGS, "the sweep's arguments changed: regenerate on purpose"
    got = run_sweep(tmp_path)
    assert [(r["task"], r["fraction"], r["seed"], r["run_key"]) for r in got["finetunes"]] == [
        (r["task"], r["fraction"], r["seed"], r["run_key"]) for r in expected["finetunes"]]
    _close(expected["finetunes"], got["finetunes"], "finetunes")
    _close(expected["leaderboard"], got["leaderboard"], "leaderboard")
