"""export-coco: COCO results and COCO datasets that pycocotools loads back unchanged."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
from pycocotools.coco import COCO

from pipeline import schema
from pipeline.eval import evaluate, export_coco

from tests.eval.helpers import EXACT, stats_of


def _load(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_results_hold_dataset_category_ids_and_xywh_boxes(synthetic, tmp_path):
    out = tmp_path / "results.json"
    report = export_coco(synthetic["pred"], str(out))
    results = json.loads(out.read_text())
    expected = [
        (row[schema.IMAGE_ID], c, box, s, m)
        for row in synthetic["rows"]
        for box, c, s, m in zip(row[schema.BOXES] or [], row[schema.CATEGORY_IDS] or [], row[schema.SCORES] or [],
                                row[schema.MASKS] or [])
        if c != -1
    ]
    assert report["detections"] == len(results) == len(expected)
    assert report["skipped"]["unmapped_category"] == sum(
        1 for r in synthetic["rows"] for c in r[schema.CATEGORY_IDS] or [] if c == -1
    )
    for rec, (image_id, c, box, score, mask) in zip(results, expected):
        x1, y1, x2, y2 = (float(np.float32(v)) for v in box)
        assert rec["image_id"] == image_id and rec["category_id"] == c
        assert rec["bbox"] == [x1, y1, x2 - x1, y2 - y1]  # xyxy float32 -> xywh, exactly
        assert rec["score"] == float(np.float32(score))
        assert rec["segmentation"] == mask and isinstance(rec["segmentation"]["counts"], str)
        assert len(rec["keypoints"]) == 51
    gt = _load(synthetic["gt_json"])
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = gt.loadRes(str(out))
    assert len(loaded.anns) == len(results)


def test_dataset_round_trip(synthetic, tmp_path):
    out = tmp_path / "dataset.json"
    report = export_coco(synthetic["pred"], str(out), as_dataset=True)
    written = json.loads(out.read_text())
    coco = _load(out)
    assert coco.dataset == written  # loads back unchanged
    assert report["images"] == len(written["images"]) == len(synthetic["rows"])  # error rows included
    assert [c["id"] for c in written["categories"]] == [c["id"] for c in synthetic["coco"]["categories"]]
    anns = written["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    assert all(a["iscrowd"] == 0 and a["area"] > 0 and a["category_id"] != -1 for a in anns)
    assert set(coco.getCatIds()) >= {a["category_id"] for a in anns}
    # the exported dataset as ground truth for its own predictions: every box finds itself
    metrics = evaluate([synthetic["pred"]], str(out), ["bbox"], use_ray=False, use_state=False)
    assert metrics["bbox"]["AP50"] == 1.0 and metrics["bbox"]["AR100"] == 1.0


def test_results_round_trip_through_eval(synthetic, tmp_path):
    """The exported results file and the shards it came from give the same numbers."""
    out = tmp_path / "results.json"
    export_coco(synthetic["pred"], str(out))
    from_file = evaluate([str(out)], synthetic["gt"], ["bbox", "segm"], use_ray=False)
    from_shards = evaluate([synthetic["pred"]], synthetic["gt"], ["bbox", "segm"], use_ray=False, use_state=False)
    for t in ("bbox", "segm"):
        np.testing.assert_allclose(stats_of(from_file, t), stats_of(from_shards, t), rtol=0, atol=EXACT)
