"""Leases: which process runs a unit right now, kept in the tracking store itself.

A unit being run holds a lease: its RUNNING MLflow run carries the owner (host, pid, process
start, the scheduler's job id when there is one), a heartbeat tag (unix seconds) refreshed by
a background thread every :func:`heartbeat_seconds`, and the time-to-live its owner promised
(:func:`ttl_seconds`). Any process, on any host, can then tell a live lease from a dead one
(:func:`lease_state`): dead when the owner process is gone (same host: asked of the kernel)
or when the heartbeat is older than the TTL (another host, a frozen node, a killed job).
Dead leases are reaped (the run marked KILLED) and the unit runs again, a pretraining from
its last checkpoint.

Claiming is exactly-once without a lock server (:func:`claim`): a process creates its
RUNNING run (its intent), then looks for a live rival already *holding* the key; if none, it
marks its own run held and looks again; if it sees another holder now, it steps back
(deletes its run). Whoever marked first is seen by the other's second look, so two processes
can never both hold a key; in the rare interleaving where both step back, each retries after
a random pause. Clocks of hosts only need to agree within the TTL (NTP does much better).

Defaults suit units that run for hours (a heartbeat a minute, dead after 15 minutes of
silence); tests and impatient users set ``BENCH_LEASE_HEARTBEAT_SECONDS`` and
``BENCH_LEASE_TTL_SECONDS`` (workers inherit the environment).
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from medssl_bench.errors import BenchError

TAG_HEARTBEAT = "medssl_bench.heartbeat"
TAG_LEASE_TTL = "medssl_bench.lease_ttl"
TAG_HELD = "medssl_bench.lease_held"
TAG_JOB = "medssl_bench.job"
HEARTBEAT_ENV = "BENCH_LEASE_HEARTBEAT_SECONDS"
TTL_ENV = "BENCH_LEASE_TTL_SECONDS"
#: The scheduler's id of the job a worker runs in (set by the parallel executors' workers).
JOB_ENV = "BENCH_JOB_ID"
#: How often a claim that stepped back (both claimants saw each other) is tried again.
CLAIM_ATTEMPTS = 6


def heartbeat_seconds() -> float:
    """How often a lease is refreshed (``BENCH_LEASE_HEARTBEAT_SECONDS``, default 60)."""
    return float(os.environ.get(HEARTBEAT_ENV) or 60)


def ttl_seconds() -> float:
    """How long a lease lives without a heartbeat (``BENCH_LEASE_TTL_SECONDS``, default
    900); at least three heartbeats, so one slow write does not kill a live unit."""
    return max(float(os.environ.get(TTL_ENV) or 900), 3 * heartbeat_seconds())


class RunningElsewhere(BenchError):
    """Another live process holds the unit's lease: this process does not run it."""

    exit_code = 5

    def __init__(self, holder: Holder) -> None:
        self.holder = holder
        super().__init__(f"running elsewhere: {holder.where()}")

    def __reduce__(self) -> tuple[Any, ...]:
        # picklable as itself (DDP broadcasts rank 0's answers, exceptions included), so a
        # lost claim is still a lost claim on every rank
        return (type(self), (self.holder,))


class LeaseLost(BenchError):
    """This process's lease expired and was reaped (the unit may run elsewhere now): its
    result is not recorded as finished."""


@dataclass
class Holder:
    """Who holds (or held) a lease, read from a run's tags."""

    run_id: str
    host: str
    pid: str
    since: float  # the run's start, unix seconds
    heartbeat: float | None
    job: str = ""

    @classmethod
    def of(cls, run: Any) -> Holder:
        from medssl_bench.tracking import TAG_HOST, TAG_PID

        tags = run.data.tags
        beat = tags.get(TAG_HEARTBEAT)
        return cls(run.info.run_id, tags.get(TAG_HOST, "?"), tags.get(TAG_PID, "?"),
                   (run.info.start_time or 0) / 1000, float(beat) if beat else None,
                   tags.get(TAG_JOB, ""))

    def where(self) -> str:
        """``host pid N (job J) since HH:MM:SS, last heartbeat N s ago``."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        job = f" job {self.job}" if self.job else ""
        beat = ("" if self.heartbeat is None
                else f", last heartbeat {max(0.0, time.time() - self.heartbeat):.0f} s ago")
        return f"{self.host} pid {self.pid}{job} since {since}{beat}"


def lease_state(run: Any, now: float | None = None) -> str:
    """``""`` when ``run``'s lease is alive, else why it is dead. A run of this host whose
    owner process is gone is dead at once; any run whose last heartbeat is older than its
    TTL is dead. A run without heartbeat (written before leases) of another host counts as
    alive: nothing tells."""
    from medssl_bench.tracking import TAG_HOST, TAG_PID, TAG_PROC_START, process_alive

    tags = run.data.tags
    pid = tags.get(TAG_PID, "")
    if tags.get(TAG_HOST) == socket.gethostname() and pid.isdigit() and not process_alive(
            int(pid), tags.get(TAG_PROC_START, "")):
        return f"owner pid {pid} is gone"
    beat = tags.get(TAG_HEARTBEAT)
    if beat:
        ttl = float(tags.get(TAG_LEASE_TTL) or ttl_seconds())
        silent = (time.time() if now is None else now) - float(beat)
        if silent > ttl:
            return (f"no heartbeat from {tags.get(TAG_HOST, '?')} pid {pid or '?'} for "
                    f"{silent:.0f} s (lease TTL {ttl:.0f} s)")
    return ""


def lease_tags() -> dict[str, str]:
    """The tags a run starts with: its first heartbeat and its TTL (and job id, if any)."""
    tags = {TAG_HEARTBEAT: f"{time.time():.3f}", TAG_LEASE_TTL: f"{ttl_seconds():g}"}
    if os.environ.get(JOB_ENV):
        tags[TAG_JOB] = os.environ[JOB_ENV]
    return tags


def _live_rivals(client: Any, experiment_id: str, key: str, run_id: str) -> list[Any]:
    from medssl_bench.tracking import TAG_KEY

    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_KEY}` = '{key}' and attributes.status = 'RUNNING'",
        max_results=100)
    return [r for r in runs if r.info.run_id != run_id and not lease_state(r)]


def claim_step(client: Any, experiment_id: str, key: str, run_id: str, step: str) -> Any | None:
    """One step of :func:`claim` (a test interleaves them): ``"look"``: a live rival that
    holds the key, or None; ``"mark"``: mark ``run_id`` held (None); ``"check"``: a live
    rival that holds the key too (then this run must step back), or None."""
    if step == "mark":
        client.set_tag(run_id, TAG_HELD, "1")
        return None
    held = [r for r in _live_rivals(client, experiment_id, key, run_id)
            if r.data.tags.get(TAG_HELD) == "1"]
    return min(held, key=lambda r: (r.info.start_time or 0, r.info.run_id)) if held else None


def claim(client: Any, experiment_id: str, key: str, run_id: str,
          attempts: int = CLAIM_ATTEMPTS) -> None:
    """Make ``run_id`` (RUNNING, tagged with ``key``) the one holder of ``key``'s lease, or
    raise :class:`RunningElsewhere` naming the holder (``run_id`` is then the caller's to
    delete). See the module docstring for why two claimants never both win."""
    for attempt in range(attempts):
        holder = claim_step(client, experiment_id, key, run_id, "look")
        if holder is not None:
            raise RunningElsewhere(Holder.of(holder))
        claim_step(client, experiment_id, key, run_id, "mark")
        holder = claim_step(client, experiment_id, key, run_id, "check")
        if holder is None:
            return
        # both marked before either checked: step back, and try again after a random pause
        client.set_tag(run_id, TAG_HELD, "0")
        if attempt == attempts - 1:
            raise RunningElsewhere(Holder.of(holder))
        time.sleep(random.uniform(0.05, 0.5) * (attempt + 1))


class Heartbeat:
    """One daemon thread per tracker: refreshes the heartbeat tag of every run it holds
    every :func:`heartbeat_seconds`. A failed refresh is tried again at the next beat (the
    TTL spans several), so a slow store does not end a unit."""

    def __init__(self, client: Any, interval: float | None = None) -> None:
        self._client = client
        self.interval = heartbeat_seconds() if interval is None else interval
        self._runs: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.beats = 0

    def hold(self, run_id: str) -> None:
        with self._lock:
            self._runs.add(run_id)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="bench-heartbeat",
                                                daemon=True)
                self._thread.start()

    def release(self, run_id: str) -> None:
        with self._lock:
            self._runs.discard(run_id)

    def held(self) -> set[str]:
        with self._lock:
            return set(self._runs)

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval)
            for run_id in self.held():
                try:
                    self._client.set_tag(run_id, TAG_HEARTBEAT, f"{time.time():.3f}")
                    self.beats += 1
                except Exception:
                    pass
