"""Proposal quality as COCO-style recall: AR@100, AR@300, AR@1000, and AR by object size @1000.

Proposals are class-agnostic, so this is pycocotools' ``COCOeval`` on boxes with
``useCats = 0`` and ``maxDets = [100, 300, 1000]`` -- the protocol of Detectron's and
torchvision's RPN recall reports. Each proposal (``proposals`` column, **xyxy**) is a detection
scored by ``proposal_scores`` (RPN objectness, or selective search's rank score). It runs in one
process through pycocotools itself: recall needs no per-category merging, and a proposal set is
evaluated once per method, not per run.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline import schema
from pipeline.data.shards import list_shards, read_shard, shard_schema
from pipeline.eval.groundtruth import load_ground_truth
from pipeline.eval.params import EvalInputError

MAX_DETS = [100, 300, 1000]
KEYS = ["AR@100", "AR@300", "AR@1000", "ARs@1000", "ARm@1000", "ARl@1000"]


def evaluate_proposals(pred_path: str, gt: str, *, column: str = schema.PROPOSALS) -> dict:
    """``{"AR@100": ..., "AR@300": ..., "AR@1000": ..., "ARs@1000": ..., ..., "counts": {...}}``."""
    ground = load_ground_truth(gt, segm=False, keypoints=False)
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
                raise EvalInputError(f"{shard}: image_id {image_id} is not in the ground truth {gt}")
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
        evaluator.params.maxDets = MAX_DETS
        evaluator.params.imgIds = sorted(int(i) for i in ground.image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats[6:12]  # AR at maxDets[0..2], then AR by area at maxDets[2]
    out = {key: float(v) for key, v in zip(KEYS, stats)}
    out["counts"] = {"images": len(ground.image_ids), "images_with_proposals": len(images), "proposals": len(results), "skipped": skipped}
    return out


def _coco_dict(ground) -> dict:
    """Our column-wise ground truth -> a COCO dataset dict (boxes only, one class-agnostic category)."""
    images = [{"id": int(i), "height": int(h), "width": int(w)} for i, h, w in zip(ground.image_ids, ground.heights, ground.widths)]
    annotations = [
        {"id": int(a), "image_id": int(im), "category_id": 1, "bbox": [float(v) for v in box], "area": float(area), "iscrowd": int(crowd)}
        for a, im, box, area, crowd in zip(ground.ann_id, ground.ann_image, ground.ann_bbox, ground.ann_area, ground.ann_iscrowd)
        if np.isfinite(box).all()
    ]
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}
