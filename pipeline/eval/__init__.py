"""COCO evaluation that is exact, distributed and mergeable.

Exact: every number equals single-process ``pycocotools.cocoeval.COCOeval`` on the same data
(bbox, segm with RLE or polygons, keypoints; crowd regions, area ranges, maxDets, images without
GT or without detections, categories without GT).

Distributed and mergeable: per-image matching runs as Ray tasks, one per prediction shard, when
Ray is running or the set is large enough to repay starting it (``driver.RAY_AUTO_MIN_IMAGES``;
below that one process is faster: a 5,000-image bbox evaluation takes ~2.5 CPU-s in all); only
small per-image match records (:mod:`pipeline.eval.records`) travel back and are persisted beside
the predictions (``PRED/eval/<iou_type>/part-XXXXX.npz``), so several runs' outputs -- or a
resumed run -- merge without recomputing finished shards.

What can be measured (``bbox``, ``segm``, ``keypoints``, ``proposals``) is the registry in
:mod:`~pipeline.eval.iou_types`: one entry per type, with the fields it reads, its stat names and
its IoU computation.

Modules, in data-flow order: :mod:`~pipeline.eval.groundtruth` and
:mod:`~pipeline.eval.detections` (inputs, validation) -> :mod:`~pipeline.eval.matching`
(per-image ``evaluateImg``) -> :mod:`~pipeline.eval.records` -> :mod:`~pipeline.eval.evaluator`
(reset/process/evaluate) -> :mod:`~pipeline.eval.accumulate` -> :mod:`~pipeline.eval.report`;
:mod:`~pipeline.eval.evaluation` runs it all; :mod:`pipeline.annotate.coco` writes COCO JSON.

Example::

    from pipeline.eval import evaluate
    metrics = evaluate(["runs/detect"], "data/val", ["bbox", "segm"], out_dir="runs/detect/metrics")
"""

import importlib

# Names re-exported lazily (PEP 562): ``import pipeline.eval.iou_types`` alone, as the CLI does for
# ``--help``, must not load Ray and the matching code.
_EXPORTS = {
    "evaluate": "pipeline.eval.evaluation",
    "COCOEvaluator": "pipeline.eval.evaluator",
    "IOU_TYPES": "pipeline.eval.iou_types",
    "get_iou_type": "pipeline.eval.iou_types",
    "EvalInputError": "pipeline.eval.params",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["IOU_TYPES", "COCOEvaluator", "EvalInputError", "evaluate", "get_iou_type"]
