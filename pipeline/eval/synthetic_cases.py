"""Synthetic ground truth + predictions that exercise every corner of COCO evaluation.

Used by the tests and ``bench/eval_speed.py``: no pixels, only annotations, so thousands of
images are generated in seconds. Image ``i`` depends only on (seed, i). The generator produces,
on purpose: images without GT, images without detections, error rows, images missing from the
predictions altogether, crowd regions (uncompressed RLE, as in COCO), identical duplicate GT
boxes (IoU ties), quantised scores (score ties across images), objects in all three area ranges,
categories without GT, and detections with category -1 (no mapping).

Ground truth is a COCO dict (bbox **xywh**, polygons); predictions are rows in our prediction
shard format (``boxes`` **xyxy** float32, ``scores`` float32, ``category_ids``, ``masks`` as
compressed RLE, optional ``keypoints``), written by :func:`write_predictions`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from pipeline import schema
from pipeline.data.shards import SHARD_PATTERN, DatasetMeta, join, write_meta, write_shard
from pipeline.eval.iou_types import NUM_KEYPOINTS


def _polygon(x: float, y: float, w: float, h: float) -> list[float]:
    """A quadrilateral inside the box, so mask area < box area (as with real objects)."""
    return [x, y + 0.1 * h, x + 0.9 * w, y, x + w, y + h, x + 0.2 * w, y + 0.95 * h]


def _keypoints(rng, x, y, w, h) -> list[float]:
    kps = []
    for _ in range(NUM_KEYPOINTS):
        kps += [float(x + rng.uniform(0, w)), float(y + rng.uniform(0, h)), float(rng.integers(0, 3))]
    return kps


def synthetic_case(
    *,
    images: int,
    seed: int = 0,
    detections_per_image: int = 20,
    categories: int = 10,
    masks: bool = True,
    keypoints: bool = False,
    max_side: int = 640,
) -> tuple[dict, list[dict]]:
    """(COCO ground-truth dict, prediction rows) for ``images`` images."""
    cats = [{"id": c, "name": f"class{c}", "supercategory": "synthetic"} for c in range(1, categories + 3)]
    gt_images, anns, rows = [], [], []
    ann_id = 1
    for i in range(images):
        rng = np.random.default_rng([seed, i])
        image_id = 1000 + 7 * i
        W = int(rng.integers(max_side // 2, max_side + 1))
        H = int(rng.integers(max_side // 3, max_side * 3 // 4 + 1))
        gt_images.append({"id": image_id, "file_name": f"img{image_id}.jpg", "width": W, "height": H})
        gts = []
        n_gt = int(rng.integers(0, 10)) if rng.random() > 0.05 else 0
        for _ in range(n_gt):
            w = float(rng.uniform(3, W / 2))
            h = float(rng.uniform(3, H / 2))
            x = float(rng.uniform(0, W - w))
            y = float(rng.uniform(0, H - h))
            crowd = int(rng.random() < 0.04)
            poly = _polygon(x, y, w, h)
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], H, W))
            ann = {
                "id": ann_id,
                "image_id": image_id,
                "category_id": int(rng.integers(1, categories + 1)),
                "bbox": [x, y, w, h],
                "area": float(mask_utils.area(rle)),
                "iscrowd": crowd,
            }
            if crowd:  # COCO stores crowd regions as uncompressed RLE
                m = mask_utils.decode(rle)
                flat = m.flatten(order="F")
                change = np.flatnonzero(np.diff(flat)) + 1
                bounds = np.concatenate([[0], change, [len(flat)]])
                counts = np.diff(bounds).tolist()
                if flat[0] == 1:
                    counts = [0] + counts
                ann["segmentation"] = {"size": [H, W], "counts": counts}
            else:
                ann["segmentation"] = [poly]
            if keypoints:
                ann["keypoints"] = _keypoints(rng, x, y, w, h)
                ann["num_keypoints"] = int(sum(1 for v in ann["keypoints"][2::3] if v > 0))
            anns.append(ann)
            gts.append(ann)
            ann_id += 1
            if rng.random() < 0.05:  # an exact duplicate: IoU ties between GT
                dup = dict(ann, id=ann_id)
                anns.append(dup)
                gts.append(dup)
                ann_id += 1

        if rng.random() < 0.02:  # image missing from the predictions altogether
            continue
        row = {
            schema.IMAGE_ID: image_id,
            schema.FILE_NAME: f"img{image_id}.jpg",
            schema.WIDTH: W,
            schema.HEIGHT: H,
            schema.ERROR: None,
        }
        if rng.random() < 0.02:  # the image could not be decoded: an error row, no predictions
            row.update({schema.ERROR: "cannot decode", schema.BOXES: None, schema.SCORES: None,
                        schema.LABELS: None, schema.CATEGORY_IDS: None})
            if masks:
                row[schema.MASKS] = None
            if keypoints:
                row[schema.KEYPOINTS] = None
            rows.append(row)
            continue
        n_det = 0 if rng.random() < 0.03 else int(rng.integers(detections_per_image // 2, detections_per_image * 3 // 2 + 1))
        boxes, scores, cat_ids, rles, kps = [], [], [], [], []
        for _ in range(n_det):
            g = None
            if gts and rng.random() < 0.65:
                g = gts[int(rng.integers(len(gts)))]
                x, y, w, h = g["bbox"]
                x, y = x + rng.normal(0, 0.08 * w), y + rng.normal(0, 0.08 * h)
                w, h = w * np.exp(rng.normal(0, 0.1)), h * np.exp(rng.normal(0, 0.1))
                c = g["category_id"] if rng.random() < 0.9 else int(rng.integers(1, categories + 1))
            else:
                w, h = float(rng.uniform(2, W / 2)), float(rng.uniform(2, H / 2))
                x, y = float(rng.uniform(-5, W - w)), float(rng.uniform(-5, H - h))
                c = int(rng.integers(1, categories + 1))
            if rng.random() < 0.01:
                c = -1
            box = np.array([x, y, x + w, y + h], np.float32)
            boxes.append(box.tolist())
            scores.append(float(np.float32(round(float(rng.random()), 2))))
            cat_ids.append(c)
            if masks:
                bx, by, bw, bh = (float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1]))
                r = mask_utils.merge(mask_utils.frPyObjects([_polygon(bx, by, bw, bh)], H, W))
                rles.append({"size": [H, W], "counts": r["counts"].decode("ascii")})
            if keypoints:
                if g is not None:  # near the GT's keypoints, so OKS spans the thresholds
                    k = np.asarray(g["keypoints"], np.float64).reshape(-1, 3)
                    k[:, :2] += rng.normal(0, 0.04 * max(w, h), size=(len(k), 2))
                    k[:, 2] = 1
                    kp = k.reshape(-1).tolist()
                else:
                    kp = _keypoints(rng, x, y, w, h)
                kps.append([float(np.float32(v)) for v in kp])
        row.update({schema.BOXES: boxes, schema.SCORES: scores, schema.LABELS: [max(c, 0) for c in cat_ids],
                    schema.CATEGORY_IDS: cat_ids})
        if masks:
            row[schema.MASKS] = rles
        if keypoints:
            row[schema.KEYPOINTS] = kps
        rows.append(row)
    return {"images": gt_images, "annotations": anns, "categories": cats}, rows


def prediction_schema(*, masks: bool, keypoints: bool) -> pa.Schema:
    fields = list(schema.PREDICTION_BASE_SCHEMA) + [
        pa.field(schema.BOXES, schema.BOXES_TYPE),
        pa.field(schema.SCORES, schema.SCORES_TYPE),
        pa.field(schema.LABELS, schema.IDS_TYPE),
        pa.field(schema.CATEGORY_IDS, schema.IDS_TYPE),
    ]
    if masks:
        fields.append(pa.field(schema.MASKS, schema.MASKS_TYPE))
    if keypoints:
        fields.append(pa.field(schema.KEYPOINTS, schema.KEYPOINTS_TYPE))
    return pa.schema(fields)


def write_predictions(rows: list[dict], out: str, *, categories: list[dict], rows_per_shard: int) -> list[str]:
    """Write rows as a prediction dataset (``kind: predictions``), like the job runner does."""
    masks = any(schema.MASKS in r for r in rows)
    keypoints = any(schema.KEYPOINTS in r for r in rows)
    table_schema = prediction_schema(masks=masks, keypoints=keypoints)
    paths = []
    for n, start in enumerate(range(0, len(rows), rows_per_shard)):
        table = pa.Table.from_pylist(rows[start : start + rows_per_shard], schema=table_schema)
        path = join(out, SHARD_PATTERN.format(n))
        write_shard(path, table)
        paths.append(path)
    write_meta(out, DatasetMeta(categories=categories, info={"source": "synthetic"}, kind="predictions"))
    return paths
