"""The COCO evaluator: reset / process(match records of one shard) / evaluate.

``process`` may be called with the records of any number of shards, in any order, including the
same shard twice (a retried task, a resumed run, two runs' outputs over the same images): records
are deduplicated by image id, the first records of an image win, and the number of duplicates is
reported. ``evaluate`` accumulates once over everything merged and returns pycocotools' numbers.

Example::

    ev = COCOEvaluator(iou_type="bbox", categories=gt.categories)
    ev.reset()
    for records in shard_records:
        ev.process(records)
    result = ev.evaluate()   # {"stats": {"AP": ...}, "per_category": {...}, "eval": {...}}
"""

from __future__ import annotations

import numpy as np

from pipeline.eval.accumulate import accumulate, per_category_ap, summarize
from pipeline.eval.iou_types import CocoIoUType, get_iou_type
from pipeline.eval.params import EvalInputError
from pipeline.eval.records import MatchRecords


class COCOEvaluator:
    def __init__(self, *, iou_type: str | CocoIoUType, categories: list[dict]):
        """``iou_type``: a name (checked here) or a :mod:`~pipeline.eval.iou_types` entry."""
        self.iou_type = get_iou_type(iou_type)
        if not self.iou_type.per_image_matching:
            raise EvalInputError(f"{self.iou_type.name} is not matched per image; evaluate() measures it")
        self.categories = sorted(categories, key=lambda c: int(c["id"]))
        self.category_ids = np.array([int(c["id"]) for c in self.categories], dtype=np.int64)
        self.num_areas = len(self.iou_type.params().areaRng)
        self.reset()

    def reset(self) -> None:
        self._parts: list[MatchRecords] = []
        self._seen = np.zeros(0, np.int64)
        self.duplicate_images = 0

    @property
    def images(self) -> np.ndarray:
        """Image ids merged so far (sorted)."""
        return self._seen

    def process(self, records: MatchRecords) -> int:
        """Merge one shard's records; returns how many of its images were already merged (dropped)."""
        ids = np.unique(records.image_ids)
        new = np.setdiff1d(ids, self._seen, assume_unique=True)
        duplicates = len(ids) - len(new)
        if duplicates:
            records = records.only_images(new)
            self.duplicate_images += duplicates
        self._parts.append(records)
        self._seen = np.union1d(self._seen, new)
        return duplicates

    def merged(self) -> MatchRecords:
        return MatchRecords.concat(self._parts, self.num_areas)

    def evaluate(self) -> dict:
        """``{"stats": {name: value}, "per_category": {category id: AP}, "eval": accumulate()}``."""
        records = self.merged()
        result = accumulate(records, category_ids=self.category_ids, iou_type=self.iou_type)
        stats = summarize(result, iou_type=self.iou_type)
        ap = per_category_ap(result)
        return {
            "stats": {k: float(v) for k, v in zip(self.iou_type.stat_keys, stats)},
            "per_category": {int(c): float(v) for c, v in zip(self.category_ids, ap)},
            "eval": result,
            "detections": records.num_detections,
        }
