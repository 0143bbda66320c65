"""The job's data flow as one streaming Ray Data plan, and the same steps run in this process.

In data-flow order (:func:`build_dataset`)::

    shard paths ──read_shard_rows (tasks)──> image rows (encoded bytes, GT dropped)
                ──decode_batch (tasks)─────> + pixels (RGB, in flight only)
                ──StageActor(stage 1) (actor pool, the stage's num_cpus/num_gpus/pool_size/batch_size)
                ──StageActor(stage N) ...    (the last stage drops pixels)
                ──> the driver's ShardCollector (pipeline.engine.collect)

Each row carries two in-flight columns, ``SHARD`` (which input shard) and ``ROW`` (its index
there), so the driver can regroup rows by shard and drop duplicates from retried tasks.

:func:`run_local` runs the very same steps (reader, decoder, :class:`StageActor` with the same
arguments) in this process, without Ray: training validation uses it inside a Ray Train worker,
where starting actor pools would compete with training for the CPUs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from pipeline import schema
from pipeline.data.decode import decode_batch
from pipeline.data.shards import iter_shard
from pipeline.engine.stage_actor import StageActor
from pipeline.engine.preflight import Plan
from pipeline.engine.resources import StageResources, cluster_shape, resolve_resources

SHARD = "_shard"  # in-flight: index of the input shard a row came from
ROW = "_row"  # in-flight: row index within that shard (the dedup key)
READ_COLUMNS = [schema.IMAGE_ID, schema.FILE_NAME, schema.WIDTH, schema.HEIGHT, schema.IMAGE, schema.ERROR]
READ_SCHEMA = pa.schema([schema.IMAGE_SCHEMA.field(c) for c in READ_COLUMNS])


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


def stage_actor_arguments(plan: Plan, index: int, threads: int | None) -> dict:
    """Constructor arguments of the :class:`StageActor` for stage ``index`` of ``plan``.

    ``threads``: the actor's torch threads when the stage leaves them to the runner (derived from
    the actor's share of the cores); a stage's own ``threads`` / ``num_cpus`` wins.
    """
    job = plan.job
    stage, kwargs = job.stages[index], plan.stage_kwargs[index]
    if "threads" in kwargs and kwargs["threads"] is None:
        kwargs = {**kwargs, "threads": threads}
    return {
        "stage_name": stage.name,
        "stage_cls": stage.stage_class(),
        "stage_kwargs": kwargs,
        "output_columns": stage.output_columns(),
        "drop_columns": (schema.PIXELS,) if index == len(job.stages) - 1 else (),
        "failure_limit": job.stage_failure_limit,
    }


BLOCK_BYTES = 2 * 1024 * 1024  # target size of the plan's blocks (build_dataset)


def build_dataset(plan: Plan, resources: list[StageResources] | None = None):
    """The lazy Ray Data dataset for ``plan``'s pending shards (nothing runs until it is iterated).

    ``resources``: each stage's pool size, CPUs and threads per actor; by default resolved from the
    connected cluster (``pipeline.engine.resources``: what the job leaves unset is derived).
    """
    import ray.data  # late: Ray Data starts its own machinery on import; run_local (validation) never needs it

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
    for i, (stage, res) in enumerate(zip(job.stages, resources)):
        ds = ds.map_batches(
            StageActor,
            fn_constructor_kwargs=stage_actor_arguments(plan, i, res.threads),
            batch_size=stage.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=res.pool_size),
            num_cpus=res.num_cpus,
            num_gpus=stage.num_gpus,
            **({"resources": stage.resources} if stage.resources else {}),
        )
    return ds


def run_local(plan: Plan, *, threads: int | None = None) -> Iterator[pa.Table]:
    """The plan's steps in this process, one stage instance each: batches as the driver would receive them.

    Each stage's rows go through in batches of its ``batch_size``; ``threads`` as in
    :func:`stage_actor_arguments` (None: torch's current setting).
    """
    job = plan.job
    actors = [StageActor(**stage_actor_arguments(plan, i, threads)) for i in range(len(job.stages))]
    for index in plan.pending:
        for table in read_shard_rows(pa.table({"shard_index": [index]}), shards=plan.shards, batch_rows=job.read_batch_rows):
            batch = decode_batch(table, max_pixels=job.decode.max_pixels, exif_transpose=job.decode.exif_transpose)
            for stage, actor in zip(job.stages, actors):
                batch = pa.concat_tables(
                    [actor(batch.slice(start, stage.batch_size)) for start in range(0, batch.num_rows, stage.batch_size)]
                )
            yield batch
