"""Leases in the tracking store: a heartbeat that advances, leases that die with their owner
or their heartbeat, reaping, the exactly-once claim under every interleaving of two racing
processes, and a reaped run that is never turned FINISHED."""

from __future__ import annotations

import itertools
import socket
import time

import pytest
from bench_helpers import poll

from medssl_bench import leases
from medssl_bench.leases import (
    TAG_HEARTBEAT,
    TAG_HELD,
    TAG_LEASE_TTL,
    LeaseLost,
    RunningElsewhere,
    claim,
    claim_step,
    lease_state,
)
from medssl_bench.tracking import TAG_HOST, TAG_KEY, TAG_PID, Tracker


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    """One SQLite store for the module (creating one takes seconds); tests use their own
    keys. Heartbeats every 0.2 s, leases of 30 s."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(leases.HEARTBEAT_ENV, "0.2")
        mp.setenv(leases.TTL_ENV, "30")
        yield Tracker(f"sqlite:///{tmp_path_factory.mktemp('leases') / 'mlflow.db'}")


def test_a_running_unit_heartbeats_and_its_lease_dies_with_the_heartbeat(tracker):
    exp = tracker.experiment_id("leases")
    run_id = tracker.start(exp, "unit", "k1", "finetune", {}, {})
    first = float(tracker.client.get_run(run_id).data.tags[TAG_HEARTBEAT])
    assert tracker.client.get_run(run_id).data.tags[TAG_LEASE_TTL] == "30"
    poll(lambda: float(tracker.client.get_run(run_id).data.tags[TAG_HEARTBEAT]) > first,
         "a heartbeat", timeout=30, interval=0.1)
    run = tracker.client.get_run(run_id)
    assert lease_state(run) == "" and tracker.reap_dead() == []

    # the same run seen from another host: alive while its heartbeat is fresh ...
    tracker.client.set_tag(run_id, TAG_HOST, "node-elsewhere")
    tracker.heartbeat.release(run_id)  # this process stops heartbeating for it
    assert lease_state(tracker.client.get_run(run_id)) == ""
    # ... dead once the heartbeat is older than the TTL the owner promised
    tracker.client.set_tag(run_id, TAG_HEARTBEAT, f"{time.time() - 31:.3f}")
    why = lease_state(tracker.client.get_run(run_id))
    assert "no heartbeat" in why and "node-elsewhere" in why and "TTL 30" in why
    assert tracker.running_elsewhere(exp, "k1") is None
    assert tracker.reap_dead() == [run_id]
    reaped = tracker.client.get_run(run_id)
    assert reaped.info.status == "KILLED" and "no heartbeat" in reaped.data.tags[
        "medssl_bench.reaped"]
    # the owner coming back to finish it does not turn it FINISHED
    with pytest.raises(LeaseLost, match="expired"):
        tracker.finish(run_id)
    assert tracker.client.get_run(run_id).info.status == "KILLED"


def test_a_run_of_a_dead_process_on_this_host_is_dead_at_once(tracker):
    import subprocess
    import sys

    exp = tracker.experiment_id("dead-pid")
    run_id = tracker.start(exp, "unit", "k2", "finetune", {}, {})
    tracker.heartbeat.release(run_id)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tracker.client.set_tag(run_id, TAG_PID, str(dead.pid))
    assert tracker.client.get_run(run_id).data.tags[TAG_HOST] == socket.gethostname()
    assert f"pid {dead.pid} is gone" in lease_state(tracker.client.get_run(run_id))


def _intent(tracker: Tracker, exp: str, key: str, host: str) -> str:
    """A RUNNING run for ``key`` as another process would create it (before claiming)."""
    tags = {TAG_KEY: key, TAG_HOST: host, TAG_PID: "1", **leases.lease_tags()}
    return tracker.client.create_run(exp, tags=tags).info.run_id


STEPS = ("look", "mark", "check", "unmark")


def _interleavings():
    """Every order of A's four claim steps and B's four, each process in its own order."""
    for slots in itertools.combinations(range(8), 4):
        yield ["A" if i in slots else "B" for i in range(8)]


def test_two_racing_claims_never_both_win_in_any_interleaving(tracker):
    """Two processes (other hosts, live heartbeats) create their run for one key and claim
    it (look for a holder, mark, look again, step back when another holder is seen), their
    steps interleaved in all 70 possible orders: never both hold it; when both stepped back,
    the retry of one wins."""
    exp = tracker.experiment_id("race")
    outcomes = set()
    for n, order in enumerate(_interleavings()):
        key = f"race-{n}"
        runs = {"A": _intent(tracker, exp, key, "host-a"), "B": _intent(tracker, exp, key,
                                                                         "host-b")}
        step = {"A": 0, "B": 0}
        result: dict[str, str] = {}
        for who in order:
            name = STEPS[step[who]]
            step[who] += 1
            if result.get(who) in ("lost", "won"):
                continue  # decided: its remaining steps do nothing
            if name == "unmark":
                tracker.client.set_tag(runs[who], TAG_HELD, "0")
                continue
            found = claim_step(tracker.client, exp, key, runs[who], name)
            if name == "look" and found is not None:
                result[who] = "lost"
            elif name == "check":
                result[who] = "stepped back" if found is not None else "won"
        assert list(result.values()).count("won") <= 1, (order, result)
        outcomes.add(tuple(sorted(result.values())))
        if "won" not in result.values():  # both stepped back: retrying settles it
            claim(tracker.client, exp, key, runs["A"])
            with pytest.raises(RunningElsewhere):
                claim(tracker.client, exp, key, runs["B"])
    # the orders cover a clean win, a loss at the first look and the mutual step-back
    assert {("lost", "won"), ("stepped back", "won"), ("stepped back", "stepped back")} \
        <= outcomes


def test_starting_a_unit_held_by_a_live_process_deletes_the_loser(tracker):
    exp = tracker.experiment_id("start-race")
    winner = tracker.start(exp, "unit", "k3", "finetune", {}, {})
    other = Tracker(tracker.uri)  # another process's tracker (same store)
    with pytest.raises(RunningElsewhere) as exc:
        other.start(exp, "unit", "k3", "finetune", {}, {})
    assert socket.gethostname() in str(exc.value) and "since" in str(exc.value)
    running = tracker.running_with(exp, "k3")
    assert [r.info.run_id for r in running] == [winner]  # the loser's run is gone
    tracker.finish(winner)
    # once the holder finished, the key can be claimed again (a --force rerun)
    again = other.start(exp, "unit", "k3", "finetune", {}, {})
    other.finish(again)


def test_a_lost_claim_survives_the_broadcast_of_rank_0s_answers():
    """Under DDP rank 0's answers (exceptions included) are pickled to the other ranks: a
    lost claim must arrive as RunningElsewhere (the unit is skipped), not as a plain error
    that ends the run."""
    import pickle

    from medssl_bench.distributed import _picklable
    from medssl_bench.leases import Holder, RunningElsewhere

    lost = RunningElsewhere(Holder("r1", "node7", "4242", 1.0, 2.0, "job9"))
    again = pickle.loads(pickle.dumps(_picklable(lost)))
    assert type(again) is RunningElsewhere and again.holder == lost.holder
    assert str(again) == str(lost) and again.exit_code == 5
