"""Per-image matching equals pycocotools' evaluateImg, record for record, with both methods."""

from __future__ import annotations

import copy

import pytest

from pipeline.eval.detections import results_to_detections
from pipeline.eval.groundtruth import from_coco_dicts
from pipeline.eval.iou_types import get_iou_type
from pipeline.eval.matching import match_images

from tests.eval.helpers import (
    COCO_EVAL,
    assert_same_records,
    pycocotools_eval,
    records_from_cocoeval,
    rows_to_results,
    stress_case,
)


def _ours(coco: dict, results: list[dict], iou_type: str, method: str):
    gt = from_coco_dicts([(im["id"], im["height"], im["width"]) for im in coco["images"]], copy.deepcopy(coco["annotations"]),
                coco["categories"], source="gt")
    entry = get_iou_type(iou_type)
    dets, _ = results_to_detections(copy.deepcopy(results), gt=gt, source="dt", masks="segm" in entry.det_fields,
                                    keypoints="keypoints" in entry.det_fields)
    return match_images(gt, dets, image_ids=gt.image_ids, iou_type=entry, method=method)


@pytest.mark.parametrize("method", ["vectorized", "pycocotools"])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stress_case_records_equal_evaluateImg(seed, iou_type, method):
    coco, results = stress_case(seed)
    expected = records_from_cocoeval(pycocotools_eval(coco, results, iou_type))
    assert_same_records(_ours(coco, results, iou_type, method), expected)


@pytest.mark.parametrize("method", ["vectorized", "pycocotools"])
def test_keypoint_records_equal_evaluateImg(method, synthetic):
    results = rows_to_results(synthetic["rows"], masks=False, keypoints=True)
    expected = records_from_cocoeval(pycocotools_eval(synthetic["coco"], results, "keypoints"))
    assert_same_records(_ours(synthetic["coco"], results, "keypoints", method), expected)


def test_published_keypoint_case_records():
    import json

    coco = json.loads((COCO_EVAL / "keypoints_139099" / "gt.json").read_text())
    results = json.loads((COCO_EVAL / "keypoints_139099" / "dt.json").read_text())
    expected = records_from_cocoeval(pycocotools_eval(coco, results, "keypoints"))
    assert_same_records(_ours(coco, results, "keypoints", "vectorized"), expected)


def test_stress_case_has_the_hard_parts():
    """Guard: the stress data really holds what the equality tests claim to cover."""
    coco, results = stress_case(0)
    assert any(a["id"] == 0 for a in coco["annotations"])
    assert any(a["iscrowd"] for a in coco["annotations"])
    assert any(a["area"] in (1024.0, 9216.0) for a in coco["annotations"])
    per_group = {}
    for r in results:
        per_group[r["image_id"], r["category_id"]] = per_group.get((r["image_id"], r["category_id"]), 0) + 1
    assert max(per_group.values()) > 100
    assert len({r["score"] for r in results}) <= 5
