"""The user's side of cluster jobs: submit, list, status, logs, cancel through Ray's Job API.

Only the dashboard's HTTP address is needed (``http://HEAD:8265``; ``RAY_ADDRESS`` by default).
A submission validates the spec here first (a bad config never reaches the cluster), then ships
the resolved spec (``job.yaml``) as the job's working_dir and this package as a py_module, so
the cluster runs exactly the code and spec that were checked. The entrypoint is

    python -m pipeline run job.yaml --address auto --resume --job-id ID --priority P --no-progress

``--resume`` makes a resubmitted or restarted job skip the shards it already wrote.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shlex
import tempfile
import time

import yaml

import pipeline
from pipeline.config.load import dump
from pipeline.coordinator.job_driver import last_record
from pipeline.engine.jobfile import load_job

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60  # how long a submission waits for a freshly started cluster's job agent


class SubmitError(RuntimeError):
    """The cluster could not be reached or refused a request; the message says which and why."""


def job_address(address: str | None) -> str:
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = job_address(address)
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection errors come in many types
        how = (
            "set --address (or RAY_ADDRESS) to the cluster's dashboard, e.g. http://HEAD:8265"
            if address == DEFAULT_ADDRESS
            else "check the address and that the cluster's dashboard is up"
        )
        raise SubmitError(
            f"cannot reach the Ray Job API at {address} ({exc}). No cluster answers there: {how}, or start one "
            "(`ray start --head --dashboard-host 127.0.0.1` here, or docker-compose up / KubeRay: see the README's "
            "'Run on a cluster'). A job can also run without a cluster: pipeline run JOB.yaml"
        ) from None


def new_job_id(name: str) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40]
    return f"{safe}-{stamp}-{secrets.token_hex(2)}"


def submit(
    job_file: str,
    *,
    address: str | None = None,
    input: str | None = None,
    output: str | None = None,
    overrides: list[str] = (),
    priority: int = 0,
    max_running: int | None = None,
    job_id: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
) -> str | dict:
    """Validate the spec, submit it, return the job id (the Ray submission id).

    ``overwrite`` replaces the output's shards instead of resuming; ``dry_run`` returns what would
    be submitted (``{"entrypoint", "spec", "metadata"}``) without contacting the cluster.
    """
    job = load_job(job_file, overrides=list(overrides), input=input, output=output)
    spec = dump(job)
    spec["ray"]["address"] = None  # the entrypoint says --address auto
    job_id = job_id or new_job_id(job.name)
    workdir = tempfile.mkdtemp(prefix="pipeline-submit-")
    with open(os.path.join(workdir, "job.yaml"), "w", encoding="utf-8") as f:
        f.write(f"# resolved from {job_file} by pipeline submit\n")
        yaml.safe_dump(spec, f, sort_keys=False)
    command = ["python", "-m", "pipeline", "run", "job.yaml", "--address", "auto",
               "--overwrite" if overwrite else "--resume", "--no-progress", "--job-id", job_id, "--priority", str(priority)]
    if max_running is not None:
        command += ["--max-running", str(max_running)]
    runtime_env = {
        "working_dir": workdir,
        "py_modules": [os.path.dirname(pipeline.__file__)],
        "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"},
    }
    metadata = {"pipeline_job": job.name, "priority": str(priority), "input": job.input, "output": job.output}
    if dry_run:
        return {"entrypoint": shlex.join(command), "spec": spec, "metadata": metadata}
    c = client(address)
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            return c.submit_job(entrypoint=shlex.join(command), submission_id=job_id, runtime_env=runtime_env, metadata=metadata)
        except Exception as exc:  # noqa: BLE001
            # A cluster that just started answers "No available agent" until its job agent is up.
            if "No available agent" in str(exc) and time.time() < deadline:
                time.sleep(2)
                continue
            raise SubmitError(f"submission to {job_address(address)} failed: {exc}") from None


def list_jobs(address: str | None = None) -> list[dict]:
    """Jobs of the cluster (ours and others), newest first, with their last reported record."""
    c = client(address)
    rows = []
    for info in sorted(c.list_jobs(), key=lambda i: i.start_time or 0, reverse=True):
        if not info.submission_id:
            continue  # drivers started by hand have no logs through the Job API
        record = last_record(_logs(c, info.submission_id)) if info.metadata.get("pipeline_job") else None
        rows.append(_row(info, record))
    return rows


def status(job_id: str, address: str | None = None) -> dict:
    c = client(address)
    info = _info(c, job_id)
    return _row(info, last_record(_logs(c, job_id)), full=True)


def ray_status(job_id: str, address: str | None = None) -> str:
    """Ray's status of the job (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), without its logs."""
    return _status(_info(client(address), job_id))


def logs(job_id: str, address: str | None = None) -> str:
    c = client(address)
    _info(c, job_id)
    return _logs(c, job_id)


def follow_logs(job_id: str, address: str | None = None):
    """Yield log text as the job writes it, until the job ends."""
    import asyncio

    c = client(address)
    _info(c, job_id)
    loop = asyncio.new_event_loop()
    try:
        agen = c.tail_job_logs(job_id)
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def cancel(job_id: str, address: str | None = None) -> bool:
    """Stop the job's driver (SIGTERM, then SIGKILL after Ray's grace period)."""
    c = client(address)
    info = _info(c, job_id)
    if _status(info) in TERMINAL:
        return False
    return bool(c.stop_job(job_id))


def _status(info) -> str:
    return str(info.status).split(".")[-1]  # "SUCCEEDED" whether Ray prints the enum's name or value


def _info(c, job_id: str):
    try:
        return c.get_job_info(job_id)
    except Exception as exc:  # noqa: BLE001
        raise SubmitError(f"no job {job_id!r} on this cluster ({exc})") from None


def _logs(c, job_id: str) -> str:
    try:
        return c.get_job_logs(job_id)
    except Exception:  # noqa: BLE001 - a job that never started has no logs yet
        return ""


def _row(info, record: dict | None, full: bool = False) -> dict:
    record = record or {}
    summary = record.get("summary") or {}
    row = {
        "job_id": info.submission_id,
        "name": info.metadata.get("pipeline_job", info.entrypoint[:40]),
        "status": _status(info),
        "state": record.get("state", "-"),
        "priority": info.metadata.get("priority", "-"),
        "rows": f"{record.get('rows_done', summary.get('rows_out', 0)) or 0}/{record.get('rows_in', '?')}",
        "started": _time(info.start_time),
        "elapsed_s": round(((info.end_time or _ms_now()) - info.start_time) / 1000, 1) if info.start_time else None,
    }
    metrics = {k: v for k, v in summary.items() if k.endswith("_AP")}
    row["metrics"] = " ".join(f"{k}={v}" for k, v in metrics.items()) or "-"
    if full:
        row.update(
            message=(info.message or "").strip().splitlines()[0][:200] if info.message else "",
            input=info.metadata.get("input"),
            output=info.metadata.get("output"),
            error=record.get("error"),
            summary=summary,
            record=record,
        )
    return row


def _time(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _ms_now() -> int:
    return int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
