"""The coordinator: one detached, named actor per cluster that admits jobs and keeps their records.

Why an actor: it lives in the cluster, not in any driver, so the queue and the records outlive
the drivers (a finished, failed or killed job's record stays readable), and every driver of the
cluster finds it by name. It runs on the head node, restarts if it dies (``max_restarts=-1``) and
reloads the JSON snapshot it writes on every state change (``records.json`` in ``records_dir``:
``$PIPELINE_RECORDS_DIR``, default ``<tmp>/pipeline-jobs/<cluster>`` on the head node).

A record is what the driver reports (see :func:`pipeline.engine.runner.run_job`): job id, name,
priority, state (queued, running, succeeded, failed, cancelled, lost), times, counts, metrics and
the resolved spec.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time

from pipeline.coordinator.queue import ACTIVE, JobQueue

NAME = "pipeline-coordinator"
NAMESPACE = "pipeline"
SNAPSHOT = "records.json"


class Coordinator:
    def __init__(self, *, max_running: int = 1, lease_s: float = 60.0, records_dir: str | None = None):
        self.queue = JobQueue(max_running=max_running, lease_s=lease_s)
        self.records: dict[str, dict] = {}
        self.records_dir = records_dir or default_records_dir()
        self._saved_at = 0.0  # progress reports are snapshotted at most every 5 s
        self._load()

    # -- what drivers call -------------------------------------------------------------------
    def enqueue(self, job_id: str, priority: int, record: dict) -> int | None:
        self.queue.enqueue(job_id, priority)
        self.records[job_id] = {**self.records.get(job_id, {}), **record, "state": "queued", "priority": priority}
        self._save()
        return self.queue.position(job_id)

    def try_admit(self, job_id: str) -> dict:
        """``{"admitted": bool, "position": int | None, "running": [ids]}``."""
        if job_id not in self.queue.entries:  # e.g. the coordinator restarted without this job
            self.queue.enqueue(job_id, self.records.get(job_id, {}).get("priority", 0))
        admitted = self.queue.try_admit(job_id)  # expires silent drivers first
        self._mark_lost()
        if admitted and self.records.setdefault(job_id, {}).get("state") != "running":
            self.records[job_id]["state"] = "running"
            self._save()
        running = [e.job_id for e in self.queue.entries.values() if e.state == "running"]
        return {"admitted": admitted, "position": self.queue.position(job_id), "running": running}

    def update(self, job_id: str, state: str, record: dict) -> None:
        """A driver's report: progress (a heartbeat too) or a final state."""
        self.queue.heartbeat(job_id)
        merged = {**self.records.get(job_id, {}), **record}
        if state != "progress":
            merged["state"] = state
            if state not in ACTIVE:
                self.queue.finish(job_id, state)
        self.records[job_id] = merged
        if state != "progress" or time.time() - self._saved_at > 5:
            self._save()
        self._mark_lost()

    def heartbeat(self, job_id: str) -> None:
        self.queue.heartbeat(job_id)
        self._mark_lost()

    # -- what people (and tests) read --------------------------------------------------------
    def get(self, job_id: str) -> dict | None:
        self._mark_lost()
        record = self.records.get(job_id)
        if record is None:
            return None
        entry = self.queue.entries.get(job_id)
        # last_seen: when the driver last reported (a heartbeat, a poll or progress), epoch seconds
        return {**record, "position": self.queue.position(job_id), "last_seen": entry.last_seen if entry else None}

    def list(self) -> list[dict]:
        self._mark_lost()
        return [{**r, "position": self.queue.position(i)} for i, r in self.records.items()]

    def cancel(self, job_id: str) -> None:
        """Take a job out of the queue (its driver is being stopped through the Job API)."""
        if job_id in self.records and self.records[job_id].get("state") in ACTIVE:
            self.queue.finish(job_id, "cancelled")
            self.records[job_id]["state"] = "cancelled"
            self._save()

    def settings(self) -> dict:
        return {"max_running": self.queue.max_running, "lease_s": self.queue.lease_s, "records_dir": self.records_dir}

    # -- persistence -------------------------------------------------------------------------
    def _mark_lost(self) -> None:
        """Bring the records in line with the queue, the one place that decides a job is lost.

        The queue expires silent drivers whenever it is asked (``try_admit`` does so on every
        poll of a waiting job), so its return value cannot be relied on here: instead every entry
        the queue holds as ``lost`` whose record still says queued/running is marked now.
        """
        self.queue.expire()
        changed = False
        for job_id, entry in self.queue.entries.items():
            record = self.records.setdefault(job_id, {})
            if entry.state == "lost" and record.get("state", "queued") in ACTIVE:
                record["state"] = "lost"
                record["error"] = f"no heartbeat from the driver for {self.queue.lease_s:.0f} s"
                changed = True
        if changed:
            self._save()

    def _save(self) -> None:
        os.makedirs(self.records_dir, exist_ok=True)
        path = os.path.join(self.records_dir, SNAPSHOT)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.records, f, indent=1, default=str)
        os.replace(tmp, path)
        self._saved_at = time.time()

    def _load(self) -> None:
        try:
            with open(os.path.join(self.records_dir, SNAPSHOT), encoding="utf-8") as f:
                self.records = json.load(f)
        except (FileNotFoundError, ValueError):
            return
        # Jobs that were active when the coordinator died get one lease to report back.
        for job_id, record in sorted(self.records.items(), key=lambda kv: kv[1].get("submitted") or ""):
            if record.get("state") in ACTIVE:
                self.queue.enqueue(job_id, record.get("priority", 0))
                self.queue.entries[job_id].state = record["state"]


def default_records_dir() -> str:
    import ray

    if os.environ.get("PIPELINE_RECORDS_DIR"):
        return os.environ["PIPELINE_RECORDS_DIR"]
    cluster = re.sub(r"[^A-Za-z0-9]+", "_", ray.get_runtime_context().gcs_address or "local")
    return os.path.join(tempfile.gettempdir(), "pipeline-jobs", cluster)


def get_coordinator(*, max_running: int = 1, lease_s: float = 60.0, records_dir: str | None = None):
    """The cluster's coordinator actor, created on the head node by the first job that needs it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next((n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]), None)
    options = dict(
        name=NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
        max_task_retries=-1,
    )
    if head is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=True)
    return ray.remote(Coordinator).options(**options).remote(
        max_running=max_running, lease_s=lease_s, records_dir=records_dir
    )
