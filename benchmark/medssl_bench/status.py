"""Where a sweep stands (``bench status``, and ``bench run``'s check for units still held by
other live processes): each unit of the plan is done, running (where, since when, last
heartbeat), failed (why) or pending, read from the tracking store in one search. Reads only:
creates no store, experiment, run or file."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from medssl_bench.leases import Holder, lease_state
from medssl_bench.plan import Plan, Unit
from medssl_bench.store import TAG_ERROR

STATES = ("done", "running", "failed", "pending")


@dataclass
class UnitState:
    """One unit of the plan and what the store says of it."""

    unit: Unit
    state: str  # one of STATES
    detail: str = ""
    holder: Holder | None = None
    run_id: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stage": self.unit.stage, "unit": self.unit.what,
                               "task": self.unit.task, "key": self.unit.key,
                               "state": self.state, "detail": self.detail,
                               "run_id": self.run_id}
        if self.holder is not None:
            h = self.holder
            out |= {"host": h.host, "pid": h.pid, "job": h.job, "since": _iso(h.since),
                    "heartbeat": _iso(h.heartbeat) if h.heartbeat else None}
        return out


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds))


def unit_states(store: Any, plan: Plan, protocol: str) -> list[UnitState]:
    """The state of every unit of ``plan`` in ``store`` (None: nothing run yet), whose runs
    are in the experiment of ``protocol`` (the spec's name)."""
    by_key = {} if store is None else store.runs_by_key(protocol)
    out = []
    for unit in plan:
        runs = by_key.get(unit.key, [])
        finished = next((r for r in runs if r.info.status == "FINISHED"), None)
        if finished is not None:
            out.append(UnitState(unit, "done", "", Holder.of(finished), finished.info.run_id))
            continue
        live = [r for r in runs if r.info.status == "RUNNING" and not lease_state(r)]
        if live:
            run = min(live, key=lambda r: (r.info.start_time or 0, r.info.run_id))
            out.append(UnitState(unit, "running", "", Holder.of(run), run.info.run_id))
            continue
        last = runs[0] if runs else None
        if last is None:
            out.append(UnitState(unit, "pending"))
        elif last.info.status == "RUNNING":  # its lease died: the next bench run reaps it
            out.append(UnitState(unit, "pending", f"its last run's lease died "
                                 f"({lease_state(last)}); the next run redoes it",
                                 Holder.of(last), last.info.run_id))
        else:
            tags = last.data.tags
            why = tags.get(TAG_ERROR) or tags.get("medssl_bench.reaped") or last.info.status
            out.append(UnitState(unit, "failed", f"{last.info.status}: {why}",
                                 Holder.of(last), last.info.run_id))
    return out


def counts(states: list[UnitState]) -> dict[str, int]:
    return {s: sum(1 for u in states if u.state == s) for s in STATES}
