"""A job's driver on a cluster: wait for the coordinator's go, report progress, record the end.

Every report goes two ways: to the coordinator (records that outlive the driver) and, as one
``pipeline-record: {json}`` line, to the driver's stdout, which Ray keeps as the job's logs; that
is how ``pipeline jobs status`` reads counts and metrics through the Job API alone.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

from pipeline.coordinator.service import get_coordinator

RECORD_PREFIX = "pipeline-record: "
# Fields of the runner's record that travel to the coordinator and the logs (the spec only once).
SUMMARY_FIELDS = (
    "job_id", "name", "state", "priority", "submitted", "started", "finished", "elapsed_s", "shards",
    "shards_skipped", "shards_done", "rows_in", "rows_done", "summary", "error", "output",
)


class ClusterJob:
    """Admission and reporting for one job id: ``admit`` and ``on_event`` plug into :func:`run_job`.

    Built before Ray is connected; the coordinator is looked up in ``admit``, which ``run_job``
    calls once connected. Events before that (``queued``) go to job.json only.
    """

    def __init__(self, job_id: str, *, priority: int = 0, max_running: int = 1, heartbeat_s: float = 5.0, poll_s: float = 2.0):
        self.job_id, self.priority, self.max_running = job_id, priority, max_running
        self.coordinator = None
        self.heartbeat_s, self.poll_s = heartbeat_s, poll_s
        self._stop = threading.Event()
        self._printed_at = 0.0
        self._beat: threading.Thread | None = None

    def admit(self, record: dict) -> None:
        """Queue the job and block until the coordinator lets it run, saying where it stands."""
        import ray

        self.coordinator = get_coordinator(max_running=self.max_running)
        first = {k: record.get(k) for k in SUMMARY_FIELDS if k in record}
        first.update(submitted=first.get("submitted") or _now(), spec=record.get("spec"), priority=self.priority)
        ray.get(self.coordinator.enqueue.remote(self.job_id, self.priority, first))
        self._start_heartbeats()
        said = None
        while True:
            answer = ray.get(self.coordinator.try_admit.remote(self.job_id))
            if answer["admitted"]:
                return
            news = (answer["position"], tuple(answer["running"]))
            if news != said:
                print(
                    f"queued: position {answer['position']}; waiting for {', '.join(answer['running']) or 'a free slot'}",
                    flush=True,
                )
                said = news
            time.sleep(self.poll_s)

    def on_event(self, state: str, record: dict) -> None:
        import ray

        if self.coordinator is None:
            return

        fields = {k: record[k] for k in SUMMARY_FIELDS if k in record}
        fields["job_id"] = self.job_id
        if state != "progress" or time.time() - self._printed_at > 10:
            print(RECORD_PREFIX + json.dumps(fields, default=str), flush=True)
            self._printed_at = time.time()
        ray.get(self.coordinator.update.remote(self.job_id, state, fields))
        if state not in ("queued", "running", "progress"):
            self.stop()

    def stop(self, timeout: float | None = None) -> None:
        """Stop sending heartbeats (the job ended); waits for the heartbeat thread to exit."""
        self._stop.set()
        beat = self._beat
        if beat is not None and beat is not threading.current_thread():
            beat.join(self.heartbeat_s + 5 if timeout is None else timeout)

    def _start_heartbeats(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    self.coordinator.heartbeat.remote(self.job_id)
                except Exception:  # noqa: BLE001 - Ray is shutting down; the job is ending anyway
                    return

        self._beat = threading.Thread(target=beat, name="pipeline-heartbeat", daemon=True)
        self._beat.start()


def last_record(logs: str) -> dict | None:
    """The last record line a driver printed in its logs."""
    for line in reversed(logs.splitlines()):
        if line.startswith(RECORD_PREFIX):
            try:
                return json.loads(line[len(RECORD_PREFIX):])
            except ValueError:
                continue
    return None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
