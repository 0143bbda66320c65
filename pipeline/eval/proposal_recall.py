"""Proposal quality as COCO-style recall: the computation behind the ``proposals`` IoU type.

Proposals are class-agnostic, so this is pycocotools' ``COCOeval`` on boxes with
``useCats = 0`` and the entry's ``maxDets`` (``[100, 300, 1000]``) -- the protocol of
Detectron's and torchvision's RPN recall reports. Each proposal (``proposals`` column, **xyxy**)
is a detection scored by ``proposal_scores`` (RPN objectness, or selective search's rank score).
It runs in one process through pycocotools itself: recall needs no per-category merging, and a
proposal set is evaluated once per method, not per run. Names and ``metrics.json`` keys are the
entry's (:class:`pipeline.eval.iou_types.ProposalRecall`); reach it through
``evaluate([pred], gt, ["proposals"])``.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline import schema
from pipeline.data.shards import list_shards, read_shard, shard_schema
from pipeline.eval.groundtruth import GroundTruth
from pipeline.eval.params import EvalInputError


def class_agnostic_recall(
    pred_path: str, ground: GroundTruth, *, max_dets: list[int], column: str = schema.PROPOSALS
) -> tuple[np.ndarray, dict]:
    """(AR at each of the three ``max_dets``, then AR of small/medium/large objects at the last;
    counts), as pycocotools' ``summarize`` reports them.

    Proposals with a non-finite or negative-size box are skipped and counted; a row's proposals
    without a score column are taken best first.
    """
    if len(max_dets) != 3:
        raise ValueError(f"pycocotools summarises exactly three maxDets, got {max_dets}")
    score_column = schema.PROPOSAL_SCORES if column == schema.PROPOSALS else schema.SCORES
    results, images, skipped = [], set(), 0
    for shard in list_shards(pred_path):
        names = shard_schema(shard).names
        if column not in names:
            raise EvalInputError(f"{shard}: no {column!r} column; run a proposals stage first")
        table = read_shard(shard, columns=[schema.IMAGE_ID, column] + ([score_column] if score_column in names else []))
        for row in table.to_pylist():
            image_id = row[schema.IMAGE_ID]
            if not ground.has_images(np.array([image_id]))[0]:
                raise EvalInputError(f"{shard}: image_id {image_id} is not in the ground truth {ground.source}")
            images.add(image_id)
            boxes = np.asarray(row[column] or [], np.float64).reshape(-1, 4)
            scores = row.get(score_column) or [1.0 - i / max(1, len(boxes)) for i in range(len(boxes))]
            for (x1, y1, x2, y2), score in zip(boxes, scores):
                if not np.isfinite([x1, y1, x2, y2, score]).all() or x2 < x1 or y2 < y1:
                    skipped += 1
                    continue
                results.append({"image_id": image_id, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    coco_gt = COCO()
    coco_gt.dataset = _coco_dict(ground)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results) if results else COCO()
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.useCats = 0
        evaluator.params.maxDets = list(max_dets)
        evaluator.params.imgIds = sorted(int(i) for i in ground.image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.asarray(evaluator.stats[6:12], np.float64)  # AR at maxDets[0..2], then AR by area at maxDets[2]
    counts = {"images": len(ground.image_ids), "images_with_proposals": len(images), "proposals": len(results), "skipped": skipped}
    return stats, counts


def _coco_dict(ground: GroundTruth) -> dict:
    """Our column-wise ground truth -> a COCO dataset dict (boxes only, one class-agnostic category)."""
    images = [{"id": int(i), "height": int(h), "width": int(w)} for i, h, w in zip(ground.image_ids, ground.heights, ground.widths)]
    annotations = [
        {"id": int(a), "image_id": int(im), "category_id": 1, "bbox": [float(v) for v in box], "area": float(area), "iscrowd": int(crowd)}
        for a, im, box, area, crowd in zip(ground.ann_id, ground.ann_image, ground.ann_bbox, ground.ann_area, ground.ann_iscrowd)
        if np.isfinite(box).all()
    ]
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}
