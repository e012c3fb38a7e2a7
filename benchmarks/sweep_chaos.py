"""A sweep that survives its workers: 3 local workers against a PostgreSQL-backed MLflow
server, a random worker SIGKILLed 10 times at random moments, the MLflow server restarted
once in the middle, then a final rerun of the same command. Checks and prints: every unit
recorded exactly once, none left RUNNING, none lost, and a leaderboard identical to an
undisturbed sweep with the same seeds (run first, in one process, on its own SQLite store).

    python benchmarks/sweep_chaos.py                 # the issue's setting: 3 workers, 10 kills
    python benchmarks/sweep_chaos.py --kills 4 --json

Needs PostgreSQL's server programs (``apt-get install postgresql``) and the ``cluster``
extra; it starts both servers itself (``tests/servers.py``) and removes them at the end,
and starts `bench` as the tests do (``tests/bench_helpers.py``).
Exit status 0 when every check holds. Takes a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bench_helpers import all_runs, bench, start_bench  # noqa: E402
from servers import tracking_server  # noqa: E402

TINY = ["dataset.size=16", "dataset.n_unlabeled=4", "dataset.n_train=4", "dataset.n_val=2",
        "dataset.n_test=2", "backbone.filters=[4,8]", "task.hidden=8",
        "pretrain.iterations_per_epoch=2", "pretrain.batch_size=2", "pretrain.epochs=6",
        "finetune.epochs=3", "finetune.warmup_epochs=0", "finetune.iterations_per_epoch=2",
        "protocol.fractions=[50,100]", "protocol.seeds=[0,1]"]
TASKS = "rotation3d,jigsaw3d,rpl3d"


def bench_argv(tracking: str, parallel: bool, workers: int) -> list[str]:
    argv = ["run", "--protocol", "data-efficiency", "--task", TASKS, "--device", "cpu",
            "--tracking-uri", tracking, "--set", *TINY]
    if parallel:
        argv += ["--executor", "local", "--workers", str(workers)]
    return argv


def start(argv: list[str], cwd: Path, delay: float, log: Path):
    """`bench ARGV` in its own process group (the killer picks its victims below it), each
    epoch stretched by ``delay`` seconds."""
    return start_bench(cwd, argv, log, new_session=True,
                       MEDSSL_BENCH_TEST_EPOCH_DELAY=str(delay))


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def workers_of(parent: int) -> list[int]:
    """The processes running units below the sweep's own process: submitit's task processes
    (``submitit.core._submit``), not the job controllers above them (``submitit.local.
    _local``), whose death leaves the task running and so tests nothing."""
    out = []
    for pid in descendants(parent):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in cmd:
            out.append(pid)
    return out


def finetune_runs(uri: str) -> list[dict]:
    return [{"key": r.data.tags.get("medssl_bench.run_key"), "status": r.info.status,
             "kind": r.data.tags.get("medssl_bench.kind")} for r in all_runs(uri)]


def leaderboard(uri: str, cwd: Path) -> list[dict]:
    out = bench(cwd, ["leaderboard", "--tracking-uri", uri, "--format", "json"])
    if out.returncode != 0:
        raise RuntimeError(f"bench leaderboard failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def board_difference(a: list[dict], b: list[dict]) -> float:
    """The largest difference of any number between two leaderboards (inf if their rows or
    fields differ)."""
    def rows(board):
        return {(r.get("task"), r.get("fraction"), r.get("dataset")): r for r in board}

    ra, rb = rows(a), rows(b)
    if ra.keys() != rb.keys():
        return float("inf")
    worst = 0.0
    for key, row in ra.items():
        other = rb[key]
        for field, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                if value != other.get(field) and field not in ("seconds",):
                    return float("inf")
                continue
            if field in ("seconds", "mean_seconds"):
                continue
            if not isinstance(other.get(field), (int, float)):
                return float("inf")
            if value != value and other[field] != other[field]:  # both NaN
                continue
            worst = max(worst, abs(value - other[field]))
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--delay", type=float, default=0.3,
                   help="seconds slept after every epoch (stretches units so kills land "
                   "inside them)")
    p.add_argument("--tolerance", type=float, default=1e-6,
                   help="largest leaderboard difference counted as identical (resumed "
                   "pretraining equals an uninterrupted one up to float rounding)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="sweep-chaos-"))
    report: dict = {"workers": args.workers, "kills_planned": args.kills}
    t0 = time.monotonic()

    # 1. the undisturbed sweep: one process, its own SQLite store and cache
    ref = work / "reference"
    ref.mkdir()
    ref_uri = f"sqlite:///{ref / 'mlflow.db'}"
    proc = start(bench_argv(ref_uri, False, 1), ref, 0, ref / "run.log")
    if proc.wait() != 0:
        print((ref / "run.log").read_text()[-3000:])
        return 2
    reference = leaderboard(ref_uri, ref)
    report["reference_seconds"] = round(time.monotonic() - t0, 1)

    chaos = work / "chaos"
    chaos.mkdir()
    with tracking_server(work) as (_pg, server):
        argv_ = bench_argv(server.uri, True, args.workers)
        # 2. the sweep with workers killed along the way and the server restarted once
        proc = start(argv_, chaos, args.delay, chaos / "run1.log")
        kills, restarted, restart_at = 0, False, args.kills // 2
        deadline = time.monotonic() + 1800
        while kills < args.kills and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.5, 4.0))
            if not restarted and kills >= restart_at:
                server.restart(down_seconds=rng.uniform(0.0, 3.0))
                restarted = True
                continue
            live = workers_of(proc.pid)
            if not live:
                continue
            victim = rng.choice(live)
            try:
                os.kill(victim, signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
            if proc.poll() is not None and kills < args.kills:
                # the sweep ended before all kills: start it again and keep killing
                proc = start(argv_, chaos, args.delay, chaos / "run1.log")
        report["kills"] = kills
        report["server_restarts"] = int(restarted)
        report["first_sweep_exit"] = proc.wait()
        # 3. the final rerun of the same command, undisturbed
        final = start(argv_, chaos, 0, chaos / "final.log")
        report["final_exit"] = final.wait()
        runs = finetune_runs(server.uri)
        board = leaderboard(server.uri, chaos)

    ref_runs = finetune_runs(ref_uri)
    expected = {r["key"] for r in ref_runs if r["kind"] == "finetune" and r["status"] == "FINISHED"}
    expected_pre = {r["key"] for r in ref_runs if r["kind"] != "finetune"
                    and r["status"] == "FINISHED"}
    finished = [r["key"] for r in runs if r["kind"] == "finetune" and r["status"] == "FINISHED"]
    finished_pre = [r["key"] for r in runs if r["kind"] != "finetune" and r["status"] == "FINISHED"]
    report.update({
        "units_planned": len(expected) + len(expected_pre),
        "recorded_once": len(set(finished) & expected) + len(set(finished_pre) & expected_pre),
        "recorded_twice_or_more": (len(finished) - len(set(finished)))
        + (len(finished_pre) - len(set(finished_pre))),
        "running": sum(r["status"] == "RUNNING" for r in runs),
        "lost": len(expected - set(finished)) + len(expected_pre - set(finished_pre)),
        "killed_or_failed_attempts": sum(r["status"] in ("KILLED", "FAILED") for r in runs),
        "leaderboard_max_difference": board_difference(reference, board),
        "seconds": round(time.monotonic() - t0, 1),
    })
    ok = (report["final_exit"] == 0 and report["recorded_twice_or_more"] == 0
          and report["running"] == 0 and report["lost"] == 0
          and report["recorded_once"] == report["units_planned"]
          and report["leaderboard_max_difference"] <= args.tolerance
          and report["kills"] == args.kills)
    report["ok"] = ok
    report["work"] = str(work)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:28s} {value}")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
