"""The COCO evaluation settings we reproduce, and the names of the numbers they produce.

We never invent our own thresholds: :func:`coco_params` returns pycocotools' own ``Params`` object
(IoU thresholds 0.50:0.05:0.95, 101 recall points, area ranges, maxDets), so the per-image
matching, the accumulation and the summary all read the very same arrays as ``COCOeval`` does.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from pycocotools.cocoeval import Params

IOU_TYPES = ("bbox", "segm", "keypoints")

DETECTION_STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
KEYPOINT_STATS = ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]

FORMAT_VERSION = 1
"""Bumped whenever the match-record layout or its meaning changes (invalidates persisted state)."""


class EvalInputError(ValueError):
    """Predictions or ground truth that cannot be evaluated; the message names the offending record."""


def check_iou_type(iou_type: str) -> str:
    if iou_type not in IOU_TYPES:
        raise EvalInputError(f"unknown IoU type {iou_type!r}; choose from {', '.join(IOU_TYPES)}")
    return iou_type


def stat_keys(iou_type: str) -> list[str]:
    """Names of ``COCOeval.stats`` entries, in pycocotools' order."""
    return KEYPOINT_STATS if check_iou_type(iou_type) == "keypoints" else DETECTION_STATS


def coco_params(iou_type: str) -> Params:
    """pycocotools' default parameters for ``iou_type`` (a fresh object each call)."""
    p = Params(iouType=check_iou_type(iou_type))
    p.maxDets = sorted(p.maxDets)
    if len(p.iouThrs) > 16:  # match flags are packed into uint16 bit masks
        raise ValueError("at most 16 IoU thresholds are supported")
    return p


def params_fingerprint(iou_type: str) -> str:
    """Everything a per-image match record depends on besides the data itself."""
    p = coco_params(iou_type)
    payload = {
        "format": FORMAT_VERSION,
        "iou_type": iou_type,
        "iouThrs": [float(t) for t in p.iouThrs],
        "areaRng": [[float(a), float(b)] for a, b in p.areaRng],
        "maxDets": [int(m) for m in p.maxDets],
        "sigmas": [float(s) for s in getattr(p, "kpt_oks_sigmas", np.zeros(0))],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
