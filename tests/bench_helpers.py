"""`bench` as a user runs it, in a subprocess, for the tests of sweeps that survive kills,
servers and parallel workers (and ``benchmarks/sweep_chaos.py``): one environment, one way to
start it, one way to wait for what it should do, one listing of the runs it recorded.

A subprocess, not ``cli.main``: these tests kill it, stop its tracking server under it or
run several at once, and each must start as a fresh process does (its own imports, its own
signal handlers, the built-in plugins only)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

#: The smallest sweep that trains everything once: phantom3d at 16^3, one step an epoch.
TINY = ["dataset.size=16", "dataset.n_unlabeled=4", "dataset.n_train=2", "dataset.n_val=2",
        "dataset.n_test=2", "backbone.filters=[4,8]", "task.hidden=8",
        "pretrain.iterations_per_epoch=1", "pretrain.batch_size=2", "finetune.epochs=1",
        "finetune.warmup_epochs=0", "finetune.iterations_per_epoch=1", "protocol.fractions=[100]"]
#: ``bench run`` of rotation3d beside scratch on the CPU (add ``--set`` and settings).
SWEEP = ["run", "--protocol", "data-efficiency", "--task", "rotation3d", "--device", "cpu"]
BENCH = [sys.executable, "-m", "medssl_bench.cli"]

T = TypeVar("T")


def bench_env(**extra: str) -> dict[str, str]:
    """This process's environment for a `bench` subprocess: built-in plugins only (a stray
    third-party plugin must not change a test), unbuffered output (logs read while it runs),
    and no ``MLFLOW_TRACKING_URI`` (each test names its store)."""
    env = {**os.environ, "BENCH_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def bench(cwd: Path, argv: list[str], timeout: float = 300,
          **env: str) -> subprocess.CompletedProcess:
    """Run `bench ARGV` in ``cwd`` to its end; its exit code, stdout and stderr."""
    return subprocess.run([*BENCH, *argv], cwd=cwd, env=bench_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def start_bench(cwd: Path, argv: list[str], log: Path | None = None, new_session: bool = False,
                **env: str) -> subprocess.Popen:
    """Start `bench ARGV` in ``cwd`` and return at once: its stdout and stderr appended to
    ``log``, or readable from ``proc.stdout`` (merged) without one. ``new_session`` puts it
    in a process group of its own (a killer of its workers must not hit the caller)."""
    out: Any = log.open("a") if log is not None else subprocess.PIPE
    try:
        return subprocess.Popen([*BENCH, *argv], cwd=cwd, env=bench_env(**env), stdout=out,
                                stderr=subprocess.STDOUT, text=True,
                                start_new_session=new_session)
    finally:
        if log is not None:
            out.close()  # the child holds its own descriptor


def poll(check: Callable[[], T], what: str, timeout: float = 240,
         interval: float = 0.2) -> T:
    """Call ``check`` until it returns something true, and return that; an AssertionError
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(interval)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def all_runs(uri: str, experiment: str | None = None) -> list:
    """Every MLflow run in the store at ``uri`` (of the protocol ``experiment`` only, when
    given), read with a plain ``MlflowClient``: listing claims nothing and starts no
    heartbeat, and an empty store is an empty list."""
    from mlflow.tracking import MlflowClient

    from medssl_bench.tracking import EXPERIMENT_PREFIX

    client = MlflowClient(tracking_uri=uri)
    if experiment is None:
        ids = [e.experiment_id for e in client.search_experiments()]
    else:
        found = client.get_experiment_by_name(EXPERIMENT_PREFIX + experiment)
        ids = [] if found is None else [found.experiment_id]
    return list(client.search_runs(ids, max_results=5000)) if ids else []


def finished(runs: list, kind: str) -> dict[str, list]:
    """The FINISHED runs of ``kind`` (pretrain, finetune) by run key: a key with two runs
    was recorded twice."""
    from medssl_bench.tracking import TAG_KEY, TAG_KIND

    out: dict[str, list] = {}
    for r in runs:
        if r.data.tags.get(TAG_KIND) == kind and r.info.status == "FINISHED":
            out.setdefault(r.data.tags[TAG_KEY], []).append(r)
    return out
