"""Time proxy-task batch construction (``task.make_batch``) for every registered task.

Each pretraining task in the plugin registry is timed on random volumes of its
``paper_input_size`` (or ``--size``) on the chosen device: a few warm-up calls, then timed
repetitions (CUDA is synchronised around each), reported as the median milliseconds per input
volume next to the cost of the original implementations' per-sample preprocessing.

    python benchmarks/batch_construction.py                     # rich table, CPU
    python benchmarks/batch_construction.py --device cuda --batch-size 8
    python benchmarks/batch_construction.py --json              # {"task": ms_per_sample}

What counts: everything ``make_batch`` does to turn a batch of volumes into the encoder's
inputs. cpc3d copies its overlapping patches into one contiguous tensor there (the encoder
needs them materialised, so that copy is batch construction, not loss computation).
rotation3d builds ``copies_per_volume`` rotated copies per volume (4 by default), so its
per-sample time (``--json``: per input volume, like every task) covers several 128^3 copies.
The reference rotates one copy per volume per visit, so the table's speed-up for rotation3d
compares per rotated copy (the ``ms/copy`` column): like with like.

The physical floor: every task here writes at least one 128^3 float32 tensor (8 MB) per
sample, or more (rotation: one per copy; cpc: 343 overlapping 32^3 patches, 45 MB). The
table's caption reports, measured in the same run, a plain copy of one volume into reused
memory and into freshly allocated memory: the second includes the kernel's page faults,
which is what any fresh batch over glibc's mmap threshold (32 MB) pays, and why the tasks
draw their outputs from a pool of reused buffers. Ratios to the reference below that floor
(e.g. rotation's 10x target: 0.33 ms per sample for 4 rotated copies) are not reachable by
any implementation that copies; the numbers here are reported as they are.

Launches and host synchronisations: on a GPU, batch construction of small volumes is bound
by kernel launches, not by arithmetic (genesis3d's ~950 small ops per batch took 2.7 ms per
64x64x32 volume on an H200, 42 % of its step), and an operation that makes the host wait
for the device (``.item()``, ``.tolist()``, ``nonzero``, a boolean-mask index) stops the CPU
from queueing work ahead of the GPU. Both are counted on any device, the CPU included, by
dispatching one ``make_batch`` through a counting mode: ``kernels`` are the aten operations
that run a kernel (views are not counted), ``syncs`` those known to wait for the device.
They are the figures to bring down before measuring on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    parser.add_argument("--detail", action="store_true",
                        help="with --json: every row whole (size, ms, kernels, syncs, ...)")
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


#: aten operations that wait for the device to finish before they return (a result the host
#: reads, or an output whose size depends on the data).
SYNC_OPS = frozenset({
    "aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
    "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default",
    "aten.repeat_interleave.Tensor",
})


class DispatchCount(TorchDispatchMode):
    """Counts the aten operations dispatched inside it: ``kernels`` (every operation that is
    not a view) and ``syncs`` (:data:`SYNC_OPS`, boolean-mask indexing, and ``tolist``/
    ``numpy``, which dispatch nothing on the CPU and are counted by patching them)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = self.syncs = 0
        self._patched: list[tuple[str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.kernels += 1
        if str(func) in SYNC_OPS or (
                str(func).startswith(("aten.index.", "aten.index_put"))
                and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                        for i in (args[1] if len(args) > 1 else ()) if i is not None)):
            self.syncs += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched.append((name, original))

            def counted(tensor, *a, _original=original, **k):
                self.syncs += 1
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched:
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)


def count_dispatch(task, images: torch.Tensor, seed: int) -> dict[str, int]:
    """Kernels and host synchronisations of one ``make_batch`` call (see :class:`DispatchCount`)."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    with torch.no_grad(), DispatchCount() as counter:
        task.make_batch(images, generator)
    return {"kernels": counter.kernels, "syncs": counter.syncs}


def copy_floor(size: int, repeats: int) -> dict[str, float]:
    """Median ms to copy one ``size^3`` float32 volume into reused and into fresh memory
    (batches of 4, so the fresh case crosses glibc's mmap threshold as the tasks' do)."""
    source = torch.rand(4, 1, size, size, size)
    target = torch.empty_like(source)
    floors = {}
    for name, fn in (("reused", lambda: target.copy_(source)),
                     ("fresh", lambda: source.clone())):
        fn()
        times = []
        for _ in range(max(repeats, 5)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        floors[name] = statistics.median(times) * 1000 / 4
    return floors


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
            counts = count_dispatch(task, images, args.seed)
        except Exception as error:  # one broken task must not hide the others' numbers
            results[name] = {"size": size, "error": f"{type(error).__name__}: {error}"}
            continue
        per_sample = [t * 1000 / args.batch_size for t in times]
        results[name] = {
            "size": size,
            "ms_per_sample": statistics.median(per_sample),
            "min_ms_per_sample": min(per_sample),
            "copies": getattr(task, "copies", 1),
            **counts,
        }
        del images
    return results


def print_table(results: dict[str, dict], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    floor = copy_floor(args.size or 128, args.repeats) if args.device == "cpu" else None
    sources = "; ".join(
        f"{name}: {REFERENCE_MS_PER_SAMPLE[name][1]}" for name in results
        if name in REFERENCE_MS_PER_SAMPLE
    )
    table = Table(
        title=f"make_batch on {args.device}, batch {args.batch_size}, "
              f"{args.channels} channel(s), median of {args.repeats}",
        caption=f"reference = the original code's median ms/sample on a 2-core CPU "
                f"(shared/reference/performance.md section 1): {sources}"
              + (f". Copying one {args.size or 128}^3 volume on this machine now: "
                 f"{floor['reused']:.2f} ms into reused memory, {floor['fresh']:.2f} ms into "
                 f"fresh memory (the floor per output volume)" if floor else ""),
    )
    for column in ("task", "size", "ms/sample", "min", "ms/copy", "reference", "speed-up",
                   "kernels", "syncs"):
        table.add_column(column, justify="left" if column in ("task", "size") else "right")
    for name, row in results.items():
        size = "x".join(map(str, row["size"]))
        if "error" in row:
            table.add_row(name, size, f"[red]{row['error']}[/red]", "", "", "", "", "", "")
            continue
        ref = REFERENCE_MS_PER_SAMPLE.get(name)
        ms = row["ms_per_sample"]
        per_copy = ms / row["copies"]  # the reference's unit: one rotated copy per volume
        table.add_row(
            name, size, f"{ms:.3f}", f"{row['min_ms_per_sample']:.3f}",
            f"{per_copy:.3f}" if row["copies"] > 1 else "-",
            f"{ref[0]:g}" if ref else "-",
            (f"{ref[0] / per_copy:.1f}x" + (" per copy" if row["copies"] > 1 else ""))
            if ref and ms > 0 else "-",
            str(row["kernels"]), str(row["syncs"]),
        )
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    if args.json and args.detail:
        print(json.dumps(results))
    elif args.json:
        print(json.dumps({n: r["ms_per_sample"] for n, r in results.items() if "error" not in r}))
    else:
        print_table(results, args)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
