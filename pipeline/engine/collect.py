"""The driver's end of the stream: rows regrouped by input shard, each shard written once.

Why the driver writes: output shard ``OUT/part-00007.parquet`` holds exactly the rows of input
shard ``part-00007.parquet``, deduplicated by their row index, so names are deterministic, a row
is never written twice even if Ray retries a task or restarts an actor, and finished shards are
skipped on resume. Only prediction columns reach the driver (no pixels, no image bytes).
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.data.shards import join, read_shard, write_shard
from pipeline.engine.fingerprint import job_fingerprint, shard_stamp
from pipeline.engine.preflight import Plan
from pipeline.engine.stream import ROW, SHARD

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


def count_finished(plan: Plan) -> tuple[int, int]:
    """(rows, error rows) of the output shards a resumed run keeps."""
    rows = errors = 0
    for i in sorted(plan.finished):
        path = join(plan.job.output, posixpath.basename(plan.shards[i]))
        table = read_shard(path, columns=[schema.ERROR])
        rows += table.num_rows
        errors += table.num_rows - table[schema.ERROR].null_count
    return rows, errors


def unmapped_warning(plan: Plan, collector: ShardCollector) -> dict:
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
