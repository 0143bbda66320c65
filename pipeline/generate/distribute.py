"""Distribute the making of N images over Ray actors and write them as an images dataset.

A *generator* is any object with ``generate(indices, seeds) -> [(pixels, label, extras), ...]``
(RGB uint8 (H, W, 3); ``label`` a dataset category id or None; ``extras`` the values of the
generator's ``extra_columns``, ``{name: arrow type}``, if it declares any), built on each actor by
a picklable ``factory(device=...)``: models load once per actor, not per image. The images are cut into shards of
``rows_per_shard`` (image ``i`` in shard ``i // rows_per_shard``); actors take shards as they
free up and write each shard when it is done, so the driver holds counts, not pixels.

Rows: the images-dataset columns (``image`` as PNG, ``label`` the category id) plus ``seed``
(:data:`pipeline.schema.SEED`), :func:`image_seed` of (``seed``, ``i``) for image ``i``; a generator
must make the same image from the same seed whatever actor or node it runs on. Remade in the same
shard (the same batch), an image is the same to the bit; remade alone, up to the summation order
of batched convolutions (measured: 7% of sub-pixels off by a few grey levels after 60 steps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import schema
from pipeline.data.shards import SHARD_PATTERN, DatasetMeta, join, prepare_output, write_meta, write_shard
from pipeline.data.decode import encode_png

MAX_ROWS_PER_SHARD = 64  # rows_per_shard's default cap: shards finish (and are written) often
GENERATED_SCHEMA = schema.LABEL_IMAGE_SCHEMA.append(pa.field(schema.SEED, schema.SEED_TYPE))


def image_seed(seed: int, index: int) -> int:
    """Image ``index``'s seed: drawn from (seed, index), so datasets made with nearby seeds share no image
    (``seed + index`` would make ``--seed 1``'s image 0 ``--seed 0``'s image 1)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def row_schema(generator: Any) -> pa.Schema:
    """The generated-dataset columns plus the generator's own (``extra_columns``)."""
    extra = getattr(generator, "extra_columns", {})
    return pa.schema(list(GENERATED_SCHEMA) + [pa.field(name, dtype) for name, dtype in extra.items()])


def make_rows(generator: Any, indices: list[int], seeds: list[int], prefix: str) -> list[dict]:
    """Run ``generator`` on these images -> dataset rows (image_id = index + 1)."""
    rows = []
    for (pixels, label, extras), index, seed in zip(generator.generate(indices, seeds), indices, seeds):
        rows.append({
            schema.IMAGE_ID: index + 1,
            schema.FILE_NAME: f"{prefix}-{index:06d}.png",
            schema.WIDTH: int(pixels.shape[1]),
            schema.HEIGHT: int(pixels.shape[0]),
            schema.IMAGE: encode_png(pixels),
            schema.ANNOTATIONS: [],
            schema.LABEL: label,
            schema.SEED: seed,
            **extras,
        })
    return rows


class GenerateActor:
    """One actor: builds the generator once, then writes the shards it is given."""

    def __init__(self, factory: Callable[[], Any], threads: int, device: str):
        import torch

        torch.set_num_threads(threads)
        self.generator = factory(device=device)

    def write(self, out: str, shard: int, indices: list[int], seeds: list[int], prefix: str) -> int:
        rows = make_rows(self.generator, indices, seeds, prefix)
        write_shard(join(out, SHARD_PATTERN.format(shard)), pa.Table.from_pylist(rows, schema=row_schema(self.generator)))
        return len(rows)


def generate_dataset(
    out: str,
    factory: Callable[..., Any],
    *,
    images: int,
    seed: int,
    prefix: str,
    categories: list[dict],
    provenance: dict,
    rows_per_shard: int | None = None,
    address: str | None = None,
    actors: int | None = None,
    num_gpus: float = 0.0,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Make ``images`` images with ``factory``'s generator on Ray actors, write them to ``out``.

    ``actors``: default one per CPU of the cluster (or per GPU with ``num_gpus``), never more than
    shards; ``rows_per_shard``: default enough shards for every actor, at most
    :data:`MAX_ROWS_PER_SHARD` rows each; each actor gets the cluster's CPUs divided among them as torch threads. Returns
    ``{"images", "shards", "actors", "seconds"}``.
    """
    import ray
    from ray.util import ActorPool

    from pipeline.engine.ray_session import start_ray  # late: with ray, imported only when a dataset is made

    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    prepare_output(out, overwrite=overwrite)
    started = start_ray(address)
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        node_cpus = max([int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] + [1])  # an actor lives on one node
        gpus = int(ray.cluster_resources().get("GPU", 0))
        room = int(gpus // num_gpus) if num_gpus > 0 else cpus
        if num_gpus > 0 and room < 1:
            raise ValueError(f"num_gpus {num_gpus} per actor, but the cluster has {gpus} GPU(s)")
        per_shard = rows_per_shard or max(1, min(MAX_ROWS_PER_SHARD, math.ceil(images / (actors or room))))
        shards = [list(range(s, min(s + per_shard, images))) for s in range(0, images, per_shard)]
        count = max(1, min(actors or room, room, len(shards)))
        threads = max(1, min(cpus // count, node_cpus))
        remote = ray.remote(GenerateActor).options(num_cpus=min(cpus / count, node_cpus), num_gpus=num_gpus)
        device = "cuda" if num_gpus > 0 else "cpu"
        pool = ActorPool([remote.remote(factory, threads, device) for _ in range(count)])
        start, done = time.perf_counter(), 0
        work = [(k, idx, [image_seed(seed, i) for i in idx]) for k, idx in enumerate(shards)]
        for rows in pool.map_unordered(lambda actor, w: actor.write.remote(out, w[0], w[1], w[2], prefix), work):
            done += rows
            if progress:
                progress(f"generated {done}/{images} images ({done / (time.perf_counter() - start):.2f} img/s)")
        seconds = time.perf_counter() - start
    finally:
        if started:
            ray.shutdown()
    info = {"description": f"pipeline generate {provenance.get('method', '')}".strip(), "images": images, "seed": seed,
            "seed_per_image": f"column {schema.SEED}: numpy SeedSequence([seed, image_id - 1]).generate_state(1)[0]",
            "generated": provenance}
    write_meta(out, DatasetMeta(categories=categories, info=info))
    return {"images": images, "shards": len(shards), "actors": count, "seconds": round(seconds, 2)}

