"""``pipeline submit`` and ``pipeline jobs ...``: batch jobs on a Ray cluster through its Job API."""

from __future__ import annotations

import json
import time

import click

from pipeline.cli.common import print_table, user_errors
from pipeline.cli.run import job_options

ADDRESS_HELP = "Ray dashboard / Job API address (default: $RAY_ADDRESS or http://127.0.0.1:8265)."


@click.command()
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False))
@job_options
@click.option("--address", help=ADDRESS_HELP)
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first; equal priorities run in submission order.")
@click.option("--max-running", type=int, default=None, help="Jobs the cluster's coordinator runs at once (only when it is first created; default 1).")
@click.option("--job-id", help="Use this id instead of NAME-TIMESTAMP-XXXX (ids are unique per cluster).")
@click.option("--overwrite", is_flag=True, help="Replace the output's shards (default: resume, skipping finished shards).")
@click.option("--dry-run", is_flag=True, help="Validate and print what would be submitted; submit nothing.")
@click.option("--wait", is_flag=True, help="Follow the job's logs until it ends; exit 1 unless it succeeded.")
@user_errors
def submit(job_file, input_path, output_path, overrides, address, priority, max_running, job_id, overwrite, dry_run, wait) -> None:
    """Submit a job spec to a Ray cluster and print its id (last line).

    The spec is validated here, then sent with this package's code; on the cluster it runs as
    `pipeline run --resume`, so resubmitting a job with the same output skips finished shards.
    """
    from pipeline.coordinator import submit as api

    job_id = api.submit(
        job_file, address=address, input=input_path, output=output_path, overrides=overrides,
        priority=priority, max_running=max_running, job_id=job_id, overwrite=overwrite, dry_run=dry_run,
    )
    if dry_run:
        click.echo(json.dumps(job_id, indent=2))
        return
    click.echo(f"submitted to {api.job_address(address)}; follow with: pipeline jobs logs {job_id} --follow", err=True)
    if wait:
        for chunk in api.follow_logs(job_id, address):
            click.echo(chunk, nl=False, err=True)
        final = api.status(job_id, address)
        click.echo(f"status: {final['status']}", err=True)
        click.echo(job_id)
        if final["status"] != "SUCCEEDED":
            raise SystemExit(1)
        return
    click.echo(job_id)


@click.group()
def jobs() -> None:
    """List, inspect, follow and cancel jobs on a Ray cluster."""


@jobs.command("list")
@click.option("--address", help=ADDRESS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def list_cmd(address, as_json) -> None:
    """Jobs on the cluster, newest first: Ray status, pipeline state, rows done, metrics."""
    from pipeline.coordinator import submit as api

    rows = api.list_jobs(address)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("no jobs")
        return
    keys = ("job_id", "name", "status", "state", "priority", "rows", "started", "elapsed_s", "metrics")
    print_table([tuple(r[k] for k in keys) for r in rows], header=keys)


@jobs.command("status")
@click.argument("job_id")
@click.option("--address", help=ADDRESS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the full last record).")
@user_errors
def status_cmd(job_id, address, as_json) -> None:
    """One job: Ray status, pipeline state, counts, metrics, error."""
    from pipeline.coordinator import submit as api

    row = api.status(job_id, address)
    if as_json:
        click.echo(json.dumps(row, indent=2, default=str))
        return
    shown = {k: v for k, v in row.items() if k not in ("record", "summary") and v not in (None, "")}
    shown.update({k: v for k, v in row["summary"].items() if k not in ("job",)})
    width = max(len(k) for k in shown)
    for key, value in shown.items():
        click.echo(f"{key.ljust(width)}  {value}")


@jobs.command("logs")
@click.argument("job_id")
@click.option("--address", help=ADDRESS_HELP)
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@user_errors
def logs_cmd(job_id, address, follow) -> None:
    """The job driver's output (progress, records, errors)."""
    from pipeline.coordinator import submit as api

    if follow:
        for chunk in api.follow_logs(job_id, address):
            click.echo(chunk, nl=False)
    else:
        click.echo(api.logs(job_id, address), nl=False)


@jobs.command("cancel")
@click.argument("job_id")
@click.option("--address", help=ADDRESS_HELP)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the job has stopped.")
@user_errors
def cancel_cmd(job_id, address, wait) -> None:
    """Stop a job; the shards it finished stay valid (resume with pipeline run --resume)."""
    from pipeline.coordinator import submit as api

    if not api.cancel(job_id, address):
        click.echo(f"{job_id} had already ended: {api.ray_status(job_id, address)}")
        return
    while wait and (status := api.ray_status(job_id, address)) not in api.TERMINAL:
        time.sleep(1)
    click.echo(f"{job_id}: {status if wait else 'stop requested'}")
