"""Export a prediction dataset as COCO JSON: a results list, or a whole COCO dataset.

Results (``export_coco(pred, out)``): one record per detection, in shard/row/box order::

    {"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float,
     "segmentation": {"size": [h, w], "counts": str},   # when the shards have masks
     "keypoints": [x1, y1, v1, ...]}                      # when the shards have keypoints

Boxes are converted from our **xyxy** float32 to COCO **xywh** in float64 exactly as the
evaluator does (``w = x2 - x1``), and written with Python's shortest round-trip float repr, so
pycocotools on this file sees the very numbers ``pipeline eval`` evaluated.

Dataset (``as_dataset=True``): ``images`` (every prediction row but error rows), ``categories``
(with names: the prediction dataset's, else its images dataset's, else ``class <id>`` -- as
``pipeline data render`` labels them), ``annotations`` with ``id`` 1..N, ``area`` (mask area
when there are masks, else ``w * h``), ``iscrowd`` 0, ``score``, plus ``segmentation`` /
``keypoints`` + ``num_keypoints`` when present -- e.g. to use predictions as pseudo-labels.

Error rows (``error`` set: the image could not be decoded, so it has no size and no detections)
are left out of both forms and counted: ``error_rows`` in the returned dict.

Category ids are the dataset's (the ``category_ids`` column), never a model's label indices;
detections with category -1 (no mapping) or a category the dataset does not list are skipped and
counted. An image present in more than one shard is exported once (first shard wins).
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter

import numpy as np
import pyarrow.compute as pc
from pycocotools import mask as mask_utils

from pipeline import schema
from pipeline.data.render import known_categories, label_text
from pipeline.data.shards import list_shards, read_meta, read_shard, resolve, shard_schema
from pipeline.eval.detections import read_prediction_table


def export_coco(pred_path: str, out_path: str, *, as_dataset: bool = False) -> dict:
    """Write ``pred_path`` as COCO results (or a COCO dataset) to ``out_path``; returns counts."""
    meta = read_meta(pred_path)
    categories = _named(known_categories(meta))
    category_ids = {int(c["id"]) for c in categories} or None
    results: list[dict] = []
    images: list[dict] = []
    skipped: Counter = Counter()
    seen: set[int] = set()
    error_rows = 0
    for shard in list_shards(pred_path):
        present = shard_schema(shard).names
        masks, keypoints = schema.MASKS in present, schema.KEYPOINTS in present
        wanted = [schema.IMAGE_ID, schema.FILE_NAME, schema.WIDTH, schema.HEIGHT, schema.ERROR, schema.BOXES,
                  schema.SCORES, schema.CATEGORY_IDS, schema.MASKS, schema.KEYPOINTS]
        table = read_shard(shard, columns=[c for c in wanted if c in present])
        if schema.ERROR in table.column_names and table[schema.ERROR].null_count < table.num_rows:
            fine = pc.is_null(table[schema.ERROR])
            error_rows += table.num_rows - int(pc.sum(fine).as_py() or 0)
            table = table.filter(fine)
        part = read_prediction_table(
            table, source=shard, gt=None, category_ids=category_ids, masks=masks, keypoints=keypoints
        )
        skipped.update(part.skipped)
        fresh = np.array([int(i) not in seen for i in part.image_ids], dtype=bool)
        skipped["duplicate_images"] += int((~fresh).sum())
        for n in np.flatnonzero(fresh):
            image = {"id": int(part.image_ids[n])}
            if part.file_names is not None:
                image["file_name"] = part.file_names[n]
            if part.widths is not None:
                image["width"], image["height"] = _int_or_none(part.widths[n]), _int_or_none(part.heights[n])
            images.append(image)
        dets = part.detections
        keep = np.flatnonzero(np.isin(dets.image_id, part.image_ids[fresh]))
        seen.update(int(i) for i in part.image_ids[fresh])
        for i in keep:
            rec = {
                "image_id": int(dets.image_id[i]),
                "category_id": int(dets.category_id[i]),
                "bbox": [float(v) for v in dets.bbox[i]],
                "score": float(dets.score[i]),
            }
            if dets.segm is not None:
                rec["segmentation"] = {"size": dets.segm[i]["size"], "counts": _str(dets.segm[i]["counts"])}
            if dets.keypoints is not None:
                rec["keypoints"] = [float(v) for v in dets.keypoints[i]]
            results.append(rec)
    if as_dataset:
        payload = _as_dataset(results, images, categories)
    else:
        payload = results
    fs, p = resolve(out_path)
    if posixpath.dirname(p):
        fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(json.dumps(payload, allow_nan=False).encode("utf-8"))
    return {"images": len(images), "detections": len(results), "error_rows": error_rows, "skipped": dict(+skipped)}


def _named(categories: list[dict]) -> list[dict]:
    """Categories, each with a name (``class <id>`` where none is recorded)."""
    return [{**c, "name": c.get("name") or label_text(int(c["id"]), None, {})} for c in categories]


def _as_dataset(results: list[dict], images: list[dict], categories: list[dict]) -> dict:
    if not categories:  # no category list anywhere: the ones the detections use, named as render names them
        categories = [{"id": c, "name": label_text(c, None, {})} for c in sorted({r["category_id"] for r in results})]
    annotations = []
    for n, rec in enumerate(results, start=1):
        ann = {"id": n, **rec, "iscrowd": 0}
        if "segmentation" in rec:
            ann["area"] = float(mask_utils.area(rec["segmentation"]))
        else:
            ann["area"] = rec["bbox"][2] * rec["bbox"][3]
        if "keypoints" in rec:
            ann["num_keypoints"] = int(sum(1 for v in rec["keypoints"][2::3] if v > 0))
        annotations.append(ann)
    return {"info": {"description": "pipeline predictions"}, "images": images, "categories": categories,
            "annotations": annotations}


def _str(counts) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


def _int_or_none(v):
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else int(v)
