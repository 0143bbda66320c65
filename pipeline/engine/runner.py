"""Run a job: read shards -> decode -> stages -> write prediction shards, as one streaming Ray Data plan.

The plan, in data-flow order (``build_plan``)::

    shard paths ──read_shard_rows (tasks)──> image rows (encoded bytes, GT dropped)
                ──decode_batch (tasks)─────> + pixels (RGB, in flight only)
                ──StageActor(stage 1) (actor pool, the stage's num_cpus/num_gpus/pool_size/batch_size)
                ──StageActor(stage N) ...    (the last stage drops pixels)
                ──> driver: rows regrouped by input shard, each shard written once, atomically

Why the driver writes: output shard ``OUT/part-00007.parquet`` holds exactly the rows of input
shard ``part-00007.parquet``, deduplicated by their row index, so names are deterministic, a row
is never written twice even if Ray retries a task, and finished shards can be skipped on resume.
Only prediction columns travel to the driver (no pixels, no image bytes).
"""

from __future__ import annotations

import datetime as dt
import os
import posixpath
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.config.load import ConfigError, dump
from pipeline.config.spec import JobSpec
from pipeline.data.decode import decode_batch
from pipeline.data.info import dataset_info
from pipeline.data.shards import (
    DatasetError,
    DatasetMeta,
    iter_shard,
    join,
    list_shards,
    read_meta,
    resolve,
    shard_rows,
    write_meta,
    write_shard,
)
from pipeline.engine.actor import StageActor


SHARD = "_shard"  # in-flight: index of the input shard a row came from
ROW = "_row"  # in-flight: row index within that shard (the dedup key)
READ_COLUMNS = [schema.IMAGE_ID, schema.FILE_NAME, schema.WIDTH, schema.HEIGHT, schema.IMAGE, schema.ERROR]
READ_SCHEMA = pa.schema([schema.IMAGE_SCHEMA.field(c) for c in READ_COLUMNS])


class JobError(RuntimeError):
    pass


@dataclass
class Plan:
    """What preflight found: the shards to process and the metadata that travels with them."""

    job: JobSpec
    shards: list[str]
    rows_per_shard: list[int]
    meta: DatasetMeta
    stage_kwargs: list[dict] = field(default_factory=list)


def preflight(job: JobSpec, source: str, *, overwrite: bool = False) -> Plan:
    """Every check that can fail before Ray starts or any image is read."""
    try:
        shards = list_shards(job.input)
    except DatasetError as exc:
        raise ConfigError(f"{source}: input: {exc}") from exc
    meta = read_meta(job.input)
    for i, stage in enumerate(job.stages):
        try:
            stage.preflight()
        except Exception as exc:  # noqa: BLE001 - weights/model problems are reported as config errors
            raise ConfigError(f"{source}: stages.{i} ({stage.name}): {exc}") from exc
    existing = _existing_outputs(job.output)
    if existing and not overwrite:
        raise ConfigError(
            f"{source}: output: {job.output} already holds {len(existing)} shard(s); "
            "choose another --output or pass --overwrite"
        )
    rows = [shard_rows(s) for s in shards]
    return Plan(job, shards, rows, meta, [s.stage_kwargs(meta.categories) for s in job.stages])


def _existing_outputs(output: str) -> list[str]:
    try:
        return list_shards(output)
    except DatasetError:
        return []


def read_shard_rows(batch: pa.Table, *, shards: list[str], batch_rows: int):
    """Ray Data UDF (generator): shard indices -> image rows in tables of ``batch_rows``."""
    for index in batch["shard_index"].to_pylist():
        start = 0
        for table in iter_shard(shards[index], batch_rows, columns=READ_COLUMNS):
            table = schema.conform(table, READ_SCHEMA)
            n = table.num_rows
            yield table.append_column(SHARD, pa.array([index] * n, pa.int32())).append_column(
                ROW, pa.array(range(start, start + n), pa.int64())
            )
            start += n


def build_plan(plan: Plan):
    """The lazy Ray Data dataset for ``plan`` (nothing runs until it is iterated)."""
    import ray.data

    job = plan.job
    ds = ray.data.from_items(
        [{"shard_index": i} for i in range(len(plan.shards))], override_num_blocks=len(plan.shards)
    )
    ds = ds.map_batches(
        read_shard_rows,
        fn_kwargs={"shards": plan.shards, "batch_rows": job.read_batch_rows},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=job.read_num_cpus,
    )
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"max_pixels": job.decode.max_pixels, "exif_transpose": job.decode.exif_transpose},
        batch_size=job.decode.batch_size,
        batch_format="pyarrow",
        num_cpus=job.decode.num_cpus,
    )
    for i, (stage, kwargs) in enumerate(zip(job.stages, plan.stage_kwargs)):
        last = i == len(job.stages) - 1
        ds = ds.map_batches(
            StageActor,
            fn_constructor_kwargs={
                "stage_name": stage.name,
                "stage_cls": stage.stage_class(),
                "stage_kwargs": kwargs,
                "drop_columns": (schema.PIXELS,) if last else (),
            },
            batch_size=stage.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=stage.pool_size),
            num_cpus=stage.num_cpus,
            num_gpus=stage.num_gpus,
        )
    return ds


class ShardCollector:
    """Regroup streamed rows by input shard; write each shard once when all its rows arrived."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.buffers: dict[int, list[pa.Table]] = {}
        self.seen: dict[int, set[int]] = {}
        self.done: set[int] = set()
        self.rows_out = self.error_rows = 0

    def add(self, batch: pa.Table) -> int:
        """Take one streamed batch; returns how many new rows it brought."""
        new_rows = 0
        for index in pc.unique(batch[SHARD]).to_pylist():
            part = batch.filter(pc.equal(batch[SHARD], index))
            seen = self.seen.setdefault(index, set())
            rows = part[ROW].to_pylist()
            fresh = [i for i, r in enumerate(rows) if r not in seen]
            if len(fresh) != len(rows):
                part = part.take(fresh)
            seen.update(rows)
            new_rows += part.num_rows
            self.buffers.setdefault(index, []).append(part)
            if len(seen) == self.plan.rows_per_shard[index]:
                self._write(index)
        return new_rows

    def _write(self, index: int) -> None:
        table = pa.concat_tables(self.buffers.pop(index))
        table = table.sort_by(ROW).drop_columns([SHARD, ROW])
        name = posixpath.basename(self.plan.shards[index])
        write_shard(join(self.plan.job.output, name), table)
        self.done.add(index)
        self.rows_out += table.num_rows
        self.error_rows += table.num_rows - table[schema.ERROR].null_count


def run_job(job: JobSpec, *, source: str = "<spec>", overwrite: bool = False, progress: bool = True) -> dict:
    """Run ``job`` to completion and return its summary (also written to OUTPUT/job.json)."""
    plan = preflight(job, source, overwrite=overwrite)
    if overwrite:
        _remove_outputs(job.output)
    started = time.time()
    started_ray = _ensure_ray(job)
    try:
        summary = execute(plan, progress=progress)
        write_meta(
            job.output,
            DatasetMeta(
                categories=plan.meta.categories,
                info={"source": job.input, "job": job.name, "stages": [s.name for s in job.stages]},
                kind="predictions",
            ),
        )
        summary.update(evaluate_output(job))
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    _write_job_json(job, summary, started)
    return summary


def execute(plan: Plan, *, progress: bool = True) -> dict:
    """Stream the plan through Ray and write every output shard; returns the run's counts."""
    job = plan.job
    rows_in = sum(plan.rows_per_shard)
    collector = ShardCollector(plan)
    started = time.time()
    with _progress(rows_in, job.name, progress) as bar:
        for batch in build_plan(plan).iter_batches(batch_size=None, batch_format="pyarrow"):
            bar.update(collector.add(batch))
            bar.set_postfix(errors=collector.error_rows, shards=f"{len(collector.done)}/{len(plan.shards)}")
    wall = time.time() - started
    missing = [i for i in range(len(plan.shards)) if i not in collector.done]
    if missing:
        raise JobError(f"{len(missing)} shard(s) did not complete: {', '.join(plan.shards[i] for i in missing[:5])}")
    return {
        "job": job.name,
        "rows_in": rows_in,
        "rows_out": collector.rows_out,
        "error_rows": collector.error_rows,
        "shards": len(plan.shards),
        "images_per_s": round(collector.rows_out / wall, 3) if wall > 0 else None,
        "wall_s": round(wall, 3),
    }


def evaluate_output(job: JobSpec) -> dict:
    """COCO metrics of the output against the input's ground truth, if it has any.

    Writes ``metrics.json`` and PR-curve PNGs into the output folder (format of ``pipeline eval``)
    and returns ``{"bbox_AP": ..., ...}`` for the summary.
    """
    iou_types = metric_types(job)
    if not iou_types or dataset_info(job.input)["annotations"] == 0:
        return {}
    from pipeline.eval import evaluate

    metrics = evaluate([job.output], job.input, iou_types, out_dir=job.output)
    return {f"{t}_AP": round(metrics[t]["AP"], 4) for t in iou_types}


def metric_types(job: JobSpec) -> list[str]:
    """IoU types to evaluate: the spec's list, or (auto) those matching what the stages write."""
    if job.metrics != "auto":
        return list(job.metrics)
    from pipeline.stages.chain import output_columns

    written = {column for stage in job.stages for column in output_columns(stage)}
    by_column = {schema.BOXES: "bbox", schema.MASKS: "segm", schema.KEYPOINTS: "keypoints"}
    return [iou for column, iou in by_column.items() if column in written]


def _write_job_json(job: JobSpec, summary: dict, started: float) -> None:
    import json

    fs, root = resolve(job.output)
    record = {
        "summary": summary,
        "started": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
        "spec": dump(job),
    }
    with fs.open_output_stream(posixpath.join(root, "job.json")) as f:
        f.write(json.dumps(record, indent=2).encode("utf-8"))


def _remove_outputs(output: str) -> None:
    for shard in _existing_outputs(output):
        fs, p = resolve(shard)
        fs.delete_file(p)


def _ensure_ray(job: JobSpec) -> bool:
    """Join ``ray.address`` or start embedded local Ray; returns True if we started it."""
    import ray
    from ray.data import DataContext
    from ray.util.debug import log_once

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts images, not blocks
    ctx.print_on_execution_start = False
    log_once("ray_data_progress_manager_disabled")  # mark Ray's "progress bars disabled" notice as shown
    if ray.is_initialized():
        return False
    if job.ray.address:
        # Ship this package's code with the job so cluster workers run the same version as the
        # driver (their Python environment must still have the dependencies installed).
        import pipeline

        runtime_env = {"py_modules": [os.path.dirname(pipeline.__file__)]}
        ray.init(address=job.ray.address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # address="local": always a new embedded instance, never a cluster someone started here.
        ray.init(address="local", num_cpus=job.ray.num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)
