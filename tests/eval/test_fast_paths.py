"""The fast paths of a cold ``pipeline eval`` give what the general code gives, bit for bit.

* batched bbox IoU == ``pycocotools.mask.iou`` (the C ``bbIou``), float for float;
* column-wise reading of results / GT == the per-record loops (which still name bad records);
* accumulate's one-call row search == ``np.searchsorted`` row by row;
* no Ray import for a small evaluation (importing it alone costs seconds of a cold command).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.eval.accumulate import _first_at_least
from pipeline.eval.detections import _bbox_results_fast, results_to_detections
from pipeline.eval.groundtruth import _plain_columns, from_coco_dicts
from pipeline.eval.iou_types import bbox_ious
from pipeline.eval.params import EvalInputError

from tests.eval.helpers import stress_case


class _Boxes:
    """The few attributes of ``_Groups`` that :func:`bbox_ious` reads."""

    def __init__(self, d, g):
        self.dets = type("D", (), {"bbox": d})()
        self.gt = type("G", (), {"ann_bbox": g})()
        self.d_idx, self.g_idx = np.arange(len(d)), np.arange(len(g))


@pytest.mark.parametrize("seed", range(5))
def test_batched_bbox_iou_is_pycocotools_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        m, n = int(rng.integers(1, 25)), int(rng.integers(1, 25))
        d = np.round(rng.uniform(0, 40, (m, 4)), int(rng.integers(0, 4)))
        g = np.round(rng.uniform(0, 40, (n, 4)), int(rng.integers(0, 4)))
        if rng.random() < 0.3:  # integer boxes: touching edges, zero sizes, identical boxes
            d[:, 2:], g[:, 2:] = rng.integers(0, 8, (m, 2)), rng.integers(0, 8, (n, 2))
            g[0] = d[0]
        crowd = rng.random(n) < 0.3
        expected = np.asarray(mask_utils.iou(d, g, crowd.astype(int).tolist())).reshape(m, n)
        got = bbox_ious(_Boxes(d, g), np.arange(m)[None], np.arange(n)[None], np.ones((1, n), bool), crowd[None])[0]
        assert got.tobytes() == expected.tobytes()


def test_first_at_least_is_searchsorted_per_row():
    rng = np.random.default_rng(0)
    for _ in range(50):
        rows = np.cumsum(rng.integers(0, 2, (int(rng.integers(1, 30)), int(rng.integers(1, 200)))), axis=1)
        need = rng.integers(0, rows.shape[1] + 5, (rows.shape[0], 101))
        expected = np.array([np.searchsorted(r, q, side="left") for r, q in zip(rows, need)])
        np.testing.assert_array_equal(_first_at_least(rows, need), expected)


def _gt(coco):
    images = [(im["id"], im["height"], im["width"]) for im in coco["images"]]
    return from_coco_dicts(images, copy.deepcopy(coco["annotations"]), coco["categories"], source="gt")


@pytest.mark.parametrize("masks", [False, True])
def test_results_fast_path_equals_the_loop(masks):
    coco, results = stress_case(0)
    gt = _gt(coco)
    fast = _bbox_results_fast(copy.deepcopy(results), gt=gt, source="dt", masks=masks, keypoints=False)
    assert fast is not None
    # one numeric-string image id sends everything through the per-record loop: same result
    slow_input = copy.deepcopy(results)
    slow_input[-1]["image_id"] = str(slow_input[-1]["image_id"])
    assert _bbox_results_fast(slow_input, gt=gt, source="dt", masks=masks, keypoints=False) is None
    slow = results_to_detections(slow_input, gt=gt, source="dt", masks=masks)
    assert fast[1] == slow[1]
    for name in ("image_id", "category_id", "score", "bbox", "area"):
        np.testing.assert_array_equal(getattr(fast[0], name), getattr(slow[0], name))
    assert fast[0].segm == slow[0].segm


def test_bad_record_is_named_as_before():
    coco, results = stress_case(1)
    gt = _gt(coco)
    bad = copy.deepcopy(results)
    known = [i for i, r in enumerate(bad) if r["category_id"] in set(gt.category_ids.tolist())]
    bad[known[7]]["bbox"] = [1.0, 2.0, -3.0, 4.0]
    bad[known[3]]["score"] = float("nan")
    with pytest.raises(EvalInputError, match=rf"record {known[3]} .*score nan is not a finite number"):
        results_to_detections(bad, gt=gt, source="dt")


def test_first_bad_mask_wins_over_a_later_error():
    coco, results = stress_case(2)
    gt = _gt(coco)
    bad = copy.deepcopy(results)
    first = next(i for i, r in enumerate(bad) if r["category_id"] in set(gt.category_ids.tolist()) and i > 2)
    (h,), (w,) = gt.image_size(np.array([bad[first]["image_id"]]))
    bad[first]["segmentation"] = {"size": [int(h), int(w)], "counts": "0"}  # runs do not add up to h * w
    bad[-1]["image_id"] = 10**9  # a later error of another kind
    with pytest.raises(EvalInputError, match=rf"record {first} .*malformed RLE mask"):
        results_to_detections(bad, gt=gt, source="dt", masks=True)


def test_gt_columns_equal_the_loop():
    coco, _ = stress_case(0)
    plain = _gt(coco)
    anns = copy.deepcopy(coco["annotations"])
    anns[0]["id"] = str(anns[0]["id"])  # forces the per-annotation loop
    assert _plain_columns(anns) is None and _plain_columns(coco["annotations"]) is not None
    images = [(im["id"], im["height"], im["width"]) for im in coco["images"]]
    looped = from_coco_dicts(images, anns, coco["categories"], source="gt")
    for name in ("ann_image", "ann_category", "ann_id", "ann_area", "ann_iscrowd", "ann_bbox", "ann_num_keypoints"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(looped, name))
    assert plain.ann_segm == looped.ann_segm


def test_small_evaluation_does_not_import_ray(tmp_path):
    coco, results = stress_case(0)
    gt, dt = tmp_path / "gt.json", tmp_path / "dt.json"
    gt.write_text(json.dumps(coco))
    dt.write_text(json.dumps(results))
    code = (
        "import sys; from pipeline.eval import evaluate; "
        f"m = evaluate([{str(dt)!r}], {str(gt)!r}, ['bbox']); "
        "assert m['bbox']['counts']['ray_tasks'] == 0; assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
