"""The input error of evaluation, and the version of what it persists.

Everything per IoU type -- pycocotools' ``Params`` (IoU thresholds 0.50:0.05:0.95, 101 recall
points, area ranges, maxDets: never our own), the stat names, the fingerprint of the settings --
is on the type's entry in :mod:`pipeline.eval.iou_types`.
"""

from __future__ import annotations

FORMAT_VERSION = 1
"""Bumped whenever the match-record layout or its meaning changes (invalidates persisted state)."""


class EvalInputError(ValueError):
    """Predictions or ground truth that cannot be evaluated; the message names the offending record."""
