"""The coordinator actor on real (local) Ray: admission order, records, restart from its snapshot."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.ray


@pytest.fixture
def coordinator(ray_local, tmp_path):
    from pipeline.coordinator.service import get_coordinator

    actor = get_coordinator(max_running=1, lease_s=60, records_dir=str(tmp_path / "records"))
    yield actor
    ray_local.kill(actor)


def test_jobs_are_admitted_by_priority_and_records_outlive_the_driver(ray_local, coordinator, tmp_path):
    ray = ray_local
    c = coordinator
    assert ray.get(c.settings.remote())["max_running"] == 1
    ray.get(c.enqueue.remote("low", 0, {"name": "low", "submitted": "t0"}))
    ray.get(c.enqueue.remote("high", 9, {"name": "high", "submitted": "t1"}))
    assert ray.get(c.try_admit.remote("low")) == {"admitted": False, "position": 2, "running": []}
    assert ray.get(c.try_admit.remote("high"))["admitted"]
    answer = ray.get(c.try_admit.remote("low"))
    assert answer == {"admitted": False, "position": 1, "running": ["high"]}

    ray.get(c.update.remote("high", "progress", {"rows_done": 10, "rows_in": 20}))
    ray.get(c.update.remote("high", "succeeded", {"rows_done": 20, "summary": {"bbox_AP": 0.5}}))
    assert ray.get(c.try_admit.remote("low"))["admitted"]
    record = ray.get(c.get.remote("high"))
    assert record["state"] == "succeeded" and record["summary"] == {"bbox_AP": 0.5} and record["priority"] == 9
    assert [r["state"] for r in ray.get(c.list.remote())] == ["running", "succeeded"]

    ray.get(c.cancel.remote("low"))
    assert ray.get(c.get.remote("low"))["state"] == "cancelled"
    snapshot = json.loads((tmp_path / "records" / "records.json").read_text())
    assert snapshot["high"]["state"] == "succeeded" and snapshot["low"]["state"] == "cancelled"


def test_a_restarted_coordinator_reloads_its_records(ray_local, coordinator):
    ray = ray_local
    from pipeline.coordinator.service import NAME, NAMESPACE

    ray.get(coordinator.enqueue.remote("j1", 0, {"name": "one"}))
    assert ray.get(coordinator.try_admit.remote("j1"))["admitted"]
    ray.kill(coordinator, no_restart=False)  # dies; Ray restarts it (max_restarts=-1)
    revived = ray.get_actor(NAME, namespace=NAMESPACE)
    record = ray.get(revived.get.remote("j1"))
    assert record["name"] == "one" and record["state"] == "running"
    # The running job keeps its slot after the restart.
    ray.get(revived.enqueue.remote("j2", 0, {"name": "two"}))
    assert not ray.get(revived.try_admit.remote("j2"))["admitted"]


@pytest.fixture
def short_lease(ray_local, tmp_path):
    """The coordinator with a 2 s lease: a driver silent for 2 s is lost."""
    from pipeline.coordinator.service import get_coordinator

    actor = get_coordinator(max_running=1, lease_s=2, records_dir=str(tmp_path / "records"))
    assert ray_local.get(actor.settings.remote())["lease_s"] == 2  # not a leftover coordinator
    yield actor
    ray_local.kill(actor)


def test_a_silent_driver_is_marked_lost_while_another_job_waits(ray_local, short_lease, tmp_path):
    """The normal case: job b polls for admission (each poll expires leases); a's record must say lost."""
    import threading
    import time

    from pipeline.coordinator.job_driver import ClusterJob

    ray, c = ray_local, short_lease
    first = ClusterJob("a", heartbeat_s=0.2, poll_s=0.2)
    first.admit({"name": "a", "submitted": "t0"})  # admitted at once: the slot is free
    assert ray.get(c.get.remote("a"))["state"] == "running"

    second = ClusterJob("b", heartbeat_s=0.2, poll_s=0.2)
    admitted = threading.Event()
    waiter = threading.Thread(target=lambda: (second.admit({"name": "b", "submitted": "t1"}), admitted.set()), daemon=True)
    waiter.start()
    try:
        time.sleep(3)  # a's heartbeats keep its slot for longer than a lease
        assert not admitted.is_set(), "b was admitted while a's driver was alive"
        record_b = ray.get(c.get.remote("b"))
        assert record_b["state"] == "queued" and record_b["position"] == 1

        silenced = time.time()
        first.stop()  # a's driver goes silent, as if SIGKILLed
        assert admitted.wait(15), "b was never admitted after a's driver went silent"
        assert time.time() - silenced >= 1.5  # not before the lease ran out (2 s after a's last beat)

        record_a = ray.get(c.get.remote("a"))
        assert record_a["state"] == "lost", record_a
        assert "no heartbeat from the driver for 2 s" in record_a["error"]
        assert ray.get(c.get.remote("b"))["state"] == "running"
        states = {r["name"]: r["state"] for r in ray.get(c.list.remote())}
        assert states == {"a": "lost", "b": "running"}
        snapshot = json.loads((tmp_path / "records" / "records.json").read_text())
        assert snapshot["a"]["state"] == "lost" and "no heartbeat" in snapshot["a"]["error"]
        assert snapshot["b"]["state"] == "running"
    finally:
        first.stop()
        second.stop()
        waiter.join(5)


def test_driver_heartbeats_at_its_interval_until_stopped(ray_local, short_lease):
    import time

    from pipeline.coordinator.job_driver import ClusterJob

    ray, c = ray_local, short_lease
    job = ClusterJob("beats", heartbeat_s=0.5, poll_s=0.2)
    job.admit({"name": "beats"})
    try:
        seen, deadline = [], time.time() + 3.2
        while time.time() < deadline:  # nothing but the heartbeat thread talks to the actor now
            last = ray.get(c.get.remote("beats"))["last_seen"]
            if not seen or last != seen[-1]:
                seen.append(last)
            time.sleep(0.05)
        gaps = [b - a for a, b in zip(seen, seen[1:])]
        assert len(gaps) >= 4, seen  # about 6 beats in 3.2 s
        assert all(0.3 <= g <= 1.2 for g in gaps), gaps  # one per interval: not faster, none missed
        assert ray.get(c.get.remote("beats"))["state"] == "running"  # beats keep the 2 s lease alive
    finally:
        job.stop()
    assert not job._beat.is_alive()
    stopped_at = ray.get(c.get.remote("beats"))["last_seen"]
    time.sleep(1.5)
    assert ray.get(c.get.remote("beats"))["last_seen"] == stopped_at  # no beat after stop()
