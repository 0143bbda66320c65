"""Run a job: read shards -> decode -> stages -> write prediction shards, as one streaming Ray Data plan.

The plan, in data-flow order (``build_plan``)::

    shard paths ──read_shard_rows (tasks)──> image rows (encoded bytes, GT dropped)
                ──decode_batch (tasks)─────> + pixels (RGB, in flight only)
                ──StageActor(stage 1) (actor pool, the stage's num_cpus/num_gpus/pool_size/batch_size)
                ──StageActor(stage N) ...    (the last stage drops pixels)
                ──> driver: rows regrouped by input shard, each shard written once, atomically

Why the driver writes: output shard ``OUT/part-00007.parquet`` holds exactly the rows of input
shard ``part-00007.parquet``, deduplicated by their row index, so names are deterministic, a row
is never written twice even if Ray retries a task or restarts an actor, and finished shards are
skipped on resume (``resume=True``: a shard whose output exists whole, with all its rows and this
job's stamp, is not read; see ``_finished_shards``).
Only prediction columns travel to the driver (no pixels, no image bytes).

The job's record, ``OUTPUT/job.json`` (spec, state, timings, counts, metrics), is written when the
job starts and rewritten when it ends (succeeded / failed / cancelled); ``on_event`` lets a caller
(the cluster coordinator) follow the same states and the progress in between.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.config.load import ConfigError, dump, missing_files, path_settings
from pipeline.config.paths import sha256_of
from pipeline.config.spec import JobSpec, StageSpec
from pipeline.data.decode import decode_batch
from pipeline.data.importers import IMAGE_EXTENSIONS
from pipeline.data.info import dataset_info
from pipeline.data.shards import (
    DatasetError,
    DatasetMeta,
    check_shard,
    iter_shard,
    join,
    list_shards,
    publish_bytes,
    read_meta,
    read_shard,
    resolve,
    shard_rows,
    write_meta,
    write_shard,
)
from pipeline.engine.actor import StageActor
from pipeline.engine.resources import StageResources, cluster_shape, resolve_resources

JOB_JSON = "job.json"
SHARD = "_shard"  # in-flight: index of the input shard a row came from
ROW = "_row"  # in-flight: row index within that shard (the dedup key)
READ_COLUMNS = [schema.IMAGE_ID, schema.FILE_NAME, schema.WIDTH, schema.HEIGHT, schema.IMAGE, schema.ERROR]
READ_SCHEMA = pa.schema([schema.IMAGE_SCHEMA.field(c) for c in READ_COLUMNS])


class JobError(RuntimeError):
    pass


class RayStartError(JobError):
    """Ray could not be started or joined: the job processed nothing (rerun as is, no --resume)."""


class JobCancelled(RuntimeError):
    """Raised in the driver when the job is stopped (SIGTERM from ``pipeline jobs cancel``)."""

# Spec keys that change how fast a job runs but not what it writes: a resumed run may differ in them.
RESOURCE_KEYS = StageSpec.resource_keys()


@dataclass
class Plan:
    """What preflight found: the shards to process and the metadata that travels with them."""

    job: JobSpec
    shards: list[str]
    rows_per_shard: list[int]
    meta: DatasetMeta
    stage_kwargs: list[dict] = field(default_factory=list)
    finished: set[int] = field(default_factory=set)  # shards already in the output (resume)
    model_categories: list[dict] | None = None  # [{"label", "name"}] of the first stage whose weights name them

    @property
    def categories(self) -> list[dict]:
        """The output's categories: the input's, or else the model's (``category_ids`` are then its labels)."""
        if self.meta.categories or not self.model_categories:
            return self.meta.categories
        return [{"id": c["label"], "name": c["name"]} for c in self.model_categories]

    @property
    def pending(self) -> list[int]:
        return [i for i in range(len(self.shards)) if i not in self.finished]


def preflight(job: JobSpec, source: str, *, overwrite: bool = False, resume: bool = False) -> Plan:
    """Every check that can fail before Ray starts or any image is read.

    ``resume``: output shards that exist with all their rows are kept and not recomputed, provided
    the output was written by the same stages (resource keys aside); anything else is refused.
    An existing file counts as finished only if ``check_shard`` accepts it (``_finished_shards``);
    any other file under a shard's name is rewritten.
    """
    try:
        shards = list_shards(job.input)
    except DatasetError as exc:
        raise ConfigError(f"{source}: input: {exc}{_import_hint(job.input)}") from exc
    meta = read_meta(job.input)
    for i, stage in enumerate(job.stages):
        missing = missing_files(stage, Path(source).parent if os.path.isfile(source) else None)
        if missing:
            raise ConfigError(f"{source}: stages.{i} ({stage.name}).{missing[0]}")
        try:
            stage.preflight()
        except Exception as exc:  # noqa: BLE001 - weights/model problems are reported as config errors
            raise ConfigError(f"{source}: stages.{i} ({stage.name}): {exc}") from exc
    existing = _existing_outputs(job.output)
    if existing and not (overwrite or resume):
        raise ConfigError(
            f"{source}: output: {job.output} already holds {len(existing)} shard(s); "
            "pass --resume to continue that run, --overwrite to replace it, or choose another --output"
        )
    rows = [shard_rows(s) for s in shards]
    plan = Plan(job, shards, rows, meta, [s.stage_kwargs(meta.categories) for s in job.stages])
    plan.model_categories = next((c for c in (s.model_categories() for s in job.stages) if c), None)
    if resume and existing and not overwrite:
        _check_same_work(job, source)
        plan.finished = _finished_shards(job, shards, rows, existing)
    return plan


def _import_hint(path: str) -> str:
    """A folder of image files given as --input: say how to make it a dataset."""
    if "://" in path or not os.path.isdir(path):
        return ""
    for entry in os.scandir(path):
        if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            return (
                f"; {path} holds image files, not a dataset of shards: import it first with "
                f"`pipeline data import-images {path} DATASET`, then pass --input DATASET"
            )
    return ""


def row_affecting(spec: dict) -> dict:
    """The parts of a dumped spec that decide the output rows (what resume compares)."""
    stages = [{k: v for k, v in stage.items() if k not in RESOURCE_KEYS} for stage in spec.get("stages", [])]
    return {"input": spec.get("input"), "decode": {k: v for k, v in spec.get("decode", {}).items() if k not in ("batch_size", "num_cpus")}, "stages": stages}


def _check_same_work(job: JobSpec, source: str) -> None:
    previous = read_record(job.output)
    if previous is None or "spec" not in previous:
        return  # shards without a record (e.g. copied by hand): their row counts were checked
    before, now = row_affecting(previous["spec"]), row_affecting(dump(job))
    if before != now:
        diffs = _diff(before, now)
        raise ConfigError(
            f"{source}: --resume: {job.output} was written by a different job "
            f"({'; '.join(diffs[:3])}); use --overwrite or another --output"
        )


def _diff(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _diff(a.get(k), b.get(k), f"{where}.{k}".lstrip("."))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{where}.{i}")]
    return [] if a == b else [f"{where}: {a!r} then, {b!r} now"]


def _existing_outputs(output: str) -> list[str]:
    try:
        return list_shards(output)
    except DatasetError:
        return []


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
        "finished": _now(),
        "spec_sha256": hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode("utf-8")).hexdigest(),
        "stages": stages,
    }


def job_fingerprint(job: JobSpec) -> str:
    """Hash of the row-affecting settings (``row_affecting``): equal for runs that write the same rows."""
    text = json.dumps(row_affecting(dump(job)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def shard_stamp(fingerprint: str, name: str) -> dict:
    """What an output shard carries in its Parquet metadata: which job wrote it, for which input shard."""
    return {"job": fingerprint, "shard": name}


def _finished_shards(job: JobSpec, shards: list[str], rows: list[int], existing: list[str]) -> set[int]:
    """Indices of input shards whose output a resumed run keeps.

    Kept: a readable Parquet file at the shard's name, with the input shard's row count and this
    job's stamp for this shard name (``check_shard``; only footers are read). Anything else under
    that name (truncated or foreign bytes, a shard of another job or another shard's copy, an
    older version's unstamped file) is rewritten by the run, and said so here.
    """
    fingerprint = job_fingerprint(job)
    present = {posixpath.basename(p): p for p in existing}
    finished = set()
    for i, shard in enumerate(shards):
        name = posixpath.basename(shard)
        if name not in present:
            continue
        why = check_shard(present[name], rows=rows[i], stamp=shard_stamp(fingerprint, name))
        if why is None:
            finished.add(i)
        else:
            print(f"--resume: {name} in {job.output} is not a finished shard of this job ({why}); it is rewritten", flush=True)
    return finished


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


BLOCK_BYTES = 2 * 1024 * 1024  # target size of the plan's blocks (build_plan)


def build_plan(plan: Plan, resources: list[StageResources] | None = None):
    """The lazy Ray Data dataset for ``plan`` (nothing runs until it is iterated).

    ``resources``: each stage's pool size, CPUs and threads per actor; by default resolved from the
    connected cluster (``pipeline.engine.resources``: what the job leaves unset is derived).
    """
    import ray.data

    job = plan.job
    if resources is None:
        resources = resolve_resources(job, *cluster_shape())
    pending = plan.pending
    ds = ray.data.from_items([{"shard_index": i} for i in pending], override_num_blocks=len(pending))
    # Small blocks (this dataset's context only): Ray Data merges a task's outputs into blocks of up
    # to 128 MiB, so a shard of a few hundred decoded 320 px images (300 KB each) reached the actor
    # pool as ONE block and only one actor of the pool got work. Blocks of ~2 MiB (about 7 such
    # images, or one photo) spread the rows over the pool; rows are regrouped by shard at the end.
    ds.context.target_max_block_size = BLOCK_BYTES
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
    for i, (stage, kwargs, res) in enumerate(zip(job.stages, plan.stage_kwargs, resources)):
        last = i == len(job.stages) - 1
        if "threads" in kwargs and kwargs["threads"] is None:
            kwargs = {**kwargs, "threads": res.threads}  # derived: the actor's share of the cores
        ds = ds.map_batches(
            StageActor,
            fn_constructor_kwargs={
                "stage_name": stage.name,
                "stage_cls": stage.stage_class(),
                "stage_kwargs": kwargs,
                "output_columns": stage.output_columns(),
                "drop_columns": (schema.PIXELS,) if last else (),
                "failure_limit": job.stage_failure_limit,
            },
            batch_size=stage.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=res.pool_size),
            num_cpus=res.num_cpus,
            num_gpus=stage.num_gpus,
            **({"resources": stage.resources} if stage.resources else {}),
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
        self.boxes = self.unmapped_boxes = 0  # category_ids values, and those that are -1
        self.fingerprint = job_fingerprint(plan.job)  # stamped into each shard, checked on --resume

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
        write_shard(join(self.plan.job.output, name), table, stamp=shard_stamp(self.fingerprint, name))
        self.done.add(index)
        self.rows_out += table.num_rows
        self.error_rows += table.num_rows - table[schema.ERROR].null_count
        for column in (c for c in table.column_names if c.endswith(schema.CATEGORY_IDS)):
            ids = pc.list_flatten(table[column])
            self.boxes += len(ids)
            self.unmapped_boxes += pc.sum(pc.equal(ids, -1)).as_py() or 0


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
    emit = _emitter(job, record, on_event)
    started = time.time()
    started_ray = False
    stop = {"cancelled": False}
    try:
        try:
            started_ray = _ensure_ray(job)
        except Exception as exc:  # noqa: BLE001 - whatever ray.init raises, no work was done
            raise RayStartError(f"Ray did not start ({error_message(exc)})") from exc
        with _cancel_on_sigterm() as stop:  # after ray.init, which installs a SIGTERM handler of its own
            if admit is not None:
                emit("queued")
                admit(record)
            started = time.time()
            emit("running", started=_now())
            summary = execute(plan, progress=progress, on_shard=lambda done, rows: emit("progress", shards_done=done, rows_done=rows))
            write_meta(
                job.output,
                DatasetMeta(
                    categories=plan.categories,
                    info=provenance(job, job_id),
                    kind="predictions",
                ),
            )
            summary.update(evaluate_output(job))
            # Reported before Ray shuts down: the coordinator is reached through this connection.
            emit("succeeded", summary=summary, finished=_now(), elapsed_s=round(time.time() - started, 3))
    except BaseException as exc:
        cancelled = stop["cancelled"] or isinstance(exc, (JobCancelled, KeyboardInterrupt))
        state = "cancelled" if cancelled else "failed"
        emit(state, error=error_message(exc), finished=_now(), elapsed_s=round(time.time() - started, 3))
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return summary


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


def _emitter(job: JobSpec, record: dict, on_event) -> Callable[..., None]:
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


def execute(plan: Plan, *, progress: bool = True, on_shard: Callable[[int, int], None] | None = None) -> dict:
    """Stream the plan's pending shards through Ray and write them; returns the run's counts.

    ``on_shard(shards_done, rows_done)`` is called after each shard is written (skipped ones count
    as done). Rows of skipped shards are counted from the output files, so ``rows_out`` always
    covers the whole output.
    """
    job = plan.job
    rows_in = sum(plan.rows_per_shard)
    skipped_rows, skipped_errors = _count_finished(plan)
    collector = ShardCollector(plan)
    started = time.time()
    resources = resolve_resources(job, *cluster_shape())
    with _progress(rows_in, job.name, progress) as bar:
        bar.update(skipped_rows)
        if plan.pending:
            for batch in build_plan(plan, resources).iter_batches(batch_size=None, batch_format="pyarrow"):
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
        "actors": "; ".join(f"{s.name}: {r.describe()}" for s, r in zip(job.stages, resources)),
        **_unmapped_warning(plan, collector),
    }


def _unmapped_warning(plan: Plan, collector: ShardCollector) -> dict:
    """``{"warnings": [...]}`` when most boxes got category -1: the model's classes are not the input's.

    Every box then drops out of exports and evaluation, silently; say so with both name lists.
    """
    if not collector.boxes or collector.unmapped_boxes * 2 <= collector.boxes:
        return {}
    model = ", ".join(c["name"] for c in plan.model_categories or []) or "unnamed labels (weights carry no names)"
    dataset = ", ".join(str(c.get("name")) for c in plan.meta.categories) or "none"
    share = collector.unmapped_boxes / collector.boxes
    return {
        "warnings": [
            f"{collector.unmapped_boxes} of {collector.boxes} boxes ({share:.0%}) map to no category of the input "
            f"(category_ids -1, left out of exports and evaluation). The model's categories: {model}; the input's: "
            f"{dataset}. Set the stage's category_map (by_name, identity, or {{label: category_id}}) if they correspond."
        ]
    }


def _count_finished(plan: Plan) -> tuple[int, int]:
    """(rows, error rows) of the output shards a resumed run keeps."""
    rows = errors = 0
    for i in sorted(plan.finished):
        path = join(plan.job.output, posixpath.basename(plan.shards[i]))
        table = read_shard(path, columns=[schema.ERROR])
        rows += table.num_rows
        errors += table.num_rows - table[schema.ERROR].null_count
    return rows, errors


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
    written = {column for stage in job.stages for column in stage.output_columns()}
    by_column = {schema.BOXES: "bbox", schema.MASKS: "segm", schema.KEYPOINTS: "keypoints"}
    return [iou for column, iou in by_column.items() if column in written]


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


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _cancel_on_sigterm():
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
    ctx.raise_original_map_exception = True  # a failed job reports the stage's error, not Ray's wrapper
    log_once("ray_data_progress_manager_disabled")  # mark Ray's "progress bars disabled" notice as shown
    # Ray's INFO lines ("Started a local Ray instance", "execution finished in ...") say nothing the
    # progress bar and the summary do not; warnings and errors still show.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return False
    if job.ray.address:
        # Ship this package's code with the job so cluster workers run the same version as the
        # driver (their Python environment must still have the dependencies installed). A job
        # submitted through the Job API already carries it in its runtime_env.
        import pipeline

        submitted = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        runtime_env = None if submitted else {"py_modules": [os.path.dirname(pipeline.__file__)]}
        ray.init(address=job.ray.address, runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
    else:
        # address="local": always a new embedded instance, never a cluster someone started here.
        ray.init(address="local", num_cpus=job.ray.num_cpus, include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    return True


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)
