"""The job's record: ``OUTPUT/job.json``, its states, and the provenance written into ``dataset.json``.

``job.json`` holds the spec, the state (queued / running / succeeded / failed / cancelled), the
timings and the counts. It is written when a job starts and rewritten when it ends;
:func:`emitter` updates it and passes every event on to a caller (the cluster coordinator).
SIGTERM -- how Ray stops a submitted job -- becomes :class:`JobCancelled` so the record says so.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import posixpath
import signal
import threading
from collections.abc import Callable

from pipeline.config.load import dump, path_settings
from pipeline.config.paths import sha256_of
from pipeline.config.spec import JobSpec
from pipeline.data.shards import publish_bytes, resolve
from pipeline.engine.fingerprint import row_affecting

JOB_JSON = "job.json"


class JobCancelled(RuntimeError):
    """Raised in the driver when the job is stopped (SIGTERM from ``pipeline jobs cancel``)."""


def emitter(job: JobSpec, record: dict, on_event) -> Callable[..., None]:
    """Update the record, write job.json on state changes, and pass every event on."""

    def emit(state: str, **fields) -> None:
        record.update(fields)
        if state != "progress":
            record["state"] = state
            write_record(job.output, record)
        if on_event is not None:
            try:
                on_event(state, record)
            except Exception as exc:  # noqa: BLE001 - a lost report must not fail the job itself
                print(f"warning: could not report state {state!r}: {error_message(exc)}", flush=True)

    return emit


def write_record(output: str, record: dict) -> None:
    """Write ``OUTPUT/job.json`` atomically (readers never see half a record; ``publish_bytes``)."""
    fs, root = resolve(output)
    fs.create_dir(root, recursive=True)
    publish_bytes(fs, posixpath.join(root, JOB_JSON), json.dumps(record, indent=2, default=str).encode("utf-8"))


def read_record(output: str) -> dict | None:
    """The job record in an output folder, or None if there is none."""
    fs, root = resolve(output)
    try:
        with fs.open_input_stream(posixpath.join(root, JOB_JSON)) as f:
            return json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, OSError, ValueError):
        return None


def error_message(exc: BaseException) -> str:
    """One line for a failure: the root cause's message, without Ray's wrapped tracebacks."""
    cause = exc
    while True:
        inner = getattr(cause, "cause", None) or cause.__cause__
        if inner is None or inner is cause:
            break
        cause = inner
    text = " ".join(line.strip() for line in str(cause).strip().splitlines())
    return f"{type(cause).__name__}: {text[:500]}"


def provenance(job: JobSpec, job_id: str | None) -> dict:
    """Where the predictions come from, for the output's ``dataset.json`` ``info``.

    The input, the job's name and id, when it finished, a hash of the whole resolved spec (the spec
    itself is in ``job.json``), and per stage its row-affecting settings (model, weights,
    thresholds...) with the sha256 of every file it read (checkpoints, style images): enough to
    tell two prediction sets apart, and to say which model a label came from.
    """
    spec = dump(job)
    stages = []
    for stage, settings in zip(job.stages, row_affecting(spec)["stages"]):
        files = {}
        for key in path_settings(type(stage)):
            value = getattr(stage, key)
            if isinstance(value, str) and os.path.isfile(value):
                files[key] = {"path": os.path.abspath(value), "sha256": sha256_of(value)}
        stages.append({**settings, "files": files})
    return {
        "source": job.input,
        "job": job.name,
        "job_id": job_id,
        "finished": now(),
        "spec_sha256": hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode("utf-8")).hexdigest(),
        "stages": stages,
    }


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def cancel_on_sigterm():
    """Turn SIGTERM (how Ray stops a submitted job) into JobCancelled, so the record says so.

    Yields a dict whose ``"cancelled"`` flag is set by the signal: Ray Data may wrap the
    exception on its way up, the flag survives that.
    """
    flag = {"cancelled": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["cancelled"] = True
        raise JobCancelled("stopped by SIGTERM (pipeline jobs cancel)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
