"""The Ray Data read step of ``pipeline train``: shard index -> rows with image bytes and annotations.

It lives apart from the trainer on purpose: Ray pickles a module-level function by reference, so
every read-task worker process imports the function's module. Here that is pyarrow and our shard
code; next to the trainer it was torch and torchvision too, in each of up to ten worker processes
starting at once, which made reading 3,000 small images take 48 s on two cores.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.data.shards import iter_shard

TRAIN_COLUMNS = [schema.IMAGE_ID, schema.IMAGE, schema.ANNOTATIONS, schema.ERROR]
# + label maps (semantic ground truth) and image labels (classifiers); null where a shard has none
TRAIN_SCHEMA = pa.schema(
    [schema.IMAGE_SCHEMA.field(c) for c in TRAIN_COLUMNS]
    + [pa.field(schema.LABEL_MAP, schema.LABEL_MAP_TYPE), pa.field(schema.LABEL, schema.LABEL_TYPE)]
)


def read_training_rows(batch: pa.Table, *, shards: list[str], required: str | None = None):
    """Ray Data UDF (generator): rows of the shards named by index, error rows left out.

    ``required``: a column rows without a value in are left out too (no ground truth for the
    model: a classifier's ``label``; a ``label_map`` in a label-map dataset, where a row without
    one is not all background). See :func:`pipeline.train.trainer.required_column`.
    """
    for index in batch["shard_index"].to_pylist():
        for table in iter_shard(shards[index], 64, columns=TRAIN_SCHEMA.names):
            table = schema.conform(table, TRAIN_SCHEMA)
            keep = pc.is_null(table[schema.ERROR])
            if required:
                keep = pc.and_(keep, pc.is_valid(table[required]))
            yield table.filter(keep).drop_columns([schema.ERROR])
