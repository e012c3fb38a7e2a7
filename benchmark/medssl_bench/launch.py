"""``bench run --nproc-per-node N``: the same run in N processes, started by torch's own
elastic launcher (``torch.distributed.run``, what ``torchrun`` is), which runs
``python -m medssl_bench run ...`` (this command without the launch options) in each.

Multi-node runs pass torchrun's rendezvous options through (``--nnodes``, ``--node-rank``,
``--rdzv-endpoint``, ``--rdzv-backend``, ``--rdzv-id``); without them the run is one node
(``--standalone``: a free local port, so several runs never collide).
"""

from __future__ import annotations

import argparse
import os

#: The launch options: ``bench run`` flag -> torchrun flag (both take a value).
LAUNCH_FLAGS = {"--nproc-per-node": "--nproc-per-node", "--nnodes": "--nnodes",
                "--node-rank": "--node-rank", "--rdzv-endpoint": "--rdzv-endpoint",
                "--rdzv-backend": "--rdzv-backend", "--rdzv-id": "--rdzv-id"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The launch options of ``bench run``."""
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="Train with N processes on this node (DDP; one per GPU), launched "
                   "through torchrun: batch_size is per process, the global batch N times it.")
    p.add_argument("--nnodes", default=None, help="Multi-node: torchrun's --nnodes (e.g. 2 "
                   "or 1:4).")
    p.add_argument("--node-rank", default=None, help="Multi-node: torchrun's --node-rank.")
    p.add_argument("--rdzv-endpoint", default=None, help="Multi-node: torchrun's "
                   "--rdzv-endpoint host:port (the node every node reaches).")
    p.add_argument("--rdzv-backend", default=None, help="Multi-node: torchrun's "
                   "--rdzv-backend (c10d).")
    p.add_argument("--rdzv-id", default=None, help="Multi-node: torchrun's --rdzv-id (the "
                   "same on every node, e.g. the Slurm job id).")


def wanted(args: argparse.Namespace) -> bool:
    """Whether ``args`` ask for more than this one process (and this is not a worker)."""
    multi_node = any(getattr(args, flag[2:].replace("-", "_")) is not None
                     for flag in LAUNCH_FLAGS if flag != "--nproc-per-node")
    return multi_node or (args.nproc_per_node or 1) > 1


def worker_argv(argv: list[str]) -> list[str]:
    """``argv`` without the launch options (``--flag value`` and ``--flag=value``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = True
        elif arg.split("=", 1)[0] not in LAUNCH_FLAGS:
            out.append(arg)
    return out


def torchrun_argv(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """torchrun's command line for ``args`` (see the module docstring)."""
    options = ["--nproc-per-node", str(args.nproc_per_node or 1)]
    rendezvous = False
    for flag, theirs in LAUNCH_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if flag != "--nproc-per-node" and value is not None:
            options += [theirs, str(value)]
            rendezvous = rendezvous or flag == "--rdzv-endpoint"
    if not rendezvous:
        options.append("--standalone")
    return [*options, "-m", "medssl_bench", *worker_argv(argv)]


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``bench run`` as torchrun would with ``args``' launch options; its exit code. A
    failed process has already said what failed (naming its rank, see
    :mod:`medssl_bench.distributed`); one that died without a word is named here."""
    from medssl_bench.errors import ConfigError

    if args.dry_run:
        raise ConfigError("--dry-run plans without training: drop --nproc-per-node.")
    if os.environ.get("RANK") is not None:
        raise ConfigError("This process was already started by torchrun: drop "
                          "--nproc-per-node and the rendezvous options (torchrun has them).")
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.run(torchrun.parse_args(torchrun_argv(args, argv)))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if not failure.error_file_data:  # killed (OOM, signal) before it could say why
            from medssl_bench.cli import err_console

            err_console.print(f"[bold red]error:[/bold red] rank {rank} ended with exit code "
                              f"{failure.exitcode} ({failure.signal_name()}) without an error "
                              "message: look for an out-of-memory kill in the system log.",
                              highlight=False)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
