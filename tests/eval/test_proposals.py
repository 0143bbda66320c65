"""Proposal recall (pipeline eval --iou-type proposals) on proposals made from exact ground truth.

``proposals`` is an IoU type like the others (an entry of ``pipeline.eval.iou_types``): reached
through ``evaluate``, written to ``metrics.json`` by the same writer, alone or beside bbox."""

import json

import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline import schema
from pipeline.cli import main
from pipeline.data.shards import DatasetMeta, list_shards, read_shard, write_meta, write_shard
from pipeline.data.synth import CATEGORIES, synth_dataset
from pipeline.eval import EvalInputError, evaluate

DETECTION_COLUMNS = [(schema.BOXES, schema.BOXES_TYPE), (schema.SCORES, schema.SCORES_TYPE), (schema.CATEGORY_IDS, schema.IDS_TYPE)]


def write_proposals(path: str, rows: list[dict], *, detections: bool = False) -> None:
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("image_id", pa.int64()), ("error", pa.string()),
        (schema.PROPOSALS, schema.BOXES_TYPE), (schema.PROPOSAL_SCORES, schema.SCORES_TYPE),
        *(DETECTION_COLUMNS if detections else [])]))
    write_shard(path + "/part-00000.parquet", table)
    write_meta(path, DatasetMeta(categories=CATEGORIES, kind="predictions"))


def evaluate_proposals(pred: str, gt: str) -> dict:
    return evaluate([pred], gt, ["proposals"])["proposals"]


@pytest.fixture()
def gt(tmp_path):
    out = str(tmp_path / "gt")
    synth_dataset(out, images=5, seed=9)
    return out


def proposals_from_gt(gt: str, shift: float = 0.0, drop_every: int = 0) -> list[dict]:
    rows = []
    for r in read_shard(list_shards(gt)[0]).to_pylist():
        boxes = []
        for k, a in enumerate(r["annotations"]):
            if drop_every and k % drop_every == 0:
                continue
            x, y, w, h = a["bbox"]
            boxes.append([x + shift * w, y, x + w + shift * w, y + h])
        rows.append({"image_id": r["image_id"], "error": None, schema.PROPOSALS: boxes,
                     schema.PROPOSAL_SCORES: [1.0 - 0.01 * i for i in range(len(boxes))],
                     # the same boxes as detections of the GT's categories (read only by bbox)
                     schema.BOXES: boxes, schema.SCORES: [1.0 - 0.01 * i for i in range(len(boxes))],
                     schema.CATEGORY_IDS: [a["category_id"] for k, a in enumerate(r["annotations"])
                                           if not (drop_every and k % drop_every == 0)]})
    return rows


def test_exact_proposals_have_full_recall(gt, tmp_path):
    write_proposals(str(tmp_path / "p"), proposals_from_gt(gt))
    recall = evaluate_proposals(str(tmp_path / "p"), gt)
    assert recall["AR@100"] == recall["AR@1000"] == 1.0
    assert recall["counts"]["images_with_proposals"] == 5


def test_missing_and_shifted_proposals_lower_recall(gt, tmp_path):
    n_gt = sum(len(r["annotations"]) for r in read_shard(list_shards(gt)[0]).to_pylist())
    write_proposals(str(tmp_path / "dropped"), proposals_from_gt(gt, drop_every=2))
    dropped = evaluate_proposals(str(tmp_path / "dropped"), gt)
    kept = sum(len(r[schema.PROPOSALS]) for r in proposals_from_gt(gt, drop_every=2))
    assert dropped["AR@1000"] == pytest.approx(kept / n_gt)  # each kept box is exact: recall 1 at every IoU
    write_proposals(str(tmp_path / "shifted"), proposals_from_gt(gt, shift=0.2))
    assert 0 < evaluate_proposals(str(tmp_path / "shifted"), gt)["AR@1000"] < 1.0


def test_unknown_image_is_an_error(gt, tmp_path):
    rows = proposals_from_gt(gt)
    rows[0]["image_id"] = 999
    write_proposals(str(tmp_path / "p"), rows)
    with pytest.raises(EvalInputError, match="image_id 999"):
        evaluate_proposals(str(tmp_path / "p"), gt)


def test_cli_prints_and_writes_recall(gt, tmp_path):
    write_proposals(str(tmp_path / "p"), proposals_from_gt(gt))
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "p"), "--gt", gt, "--iou-type", "proposals", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "AR@1000" in result.output
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["proposals"]["AR@100"] == 1.0


def test_cli_metrics_json_keys_are_as_before(gt, tmp_path):
    write_proposals(str(tmp_path / "p"), proposals_from_gt(gt, drop_every=3))
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "p"), "--gt", gt, "--iou-type", "proposals", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert list(written) == ["proposals"]
    assert list(written["proposals"]) == ["AR@100", "AR@300", "AR@1000", "ARs@1000", "ARm@1000", "ARl@1000", "counts"]
    assert set(written["proposals"]["counts"]) == {"images", "images_with_proposals", "proposals", "skipped"}
    assert "5 images (5 with proposals)" in result.output and "pr_<iou_type>" not in result.output


def test_proposals_beside_bbox_in_one_call(gt, tmp_path):
    """One metrics.json, one writer: both types, in the order asked; one JSON document with --json."""
    write_proposals(str(tmp_path / "p"), proposals_from_gt(gt), detections=True)
    args = ["eval", str(tmp_path / "p"), "--gt", gt, "--iou-type", "bbox", "--iou-type", "proposals", "--no-state"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert list(written) == ["bbox", "proposals"]
    assert written["bbox"]["AP"] == 1.0 and written["proposals"]["AR@1000"] == 1.0
    assert "AP50" in result.output and "AR@1000" in result.output and "AP bbox" in result.output
    as_json = CliRunner().invoke(main, [*args, "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert list(json.loads(as_json.output)) == ["bbox", "proposals"]


def test_proposals_take_one_prediction_dataset(gt, tmp_path):
    write_proposals(str(tmp_path / "p"), proposals_from_gt(gt))
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "p"), str(tmp_path / "p"), "--gt", gt, "--iou-type", "proposals"])
    assert result.exit_code == 2 and "--iou-type proposals takes one prediction dataset" in result.output
    with pytest.raises(EvalInputError, match="takes one prediction dataset"):
        evaluate([str(tmp_path / "p")] * 2, gt, ["proposals"])
