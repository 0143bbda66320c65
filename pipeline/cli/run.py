"""``pipeline run``: run a job spec on embedded Ray or an existing cluster."""

from __future__ import annotations

import json

import click

from pipeline.cli.common import print_table, user_errors


@click.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--input", "input_path", help="Input dataset (overrides the spec's input).")
@click.option("--output", "output_path", help="Output folder (overrides the spec's output).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec key, e.g. stages.detect.score_threshold=0.3 (repeatable).")
@click.option("--address", help="Join this Ray cluster (e.g. auto, 127.0.0.1:6379) instead of embedded local Ray.")
@click.option("--overwrite", is_flag=True, help="Replace shards already in the output folder.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs, CI).")
@click.option("--dry-run", is_flag=True, help="Validate the spec and print it resolved; run nothing.")
@user_errors
def run(job_file, input_path, output_path, overrides, address, overwrite, no_progress, dry_run) -> None:
    """Run a job spec: read shards, decode, run stages, write predictions.

    JOB_FILE is a YAML job spec (see jobs/README.md).
    """
    from pipeline.config.load import dump, load_job

    extra = list(overrides) + ([f"ray.address={address}"] if address else [])
    job = load_job(job_file, overrides=extra, input=input_path, output=output_path)
    if dry_run:
        click.echo(json.dumps(dump(job), indent=2))
        return
    from pipeline.engine.runner import run_job

    summary = run_job(job, source=job_file, overwrite=overwrite, progress=not no_progress)
    click.echo("")
    print_table([(k, v) for k, v in summary.items()])
    click.echo(f"predictions: {job.output}  (summary and resolved spec in {job.output.rstrip('/')}/job.json)")
