"""Every number published in tests/fixtures/README.md (coco-eval), through OUR code path.

Ground truth is imported into shards with ``import_coco`` (image files are mostly absent, so
most rows are error rows -- their annotations must still count), detections are evaluated with
``pipeline.eval.evaluation`` as a COCO results file. Expected values are the README's, to 1e-12.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.data.importers import import_coco
from pipeline.data.shards import read_meta
from pipeline.eval import evaluate
from pipeline.eval.detections import results_to_detections
from pipeline.eval.groundtruth import load_ground_truth
from pipeline.eval.matching import _Groups
from pipeline.eval.iou_types import get_iou_type

from tests.eval.helpers import COCO_EVAL, EXACT, stats_of

PUBLISHED = {
    ("val2014_100", "bbox"): [0.5045806987249628, 0.6969727247299577, 0.5729816669904824, 0.5856257209410443,
                              0.5193996948036719, 0.5013978986347466, 0.38681277964578054, 0.5936795762842003,
                              0.595352982877607, 0.6398109626113442, 0.5664205978994309, 0.5642905982905982],
    ("val2014_100", "segm"): [0.3195452758576433, 0.5622883972521636, 0.29892653412086784, 0.3873740315997838,
                              0.31018272403369485, 0.3269339071005138, 0.2682297225711534, 0.41544868114906375,
                              0.4168394992198818, 0.4694498622754236, 0.37675922666197265, 0.3814715099715099],
    ("keypoints_139099", "keypoints"): [0.5048844884488449, 0.7227722772277227, 0.6336633663366337,
                                        0.46633663366336636, 0.7504950495049505, 0.5181818181818182,
                                        0.7272727272727273, 0.6363636363636364, 0.4666666666666666, 0.75],
    ("polygons_3img", "segm"): [0.6947194719471946, 0.6947194719471946, 0.6947194719471946, -1,
                                0.7367986798679867, 0.0, 0.6666666666666666, 0.75, 0.75, -1, 0.7916666666666666, 0.0],
    ("crowd_2299", "bbox"): [0.7099009900990099, 1.0, 0.8415841584158416, -1, 0.7099009900990099, -1, 0.0,
                             0.45384615384615384, 0.7153846153846154, -1, 0.7153846153846154, -1],
    ("detectron2_case", "bbox"): [0.7504950495049505, 1, 1, 0.7, 0.8, -1, 0.4, 0.75, 0.75, 0.7, 0.8, -1],
    ("detectron2_case", "segm"): [0.7252475247524752, 1, 1, 0.8, 0.7, -1, 0.35, 0.75, 0.75, 0.8, 0.7, -1],
}
DT_FILE = {"val2014_100": {"bbox": "dt_bbox.json", "segm": "dt_segm.json"}}


@pytest.fixture(scope="module")
def gt_shards(tmp_path_factory):
    """case name -> GT dataset imported from the case's gt.json (cached per module)."""
    root = tmp_path_factory.mktemp("published")
    cache = {}

    def get(case: str) -> str:
        if case not in cache:
            out = root / case / "gt"
            gt_json = COCO_EVAL / case / "gt.json"
            report = import_coco(str(COCO_EVAL / case), str(gt_json), str(out), rows_per_shard=40, allow_missing_images=True)
            cache[case] = (str(out), report)
        return cache[case][0]

    get.report = lambda case: cache[case][1]
    get.root = root
    return get


def _dt_path(case: str, iou_type: str, tmp) -> str:
    """The case's detections as the README prescribes, written where the test can read them."""
    if case in DT_FILE:
        return str(COCO_EVAL / case / DT_FILE[case][iou_type])
    dt = json.loads((COCO_EVAL / case / "dt.json").read_text())
    if case == "polygons_3img":  # each DT polygon -> one RLE, bbox dropped (area = mask area)
        images = {im["id"]: im for im in json.loads((COCO_EVAL / case / "gt.json").read_text())["images"]}
        converted = []
        for d in dt:
            im = images[d["image_id"]]
            rle = mask_utils.merge(mask_utils.frPyObjects(d["segmentation"], im["height"], im["width"]))
            d = {k: v for k, v in d.items() if k != "bbox"}
            d["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            converted.append(d)
        dt = converted
    elif case == "crowd_2299":  # keep score >= 0.1, image ids as int
        dt = [dict(d, image_id=int(d["image_id"])) for d in dt if d["score"] >= 0.1]
    else:
        return str(COCO_EVAL / case / "dt.json")
    path = tmp / f"{case}-{iou_type}-dt.json"
    path.write_text(json.dumps(dt))
    return str(path)


@pytest.mark.parametrize("case,iou_type", list(PUBLISHED), ids=[f"{c}-{t}" for c, t in PUBLISHED])
def test_published_numbers_through_import_and_eval(case, iou_type, gt_shards, tmp_path):
    gt = gt_shards(case)
    metrics = evaluate([_dt_path(case, iou_type, tmp_path)], gt, [iou_type], use_ray=False)
    np.testing.assert_allclose(stats_of(metrics, iou_type), PUBLISHED[case, iou_type], rtol=0, atol=EXACT)


def test_missing_image_files_still_count_as_ground_truth(gt_shards):
    gt = gt_shards("val2014_100")
    report = gt_shards.report("val2014_100")
    assert len(report["errors"]) == 100  # no image file of this case is present
    truth = load_ground_truth(gt)
    assert len(truth.image_ids) == 100 and truth.stats["gt_annotations"] == 839
    assert int((truth.ann_iscrowd != 0).sum()) == 9
    # the same ground truth as the original file, read directly (crowd RLE is stored compressed)
    direct = load_ground_truth(str(COCO_EVAL / "val2014_100" / "gt.json"))
    for name in ("image_ids", "heights", "widths", "ann_image", "ann_category", "ann_id", "ann_area", "ann_iscrowd", "ann_bbox"):
        np.testing.assert_array_equal(getattr(truth, name), getattr(direct, name))
    for t in ("bbox", "keypoints"):  # so state computed against either is valid for the other
        assert truth.fingerprint(get_iou_type(t)) == direct.fingerprint(get_iou_type(t))
    for ours, theirs, h, w in zip(truth.ann_segm, direct.ann_segm, *truth.image_size(truth.ann_image)):
        if isinstance(theirs, dict):
            theirs = mask_utils.frPyObjects(theirs, int(h), int(w))
            assert ours == {"size": [int(v) for v in theirs["size"]], "counts": theirs["counts"].decode()}
        else:
            assert ours == theirs


def test_polygon_detections_with_their_bbox_use_box_area(gt_shards):
    """README: with the DT's bbox kept, APm becomes 0.792079 (loadRes takes area = w*h)."""
    gt = gt_shards("polygons_3img")
    metrics = evaluate([str(COCO_EVAL / "polygons_3img" / "dt.json")], gt, ["segm"], use_ray=False)
    assert round(metrics["segm"]["APm"], 6) == 0.792079


def test_crowd_iou_matrix_matches_published(gt_shards, tmp_path):
    gt = load_ground_truth(gt_shards("crowd_2299"))
    results = json.loads(open(_dt_path("crowd_2299", "bbox", tmp_path)).read())
    dets, _ = results_to_detections(results, gt=gt, source="dt")
    groups = _Groups(gt, dets, gt.image_ids, get_iou_type("bbox"))
    ((key, ds, dn, gs, gn),) = groups.paired()
    expected = np.load(COCO_EVAL / "crowd_2299" / "ious_2299_1.npy")
    np.testing.assert_array_equal(groups.ious(key, ds, dn, gs, gn), expected)


def test_published_numbers_through_ray_tasks(gt_shards, ray_local):
    """The same val2014 case split over Ray tasks (results files are evaluated in image chunks)."""
    gt = gt_shards("val2014_100")
    dt = str(COCO_EVAL / "val2014_100" / "dt_bbox.json")
    metrics = evaluate([dt], gt, ["bbox"], use_ray=True)
    assert metrics["bbox"]["counts"]["ray_tasks"] == 2
    np.testing.assert_allclose(stats_of(metrics, "bbox"), PUBLISHED["val2014_100", "bbox"], rtol=0, atol=EXACT)


def test_import_coco_accepts_string_info(tmp_path):
    import_coco(str(COCO_EVAL / "detectron2_case"), str(COCO_EVAL / "detectron2_case" / "gt.json"), str(tmp_path / "gt"), allow_missing_images=True)
    assert read_meta(str(tmp_path / "gt")).info["description"]
