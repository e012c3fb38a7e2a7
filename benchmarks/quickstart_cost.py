"""Wall time and peak memory of the README quickstart on this machine.

Runs ``bench run --protocol data-efficiency --task rotation3d`` (defaults: quick preset,
phantom3d, unet3d, CPU unless a GPU is present) in a fresh temporary directory, then
``bench leaderboard --format json``, and reports wall seconds and the peak resident memory
of the run (the child process's max RSS), with the host it ran on and the load average
before and after (a figure from a loaded machine says little: torch's CPU threads slow
down many times when other processes compete for the cores).

``--isa avx2`` runs torch's and oneDNN's AVX2 kernels on a host that has AVX-512
(``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``), an approximation of a host without
AVX-512 (clock, caches and memory bandwidth stay this host's).

    python benchmarks/quickstart_cost.py [--task rotation3d] [--isa avx2] [--json]
        [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import host_info, host_line

#: Environment that makes torch and oneDNN use at most this instruction set.
ISA = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
       "native": {}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rotation3d")
    parser.add_argument("--isa", choices=sorted(ISA), default="native",
                        help="avx2: torch's and oneDNN's AVX2 kernels only (see above)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="passed to bench run (measure another setting than the README's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import torch

    env = {**os.environ, **ISA[args.isa]}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-m", "medssl_bench.cli", "run", "--protocol", "data-efficiency",
             "--task", args.task, *(["--set", *args.set] if args.set else [])],
            cwd=workdir, capture_output=True, text=True, env=env,
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
    host = host_info(torch.device("cpu"))
    result = {
        "task": args.task,
        "wall_seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_mb),
        "isa": args.isa,
        "set": args.set,
        "host": host,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "rows": [(r["task"], r["fraction"], round(r["mean"], 4), r["n"]) for r in rows],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"bench run --protocol data-efficiency --task {args.task}: {seconds:.0f} s wall, "
          f"peak RSS {peak_mb:.0f} MB ({args.isa} kernels)")
    print(host_line(host))
    print(f"load average (1, 5, 15 min) before {result['load_average_before']}, after "
          f"{result['load_average_after']}")
    for task, fraction, mean, n in result["rows"]:
        print(f"  {task:12s} {fraction:5g}%  mean {mean:.4f}  n={n}")


if __name__ == "__main__":
    main()
