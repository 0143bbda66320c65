"""Our accumulate/summarize over records equals COCOeval.accumulate/summarize bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.eval.accumulate import accumulate, per_category_ap, summarize
from pipeline.eval.iou_types import get_iou_type
from pipeline.eval.records import MatchRecords

from tests.eval.helpers import pycocotools_eval, records_from_cocoeval, stress_case


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_accumulate_equals_pycocotools_arrays(iou_type):
    coco, results = stress_case(5, images=40)
    e = pycocotools_eval(coco, results, iou_type)
    entry = get_iou_type(iou_type)
    ours = accumulate(records_from_cocoeval(e), category_ids=np.array(e.params.catIds), iou_type=entry)
    for name in ("precision", "recall", "scores"):
        np.testing.assert_array_equal(ours[name], e.eval[name], err_msg=name)
    np.testing.assert_array_equal(summarize(ours, iou_type=entry), e.stats)


def test_record_order_does_not_matter():
    """Shards arrive in any order: accumulate sorts, so a shuffled merge gives the same arrays."""
    coco, results = stress_case(6, images=40)
    e = pycocotools_eval(coco, results, "bbox")
    records = records_from_cocoeval(e)
    rng = np.random.default_rng(0)
    d, g = rng.permutation(records.num_detections), rng.permutation(len(records.gt_image))
    shuffled = MatchRecords(
        image_ids=records.image_ids, det_image=records.det_image[d], det_category=records.det_category[d],
        det_rank=records.det_rank[d], det_score=records.det_score[d], det_matched=records.det_matched[d],
        det_ignored=records.det_ignored[d], gt_image=records.gt_image[g], gt_category=records.gt_category[g],
        gt_count=records.gt_count[g],
    )
    ours = accumulate(shuffled, category_ids=np.array(e.params.catIds), iou_type=get_iou_type("bbox"))
    np.testing.assert_array_equal(ours["precision"], e.eval["precision"])


def test_no_records_gives_minus_one_everywhere():
    bbox = get_iou_type("bbox")
    result = accumulate(MatchRecords.empty(4), category_ids=np.array([1, 2]), iou_type=bbox)
    assert (summarize(result, iou_type=bbox) == -1).all()
    assert (per_category_ap(result) == -1).all()


def test_per_category_ap_is_detectron2s_definition():
    coco, results = stress_case(7, images=40)
    e = pycocotools_eval(coco, results, "bbox")
    ap = per_category_ap(e.eval)
    for k in range(len(e.params.catIds)):
        p = e.eval["precision"][:, :, k, 0, -1]
        assert ap[k] == (np.mean(p[p > -1]) if (p > -1).any() else -1)
    assert ap[-1] == -1  # the stress case's last category has no GT
