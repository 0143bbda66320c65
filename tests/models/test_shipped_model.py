"""The model the repo ships (conf/models/small_maskrcnn_shapes.pth) still predicts what it did.

An accuracy pin in the Detectron2 way: the checkpoint runs through the masks stage on the demo's
whole held-out split (200 synthetic images, seed 300) and is evaluated with the project's COCO
evaluator; the AP must equal what was measured when the file was made (the numbers in
``conf/models/small_maskrcnn_shapes.json``, which the READMEs quote). Inference of a fixed
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
from pipeline.stages.masks import MasksSpec, MasksStage
from tests.conftest import REPO

CHECKPOINT = REPO / "conf" / "models" / "small_maskrcnn_shapes.pth"
EXPECTED = json.loads((REPO / "conf" / "models" / "small_maskrcnn_shapes.json").read_text())
TOLERANCE = 0.005


def test_shipped_checkpoint_is_small_and_documented():
    assert CHECKPOINT.exists(), "make model writes it"
    assert os.path.getsize(CHECKPOINT) < 10 * 1024**2  # the repo holds no file over 10 MB
    assert "pipeline train jobs/train_shapes.yaml" in (REPO / "conf" / "models" / "README.md").read_text()


def test_shipped_checkpoint_keeps_its_accuracy(tmp_path):
    gt = str(tmp_path / "test")
    split = EXPECTED["held_out"]
    synth_dataset(gt, images=split["images"], seed=split["seed"], size=split["size"])
    stage = StageActor(
        stage_name="masks",
        stage_cls=MasksStage,
        output_columns=MasksSpec(name="masks", type="masks").output_columns(),
        stage_kwargs={
            "model": "small_maskrcnn",
            "weights": str(CHECKPOINT),
            "score_threshold": split["score_threshold"],
            "dataset_categories": read_meta(gt).categories,
            "threads": 2,
        },
        drop_columns=(schema.PIXELS,),
    )
    columns = [schema.IMAGE_ID, schema.FILE_NAME, schema.WIDTH, schema.HEIGHT, schema.IMAGE, schema.ERROR]
    read_schema = pa.schema([schema.IMAGE_SCHEMA.field(c) for c in columns])
    parts = [stage(decode_batch(schema.conform(t, read_schema))) for s in list_shards(gt) for t in iter_shard(s, 8, columns=columns)]
    pred = str(tmp_path / "pred")
    write_shard(os.path.join(pred, "part-00000.parquet"), pa.concat_tables(parts))
    write_meta(pred, DatasetMeta(categories=read_meta(gt).categories, kind="predictions"))
    metrics = evaluate([pred], gt, ["bbox", "segm"], use_ray=False, use_state=False)
    got = {t: round(metrics[t]["AP"], 4) for t in ("bbox", "segm")}
    for iou_type, expected in EXPECTED["AP"].items():
        assert got[iou_type] == pytest.approx(expected, abs=TOLERANCE), (iou_type, got)
