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
# label maps: semantic ground truth of label-map datasets (null where a shard has none)
TRAIN_SCHEMA = pa.schema([schema.IMAGE_SCHEMA.field(c) for c in TRAIN_COLUMNS] + [pa.field(schema.LABEL_MAP, schema.LABEL_MAP_TYPE)])


def read_training_rows(batch: pa.Table, *, shards: list[str], label_maps_only: bool = False):
    """Ray Data UDF (generator): rows of the shards named by index, error rows left out.

    ``label_maps_only``: in a label-map dataset (``import-images --labels``) a row without a label
    map has no ground truth (it is not all background), so it is left out too.
    """
    for index in batch["shard_index"].to_pylist():
        for table in iter_shard(shards[index], 64, columns=TRAIN_SCHEMA.names):
            table = schema.conform(table, TRAIN_SCHEMA)
            keep = pc.is_null(table[schema.ERROR])
            if label_maps_only:
                keep = pc.and_(keep, pc.is_valid(table[schema.LABEL_MAP]))
            yield table.filter(keep).drop_columns([schema.ERROR])
