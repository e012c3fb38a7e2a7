"""The benchmark scripts run (not how fast: speed is shown by running them, never by a
timed test): every registered pretraining task gets a number, and nothing errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from medssl_bench.plugins import build_registry

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batch_construction_json_covers_every_task(capsys):
    bench = _load("batch_construction")
    code = bench.main(["--size", "32", "--batch-size", "2", "--warmup", "0", "--repeats", "1",
                       "--json"])
    timings = json.loads(capsys.readouterr().out)
    registry = build_registry()
    expected = {n for n in registry.names("task") if registry.get("task", n).pretrains}
    assert code == 0 and set(timings) == expected
    assert all(ms > 0 for ms in timings.values())
    assert set(bench.REFERENCE_MS_PER_SAMPLE) <= expected
