"""Bad input gives a clear error naming the record, or a counted skip -- never a silent wrong number."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline import schema
from pipeline.data.shards import list_shards, read_shard, write_shard
from pipeline.eval import EvalInputError, evaluate

from tests.eval.helpers import EXACT, pycocotools_eval, stats_of


@pytest.fixture
def small(synthetic, tmp_path):
    """A one-shard copy of the first 40 prediction rows, and a results list built from it."""
    table = read_shard(list_shards(synthetic["pred"])[0])
    return {"table": table, "tmp": tmp_path, "gt": synthetic["gt"], "gt_json": synthetic["gt_json"]}


def _with(small, column: str, row: int, value) -> str:
    """Write the shard with ``column[row]`` replaced; returns the dataset path."""
    table = small["table"]
    values = table[column].to_pylist()
    values[row] = value
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values, table.schema.field(column).type))
    out = small["tmp"] / "bad"
    write_shard(str(out / "part-00000.parquet"), table)
    return str(out)


def _row_with_boxes(small) -> int:
    return next(i for i, b in enumerate(small["table"][schema.BOXES].to_pylist()) if b and len(b) > 2)


def _error(pred, gt, iou_types=("bbox",)) -> str:
    with pytest.raises(EvalInputError) as info:
        evaluate([pred], gt, list(iou_types), use_ray=False, use_state=False)
    return str(info.value)


def test_unknown_image_in_shard_is_an_error_naming_it(small):
    ids = small["table"][schema.IMAGE_ID].to_pylist()
    message = _error(_with(small, schema.IMAGE_ID, 3, 424242), small["gt"])
    assert "424242" in message and "part-00000.parquet" in message
    assert ids[3] != 424242


def test_nan_box_names_row_image_and_detection(small):
    r = _row_with_boxes(small)
    boxes = small["table"][schema.BOXES][r].as_py()
    boxes[1] = [float("nan"), 0.0, 1.0, 1.0]
    message = _error(_with(small, schema.BOXES, r, boxes), small["gt"])
    image_id = small["table"][schema.IMAGE_ID][r].as_py()
    assert f"row {r} (image_id {image_id}), detection 1" in message and "not finite" in message


def test_negative_box_is_an_error(small):
    r = _row_with_boxes(small)
    boxes = small["table"][schema.BOXES][r].as_py()
    boxes[2] = [10.0, 10.0, 5.0, 20.0]  # x2 < x1
    assert "negative width" in _error(_with(small, schema.BOXES, r, boxes), small["gt"])


def test_nan_score_is_an_error(small):
    r = _row_with_boxes(small)
    scores = small["table"][schema.SCORES][r].as_py()
    scores[0] = float("nan")
    assert "score" in _error(_with(small, schema.SCORES, r, scores), small["gt"])


def test_malformed_rle_is_an_error_for_segm(small):
    r = _row_with_boxes(small)
    masks = small["table"][schema.MASKS][r].as_py()
    masks[0] = dict(masks[0], counts=masks[0]["counts"][:-3])
    pred = _with(small, schema.MASKS, r, masks)
    assert "malformed RLE mask" in _error(pred, small["gt"], ["segm"])
    evaluate([pred], small["gt"], ["bbox"], use_ray=False, use_state=False)  # bbox does not read masks


def test_mask_of_wrong_size_is_an_error(small):
    r = _row_with_boxes(small)
    masks = small["table"][schema.MASKS][r].as_py()
    masks[1] = dict(masks[1], size=[masks[1]["size"][0] + 1, masks[1]["size"][1]])
    assert "mask size" in _error(_with(small, schema.MASKS, r, masks), small["gt"], ["segm"])


def test_mismatched_list_lengths_are_an_error(small):
    r = _row_with_boxes(small)
    scores = small["table"][schema.SCORES][r].as_py()[:-1]
    assert "scores for" in _error(_with(small, schema.SCORES, r, scores), small["gt"])


def test_wrong_keypoint_count_is_an_error(small):
    r = _row_with_boxes(small)
    kps = small["table"][schema.KEYPOINTS][r].as_py()
    kps[0] = kps[0][:-3]
    assert "keypoint values" in _error(_with(small, schema.KEYPOINTS, r, kps), small["gt"], ["keypoints"])


def test_missing_column_is_an_error(small):
    table = small["table"].drop_columns([schema.MASKS])
    write_shard(str(small["tmp"] / "nomasks" / "part-00000.parquet"), table)
    assert "'masks' column" in _error(str(small["tmp"] / "nomasks"), small["gt"], ["segm"])


def test_results_file_unknown_image_names_the_record(small):
    results = [{"image_id": 1000, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5},
               {"image_id": 999999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]
    path = small["tmp"] / "r.json"
    path.write_text(json.dumps(results))
    message = _error(str(path), small["gt"])
    assert "record 1" in message and "999999" in message


@pytest.mark.parametrize("bad,expect", [({"bbox": [0, 0, -1, 5]}, "negative"), ({"bbox": [0, 0, 5]}, "bbox must"),
                                        ({"score": None}, "score"), ({"image_id": "x"}, "image_id")])
def test_results_file_bad_records(small, bad, expect):
    path = small["tmp"] / "r.json"
    path.write_text(json.dumps([dict({"image_id": 1000, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}, **bad)]))
    assert expect in _error(str(path), small["gt"])


def test_unknown_categories_are_skipped_counted_and_match_pycocotools(small, synthetic):
    """pycocotools drops detections of categories the GT lacks without a word; we count them."""
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in synthetic["coco"]["annotations"][:200]]
    results += [dict(r, category_id=777) for r in results[:7]] + [dict(r, category_id=-1) for r in results[:3]]
    path = small["tmp"] / "r.json"
    path.write_text(json.dumps(results))
    metrics = evaluate([str(path)], small["gt"], ["bbox"], use_ray=False)
    assert metrics["bbox"]["counts"]["skipped"] == {"unknown_category": 7, "unmapped_category": 3}
    np.testing.assert_allclose(stats_of(metrics, "bbox"), pycocotools_eval(small["gt_json"], path, "bbox").stats,
                               rtol=0, atol=EXACT)


def test_ground_truth_without_area_is_an_error(small):
    coco = json.loads(small["gt_json"].read_text())
    del coco["annotations"][5]["area"]
    path = small["tmp"] / "gt.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(EvalInputError, match=f"annotation id {coco['annotations'][5]['id']}.*area"):
        evaluate([str(small["tmp"] / "x.json")], str(path), ["bbox"], use_ray=False)


def test_unknown_iou_type(small):
    with pytest.raises(EvalInputError, match="unknown IoU type"):
        evaluate([small["gt"]], small["gt"], ["mask"], use_ray=False)


def test_errors_inside_ray_tasks_arrive_as_one_clear_error(synthetic, tmp_path, ray_local):
    shards = list_shards(synthetic["pred"])
    for n, shard in enumerate(shards[:2]):
        table = read_shard(shard)
        if n == 1:
            scores = table[schema.SCORES].to_pylist()
            r = next(i for i, s in enumerate(scores) if s)
            scores[r][0] = float("nan")
            table = table.set_column(table.schema.get_field_index(schema.SCORES), schema.SCORES,
                                     pa.array(scores, table.schema.field(schema.SCORES).type))
        write_shard(str(tmp_path / "two" / f"part-0000{n}.parquet"), table)
    with pytest.raises(EvalInputError) as info:
        evaluate([str(tmp_path / "two")], synthetic["gt"], ["bbox"], use_ray=True, use_state=False)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "two" / "part-00001.parquet")) and "score nan is not finite" in message
    assert "Traceback" not in message
