"""Wall time and peak memory of the README quickstart on this machine.

Runs ``bench run --protocol data-efficiency --task rotation3d`` (defaults: quick preset,
phantom3d, unet3d, CPU unless a GPU is present) in a fresh temporary directory, then
``bench leaderboard --format json``, and reports wall seconds and the peak resident memory
of the run (the child process's max RSS).

    python benchmarks/quickstart_cost.py [--task rotation3d] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rotation3d")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-m", "medssl_bench.cli", "run", "--protocol", "data-efficiency",
             "--task", args.task], cwd=workdir, capture_output=True, text=True,
        )
        seconds = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if run.returncode != 0:
            sys.exit(f"bench run failed:\n{run.stdout}\n{run.stderr}")
        board = subprocess.run(
            [sys.executable, "-m", "medssl_bench.cli", "leaderboard", "--format", "json"],
            cwd=workdir, capture_output=True, text=True, check=True,
        )
        rows = json.loads(board.stdout)
    result = {
        "task": args.task,
        "wall_seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_mb),
        "rows": [(r["task"], r["fraction"], round(r["mean"], 4), r["n"]) for r in rows],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"bench run --protocol data-efficiency --task {args.task}: {seconds:.0f} s wall, "
          f"peak RSS {peak_mb:.0f} MB")
    for task, fraction, mean, n in result["rows"]:
        print(f"  {task:12s} {fraction:5g}%  mean {mean:.4f}  n={n}")


if __name__ == "__main__":
    main()
