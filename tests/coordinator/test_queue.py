"""Admission policy: priority first, then submission order; a silent driver loses its slot."""

from __future__ import annotations

import pytest

from pipeline.coordinator.queue import JobQueue


def test_priority_then_first_come_first_served():
    q = JobQueue(max_running=1)
    for job_id, priority in [("a", 0), ("b", 0), ("c", 5), ("d", 5)]:
        q.enqueue(job_id, priority, now=0)
    assert q.waiting() == ["c", "d", "a", "b"]
    assert [q.try_admit(j, now=1) for j in ("a", "b", "d", "c")] == [False, False, False, True]
    assert q.position("d") == 1 and q.position("c") is None
    assert not q.try_admit("d", now=2)  # one slot, c holds it
    q.finish("c", "succeeded")
    assert q.try_admit("d", now=3)
    q.finish("d", "failed")
    assert q.try_admit("a", now=4) and q.waiting() == ["b"]


def test_slots_and_leases():
    q = JobQueue(max_running=2, lease_s=10)
    for job_id in "xyz":
        q.enqueue(job_id, now=0)
    assert q.try_admit("x", now=1) and q.try_admit("y", now=1) and not q.try_admit("z", now=1)
    q.heartbeat("y", now=15)
    q.heartbeat("z", now=15)
    # x's driver went silent (killed): after its lease it is lost and z gets the slot.
    assert q.try_admit("z", now=15)
    assert q.entries["x"].state == "lost" and q.entries["y"].state == "running"
    with pytest.raises(KeyError):
        q.try_admit("nope")
    with pytest.raises(ValueError):
        JobQueue(max_running=0)


def test_restarted_driver_keeps_its_place():
    q = JobQueue()
    q.enqueue("first", now=0)
    q.enqueue("second", now=1)
    q.enqueue("first", now=2)  # its driver restarted and registered again
    assert q.waiting() == ["first", "second"]
