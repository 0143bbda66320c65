"""Run a job: preflight -> Ray -> stream shards through the stages -> write -> evaluate -> record.

:func:`run_job` reads as that data flow; each step lives in its own module:

* :mod:`pipeline.engine.preflight` -- every check before Ray starts; the :class:`Plan` (shards,
  rows, stage arguments, shards a resumed run keeps);
* :mod:`pipeline.engine.ray_session` -- join the cluster or start embedded local Ray;
* :mod:`pipeline.engine.stream` -- the streaming Ray Data plan (read -> decode -> stage actors);
* :mod:`pipeline.engine.collect` -- the driver regroups rows by input shard and writes each once;
* :mod:`pipeline.eval` -- COCO metrics when the input has ground truth;
* :mod:`pipeline.engine.job_record` -- ``OUTPUT/job.json`` (spec, state, timings, counts, metrics),
  written when the job starts and rewritten when it ends; ``on_event`` lets a caller (the cluster
  coordinator) follow the same states and the progress in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.config.load import dump
from pipeline.config.spec import JobSpec
from pipeline.data.info import dataset_info
from pipeline.data.shards import DatasetMeta, resolve, write_meta
from pipeline.engine.collect import ShardCollector, count_finished, unmapped_warning
from pipeline.engine.preflight import Plan, existing_outputs, preflight
from pipeline.engine.ray_session import ensure_ray
from pipeline.engine.job_record import JobCancelled, cancel_on_sigterm, emitter, error_message, now, provenance
from pipeline.engine.resources import cluster_shape, resolve_resources
from pipeline.engine.stream import build_dataset, run_local
from pipeline.eval import evaluate
from pipeline.eval.iou_types import get_iou_type, iou_types_for_columns

__all__ = ["JobError", "RayStartError", "error_message", "execute", "preflight", "run_job"]


class JobError(RuntimeError):
    pass


class RayStartError(JobError):
    """Ray could not be started or joined: no work was done."""


def run_job(
    job: JobSpec,
    *,
    source: str = "<spec>",
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    job_id: str | None = None,
    admit: Callable[[dict], None] | None = None,
    on_event: Callable[[str, dict], None] | None = None,
) -> dict:
    """Run ``job`` to completion and return its summary (also in OUTPUT/job.json).

    ``admit(record)``, if given, blocks until the job may start (the cluster coordinator's queue).
    ``on_event(state, record)`` sees ``queued``, ``running``, ``progress`` (as shards finish) and the
    final state (``succeeded``, ``failed``, ``cancelled``), each with the record so far.
    """
    plan = preflight(job, source, overwrite=overwrite, resume=resume)
    if overwrite:
        _remove_outputs(job.output)
    record = {
        "job_id": job_id,
        "name": job.name,
        "state": "queued",
        "started": None,
        "finished": None,
        "output": job.output,
        "shards": len(plan.shards),
        "shards_skipped": len(plan.finished),
        "rows_in": sum(plan.rows_per_shard),
        "spec": dump(job),
    }
    emit = emitter(job, record, on_event)
    started = time.time()
    started_ray = False
    stop = {"cancelled": False}
    try:
        try:
            started_ray = ensure_ray(job)
        except Exception as exc:  # noqa: BLE001 - whatever ray.init raises, no work was done
            raise RayStartError(f"Ray did not start ({error_message(exc)})") from exc
        with cancel_on_sigterm() as stop:  # after ray.init, which installs a SIGTERM handler of its own
            if admit is not None:
                emit("queued")
                admit(record)
            started = time.time()
            emit("running", started=now())
            summary = execute(plan, progress=progress, on_shard=lambda done, rows: emit("progress", shards_done=done, rows_done=rows))
            write_meta(job.output, DatasetMeta(categories=plan.categories, info=provenance(job, job_id), kind="predictions"))
            summary.update(evaluate_output(job))
            # Reported before Ray shuts down: the coordinator is reached through this connection.
            emit("succeeded", summary=summary, finished=now(), elapsed_s=round(time.time() - started, 3))
    except BaseException as exc:
        cancelled = stop["cancelled"] or isinstance(exc, (JobCancelled, KeyboardInterrupt))
        state = "cancelled" if cancelled else "failed"
        emit(state, error=error_message(exc), finished=now(), elapsed_s=round(time.time() - started, 3))
        raise
    finally:
        if started_ray:
            import ray  # late: only a job that started Ray stops it; ray_session imported it already

            ray.shutdown()
    return summary


def execute(
    plan: Plan, *, progress: bool = True, on_shard: Callable[[int, int], None] | None = None, local: bool = False
) -> dict:
    """Stream the plan's pending shards through the stages and write them; returns the run's counts.

    ``on_shard(shards_done, rows_done)`` is called after each shard is written (skipped ones count
    as done). Rows of skipped shards are counted from the output files, so ``rows_out`` always
    covers the whole output. ``local``: the same steps in this process, without Ray
    (:func:`pipeline.engine.stream.run_local`; training validation).
    """
    job = plan.job
    rows_in = sum(plan.rows_per_shard)
    skipped_rows, skipped_errors = count_finished(plan)
    collector = ShardCollector(plan)
    started = time.time()
    resources = None if local else resolve_resources(job, *cluster_shape())
    with _progress(rows_in, job.name, progress) as bar:
        bar.update(skipped_rows)
        if plan.pending:
            batches = run_local(plan) if local else build_dataset(plan, resources).iter_batches(batch_size=None, batch_format="pyarrow")
            for batch in batches:
                written = len(collector.done)
                bar.update(collector.add(batch))
                bar.set_postfix(errors=collector.error_rows, shards=f"{len(collector.done) + len(plan.finished)}/{len(plan.shards)}")
                if on_shard is not None and len(collector.done) > written:
                    on_shard(len(collector.done) + len(plan.finished), collector.rows_out + skipped_rows)
    wall = time.time() - started
    missing = [i for i in plan.pending if i not in collector.done]
    if missing:
        raise JobError(f"{len(missing)} shard(s) did not complete: {', '.join(plan.shards[i] for i in missing[:5])}")
    return {
        "job": job.name,
        "rows_in": rows_in,
        "rows_out": collector.rows_out + skipped_rows,
        "error_rows": collector.error_rows + skipped_errors,
        "shards": len(plan.shards),
        "shards_skipped": len(plan.finished),
        "images_per_s": round(collector.rows_out / wall, 3) if wall > 0 else None,
        "wall_s": round(wall, 3),
        "actors": "in this process" if local else "; ".join(f"{s.name}: {r.describe()}" for s, r in zip(job.stages, resources)),
        **unmapped_warning(plan, collector),
    }


def evaluate_output(job: JobSpec) -> dict:
    """Metrics of the output against the input's ground truth, for the types it has ground truth for.

    Annotations are ground truth for every type. Without them, a type is evaluated only if the
    input holds ground truth of its own kind (:meth:`IoUType.has_own_ground_truth`, as
    :func:`~pipeline.eval.evaluate` decides it): ``semantic`` with label maps (``label_map``, e.g.
    ``pipeline data import-images --labels``). Writes ``metrics.json`` and PR-curve PNGs into the
    output folder (format of ``pipeline eval``) and returns each type's headline number for the
    summary: ``{"bbox_AP": ..., "semantic_mIoU": ...}`` (the first of its ``stat_keys``).
    """
    iou_types = metric_types(job)
    if iou_types and dataset_info(job.input)["annotations"] == 0:
        from pipeline.eval.groundtruth import load_ground_truth  # late: only an input without annotations needs it
        from pipeline.eval.params import EvalInputError

        try:
            ground = load_ground_truth(job.input, segm=False, keypoints=False)  # ids and sizes: nothing else to load
        except EvalInputError:  # shards without an annotations column: no ground truth of any kind
            return {}
        iou_types = [t for t in iou_types if get_iou_type(t).has_own_ground_truth(ground)]
    if not iou_types:
        return {}
    metrics = evaluate([job.output], job.input, iou_types, out_dir=job.output)
    headline = {t: get_iou_type(t).stat_keys[0] for t in iou_types}
    return {f"{t}_{key}": round(metrics[t][key], 4) for t, key in headline.items() if metrics[t][key] is not None}


def metric_types(job: JobSpec) -> list[str]:
    """IoU types to evaluate: the spec's list, or (auto) those matching what the stages write."""
    if job.metrics != "auto":
        return list(job.metrics)
    return iou_types_for_columns({column for stage in job.stages for column in stage.output_columns()})


def _remove_outputs(output: str) -> None:
    for shard in existing_outputs(output):
        fs, p = resolve(shard)
        fs.delete_file(p)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm  # late: tqdm's import is slow and a job without progress never needs it

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)
