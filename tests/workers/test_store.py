"""The job record state machine, leases and streams, against a real Redis."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from workers.store import (
    TERMINAL,
    TRANSITIONS,
    InvalidTransition,
    JobNotFound,
    JobStatus,
    JobStore,
    legal_sources,
)

S = JobStatus
ALL = list(JobStatus)


def _job_in(store: JobStore, status: JobStatus, job_id: str = "ftjob-x") -> str:
    store.r.delete(store.k_job(job_id))
    store.create(job_id, "{}", status)
    return job_id


@pytest.mark.parametrize("src,dst", list(itertools.product(ALL, ALL)))
def test_every_transition_is_allowed_exactly_when_the_table_says(store, src, dst):
    job = _job_in(store, src)
    if dst in TRANSITIONS[src]:
        assert store.transition(job, dst, expect={src}) == src
        assert store.get(job)["status"] == dst
        assert ("finished_at" in store.get(job)) == (dst in TERMINAL)
    else:
        with pytest.raises((InvalidTransition, ValueError)):
            store.transition(job, dst, expect={src})
        # the unconstrained form refuses too, and the record is untouched
        if dst != src:
            with pytest.raises(InvalidTransition):
                store.transition(job, dst)
        assert store.get(job)["status"] == src


def test_terminal_states_have_no_exits():
    assert all(not TRANSITIONS[s] for s in TERMINAL)
    assert legal_sources(S.cancelled) == {
        S.validating_files,
        S.queued,
        S.running,
        S.pausing,
        S.paused,
    }


def test_transition_sets_fields_atomically_with_status(store):
    job = _job_in(store, S.running)
    store.transition(job, S.failed, error={"code": "x", "message": "boom", "param": None})
    rec = store.get(job)
    assert rec["status"] == "failed" and '"boom"' in rec["error"]


def test_missing_job_is_not_found(store):
    with pytest.raises(JobNotFound):
        store.transition("ftjob-nope", S.cancelled)


def test_two_concurrent_writers_cannot_both_win(store):
    """A cancel and a success race for the same running job: exactly one lands."""
    for round_ in range(20):
        job = _job_in(store, S.running, f"ftjob-race{round_}")
        barrier = threading.Barrier(2)
        wins: list[JobStatus] = []

        def attempt(target: JobStatus, job=job, barrier=barrier, wins=wins) -> None:
            barrier.wait()
            try:
                store.transition(job, target)
                wins.append(target)
            except InvalidTransition:
                pass

        threads = [threading.Thread(target=attempt, args=(t,)) for t in (S.cancelled, S.succeeded)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        assert store.get(job)["status"] == wins[0]


def test_owner_guard_refuses_a_worker_that_lost_its_lease(store):
    job = _job_in(store, S.queued)
    assert store.claim(job, "w1", lease_seconds=30, max_attempts=3).ok
    with pytest.raises(InvalidTransition):
        store.transition(job, S.succeeded, owner="w2")
    store.transition(job, S.succeeded, owner="w1")


def test_claim_is_idempotent_while_the_lease_is_live(store):
    job = _job_in(store, S.queued)
    first = store.claim(job, "w1", lease_seconds=30, max_attempts=3)
    second = store.claim(job, "w2", lease_seconds=30, max_attempts=3)
    assert first.ok and first.attempt == 1
    assert not second.ok and second.previous == "running"
    assert store.get(job)["lease_owner"] == "w1"


def test_expired_lease_can_be_taken_over_and_counts_an_attempt(store):
    job = _job_in(store, S.queued)
    store.claim(job, "w1", lease_seconds=0.05, max_attempts=3)
    time.sleep(0.1)
    assert store.expired_leases() == [job]
    assert not store.renew(job, "w2", 30)  # not the owner
    takeover = store.claim(job, "w2", lease_seconds=30, max_attempts=3)
    assert takeover.ok and takeover.attempt == 2
    assert not store.renew(job, "w1", 30)  # the old owner lost it
    assert store.renew(job, "w2", 30)


def test_claim_refuses_after_max_attempts(store):
    job = _job_in(store, S.queued)
    for attempt in (1, 2):
        assert store.claim(job, f"w{attempt}", lease_seconds=0.01, max_attempts=2).ok
        time.sleep(0.03)
    third = store.claim(job, "w3", lease_seconds=30, max_attempts=2)
    assert third.exhausted and not third.ok


def test_cancelled_job_cannot_be_claimed(store):
    job = _job_in(store, S.queued)
    store.transition(job, S.cancelled)
    assert not store.claim(job, "w1", 30, 3).ok
    assert store.get(job)["status"] == "cancelled"


def test_list_ids_pages_newest_first(store):
    ids = [f"ftjob-{i}" for i in range(5)]
    for i in ids:
        store.create(i, "{}")
        time.sleep(0.002)
    page1, more1 = store.list_ids(None, 2)
    page2, more2 = store.list_ids(page1[-1], 2)
    page3, more3 = store.list_ids(page2[-1], 2)
    assert page1 == ["ftjob-4", "ftjob-3"] and more1
    assert page2 == ["ftjob-2", "ftjob-1"] and more2
    assert page3 == ["ftjob-0"] and not more3


def test_events_page_newest_first_with_cursor(store):
    job = _job_in(store, S.queued)
    for i in range(5):
        store.add_event(job, f"e{i}")
    first, more = store.events(job, None, 3)
    assert [f["message"] for _, f in first] == ["e4", "e3", "e2"] and more
    rest, more = store.events(job, first[-1][0], 3)
    assert [f["message"] for _, f in rest] == ["e1", "e0"] and not more


def test_metrics_are_kept_per_step(store):
    job = _job_in(store, S.running)
    for step in range(1, 6):
        store.add_metrics(job, step, {"loss": 1.0 / step})
    rows, more = store.metrics(job, after_step=2, limit=2)
    assert [r["step"] for r in rows] == [3, 4] and more
    assert rows[0]["loss"] == pytest.approx(1 / 3)


def test_idempotency_key_binds_once(store):
    assert store.remember_idempotency("k1", "ftjob-a", "h1") is None
    assert store.remember_idempotency("k1", "ftjob-b", "h2") == "ftjob-a|h1"


def test_lease_index_tracks_exactly_the_jobs_holding_a_lease(store):
    for i in range(3):
        store.create(f"ftjob-{i}", "{}", S.queued)
        store.claim(f"ftjob-{i}", "w", lease_seconds=60, max_attempts=3)
    store.transition("ftjob-0", S.succeeded)
    store.transition("ftjob-1", S.pausing)
    assert set(store.r.zrange(store.k_leased(), 0, -1)) == {"ftjob-1", "ftjob-2"}
    assert store.expired_leases() == []
    store.renew("ftjob-2", "w", lease_seconds=-1)  # as if its heartbeats stopped long ago
    assert store.expired_leases() == ["ftjob-2"]
    assert store.requeue_if_expired("ftjob-2")
    assert store.r.zrange(store.k_leased(), 0, -1) == ["ftjob-1"]


# ---- fencing, server time, pausing through a worker loss, the queued index (issue 10)


def test_each_claim_gets_a_larger_fencing_token_and_stale_tokens_are_refused(store):
    a, b = _job_in(store, S.queued, "ftjob-fa"), _job_in(store, S.queued, "ftjob-fb")
    first = store.claim(a, "w1", lease_seconds=0.05, max_attempts=3)
    other = store.claim(b, "w1", lease_seconds=30, max_attempts=3)
    time.sleep(0.1)
    second = store.claim(a, "w1", lease_seconds=30, max_attempts=3)  # same owner name
    assert first.fence < other.fence < second.fence
    assert store.get(a)["fence"] == str(second.fence)
    # the first claim's holder has the same owner string, but its token is stale
    assert not store.renew(a, "w1", 30, fence=first.fence)
    with pytest.raises(InvalidTransition):
        store.transition(a, S.succeeded, owner="w1", fence=first.fence)
    assert store.renew(a, "w1", 30, fence=second.fence)
    store.transition(a, S.succeeded, owner="w1", fence=second.fence)
    assert store.get(a)["status"] == "succeeded"


def test_leases_use_redis_server_time_not_the_host_clock(store, monkeypatch):
    """A worker whose clock is an hour fast (or slow) neither expires nor extends leases."""
    job = _job_in(store, S.queued)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    store.claim(job, "w1", lease_seconds=30, max_attempts=3)
    assert store.expired_leases() == []  # a skewed host clock would see it expired
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    assert not store.requeue_if_expired(job)
    expires = float(store.get(job)["lease_expires_at"])
    assert abs(expires - (store.server_time() + 30)) < 5


def test_a_pausing_job_whose_worker_died_is_parked_paused_not_resumed(store):
    job = _job_in(store, S.queued)
    store.claim(job, "w1", lease_seconds=0.05, max_attempts=3)
    store.transition(job, S.pausing)
    time.sleep(0.1)
    # a redelivered message must not take it back to running
    claim = store.claim(job, "w2", lease_seconds=30, max_attempts=3)
    assert claim.paused and not claim.ok
    rec = store.get(job)
    assert rec["status"] == "paused" and rec["lease_owner"] == "" and rec["attempt"] == "0"
    # the reaper's path ends the same way
    job2 = _job_in(store, S.queued, "ftjob-p2")
    store.claim(job2, "w1", lease_seconds=0.05, max_attempts=3)
    store.transition(job2, S.pausing)
    time.sleep(0.1)
    assert store.requeue_if_expired(job2) == "paused"
    assert store.get(job2)["status"] == "paused"
    assert job2 not in store.r.zrange(store.k_leased(), 0, -1)


def test_the_queued_index_holds_exactly_the_queued_jobs(store):
    store.create("ftjob-q1", "{}", S.queued)
    store.create("ftjob-q2", "{}", S.queued)
    assert set(store.queued_since(-1)) == {"ftjob-q1", "ftjob-q2"}
    assert store.queued_since(60) == []  # just sent: inside any grace period
    store.claim("ftjob-q1", "w", lease_seconds=0.05, max_attempts=3)
    store.transition("ftjob-q2", S.cancelled)
    assert store.queued_since(-1) == []
    time.sleep(0.1)
    assert store.requeue_if_expired("ftjob-q1") == "queued"
    assert store.queued_since(-1) == ["ftjob-q1"]
    store.claim("ftjob-q1", "w", lease_seconds=30, max_attempts=3)
    store.transition("ftjob-q1", S.pausing)
    store.transition("ftjob-q1", S.paused)
    assert store.queued_since(-1) == []
    store.transition("ftjob-q1", S.queued, expect={S.paused})  # resume
    assert store.queued_since(-1) == ["ftjob-q1"]
