"""Distributed evaluation over prediction shards: exact, mergeable, resumable.

The reference is single-process pycocotools on the same data: the GT COCO file, and the results
file ``export_coco`` writes from the prediction shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.shards import list_shards
from pipeline.annotate.coco import export_coco
from pipeline.eval import evaluate
from pipeline.eval.records import load_records
from pipeline.eval.synthetic_cases import synthetic_case, write_predictions

from tests.eval.helpers import EXACT, pycocotools_eval, stats_of

TYPES = ["bbox", "segm", "keypoints"]


@pytest.fixture
def pred(synthetic, tmp_path):
    """A private copy of the synthetic predictions (state files get written beside them)."""
    path = tmp_path / "pred"
    shutil.copytree(synthetic["pred"], path)
    return str(path)


@pytest.fixture(scope="module")
def reference(synthetic, tmp_path_factory):
    """pycocotools stats per IoU type, on the GT file and the exported results."""
    results = tmp_path_factory.mktemp("ref") / "results.json"
    export_coco(synthetic["pred"], str(results))
    return {t: pycocotools_eval(synthetic["gt_json"], results, t).stats for t in TYPES}


def test_ray_tasks_equal_single_process_pycocotools(synthetic, pred, reference, ray_local):
    metrics = evaluate([pred], synthetic["gt"], TYPES, use_ray=True)
    for t in TYPES:
        np.testing.assert_allclose(stats_of(metrics, t), reference[t], rtol=0, atol=EXACT, err_msg=t)
    counts = metrics["bbox"]["counts"]
    assert counts["shards"] == 4 and counts["shards_from_state"] == 0 and counts["ray_tasks"] == 4
    assert counts["images"] == 160 and counts["images_without_predictions"] > 0
    assert counts["skipped"]["unmapped_category"] > 0 and counts["skipped"]["error_rows"] > 0


def test_state_is_reused_and_only_missing_shards_recomputed(synthetic, pred, reference, ray_local):
    first = evaluate([pred], synthetic["gt"], ["bbox", "segm"])  # Ray is running: tasks by default
    assert first["bbox"]["counts"]["ray_tasks"] == 4
    states = sorted((Path(pred) / "eval" / "bbox").glob("*.npz"))
    assert [p.name for p in states] == [f"part-0000{i}.npz" for i in range(4)]
    records, meta = load_records(str(states[0]))
    assert {"key", "shard_sha256", "gt_fingerprint", "params_fingerprint", "skipped"} <= set(meta)
    assert records.num_detections > 0 and records.det_matched.dtype == np.uint16
    states[2].unlink()  # as if the run had stopped before this shard
    second = evaluate([pred], synthetic["gt"], ["bbox", "segm"])
    assert second["bbox"]["counts"]["shards_from_state"] == 3 and second["bbox"]["counts"]["ray_tasks"] == 0
    assert second["segm"]["counts"]["shards_from_state"] == 4
    third = evaluate([pred], synthetic["gt"], ["bbox"])
    assert third["bbox"]["counts"]["shards_from_state"] == 4
    for m in (first, second, third):
        np.testing.assert_allclose(stats_of(m, "bbox"), reference["bbox"], rtol=0, atol=EXACT)
    assert second["bbox"]["counts"]["skipped"] == first["bbox"]["counts"]["skipped"]


def test_corrupt_state_is_recomputed(synthetic, pred, reference):
    evaluate([pred], synthetic["gt"], ["bbox"], use_ray=False)
    (Path(pred) / "eval" / "bbox" / "part-00001.npz").write_bytes(b"not an npz")
    metrics = evaluate([pred], synthetic["gt"], ["bbox"], use_ray=False)
    assert metrics["bbox"]["counts"]["shards_from_state"] == 3
    np.testing.assert_allclose(stats_of(metrics, "bbox"), reference["bbox"], rtol=0, atol=EXACT)


def test_state_is_not_reused_against_other_ground_truth(synthetic, pred, tmp_path):
    evaluate([pred], synthetic["gt"], ["bbox"], use_ray=False)
    coco = json.loads(synthetic["gt_json"].read_text())
    coco["annotations"] = coco["annotations"][::2]  # different ground truth for most images
    gt_json = tmp_path / "gt2.json"
    gt_json.write_text(json.dumps(coco))
    metrics = evaluate([pred], str(gt_json), ["bbox"], use_ray=False)
    assert metrics["bbox"]["counts"]["shards_from_state"] == 0
    results = tmp_path / "results.json"
    export_coco(pred, str(results))
    np.testing.assert_allclose(stats_of(metrics, "bbox"), pycocotools_eval(gt_json, results, "bbox").stats, rtol=0, atol=EXACT)


def test_state_of_each_iou_type_depends_only_on_what_it_reads(synthetic, pred, tmp_path):
    """A changed GT mask invalidates segm state only; bbox records never read masks."""
    coco = json.loads(synthetic["gt_json"].read_text())
    evaluate([pred], str(synthetic["gt_json"]), ["bbox", "segm"], use_ray=False)
    ann = next(a for a in coco["annotations"] if isinstance(a["segmentation"], list))
    ann["segmentation"] = [[v + 1 for v in ann["segmentation"][0]]]
    gt_json = tmp_path / "gt-moved-mask.json"
    gt_json.write_text(json.dumps(coco))
    metrics = evaluate([pred], str(gt_json), ["bbox", "segm"], use_ray=False)
    assert metrics["bbox"]["counts"]["shards_from_state"] == 4
    assert metrics["segm"]["counts"]["shards_from_state"] == 3


def test_changed_shard_is_recomputed(synthetic, pred, reference):
    evaluate([pred], synthetic["gt"], ["bbox"], use_ray=False)
    shards = list_shards(pred)
    shutil.copy(shards[0], shards[1])  # shard 1 now holds shard 0's rows: new bytes, new records
    metrics = evaluate([pred], synthetic["gt"], ["bbox"], use_ray=False)
    counts = metrics["bbox"]["counts"]
    assert counts["shards_from_state"] == 3
    assert counts["skipped"]["duplicate_images"] == 40  # shard 1 repeats shard 0: counted once


def test_same_predictions_twice_count_once(synthetic, pred, reference):
    metrics = evaluate([pred, pred], synthetic["gt"], ["bbox"], use_ray=False)
    np.testing.assert_allclose(stats_of(metrics, "bbox"), reference["bbox"], rtol=0, atol=EXACT)
    assert metrics["bbox"]["counts"]["skipped"]["duplicate_images"] == len(synthetic["rows"])


def test_two_runs_merge_like_one(synthetic, tmp_path, reference, ray_local):
    rows = synthetic["rows"]
    half = len(rows) // 2
    write_predictions(rows[:half], str(tmp_path / "run1"), categories=synthetic["coco"]["categories"], rows_per_shard=30)
    write_predictions(rows[half:], str(tmp_path / "run2"), categories=synthetic["coco"]["categories"], rows_per_shard=30)
    metrics = evaluate([str(tmp_path / "run1"), str(tmp_path / "run2")], synthetic["gt"], TYPES, use_ray=True)
    assert metrics["bbox"]["counts"]["ray_tasks"] == 6
    for t in TYPES:
        np.testing.assert_allclose(stats_of(metrics, t), reference[t], rtol=0, atol=EXACT, err_msg=t)


def test_overlapping_runs_first_wins(synthetic, pred, tmp_path, reference):
    """A second run over some of the same images (other predictions) does not change the numbers."""
    _, other_rows = synthetic_case(images=160, seed=99, detections_per_image=5, categories=6, keypoints=True)
    write_predictions(other_rows[:70], str(tmp_path / "other"), categories=synthetic["coco"]["categories"], rows_per_shard=35)
    metrics = evaluate([pred, str(tmp_path / "other")], synthetic["gt"], ["bbox"], use_ray=False)
    np.testing.assert_allclose(stats_of(metrics, "bbox"), reference["bbox"], rtol=0, atol=EXACT)
    assert metrics["bbox"]["counts"]["skipped"]["duplicate_images"] > 0


def test_both_matching_methods_and_no_ray_agree(synthetic, pred, reference):
    for method in ("vectorized", "pycocotools"):
        metrics = evaluate([pred], synthetic["gt"], ["bbox", "keypoints"], method=method, use_ray=False, use_state=False)
        for t in ("bbox", "keypoints"):
            np.testing.assert_allclose(stats_of(metrics, t), reference[t], rtol=0, atol=EXACT)


def test_ground_truth_as_coco_file(synthetic, pred, reference):
    metrics = evaluate([pred], str(synthetic["gt_json"]), ["segm"], use_ray=False, use_state=False)
    np.testing.assert_allclose(stats_of(metrics, "segm"), reference["segm"], rtol=0, atol=EXACT)


def test_out_dir_files(synthetic, pred, tmp_path):
    out = tmp_path / "metrics"
    metrics = evaluate([pred], synthetic["gt"], ["bbox", "keypoints"], str(out), use_ray=False)
    written = json.loads((out / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert list(written["bbox"])[:12] == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    assert list(written["keypoints"])[:10] == ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]
    assert set(written["bbox"]["per_category"]) == {c["name"] for c in synthetic["coco"]["categories"]}
    assert written["bbox"]["per_category"]["class8"] == -1  # declared, never annotated
    for t in ("bbox", "keypoints"):
        assert (out / f"pr_{t}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
