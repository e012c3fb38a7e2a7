"""MLflow tracking: one experiment per protocol, a parent run per pretraining (or scratch
group), a child run per fine-tune; run keys let reruns skip finished work.

We use ``MlflowClient`` directly (no global active run) so a failed fine-tune can be closed
as FAILED while the sweep goes on.

Interrupted sweeps: every run records the host and pid (and the process start time) of the
process that created it and holds a lease with a heartbeat (:mod:`medssl_bench.leases`);
:meth:`Tracker.reap_dead` marks runs of dead processes and expired leases KILLED, so a
rerun after SIGKILL leaves nothing RUNNING and redoes exactly the unfinished work. Starting a
run claims its key: two processes never both run one unit (:func:`leases.claim`).

Several writers: SQLite allows one writer at a time, and MLflow surfaces contention as
"database is locked". Every client call is retried with exponential backoff, so a few
parallel sweeps on one ``sqlite:///`` store lose nothing. For many writers (a cluster of
workers) run an MLflow server and pass ``--tracking-uri http://host:5000``.

A server that goes away mid-run (restarted, network down): every call is retried with
backoff for ``BENCH_TRACKING_SERVER_RETRY_SECONDS`` (default 300 s; a restart takes tens of
seconds), then :class:`~medssl_bench.errors.TrackingUnavailable` ends the run with one
message; what finished is recorded. MLflow's own HTTP retries are turned off for such
stores (unless ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` is set), so the budget is ours. Opening a
store does not wait: an unreachable server at start is one message at once.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medssl_bench.config import flatten
from medssl_bench.errors import BenchError, TrackingUnavailable

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT_PREFIX = "medssl-bench/"
TAG_KIND = "medssl_bench.kind"
TAG_KEY = "medssl_bench.run_key"
TAG_HOST = "medssl_bench.host"
TAG_PID = "medssl_bench.pid"
TAG_PROC_START = "medssl_bench.proc_start"
RETRY_SECONDS = float(os.environ.get("BENCH_TRACKING_RETRY_SECONDS", "120"))
SERVER_RETRY_ENV = "BENCH_TRACKING_SERVER_RETRY_SECONDS"


def _server_retry_seconds() -> float:
    return float(os.environ.get(SERVER_RETRY_ENV, "300") or 0)


def _is_locked(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return "database is locked" in text or "database table is locked" in text


#: What a server that is down, restarting or overloaded answers (connection refused or
#: reset, a gateway error, the database behind it gone for a moment).
_UNREACHABLE = re.compile(
    r"connection refused|failed to establish a new connection|connection aborted|"
    r"connection reset|remotedisconnected|max retries exceeded|name or service not known|"
    r"temporary failure in name resolution|error code (502|503|504)\b|"
    r"server closed the connection unexpectedly|could not connect to server|"
    r"terminating connection due to administrator command|the database system is "
    r"(starting up|shutting down)")


def _is_unreachable(exc: BaseException) -> bool:
    return bool(_UNREACHABLE.search(f"{type(exc).__name__}: {exc}".lower()))


class RetryingClient:
    """Wraps an ``MlflowClient``: every call is retried with exponential backoff while SQLite
    says it is locked (``budget`` seconds) or the server cannot be reached
    (``server_budget`` seconds; then :class:`TrackingUnavailable`).

    SQLite raises before committing, so a retried call never applies twice; a refused
    connection never reached the server either.
    """

    def __init__(self, client: Any, budget: float = RETRY_SECONDS,
                 server_budget: float | None = None, uri: str = "") -> None:
        self._client = client
        self._budget = budget
        self._server_budget = _server_retry_seconds() if server_budget is None else server_budget
        self._uri = uri
        self.retries = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            delay = 0.05
            while True:
                try:
                    return attr(*args, **kwargs)
                except Exception as exc:
                    waited = time.monotonic() - start
                    if _is_locked(exc):
                        if waited > self._budget:
                            raise
                        cap = 2.0
                    elif _is_unreachable(exc):
                        if waited > self._server_budget:
                            raise TrackingUnavailable(
                                f"The tracking store {self._uri or '(server)'} stayed "
                                f"unreachable for {waited:.0f} s ({short_error(exc)}). The "
                                "unit in progress failed; finished results are recorded. Start "
                                "the server again (or check the network), then rerun the same "
                                f"command: it resumes. ({SERVER_RETRY_ENV} sets how long to "
                                "retry.)") from None
                        cap = 10.0
                    else:
                        raise
                    self.retries += 1
                    time.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, cap)

        return call


def process_start(pid: int) -> str:
    """The kernel's start time of ``pid`` (guards against pid reuse); "" when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int, start: str = "") -> bool:
    """Whether ``pid`` still runs on this host (and is the same process when ``start`` is known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = process_start(pid)
    return not (start and now and now != start)


def owner_tags() -> dict[str, str]:
    """Who runs this: lets a later process tell a live run from one left by a killed process."""
    pid = os.getpid()
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(pid), TAG_PROC_START: process_start(pid)}


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="mlflow")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    # MLflow prints "View run ... at: http://..." and "View experiment at" to stdout for every
    # run ended on a server store (one more request each): noise among parallel workers' lines
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def git_sha() -> str | None:
    """The checkout's commit when medssl-bench runs from a git repository."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_tags(device: str) -> dict[str, str]:
    import torch

    from medssl_bench import __version__

    tags = {
        "medssl_bench.version": __version__,
        "torch.version": torch.__version__,
        "python.version": sys.version.split()[0],
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        tags["device.name"] = torch.cuda.get_device_name(torch.device(device))
    sha = git_sha()
    if sha:
        tags["git.sha"] = sha
    return tags


SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
#: Store names MLflow accepts that are not paths (no ``://``).
_NAMED_STORES = ("databricks", "databricks-uc", "uc")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other URIs and in-memory stores."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def absolute_uri(uri: str) -> str:
    """The tracking URI medssl-bench opens, made unambiguous; a :class:`BenchError` for a
    location that cannot work.

    - ``sqlite:///mlflow.db`` (relative to the working directory) is made absolute: MLflow
      caches stores by URI, so a relative one would follow the first directory it was opened
      in. Its directory must exist (SQLite would create the file, MLflow also the missing
      directories, silently, wherever a typo points).
    - A plain path ending in ``.db``, ``.sqlite`` or ``.sqlite3`` means that SQLite file:
      ``/data/mlflow.db`` becomes ``sqlite:////data/mlflow.db``. Other plain paths (and
      ``file:`` URIs) would be MLflow's file store, which medssl-bench does not use: refused,
      naming the ``sqlite:///`` URI to use instead.
    - Everything else (``http(s)://``, ``postgresql://``, ...) is passed on unchanged.
    """
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "file" or (not scheme and not uri.startswith("sqlite:")
                            and uri not in _NAMED_STORES):
        path = Path(uri[len("file://"):] if scheme == "file" else uri).expanduser().resolve()
        if path.suffix.lower() in SQLITE_SUFFIXES and scheme != "file":
            uri = f"sqlite:///{path}"
        else:
            target = (path / "mlflow.db" if path.is_dir() else path if path.is_file()
                      else path.with_name(path.name + ".db"))
            raise BenchError(
                f"Tracking URI {uri!r} is a path, which MLflow reads as its deprecated file "
                f"store (not supported here). For an SQLite store pass sqlite:///{target} (or a "
                "path ending in .db).")
    db = sqlite_path(uri)
    if db is not None:
        db = db.expanduser().resolve()
        if not db.parent.is_dir():
            raise BenchError(
                f"The directory of the SQLite tracking store does not exist: {db.parent} "
                f"(tracking URI {uri!r}). Create it, or pick another path.")
        uri = "sqlite:///" + str(db) + (uri[uri.index("?"):] if "?" in uri else "")
    return uri


def short_error(exc: BaseException) -> str:
    """The essential line of a tracking-store error (no urllib3 retry chains, no essays)."""
    text = " ".join(str(exc).split())
    reason = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if reason:  # a connection error wrapped in retry/pool text: the OS reason is the news
        return f"cannot connect ({reason.group(1).strip()})"
    if "unsupported uri" in text.lower():
        return ("unsupported URI scheme; use sqlite:///PATH, http(s)://HOST:PORT (an MLflow "
                "server) or a database URI such as postgresql://HOST/DB")
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return (first[:197] + "...") if len(first) > 200 else first or type(exc).__name__


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done (each is delivered right after it), so
    Ctrl-C or `kill` cannot land between creating a run and knowing its id, or in the middle
    of a store write (an interrupt inside SQLAlchemy can leave an SQLite transaction open,
    and every later write then fails with "database is locked").

    Deferred at the Python level, by swapping the handlers: a thread's signal mask would
    not do, since a process-directed signal goes to any thread not blocking it (the lease
    heartbeat, torch's workers) and Python then runs the handler in the main thread anyway.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def note(signum: int, frame: Any) -> None:
        pending.append(signum)

    old = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(pending):  # each once, in the order they came
            signal.raise_signal(signum)


class Tracker:
    """A thin layer over ``MlflowClient`` for the runs a protocol creates."""

    def __init__(self, uri: str = DEFAULT_TRACKING_URI) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        from medssl_bench.leases import Heartbeat

        _quiet_mlflow()
        uri = absolute_uri(uri)
        self.uri = uri
        self.mlflow = mlflow
        if uri.split("://", 1)[0].lower() in ("http", "https"):
            # our retries (RetryingClient) take the place of MLflow's, whose backoff would
            # multiply ours; a value the user set is kept
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        try:
            raw = MlflowClient(tracking_uri=uri)
            raw.search_experiments(max_results=1)  # unreachable at start: one message now
            self.client = RetryingClient(raw, uri=uri)
        except Exception as exc:
            raise BenchError(
                f"Cannot open the MLflow tracking store {uri!r}: {short_error(exc)}. "
                "Check --tracking-uri (default sqlite:///mlflow.db in the working directory)."
            ) from None
        self.heartbeat = Heartbeat(self.client)

    @classmethod
    def existing(cls, uri: str = DEFAULT_TRACKING_URI) -> Tracker | None:
        """A tracker for reading results; None when ``uri`` is an SQLite store whose file does
        not exist (nothing was run there yet), without creating it as opening would."""
        db = sqlite_path(absolute_uri(uri))
        if db is not None and not db.exists():
            return None
        return cls(uri)

    # ------------------------------------------------------------------ experiments
    def find_experiment(self, protocol: str) -> str | None:
        """The id of ``protocol``'s experiment, or None (creates nothing)."""
        exp = self.client.get_experiment_by_name(EXPERIMENT_PREFIX + protocol)
        return None if exp is None else exp.experiment_id

    def experiment_id(self, protocol: str) -> str:
        name = EXPERIMENT_PREFIX + protocol
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        artifact_location = None
        if self.uri.startswith("sqlite:"):
            db = Path(self.uri[len("sqlite:///"):])
            artifact_location = (db.resolve().parent / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # another process created it meanwhile
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def experiments(self) -> list[Any]:
        return [
            e for e in self.client.search_experiments()
            if e.name.startswith(EXPERIMENT_PREFIX)
        ]

    # ------------------------------------------------------------------ runs
    def find(self, experiment_id: str, key: str, status: str = "FINISHED") -> Any | None:
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TAG_KEY}` = '{key}' and attributes.status = '{status}'",
            max_results=1,
        )
        return runs[0] if runs else None

    def start(
        self,
        experiment_id: str,
        name: str,
        key: str,
        kind: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
        parent_id: str | None = None,
    ) -> str:
        from mlflow.entities import Param

        from medssl_bench.leases import RunningElsewhere, claim, lease_tags

        all_tags = {TAG_KEY: key, TAG_KIND: kind, **owner_tags(), **lease_tags(),
                    **{k: str(v) for k, v in tags.items()}}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        flat = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(params).items())]
        run_id = None
        try:
            with _interrupts_deferred():  # a run is created whole, or closed as KILLED
                run_id = self.client.create_run(experiment_id, run_name=name,
                                                tags=all_tags).info.run_id
                try:
                    claim(self.client, experiment_id, key, run_id)
                except RunningElsewhere:  # another live process holds the unit: not ours
                    self.client.delete_run(run_id)
                    run_id = None
                    raise
                self.heartbeat.hold(run_id)
                for i in range(0, len(flat), 100):
                    self.client.log_batch(run_id, params=flat[i : i + 100], synchronous=True)
        except BaseException:
            if run_id is not None:
                self.heartbeat.release(run_id)
                self.client.set_terminated(run_id, "KILLED")
            raise
        return run_id

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and v == v  # MLflow rejects NaN in some stores: skip it
        ]
        if batch:
            self.client.log_batch(run_id, metrics=batch, synchronous=True)

    def log_json(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.client.log_text(run_id, json.dumps(data, indent=2, default=str), artifact_file)

    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_bytes_file(self, run_id: str, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / name
            target.write_bytes(data)
            self.client.log_artifact(run_id, str(target))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        if batch:
            self.client.log_batch(run_id, tags=batch, synchronous=True)

    def running(self, experiment_ids: list[str] | None = None) -> list[Any]:
        ids = experiment_ids or [e.experiment_id for e in self.experiments()]
        if not ids:
            return []
        return list(self.client.search_runs(
            ids, filter_string="attributes.status = 'RUNNING'", max_results=5000))

    def owner_alive(self, run: Any) -> bool:
        """Whether ``run``'s lease is alive (:func:`leases.lease_state`): False when it was
        started on this host by a process that is gone, or its heartbeat is older than its
        TTL. Runs of other hosts without a heartbeat (before leases) count as alive."""
        from medssl_bench.leases import lease_state

        return not lease_state(run)

    def reap(self, run: Any, why: str) -> None:
        """Mark one RUNNING run KILLED, saying why (its unit will run again)."""
        self.client.set_tag(run.info.run_id, "medssl_bench.reaped", why[:4000])
        self.client.set_terminated(run.info.run_id, "KILLED")

    def reap_dead(self, experiment_ids: list[str] | None = None) -> list[str]:
        """Mark runs whose lease is dead (their process is gone, or their heartbeat stopped
        for longer than their TTL) KILLED; their ids."""
        from medssl_bench.leases import lease_state

        reaped = []
        for run in self.running(experiment_ids):
            why = lease_state(run)
            if why:
                self.reap(run, why)
                reaped.append(run.info.run_id)
        return reaped

    def running_with(self, experiment_id: str, key: str) -> list[Any]:
        """Every RUNNING run with ``key`` (live or not)."""
        return list(self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TAG_KEY}` = '{key}' and attributes.status = 'RUNNING'",
            max_results=100))

    def running_elsewhere(self, experiment_id: str, key: str) -> Any | None:
        """A RUNNING run with ``key`` held by another process with a live lease (a parallel
        sweep, another worker)."""
        mine = (socket.gethostname(), str(os.getpid()))
        for run in self.running_with(experiment_id, key):
            tags = run.data.tags
            if run.info.run_id in self.heartbeat.held() or (
                    tags.get(TAG_HOST), tags.get(TAG_PID)) == mine:
                continue
            if self.owner_alive(run):
                return run
        return None

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """Close a run; Ctrl-C/SIGTERM wait until its status is written (an interrupt in the
        middle of the write would leave it RUNNING). A run whose lease was reaped meanwhile
        (this process stopped heartbeating for longer than the TTL, and another process
        marked it KILLED) is not turned FINISHED: :class:`leases.LeaseLost`."""
        from medssl_bench.leases import LeaseLost

        self.heartbeat.release(run_id)
        with _interrupts_deferred():
            if status == "FINISHED":
                now = self.client.get_run(run_id).info.status
                if now != "RUNNING":
                    raise LeaseLost(
                        f"The lease of run {run_id} expired and it was marked {now} by another "
                        "process (this one stopped heartbeating for longer than the lease TTL, "
                        "BENCH_LEASE_TTL_SECONDS); its result is not recorded as finished.")
            self.client.set_terminated(run_id, status)

    def finetune_runs(self, experiment_ids: list[str] | None = None) -> list[Any]:
        """Every finished fine-tune run (paged through)."""
        ids = experiment_ids or [e.experiment_id for e in self.experiments()]
        if not ids:
            return []
        runs: list[Any] = []
        token = None
        while True:
            page = self.client.search_runs(
                ids,
                filter_string=f"tags.`{TAG_KIND}` = 'finetune' and attributes.status = 'FINISHED'",
                max_results=1000,
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs
