"""Faults mid-job: a killed stage actor, a stage that always raises. Every row once, or a clear failure."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray.cloudpickle

from pipeline.data.shards import list_shards, read_shard
from pipeline.data.synth import synth_dataset
from pipeline.engine.job_record import read_record
from pipeline.engine.runner import run_job
from pipeline.stages import STAGES, register
from tests.engine import probe_stage

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def probe():
    ray.cloudpickle.register_pickle_by_value(probe_stage)
    register(probe_stage.ProbeSpec)
    yield
    STAGES.pop("probe", None)
    ray.cloudpickle.unregister_pickle_by_value(probe_stage)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("faults") / "shapes")
    synth_dataset(out, images=40, seed=11, size=64, rows_per_shard=4)  # 10 shards
    return out




def load_probe_job(src: str, out: str, **stage):
    from pipeline.engine.jobfile import validate_job

    spec = {
        "name": "probe",
        "input": src,
        "output": out,
        "metrics": [],
        "stages": [{"name": "probe", "type": "probe", "batch_size": 2, "num_cpus": 0.5, **stage}],
    }
    return validate_job(spec, "probe.yaml")


def stage_actor_pids(ray) -> list[int]:
    """Pids of this job's live Ray Data map actors hosting a StageActor, and nothing else.

    Found in this Ray instance's actor table (the GCS), filtered by this driver's job id, so a
    StageActor of another job or another Ray on a shared host is never picked. ``ray_local`` has
    no dashboard, so ``ray.util.state.list_actors`` (an HTTP API of the dashboard) is not
    available; ``ray._private.state.actors`` reads the same table from the GCS directly. The
    process title (``ray::MapWorker(MapBatches(StageActor))``) is checked as well, in case the pid
    was already reused.
    """
    from ray._private import state

    job_id = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    pids = []
    for actor in state.actors(job_id=job_id, actor_state_name="ALIVE").values():
        if actor["JobID"] != job_id.hex() or not actor["Pid"] or "MapWorker" not in actor["ActorClassName"]:
            continue
        try:
            with open(f"/proc/{actor['Pid']}/cmdline", "rb") as f:
                if b"StageActor" in f.read():
                    pids.append(actor["Pid"])
        except OSError:
            continue
    return pids


def test_killed_stage_actor_job_still_writes_every_row_once(ray_local, probe, many_shards, tmp_path):
    out = str(tmp_path / "pred")
    job = load_probe_job(many_shards, out, sleep_s=0.05)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=run_job(job, progress=False)))
    runner.start()
    killed = None
    deadline = time.time() + 120
    while runner.is_alive() and time.time() < deadline and killed is None:
        done = len([p for p in os.listdir(out) if p.endswith(".parquet")]) if os.path.isdir(out) else 0
        pids = stage_actor_pids(ray_local)
        if done >= 1 and pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            killed_at_shards = done
        time.sleep(0.05)
    runner.join(timeout=180)
    assert killed is not None, "the stage actor was never seen running mid-job"
    assert 1 <= killed_at_shards < 10, "killed too late to mean anything"
    assert "summary" in result, "job did not finish after its actor was killed"
    summary = result["summary"]
    assert (summary["rows_in"], summary["rows_out"], summary["error_rows"]) == (40, 40, 0)
    ids = [i for s in list_shards(out) for i in read_shard(s, columns=["image_id"])["image_id"].to_pylist()]
    source_ids = [i for s in list_shards(many_shards) for i in read_shard(s, columns=["image_id"])["image_id"].to_pylist()]
    assert sorted(ids) == sorted(source_ids) and len(set(ids)) == 40  # every row exactly once
    assert read_record(out)["state"] == "succeeded"


def test_stage_raising_on_every_batch_fails_the_job_and_keeps_finished_shards(ray_local, probe, many_shards, tmp_path):
    out = str(tmp_path / "pred")
    trigger = tmp_path / "break-now"
    # The stage works until `trigger` appears, then raises on everything: a broken stage, not a bad image.
    job = load_probe_job(many_shards, out, fail_if_exists=str(trigger), sleep_s=0.3)
    job.stage_failure_limit = 6
    failure: dict = {}

    def run():
        try:
            run_job(job, progress=False)
        except Exception as exc:  # noqa: BLE001
            failure["exc"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.time() + 120
    while runner.is_alive() and time.time() < deadline:
        if os.path.isdir(out) and len([p for p in os.listdir(out) if p.endswith(".parquet")]) >= 2:
            trigger.touch()
            break
        time.sleep(0.05)
    runner.join(timeout=180)
    assert trigger.exists(), "the job never finished two shards"
    assert "exc" in failure, "the job did not fail"
    message = str(failure["exc"])
    assert "stage probe failed on 6 rows in a row" in message and "break-now exists" in message
    record = read_record(out)
    assert record["state"] == "failed" and "stage_failure_limit" in record["error"]
    kept = list_shards(out)
    assert 2 <= len(kept) < 10
    for path in kept:  # what was kept is whole and readable
        assert read_shard(path).num_rows == 4

    # The same failures with the limit off become error rows, one per image: nothing lost either way.
    job2 = load_probe_job(many_shards, str(tmp_path / "rows"), fail_from=37)
    job2.stage_failure_limit = 0
    summary = run_job(job2, progress=False)
    assert (summary["rows_out"], summary["error_rows"]) == (40, 4)
