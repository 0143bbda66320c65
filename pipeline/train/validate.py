"""Validation AP (detectors), mIoU (semantic models) or top-1 (classifiers) during training, through the path a job takes.

The checkpoint the training loop just saved is run as a one-stage job over the validation
dataset: the job spec a user would write (stage ``detect`` / ``masks`` / ``keypoints`` / ``segment`` / ``classify`` with that
``weights`` file), the engine's preflight, plan and shard writer
(:func:`pipeline.engine.runner.execute` with ``local=True``: the same read -> decode -> stage
steps, run in this training worker instead of in Ray actor pools), and
:func:`pipeline.eval.evaluation`. So the AP reported per epoch is the AP a user gets from
``pipeline run`` + ``pipeline eval`` with that checkpoint -- no second code path.
"""

from __future__ import annotations

import os
import tempfile

import torch

from pipeline.config.spec import JobSpec
from pipeline.data.shards import DatasetMeta, write_meta
from pipeline.engine.preflight import preflight
from pipeline.engine.runner import execute, metric_types
from pipeline.eval import evaluate
from pipeline.eval.iou_types import get_iou_type
from pipeline.models.registry import build_model, get_entry
from pipeline.models.weights import resolve_weights
from pipeline.stages import get_stage_spec
from pipeline.train.generative_objective import validation_bits_per_dim
from pipeline.train.train_spec import TrainSpec

STAGE_FOR_TASK = {"detect": "detect", "masks": "masks", "keypoints": "keypoints", "semantic": "segment", "classify": "classify"}  # model task -> stage type
DETECTION_PARAMS = {"score_threshold": 0.05, "max_detections": 100}  # COCO evaluation's usual operating point


def validation_job(weights: str, spec: TrainSpec, output: str, *, batch_size: int = 8) -> JobSpec:
    """The job that scores checkpoint ``weights`` on ``spec.val``, writing predictions to ``output``."""
    stage_type = STAGE_FOR_TASK[get_entry(spec.model).task]
    stage = get_stage_spec(stage_type).model_validate(
        {
            "name": "validate",
            "type": stage_type,
            "model": spec.model,
            "weights": weights,
            "category_map": "by_name",
            "batch_size": batch_size,
            "threads": torch.get_num_threads(),
        }
        | (DETECTION_PARAMS if spec.kind == "detector" else {})
    )
    return JobSpec(name=f"{spec.name}-validation", input=spec.val, output=output, stages=[stage])


def validate_checkpoint(weights: str, spec: TrainSpec, *, batch_size: int = 8) -> dict:
    """``{"val_bbox_AP": ..., "val_segm_AP": ...}`` (detectors) or ``{"val_semantic_mIoU": ...}`` of the
    checkpoint file ``weights`` on ``spec.val``: each type's headline number (its first stat key); for a
    generative model, ``{"val_bits_per_dim": ...}`` (no stage runs it: its likelihood is computed here)."""
    if spec.kind == "generative":
        model, _ = build_model(spec.model, resolve_weights(spec.model, weights))
        return {"val_bits_per_dim": round(validation_bits_per_dim(model, spec.val, spec.image_size, batch_size=batch_size), 4)}
    with tempfile.TemporaryDirectory() as tmp:
        job = validation_job(weights, spec, os.path.join(tmp, "pred"), batch_size=batch_size)
        plan = preflight(job, "<validation>")
        execute(plan, progress=False, local=True)
        write_meta(job.output, DatasetMeta(categories=plan.categories, kind="predictions"))
        iou_types = metric_types(job)
        metrics = evaluate([job.output], job.input, iou_types, use_ray=False, use_state=False)
    headline = {t: get_iou_type(t).stat_keys[0] for t in iou_types}
    return {f"val_{t}_{key}": round(float(metrics[t][key]), 4) for t, key in headline.items()}
