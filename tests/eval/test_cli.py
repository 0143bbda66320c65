"""``pipeline eval`` through click's CliRunner (export-coco: tests/annotate/test_coco.py)."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from pipeline.cli.eval import eval_cmd


def test_eval_prints_tables_and_writes_files(synthetic, tmp_path):
    pred = tmp_path / "pred"
    shutil.copytree(synthetic["pred"], pred)
    out = tmp_path / "metrics"
    result = CliRunner().invoke(
        eval_cmd, [str(pred), "--gt", synthetic["gt"], "--iou-type", "bbox", "--iou-type", "keypoints", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    for text in ("AP50", "ARl", "AR75", "category", "class1", "skipped: ", "category -1", "metrics.json"):
        assert text in result.output, text
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "keypoints"}
    assert (out / "pr_bbox.png").exists() and (out / "pr_keypoints.png").exists()


def test_eval_json_output_and_default_iou_type(synthetic, tmp_path):
    pred = tmp_path / "pred"
    shutil.copytree(synthetic["pred"], pred)
    result = CliRunner().invoke(eval_cmd, [str(pred), "--gt", str(synthetic["gt_json"]), "--json", "--no-state"])
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.output)) == ["bbox"]
    assert not (pred / "eval").exists()


def test_eval_bad_input_is_one_line_not_a_traceback(synthetic, tmp_path):
    results = tmp_path / "r.json"
    results.write_text(json.dumps([{"image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}]))
    result = CliRunner().invoke(eval_cmd, [str(results), "--gt", synthetic["gt"]])
    assert result.exit_code == 1
    assert "record 0" in result.output and "image_id 5" in result.output and "Traceback" not in result.output


def test_eval_help_documents_every_option():
    result = CliRunner().invoke(eval_cmd, ["--help"])
    assert result.exit_code == 0
    for option in ("--gt", "--iou-type", "--out", "--no-state", "--method", "--ray", "--json"):
        assert option in result.output


def test_eval_against_a_dataset_without_annotations_says_so(tmp_path):
    """A folder of photos has no ground truth: a table of -1 with exit 0 read like a result."""
    from click.testing import CliRunner

    from pipeline.cli import main
    from tests.conftest import REPO

    photos = str(tmp_path / "photos")
    assert CliRunner().invoke(main, ["data", "import-images", str(REPO / "tests/fixtures/images/skimage"), photos]).exit_code == 0
    results = tmp_path / "dt.json"
    results.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}]))
    result = CliRunner().invoke(main, ["eval", str(results), "--gt", photos, "--no-ray"])
    assert result.exit_code == 1, result.output
    assert "has no annotations (5 images)" in result.output
    assert "AP50" not in result.output and "area=all" not in result.output  # no table of -1
