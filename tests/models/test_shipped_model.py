"""The models the repo ships (conf/models/small_maskrcnn_shapes.pth, small_unet_shapes.pth, small_cnn_shapes.pth) still predict what they did.

An accuracy pin in the Detectron2 way: each checkpoint runs through its stage (masks, segment,
classify) on the whole held-out split (200 synthetic images, seed 300) and is evaluated with the
project's evaluator (COCO AP, semantic mIoU, classification top-1); the numbers must equal what was measured when the file was
made (``conf/models/<name>.json``, which the READMEs quote). Inference of a fixed
checkpoint on CPU is deterministic far below the tolerance, which only absorbs float reordering.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from pipeline import schema
from pipeline.data.decode import decode_batch
from pipeline.data.shards import DatasetMeta, iter_shard, list_shards, read_meta, write_meta, write_shard
from pipeline.data.synth import synth_dataset
from pipeline.engine.stage_actor import StageActor
from pipeline.eval import evaluate
from pipeline.stages.classify import ClassifySpec, ClassifyStage
from pipeline.stages.masks import MasksSpec, MasksStage
from pipeline.stages.segment import SegmentSpec, SegmentStage
from tests.conftest import REPO

CHECKPOINT = REPO / "conf" / "models" / "small_maskrcnn_shapes.pth"
EXPECTED = json.loads((REPO / "conf" / "models" / "small_maskrcnn_shapes.json").read_text())
SEMANTIC_CHECKPOINT = REPO / "conf" / "models" / "small_unet_shapes.pth"
SEMANTIC_EXPECTED = json.loads((REPO / "conf" / "models" / "small_unet_shapes.json").read_text())
CLASSIFIER_CHECKPOINT = REPO / "conf" / "models" / "small_cnn_shapes.pth"
CLASSIFIER_EXPECTED = json.loads((REPO / "conf" / "models" / "small_cnn_shapes.json").read_text())
TOLERANCE = 0.005


@pytest.mark.parametrize(
    "checkpoint, limit_mb, command",
    [
        (CHECKPOINT, 10, "pipeline train jobs/train_shapes.yaml"),  # the repo holds no file over 10 MB
        (SEMANTIC_CHECKPOINT, 10, "pipeline train jobs/train_segment_shapes.yaml"),
        (CLASSIFIER_CHECKPOINT, 5, "pipeline train jobs/train_classify_shapes.yaml"),  # the classification issue's limit
    ],
    ids=lambda v: v.name if hasattr(v, "name") else None,
)
def test_shipped_checkpoints_are_small_and_documented(checkpoint, limit_mb, command):
    assert checkpoint.exists(), "make model / model-segment / model-classify write them"
    assert os.path.getsize(checkpoint) < limit_mb * 1024**2
    assert command in (REPO / "conf" / "models" / "README.md").read_text()


def predict(gt: str, out: str, stage_name: str, stage_cls, spec_cls, kwargs: dict) -> None:
    """Run one stage over every row of ``gt`` in batches of 8, in this process; write a prediction dataset."""
    stage = StageActor(
        stage_name=stage_name,
        stage_cls=stage_cls,
        output_columns=spec_cls(name=stage_name, type=stage_name).output_columns(),
        stage_kwargs={**kwargs, "dataset_categories": read_meta(gt).categories, "threads": 2},
        drop_columns=(schema.PIXELS,),
    )
    columns = [schema.IMAGE_ID, schema.FILE_NAME, schema.WIDTH, schema.HEIGHT, schema.IMAGE, schema.ERROR]
    read_schema = pa.schema([schema.IMAGE_SCHEMA.field(c) for c in columns])
    parts = [stage(decode_batch(schema.conform(t, read_schema))) for s in list_shards(gt) for t in iter_shard(s, 8, columns=columns)]
    write_shard(os.path.join(out, "part-00000.parquet"), pa.concat_tables(parts))
    write_meta(out, DatasetMeta(categories=read_meta(gt).categories, kind="predictions"))


def test_shipped_checkpoint_keeps_its_accuracy(tmp_path):
    gt, pred = str(tmp_path / "test"), str(tmp_path / "pred")
    split = EXPECTED["held_out"]
    synth_dataset(gt, images=split["images"], seed=split["seed"], size=split["size"])
    kwargs = {"model": "small_maskrcnn", "weights": str(CHECKPOINT), "score_threshold": split["score_threshold"]}
    predict(gt, pred, "masks", MasksStage, MasksSpec, kwargs)
    metrics = evaluate([pred], gt, ["bbox", "segm"], use_ray=False, use_state=False)
    got = {t: round(metrics[t]["AP"], 4) for t in ("bbox", "segm")}
    for iou_type, expected in EXPECTED["AP"].items():
        assert got[iou_type] == pytest.approx(expected, abs=TOLERANCE), (iou_type, got)


def test_shipped_semantic_checkpoint_keeps_its_miou(tmp_path):
    """The job's settings (jobs/segment_shapes.yaml: native size, categories by name) on the held-out split."""
    gt, pred = str(tmp_path / "test"), str(tmp_path / "pred")
    split = SEMANTIC_EXPECTED["held_out"]
    synth_dataset(gt, images=split["images"], seed=split["seed"], size=split["size"])
    kwargs = {"model": "small_unet", "weights": str(SEMANTIC_CHECKPOINT), "category_map": "by_name"}
    predict(gt, pred, "segment", SegmentStage, SegmentSpec, kwargs)
    got = evaluate([pred], gt, ["semantic"], use_ray=False, use_state=False)["semantic"]
    expected = SEMANTIC_EXPECTED["semantic"]
    assert got["counts"]["images"] == split["images"] and got["counts"]["images_without_predictions"] == 0
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert got[key] == pytest.approx(expected[key], abs=TOLERANCE), (key, got[key])
    for name, iou in expected["IoU"].items():
        assert got["per_category"][name]["IoU"] == pytest.approx(iou, abs=TOLERANCE), (name, got["per_category"][name])


def test_shipped_classifier_keeps_its_top1(tmp_path):
    """The job's settings (jobs/classify_shapes.yaml: the checkpoint's sizes, categories by name) on the held-out split."""
    gt, pred = str(tmp_path / "test"), str(tmp_path / "pred")
    split = CLASSIFIER_EXPECTED["held_out"]
    synth_dataset(gt, images=split["images"], seed=split["seed"], size=split["size"], classification=True)
    kwargs = {"model": "small_cnn", "weights": str(CLASSIFIER_CHECKPOINT), "category_map": "by_name", "top_k": 3}
    predict(gt, pred, "classify", ClassifyStage, ClassifySpec, kwargs)
    got = evaluate([pred], gt, ["classification"], use_ray=False, use_state=False)["classification"]
    expected = CLASSIFIER_EXPECTED["classification"]
    assert got["counts"]["images"] == split["images"] and got["counts"]["images_without_predictions"] == 0
    assert got["top1"] == pytest.approx(expected["top1"], abs=TOLERANCE)
    for name, top1 in expected["per_category_top1"].items():
        assert got["per_category"][name]["top1"] == pytest.approx(top1, abs=TOLERANCE), (name, got["per_category"][name])
