"""The coordinator actor on real (local) Ray: admission order, records, restart from its snapshot."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.ray


@pytest.fixture
def coordinator(ray_local, tmp_path):
    from pipeline.coordinator.actor import get_coordinator

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
    from pipeline.coordinator.actor import NAME, NAMESPACE

    ray.get(coordinator.enqueue.remote("j1", 0, {"name": "one"}))
    assert ray.get(coordinator.try_admit.remote("j1"))["admitted"]
    ray.kill(coordinator, no_restart=False)  # dies; Ray restarts it (max_restarts=-1)
    revived = ray.get_actor(NAME, namespace=NAMESPACE)
    record = ray.get(revived.get.remote("j1"))
    assert record["name"] == "one" and record["state"] == "running"
    # The running job keeps its slot after the restart.
    ray.get(revived.enqueue.remote("j2", 0, {"name": "two"}))
    assert not ray.get(revived.try_admit.remote("j2"))["admitted"]
