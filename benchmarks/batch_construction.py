"""Time proxy-task batch construction (``task.make_batch``) for every registered task.

Each pretraining task in the plugin registry is timed on random volumes of its
``paper_input_size`` (or ``--size``) on the chosen device: a few warm-up calls, then timed
repetitions (CUDA is synchronised around each), reported as the median milliseconds per input
volume next to the cost of the original implementations' per-sample preprocessing.

    python benchmarks/batch_construction.py                     # rich table, CPU
    python benchmarks/batch_construction.py --device cuda --batch-size 8
    python benchmarks/batch_construction.py --json              # {"task": ms_per_sample}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from medssl_bench.plugins import build_registry

#: Median ms per sample of the original implementations on a 2-core CPU, from
#: ../shared/reference/performance.md section 1 (Taleb et al. functions at 128^3; Models
#: Genesis generate_pair at 64x64x32). Keyed by the task that replaces each function.
REFERENCE_MS_PER_SAMPLE: dict[str, tuple[float, str]] = {
    "rotation3d": (3.3, "Taleb rotate_batch_3d"),
    "rpl3d": (1.0, "Taleb rpl preprocess_batch_3d"),
    "jigsaw3d": (3.4, "Taleb jigsaw preprocess"),
    "cpc3d": (53.6, "Taleb cpc preprocess + grid"),
    "exemplar3d": (145.0, "Taleb augment_exemplar_3d"),
    "genesis3d": (43.6, "Genesis generate_pair (64x64x32)"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=4, help="volumes per make_batch call")
    parser.add_argument("--size", type=int, default=None,
                        help="cubic input side for every task (default: each task's paper size)")
    parser.add_argument("--channels", type=int, default=1, help="image channels")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated task names to time (default: all pretraining tasks)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per task")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per task")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true",
                        help="print only a JSON mapping task name -> median ms per sample")
    return parser.parse_args(argv)


def select_tasks(registry, wanted: str | None) -> list[str]:
    """Every registered task that pretrains, optionally filtered by ``--tasks``."""
    names = [n for n in registry.names("task") if registry.get("task", n).pretrains]
    if not wanted:
        return names
    chosen = [n.strip() for n in wanted.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise SystemExit(f"Unknown task(s) {unknown}; registered: {names}")
    return chosen


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_task(task, images: torch.Tensor, warmup: int, repeats: int, seed: int) -> list[float]:
    """Seconds per ``make_batch`` call, one entry per timed repetition."""
    device = images.device
    generator = torch.Generator(device=device).manual_seed(seed)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            _sync(device)
            start = time.perf_counter()
            batch = task.make_batch(images, generator)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
            del batch
    return times


def run(args: argparse.Namespace) -> dict[str, dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but CUDA is not available.")
    registry = build_registry()
    results: dict[str, dict] = {}
    for name in select_tasks(registry, args.tasks):
        task_cls = registry.get("task", name)
        task = task_cls(task_cls.Config())
        size = (tuple([args.size] * task_cls.spatial_dims) if args.size
                else tuple(task_cls.paper_input_size))
        images = torch.rand(
            (args.batch_size, args.channels, *size),
            generator=torch.Generator(device=device).manual_seed(args.seed), device=device,
        )
        try:
            task.check_input(size, args.channels)
            times = time_task(task, images, args.warmup, args.repeats, args.seed)
        except Exception as error:  # one broken task must not hide the others' numbers
            results[name] = {"size": size, "error": f"{type(error).__name__}: {error}"}
            continue
        per_sample = [t * 1000 / args.batch_size for t in times]
        results[name] = {
            "size": size,
            "ms_per_sample": statistics.median(per_sample),
            "min_ms_per_sample": min(per_sample),
        }
        del images
    return results


def print_table(results: dict[str, dict], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    sources = "; ".join(
        f"{name}: {REFERENCE_MS_PER_SAMPLE[name][1]}" for name in results
        if name in REFERENCE_MS_PER_SAMPLE
    )
    table = Table(
        title=f"make_batch on {args.device}, batch {args.batch_size}, "
              f"{args.channels} channel(s), median of {args.repeats}",
        caption=f"reference = the original code's median ms/sample on a 2-core CPU "
                f"(shared/reference/performance.md section 1): {sources}",
    )
    for column in ("task", "size", "ms/sample", "min", "reference", "speed-up"):
        table.add_column(column, justify="left" if column in ("task", "size") else "right")
    for name, row in results.items():
        size = "x".join(map(str, row["size"]))
        if "error" in row:
            table.add_row(name, size, f"[red]{row['error']}[/red]", "", "", "")
            continue
        ref = REFERENCE_MS_PER_SAMPLE.get(name)
        ms = row["ms_per_sample"]
        table.add_row(
            name, size, f"{ms:.3f}", f"{row['min_ms_per_sample']:.3f}",
            f"{ref[0]:g}" if ref else "-",
            f"{ref[0] / ms:.1f}x" if ref and ms > 0 else "-",
        )
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    if args.json:
        print(json.dumps({n: r["ms_per_sample"] for n, r in results.items() if "error" not in r}))
    else:
        print_table(results, args)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
