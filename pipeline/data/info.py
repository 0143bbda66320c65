"""``pipeline data info``: what is in a dataset, read column by column (image bytes are never loaded).

Error rows (``error`` set: an image that could not be read at import, or decoded by a job) are
counted, and the first ``ERROR_EXAMPLES`` are named with their image_id, file_name and reason.
``label_maps`` counts the rows carrying semantic ground truth (a non-null ``label_map``).
"""

from __future__ import annotations

from collections import Counter

import pyarrow.compute as pc

from pipeline import schema
from pipeline.data.shards import list_shards, read_meta, read_shard, resolve, shard_schema

ERROR_EXAMPLES = 5


def dataset_info(path: str) -> dict:
    shards = list_shards(path)
    meta = read_meta(path)
    names = {c["id"]: c.get("name", str(c["id"])) for c in meta.categories}
    rows = errors = n_bytes = annotations = crowd = detections = label_maps = 0
    per_category: Counter = Counter()
    error_examples: list[dict] = []
    for shard in shards:
        fs, p = resolve(shard)
        n_bytes += fs.get_file_info(p).size or 0
        present = shard_schema(shard).names
        wanted = [c for c in (schema.ERROR, schema.ANNOTATIONS, schema.SCORES, schema.LABEL_MAP) if c in present]
        table = read_shard(shard, columns=wanted)
        rows += table.num_rows
        if schema.ERROR in table.column_names:
            n_errors = table.num_rows - table[schema.ERROR].null_count
            errors += n_errors
            if n_errors and len(error_examples) < ERROR_EXAMPLES:
                named = [c for c in (schema.IMAGE_ID, schema.FILE_NAME, schema.ERROR) if c in present]
                bad = read_shard(shard, columns=named)
                bad = bad.filter(pc.is_valid(bad[schema.ERROR])).slice(0, ERROR_EXAMPLES - len(error_examples))
                error_examples += [{"image_id": r.get(schema.IMAGE_ID), "file_name": r.get(schema.FILE_NAME), "error": r[schema.ERROR]}
                                   for r in bad.to_pylist()]
        if schema.ANNOTATIONS in table.column_names:
            flat = pc.list_flatten(table[schema.ANNOTATIONS])
            if len(flat):
                annotations += len(flat)
                crowd += int(pc.sum(pc.struct_field(flat, "iscrowd")).as_py() or 0)
                per_category.update(pc.struct_field(flat, "category_id").to_pylist())
        if schema.SCORES in table.column_names:
            detections += len(pc.list_flatten(table[schema.SCORES]))
        if schema.LABEL_MAP in table.column_names:
            label_maps += table.num_rows - table[schema.LABEL_MAP].null_count
    info = {
        "path": path,
        "kind": meta.kind,
        "rows": rows,
        "error_rows": errors,
        "error_examples": error_examples,
        "shards": len(shards),
        "bytes": n_bytes,
        "categories": len(meta.categories),
        "annotations": annotations,
        "crowd_annotations": crowd,
        "label_maps": label_maps,
        "annotations_per_category": {names.get(k, str(k)): v for k, v in sorted(per_category.items())},
    }
    if meta.kind == "predictions":
        info["detections"] = detections
    return info
