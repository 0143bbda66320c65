"""A predictions dataset made from synthetic shapes: exact boxes (xyxy) and masks, known scores.

Built with the schema's prediction columns and pipeline.data.shards (no model, no Ray), so every
exported number can be checked against the truth: image 2 has no predictions (an empty label
file), image 3 is an error row (the image could not be read), scores run 0.30..0.95.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline import schema
from pipeline.data.shards import DatasetMeta, list_shards, read_meta, read_shard, write_meta, write_shard

PRED_SCHEMA = pa.schema(list(schema.PREDICTION_BASE_SCHEMA) + [
    pa.field(schema.BOXES, schema.BOXES_TYPE), pa.field(schema.SCORES, schema.SCORES_TYPE),
    pa.field(schema.LABELS, schema.IDS_TYPE), pa.field(schema.CATEGORY_IDS, schema.IDS_TYPE),
    pa.field(schema.MASKS, schema.MASKS_TYPE),
])


def make_predictions(images_ds: str, out: str, *, job: str = "shapes_test") -> dict[int, dict]:
    """Write predictions for every image of ``images_ds``; returns image_id -> row (the truth)."""
    truth = {}
    for k, shard in enumerate(list_shards(images_ds)):
        rows = []
        for r in read_shard(shard).to_pylist():
            i = r[schema.IMAGE_ID]
            anns = [] if i == 2 else r[schema.ANNOTATIONS]
            boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
            row = {
                schema.IMAGE_ID: i, schema.FILE_NAME: r[schema.FILE_NAME], schema.WIDTH: r[schema.WIDTH],
                schema.HEIGHT: r[schema.HEIGHT], schema.ERROR: None, schema.BOXES: boxes,
                schema.SCORES: [0.30 + 0.65 * ((i * 7 + n * 3) % 10) / 9 for n in range(len(anns))],
                schema.LABELS: [a["category_id"] for a in anns], schema.CATEGORY_IDS: [a["category_id"] for a in anns],
                schema.MASKS: [a["segmentation"]["rle"] for a in anns],
            }
            if i == 3:
                row.update({schema.ERROR: "cannot decode image: truncated", schema.WIDTH: None, schema.HEIGHT: None,
                            schema.BOXES: None, schema.SCORES: None, schema.LABELS: None, schema.CATEGORY_IDS: None,
                            schema.MASKS: None})
            rows.append(row)
            truth[i] = row
        write_shard(f"{out}/part-{k:05d}.parquet", pa.Table.from_pylist(rows, schema=PRED_SCHEMA))
    meta = read_meta(images_ds)
    write_meta(out, DatasetMeta(categories=meta.categories, kind="predictions",
                                info={"source": images_ds, "job": job, "stages": ["masks"]}))
    return truth


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """(images dataset, predictions dataset, truth by image_id): 10 images in 2 shards."""
    from pipeline.data.synth import synth_dataset

    root = tmp_path_factory.mktemp("annotate")
    images = str(root / "shapes")
    synth_dataset(images, images=10, seed=11, size=96, rows_per_shard=5)
    pred = str(root / "pred")
    return images, pred, make_predictions(images, pred)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The evaluation tests' synthetic case, smaller: 100 images (one error row), GT imported, predictions in 4 shards.

    Detections include category -1 and categories without GT, keypoints, masks and error rows.
    Returns ``gt_json``, ``gt`` (dataset), ``pred`` (prediction dataset), ``coco`` and ``rows``.
    """
    import json

    from pipeline.data.importers import import_coco
    from pipeline.eval.synthetic_cases import synthetic_case, write_predictions

    root = tmp_path_factory.mktemp("synthetic")
    coco, rows = synthetic_case(images=100, seed=3, detections_per_image=16, categories=6, keypoints=True)
    gt_json = root / "gt.json"
    gt_json.write_text(json.dumps(coco))
    import_coco(str(root / "images"), str(gt_json), str(root / "gt"), rows_per_shard=20, allow_missing_images=True)
    write_predictions(rows, str(root / "pred"), categories=coco["categories"], rows_per_shard=15)
    return {"root": root, "gt_json": gt_json, "gt": str(root / "gt"), "pred": str(root / "pred"), "coco": coco, "rows": rows}
