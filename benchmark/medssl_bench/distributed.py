"""Distributed data parallelism (DDP): one training over several processes, launched by
``torchrun`` (or ``bench run --nproc-per-node N``, which re-executes itself through torch's
elastic launcher, :mod:`medssl_bench.launch`).

Every process runs the same ``bench run``: the same plan, the same units in the same order.
What differs is asked of the :class:`DistributedRuntime`, the runtime's DDP seams:

- training: ``DistributedDataParallel`` around the step module; each process reads its share
  of every global batch (``batch_size`` is per process, the global batch ``N`` times it),
  drawn as one process at batch ``N * batch_size`` would draw it; its batch-construction
  randomness is seeded from the seed and the rank;
- evaluation: every case scored by exactly one process, the per-case scores gathered so every
  process computes the same metrics (and picks the same best epoch);
- decisions: the result store, the cached encoders and checkpoints are read and written by
  rank 0 alone (:class:`MainStore`); what the others need (is this unit done? the cached
  weights, the checkpoint to resume) is broadcast from rank 0 (:meth:`DistributedRuntime.
  from_main`), so every process takes the same path;
- failure: the first process to fail writes ``rank R failed: ...`` into the process group's
  key-value store; every process then exits with that message (torchrun stops the others),
  and rank 0 closes its open run as FAILED with it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from medssl_bench.errors import BenchError
from medssl_bench.runtime import Runtime

T = TypeVar("T")

#: Test-only hook: ``R`` (or ``R@E``) makes rank R raise at the first (E-th) epoch end of
#: its process, where the others wait in the all-reduce of the epoch's logs
#: (tests/test_distributed.py checks that the failure is reported naming that rank, that no
#: run is left RUNNING, and that a rerun resumes from the checkpoint). Unset in use.
CRASH_RANK_ENV = "MEDSSL_BENCH_TEST_CRASH_RANK"
_EPOCH_ENDS = [0]  # epoch ends this process has seen (for CRASH_RANK_ENV)
#: Seconds a collective may wait for the other processes before the run fails (default 30
#: minutes: rank 0 may be reading a large checkpoint while the others wait for it).
TIMEOUT_ENV = "MEDSSL_BENCH_DDP_TIMEOUT"
#: The process group's key-value store key holding the first failure's message.
FAILURE_KEY = "medssl_bench/first_failure"
#: Seconds a process keeps waiting, once another rank's failure is recorded, before its
#: :class:`PeerWatch` ends it (default 10). With gloo the process fails by itself at once;
#: with NCCL it would sit in a collective until the group's timeout (30 minutes).
GRACE_ENV = "MEDSSL_BENCH_DDP_FAILURE_GRACE"
#: Held by whoever ends this process after a failure: its main thread (:func:`fail_process`)
#: or the :class:`PeerWatch` thread, never both.
_ENDING = threading.Lock()


class RankFailed(BenchError):
    """A process of a distributed run failed; its message names the rank."""


def launched() -> bool:
    """Whether this process was started by torchrun (or ``bench run --nproc-per-node``) as
    one of several processes of a run."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _picklable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return BenchError(f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class DistributedRuntime(Runtime):
    """One of ``processes`` processes of a run, rank ``process_rank``, in an initialised
    default process group (see the module docstring)."""

    process_rank: int = 0
    processes: int = 1

    @classmethod
    def from_env(cls, device: torch.device) -> DistributedRuntime:
        """Initialise the process group from torchrun's environment (``RANK``,
        ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL on
        ``cuda:LOCAL_RANK`` when ``device`` is CUDA, else gloo on the CPU."""
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timeout)
        PeerWatch().start()
        return cls.in_group(device)

    @classmethod
    def in_group(cls, device: torch.device) -> DistributedRuntime:
        """This process's runtime in the already initialised default process group."""
        return cls(torch.device(device), process_rank=dist.get_rank(),
                   processes=dist.get_world_size())

    # ------------------------------------------------------------------ identity
    @property
    def rank(self) -> int:
        return self.process_rank

    @property
    def world_size(self) -> int:
        return self.processes

    def rank_seed(self, seed: int) -> int:
        """Rank 0 keeps ``seed`` (it draws what one process would); every other rank a seed
        derived from (seed, rank) by NumPy's SeedSequence (no collisions between ranks)."""
        if self.rank == 0:
            return seed
        return int(np.random.SeedSequence([seed % 2**63, self.rank]).generate_state(1)[0])

    # ------------------------------------------------------------------ training
    def wrap(self, module: nn.Module) -> nn.Module:
        """``DistributedDataParallel(module)``. ``find_unused_parameters=True``: fine-tuning
        freezes the encoder for its warm-up epochs after wrapping (its parameters then get
        no gradient), and some task/backbone pairs leave parts unused in a step (a task
        reading only the deepest level of a pyramid backbone); DDP cannot know in advance.
        Buffers are broadcast from rank 0 before every forward (normalisation statistics;
        tasks that keep a memory bank update it with the gathered batch, so it agrees).

        Batch-norm layers normalise with the global batch's statistics in training
        (:func:`medssl_bench.sync_norm.synchronise`), as one process at the global batch."""
        from medssl_bench.sync_norm import synchronise

        synchronise(module)
        if not any(p.requires_grad for p in module.parameters()):
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)

    @contextlib.contextmanager
    def no_sync(self, module: nn.Module) -> Iterator[None]:
        context = module.no_sync() if isinstance(module, DistributedDataParallel) else (
            contextlib.nullcontext())
        with context:
            yield

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def reduce_sum(self, values: Sequence[float]) -> list[float]:
        crash = os.environ.get(CRASH_RANK_ENV, "").split("@")
        _EPOCH_ENDS[0] += 1
        if crash[0] == str(self.rank) and _EPOCH_ENDS[0] == int((crash[1:] or ["1"])[0]):
            raise RuntimeError(f"{CRASH_RANK_ENV}={'@'.join(crash)}: test crash at epoch end "
                               f"{_EPOCH_ENDS[0]}")
        totals = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(totals)
        return totals.tolist()

    # ------------------------------------------------------------------ agreement
    def from_main(self, fn: Callable[[], T]) -> T:
        box: list[Any] = [None]
        raised: Exception | None = None
        if self.is_main:
            try:
                box[0] = (True, fn())
            except Exception as exc:
                raised = exc
                box[0] = (False, _picklable(exc))
        dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            raise raised if raised is not None else value  # rank 0: the original itself
        return value

    def gather(self, value: T) -> list[T]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def shard(self, count: int, batch_size: int) -> list[int]:
        starts = range(self.rank * batch_size, count, self.world_size * batch_size)
        return [case for start in starts for case in range(start, min(start + batch_size, count))]

    def sync_buffers(self, module: nn.Module) -> None:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def gather_rows(t: Tensor) -> Tensor:
    """The rows of ``t`` from every process, concatenated in rank order along dimension 0:
    differentiable both ways (the gradient of a gathered row goes back to the process that
    owns it, summed over every process's loss), which one process at the global batch needs
    when a loss or a normalisation mixes rows of several processes. ``t`` itself without an
    initialised process group. Every process's ``t`` must have the same shape.

    torch's functional collective (``torch.distributed.nn.functional.all_gather``, the
    public one, is deprecated since torch 2.11 and refused inside ``torch.compile``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    from torch.distributed import _functional_collectives as collectives

    gathered = collectives.all_gather_single_autograd(t.contiguous(), 0, dist.group.WORLD)
    return collectives.wait_tensor(gathered)


def note_failure(exc: BaseException) -> str:
    """Record ``exc`` as the run's first failure unless another rank's came first; the first
    failure's message (``rank R (of N) failed: ...``). An interrupt (torchrun stopping this
    process because another failed) is never a first failure."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if not isinstance(exc, Exception):
        return peer_failure() or f"rank {rank} (of {world}) interrupted"
    if isinstance(exc, RankFailed):
        return str(exc)
    mine = f"rank {rank} (of {world}) failed: {type(exc).__name__}: {exc}"
    store = _key_value_store()
    try:
        return mine if store is None else store.compare_set(FAILURE_KEY, "", mine).decode()
    except Exception:  # the store's host is gone: this rank's own message
        return mine


def peer_failure() -> str | None:
    """The first failure recorded by any rank of the run, or None."""
    return _poll_failure()[0]


def _poll_failure(store: Any = None) -> tuple[str | None, bool]:
    """(the first failure recorded by any rank or None, whether the store answered), from
    ``store`` (default: the process group's)."""
    store = _key_value_store() if store is None else store
    try:
        if store is not None and store.check([FAILURE_KEY]):
            return store.get(FAILURE_KEY).decode(), True
    except Exception:
        return None, False
    return None, True


#: The :class:`PeerWatch` threads started in this process (stopped by :func:`shutdown`).
_WATCHES: list[PeerWatch] = []


def shutdown() -> None:
    """The end of a distributed run that did not fail, in every process: wait for the others
    (so that rank 0, which may host the group's store, does not leave while another still
    needs it), stop the :class:`PeerWatch`, destroy the process group (NCCL warns of
    leaked resources at exit otherwise). Nothing without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    for watch in _WATCHES:
        watch.stop()
    _WATCHES.clear()
    dist.destroy_process_group()


def on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM in a process of a distributed run. After another rank failed (torchrun then
    stops the rest) it is ignored: this process fails at its next collective, at once, and
    closes its open run as FAILED, which an interrupt landing in the middle of closing it
    could prevent (torchrun kills it 30 s later if it hangs). Otherwise (a user's Ctrl-C or a
    scheduler's cancel, forwarded by torchrun) it interrupts, as in one process."""
    if peer_failure() is None:
        raise KeyboardInterrupt


def is_own(message: str) -> bool:
    """Whether a failure message is this rank's own."""
    return message.startswith(f"rank {dist.get_rank()} ")


#: The store of the run in this process (set by ``bench run`` under DDP), whose runs still
#: open are closed when this process fails.
ACTIVE_STORE: list[MainStore] = []


def fail_process(exc: BaseException) -> str:
    """This process ends with ``exc``: note the run's first failure, close the runs rank 0
    still holds as FAILED with it (SIGTERM ignored from now on: torchrun stops the other
    processes as soon as one fails), write it for torchrun's summary; its message."""
    import signal

    # this process ends now: a SIGTERM from torchrun meanwhile must not interrupt the
    # closing (a handler, not a thread's signal mask: another thread may take the signal)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    with _ENDING:  # blocks for good if the PeerWatch is already ending the process
        message = note_failure(exc)
        for store in ACTIVE_STORE:
            store.close_open(message)
        record_error_file(message)
    return message


class PeerWatch(threading.Thread):
    """Ends this process when another rank failed and this one has not noticed.

    A failing rank records its message in the process group's store (:func:`note_failure`)
    and exits. With gloo the others fail at their next collective at once; with NCCL they
    wait in it until the group's timeout (30 minutes), holding their GPUs, and rank 0 holds
    its run RUNNING meanwhile; under submitit nobody stops them (torchrun at least kills them
    30 s later, leaving the run RUNNING). This daemon thread polls the store every
    ``interval`` seconds; once another rank's failure has stood for ``grace`` seconds
    without this process ending by itself, it closes rank 0's open runs as FAILED with that
    message (as :func:`fail_process` would), writes it for torchrun, and ends the process
    with exit status 1 (``os._exit``: the main thread cannot be woken from a collective)."""

    def __init__(self, interval: float = 2.0, grace: float | None = None) -> None:
        super().__init__(name="medssl-bench-peer-watch", daemon=True)
        self.interval = interval
        self.grace = float(os.environ.get(GRACE_ENV, "10")) if grace is None else grace
        self._stop = threading.Event()
        # a client of its own: the main thread's may be held for minutes by a blocking get
        # (NCCL fetching its communicator id at the first collective)
        self._store = _key_value_store()
        with contextlib.suppress(Exception):
            self._store = self._store.clone()
        _WATCHES.append(self)

    def run(self) -> None:
        since: float | None = None
        while not self._stop.wait(self.interval):
            message, reachable = _poll_failure(self._store)
            if reachable and (message is None or is_own(message)):
                since = None  # nothing wrong, or this process's own failure: it ends itself
                continue
            since = time.monotonic() if since is None else since
            if time.monotonic() - since >= self.grace:
                self.end(message or "the run's key-value store is unreachable: the process "
                         "hosting it (rank 0's, or torchrun's agent) has ended")
                return

    def stop(self) -> None:
        self._stop.set()

    @staticmethod
    def end(message: str) -> None:
        """Close this process's open runs with ``message`` and exit 1, unless the main thread
        is already ending the process (then it does)."""
        if not _ENDING.acquire(blocking=False):
            return
        try:
            for store in ACTIVE_STORE:
                store.close_open(message)
            record_error_file(message)
            if dist.get_rank() == 0:
                print(f"error: {message} (this process, rank 0, stopped waiting for it)",
                      file=sys.stderr, flush=True)
        finally:
            os._exit(1)


def _key_value_store() -> Any:
    """The default process group's key-value store (torchrun's agent hosts it, so it outlives
    a failed rank); None without one."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


#: ResultStore methods that only write: rank 0 runs them, the others return None at once.
#: Nothing a process decides depends on them, and a failing rank 0 must be able to close its
#: run (``fail``) while the other processes are already gone.
WRITES = frozenset({"mark_reused", "mark_resumed", "log_pretrained", "log_epoch",
                    "finish_finetune", "fail", "finish", "log_report"})


class MainStore:
    """The run's :class:`~medssl_bench.store.ResultStore` as every process sees it: rank 0
    holds the real store (``store``; None on the other ranks, which never open it). A write
    (:data:`WRITES`) runs on rank 0 only; every other call runs on rank 0 and its answer (or
    its exception) is broadcast, so all processes agree on what is done, running or started.
    Every process must therefore make the same calls in the same order, which they do: they
    run the same plan on the same broadcast answers."""

    def __init__(self, runtime: DistributedRuntime, store: Any) -> None:
        self._runtime, self._store = runtime, store

    def __getattr__(self, name: str) -> Any:
        from medssl_bench.store import ResultStore

        kind = getattr(ResultStore, name)  # AttributeError for what a store does not have
        runtime, store = self._runtime, self._store
        if isinstance(kind, property):
            return runtime.from_main(lambda: getattr(store, name))
        if name in WRITES:
            def write(*args: Any, **kwargs: Any) -> Any:
                if not runtime.is_main:
                    return None
                if name == "fail":  # closed with the first failure when another rank's
                    cause = peer_failure()
                    if cause and not is_own(cause):
                        args = (args[0], RankFailed(cause), *args[2:])
                return getattr(store, name)(*args, **kwargs)
            return write

        def read(*args: Any, **kwargs: Any) -> Any:
            return runtime.from_main(lambda: getattr(store, name)(*args, **kwargs))
        return read

    def close_open(self, message: str) -> None:
        """Close every run rank 0 still holds (its lease) as FAILED with ``message``: the
        unit that was running when a process of the run failed."""
        if self._store is None:
            return
        for run_id in self._store.tracker.heartbeat.held():
            with contextlib.suppress(Exception):
                self._store.fail(run_id, RankFailed(message))


def record_error_file(message: str) -> None:
    """Write ``message`` where torchrun's elastic agent reads a worker's error
    (``TORCHELASTIC_ERROR_FILE``), so its failure summary shows it."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    with contextlib.suppress(Exception):
        ErrorHandler().record_exception(RankFailed(message))
