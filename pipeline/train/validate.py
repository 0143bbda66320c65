"""Validation COCO AP during training, through the same path a job takes.

The model in training is saved as a checkpoint, loaded by the inference stage that jobs use
(``detect`` / ``masks`` / ``keypoints``), run over the validation images, written as a prediction
shard, and scored by :func:`pipeline.eval.evaluate`. So the AP reported per epoch is the AP a user
gets from ``pipeline run`` + ``pipeline eval`` with that checkpoint -- no second code path.
"""

from __future__ import annotations

import os
import tempfile

import pyarrow as pa
import torch

from pipeline import schema
from pipeline.data.decode import decode_batch
from pipeline.data.shards import (
    DatasetMeta,
    iter_shard,
    join,
    list_shards,
    read_meta,
    write_meta,
    write_shard,
)
from pipeline.engine.actor import StageActor
from pipeline.models.registry import get_entry
from pipeline.train.spec import TrainSpec

STAGE_FOR_TASK = {"detect": "detect", "masks": "masks", "keypoints": "keypoints"}
IOU_TYPES = {"detect": ["bbox"], "masks": ["bbox", "segm"], "keypoints": ["bbox", "keypoints"]}


def validate(model: torch.nn.Module, spec: TrainSpec, categories: list[dict], *, batch_size: int = 8) -> dict:
    """Return ``{"val_bbox_AP": ..., "val_segm_AP": ...}`` for ``model`` on ``spec.val``."""
    from pipeline.eval import evaluate
    from pipeline.stages import get_stage_spec
    from pipeline.train.loop import checkpoint_payload

    task = get_entry(spec.model).task
    was_training = model.training
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "model.pth")
        torch.save(checkpoint_payload(spec, model, categories), weights)
        spec_cls = get_stage_spec(STAGE_FOR_TASK[task])
        stage = StageActor(  # the wrapper jobs use: rows that fail to decode become error rows
            stage_name="validate",
            stage_cls=spec_cls.stage_class(),
            output_columns=spec_cls(name="validate", type=spec_cls.type_name, model=spec.model).output_columns(),
            stage_kwargs={
                "model": spec.model,
                "weights": weights,
                "score_threshold": 0.05,
                "max_detections": 100,
                "category_map": "by_name",
                "dataset_categories": read_meta(spec.val).categories,
                "threads": torch.get_num_threads(),
            },
            drop_columns=(schema.PIXELS,),
        )
        gt_dir = spec.val
        pred_dir = os.path.join(tmp, "pred")
        parts = []
        read_schema = _read_schema()
        for shard in list_shards(spec.val):
            for table in iter_shard(shard, batch_size, columns=read_schema.names):
                decoded = decode_batch(schema.conform(table, read_schema))
                parts.append(stage(decoded))
        write_shard(join(pred_dir, "part-00000.parquet"), pa.concat_tables(parts))
        write_meta(pred_dir, DatasetMeta(categories=read_meta(gt_dir).categories, kind="predictions"))
        metrics = evaluate([pred_dir], gt_dir, IOU_TYPES[task], use_ray=False, use_state=False)
    model.train(was_training)
    return {f"val_{t}_AP": round(float(metrics[t]["AP"]), 4) for t in IOU_TYPES[task]}


def _read_schema() -> pa.Schema:
    names = [schema.IMAGE_ID, schema.FILE_NAME, schema.WIDTH, schema.HEIGHT, schema.IMAGE, schema.ERROR]
    return pa.schema([schema.IMAGE_SCHEMA.field(n) for n in names])
