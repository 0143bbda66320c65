"""``pipeline run``: run a job spec on embedded Ray or an existing cluster."""

from __future__ import annotations

import json

import click

from pipeline.cli.common import filtered_stderr, print_table, user_errors


def job_options(fn):
    """Options ``run`` and ``submit`` share: what to run on, and spec overrides."""
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec key, e.g. stages.detect.score_threshold=0.3 (repeatable).")(fn)
    fn = click.option("--output", "output_path", help="Output folder (overrides the spec's output).")(fn)
    fn = click.option("--input", "input_path", help="Input dataset (overrides the spec's input).")(fn)
    return fn


@click.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@job_options
@click.option("--address", help="Join this Ray cluster (e.g. auto, 127.0.0.1:6379) instead of embedded local Ray; the job then waits for the cluster's coordinator to admit it.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run: keep the output shards already written, do the rest.")
@click.option("--overwrite", is_flag=True, help="Replace shards already in the output folder.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs, CI).")
@click.option("--dry-run", is_flag=True, help="Print the resolved spec and run every check a real run makes first (input, weights, output); run nothing.")
@click.option("--job-id", help="Record the run under this id (set by pipeline submit).")
@click.option("--priority", type=int, default=0, show_default=True, help="Queue priority on a cluster (higher runs first).")
@click.option("--max-running", type=int, default=1, show_default=True, help="Jobs a new cluster coordinator runs at once (used when it is first created).")
@user_errors
def run(job_file, input_path, output_path, overrides, address, resume, overwrite, no_progress, dry_run, job_id, priority, max_running) -> None:
    """Run a job spec: read shards, decode, run stages, write predictions.

    JOB_FILE is a YAML job spec (see jobs/README.md).
    """
    from pipeline.config.load import ConfigError, dump
    from pipeline.engine.jobfile import load_job

    extra = list(overrides) + ([f"ray.address={address}"] if address else [])
    job = load_job(job_file, overrides=extra, input=input_path, output=output_path)
    from pipeline.engine.preflight import preflight
    from pipeline.engine.job_record import error_message
    from pipeline.engine.runner import RayStartError, run_job

    if dry_run:  # everything a real run checks before it starts Ray, then stop
        click.echo(json.dumps(dump(job), indent=2))
        plan = preflight(job, job_file, overwrite=overwrite, resume=resume)
        click.echo(
            f"dry run: preflight passed; {len(plan.pending)} of {len(plan.shards)} shard(s) "
            f"({sum(plan.rows_per_shard[i] for i in plan.pending)} rows) would be processed into {job.output}",
            err=True,
        )
        return

    cluster = None
    if job.ray.address:  # on a cluster, jobs queue through the coordinator and report to it
        from pipeline.coordinator.job_driver import ClusterJob
        from pipeline.coordinator.submit import new_job_id

        job_id = job_id or new_job_id(job.name)
        cluster = ClusterJob(job_id, priority=priority, max_running=max_running)
    try:
        with filtered_stderr():
            summary = run_job(
                job,
                source=job_file,
                overwrite=overwrite,
                resume=resume,
                progress=not no_progress,
                job_id=job_id,
                admit=cluster.admit if cluster else None,
                on_event=cluster.on_event if cluster else None,
            )
    except ConfigError:
        raise  # a spec problem found at preflight: user_errors prints it
    except RayStartError as exc:
        check = (
            f"check that the cluster at {job.ray.address} is up (--address, RAY_ADDRESS)"
            if job.ray.address
            else "check that Ray can start here (free memory, a writable temporary folder: RAY_TMPDIR)"
        )
        raise click.ClickException(
            f"job {job.name} failed: {exc}; no image was processed and no shard written: {check}, then rerun the same command"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a failed job: one clear line, finished shards kept
        raise click.ClickException(
            f"job {job.name} failed: {error_message(exc)}\n"
            f"finished shards are kept in {job.output}; fix the cause and rerun with --resume"
        ) from exc
    click.echo("")
    warnings = summary.pop("warnings", [])
    actors = summary.pop("actors", None)  # a sentence, not a number: below the table
    print_table([(k, v) for k, v in summary.items()])
    if actors:
        click.echo(f"actors          {actors}")
    for line in warnings:
        click.echo(f"warning: {line}", err=True)
    click.echo(f"predictions: {job.output}  (summary and resolved spec in {job.output.rstrip('/')}/job.json)")

