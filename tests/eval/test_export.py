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
    fine = [r for r in synthetic["rows"] if r[schema.ERROR] is None]
    assert 0 < report["error_rows"] == len(synthetic["rows"]) - len(fine)  # the case has error rows: left out
    assert report["images"] == len(written["images"]) == len(fine)
    assert [i["id"] for i in written["images"]] == [r[schema.IMAGE_ID] for r in fine]
    assert [c["id"] for c in written["categories"]] == [c["id"] for c in synthetic["coco"]["categories"]]
    anns = written["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    assert all(a["iscrowd"] == 0 and a["area"] > 0 and a["category_id"] != -1 for a in anns)
    assert set(coco.getCatIds()) >= {a["category_id"] for a in anns}
    # the exported dataset as ground truth for its own predictions (the results export, which
    # leaves the error rows out too): every box finds itself
    results = tmp_path / "results.json"
    export_coco(synthetic["pred"], str(results))
    metrics = evaluate([str(results)], str(out), ["bbox"], use_ray=False, use_state=False)
    assert metrics["bbox"]["AP50"] == 1.0 and metrics["bbox"]["AR100"] == 1.0


def test_results_round_trip_through_eval(synthetic, tmp_path):
    """The exported results file and the shards it came from give the same numbers."""
    out = tmp_path / "results.json"
    export_coco(synthetic["pred"], str(out))
    from_file = evaluate([str(out)], synthetic["gt"], ["bbox", "segm"], use_ray=False)
    from_shards = evaluate([synthetic["pred"]], synthetic["gt"], ["bbox", "segm"], use_ray=False, use_state=False)
    for t in ("bbox", "segm"):
        np.testing.assert_allclose(stats_of(from_file, t), stats_of(from_shards, t), rtol=0, atol=EXACT)


def _with_error_rows(tmp_path, *, categories, source="synthetic"):
    """A small prediction dataset in which 2 rows are error rows with no size (as the decode step writes them)."""
    from pipeline.eval.synthetic import synthetic_case, write_predictions
    from pipeline.data.shards import DatasetMeta, write_meta

    coco, rows = synthetic_case(images=12, seed=5, detections_per_image=4, categories=3)
    rows = [r for r in rows if r[schema.ERROR] is None][:10]
    for r in rows[3:5]:
        r.update({schema.ERROR: "cannot decode image: truncated file", schema.WIDTH: None, schema.HEIGHT: None,
                  schema.BOXES: None, schema.SCORES: None, schema.LABELS: None, schema.CATEGORY_IDS: None,
                  schema.MASKS: None})
    pred = str(tmp_path / "pred")
    write_predictions(rows, pred, categories=coco["categories"], rows_per_shard=4)
    write_meta(pred, DatasetMeta(categories=categories(coco) if callable(categories) else categories,
                                 info={"source": source}, kind="predictions"))
    return pred, rows, coco


def test_error_rows_are_left_out_and_counted(tmp_path):
    from click.testing import CliRunner
    from pipeline.cli import main

    pred, rows, coco = _with_error_rows(tmp_path, categories=lambda coco: coco["categories"])
    bad = {r[schema.IMAGE_ID] for r in rows if r[schema.ERROR]}
    out = tmp_path / "dataset.json"
    result = CliRunner().invoke(main, ["data", "export-coco", pred, str(out), "--as-dataset"])
    assert result.exit_code == 0, result.output
    assert "for 8 images" in result.output and "left out 2 error row(s)" in result.output
    written = json.loads(out.read_text())
    assert len(written["images"]) == 8 and not bad & {i["id"] for i in written["images"]}
    assert all(isinstance(i["width"], int) and isinstance(i["height"], int) for i in written["images"])
    assert _load(out).dataset == written  # pycocotools takes it
    assert [c["name"] for c in written["categories"]] == [c["name"] for c in coco["categories"]]

    results_out = tmp_path / "results.json"
    report = export_coco(pred, str(results_out))
    assert report["error_rows"] == 2 and report["images"] == 8
    records = json.loads(results_out.read_text())
    assert records and not bad & {r["image_id"] for r in records}


def test_categories_always_have_names(tmp_path):
    # no categories in dataset.json and no readable source: named as render names them
    pred, rows, _ = _with_error_rows(tmp_path, categories=[])
    out = tmp_path / "dataset.json"
    export_coco(pred, str(out), as_dataset=True)
    written = json.loads(out.read_text())
    used = sorted({c for r in rows for c in r[schema.CATEGORY_IDS] or [] if c != -1})
    assert written["categories"] == [{"id": c, "name": f"class {c}"} for c in used]
    assert _load(out).loadCats(used[0])[0]["name"] == f"class {used[0]}"
    # categories recorded without names get the same fallback
    pred, _, _ = _with_error_rows(tmp_path / "b", categories=[{"id": 1}, {"id": 2, "name": "dog"}, {"id": 3}])
    export_coco(pred, str(out), as_dataset=True)
    assert [c["name"] for c in json.loads(out.read_text())["categories"]] == ["class 1", "dog", "class 3"]
