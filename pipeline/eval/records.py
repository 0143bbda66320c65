"""Per-image match records: the small, mergeable state that travels from tasks to the driver.

For every (image, category) that pycocotools' ``evaluateImg`` would return a record for, we keep
exactly what ``COCOeval.accumulate`` reads from it, for every area range ``a``:

* one row per kept detection (the ``maxDets[-1]`` best by score, stable): ``score``, its ``rank``
  in that order, and two ``uint16`` bit masks over the IoU thresholds -- ``matched`` (bit t set
  when ``dtMatches[t]`` is non-zero) and ``ignored`` (``dtIgnore[t]``);
* one row per (image, category) with ground truth: ``count[a]``, its number of non-ignored GT
  (``gtIgnore == 0``).

Detection ranks let the driver rebuild each ``dtScores[0:maxDet]`` prefix, and images are the
dedup key: records of an image already merged from another shard are dropped, so a retried or
repeated shard is never counted twice. Saved as ``.npz`` with a JSON ``meta`` entry (the
fingerprints it was computed against).
"""

from __future__ import annotations

import io
import json
import posixpath
import zipfile
from dataclasses import dataclass, fields

import numpy as np

from pipeline.data.shards import publish_bytes, resolve


@dataclass
class MatchRecords:
    image_ids: np.ndarray  # int64: every image these records cover (including ones with no rows)
    det_image: np.ndarray  # int64
    det_category: np.ndarray  # int64
    det_rank: np.ndarray  # int32: position among the image+category's detections by score
    det_score: np.ndarray  # float64
    det_matched: np.ndarray  # uint16 (n, A): bit t = matched at IoU threshold t
    det_ignored: np.ndarray  # uint16 (n, A): bit t = ignored at IoU threshold t
    gt_image: np.ndarray  # int64
    gt_category: np.ndarray  # int64
    gt_count: np.ndarray  # int32 (p, A): non-ignored ground truth per area range

    @staticmethod
    def empty(num_areas: int) -> MatchRecords:
        return MatchRecords(
            image_ids=np.zeros(0, np.int64),
            det_image=np.zeros(0, np.int64),
            det_category=np.zeros(0, np.int64),
            det_rank=np.zeros(0, np.int32),
            det_score=np.zeros(0, np.float64),
            det_matched=np.zeros((0, num_areas), np.uint16),
            det_ignored=np.zeros((0, num_areas), np.uint16),
            gt_image=np.zeros(0, np.int64),
            gt_category=np.zeros(0, np.int64),
            gt_count=np.zeros((0, num_areas), np.int32),
        )

    @property
    def num_detections(self) -> int:
        return len(self.det_image)

    def only_images(self, image_ids: np.ndarray) -> MatchRecords:
        """The records of ``image_ids`` only."""
        keep_d = np.isin(self.det_image, image_ids)
        keep_g = np.isin(self.gt_image, image_ids)
        return MatchRecords(
            image_ids=self.image_ids[np.isin(self.image_ids, image_ids)],
            det_image=self.det_image[keep_d],
            det_category=self.det_category[keep_d],
            det_rank=self.det_rank[keep_d],
            det_score=self.det_score[keep_d],
            det_matched=self.det_matched[keep_d],
            det_ignored=self.det_ignored[keep_d],
            gt_image=self.gt_image[keep_g],
            gt_category=self.gt_category[keep_g],
            gt_count=self.gt_count[keep_g],
        )

    @staticmethod
    def concat(parts: list[MatchRecords], num_areas: int) -> MatchRecords:
        if not parts:
            return MatchRecords.empty(num_areas)
        return MatchRecords(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(MatchRecords)})

    def sorted(self) -> MatchRecords:
        """Canonical order (image, category, rank): equal records compare equal array by array."""
        d = np.lexsort((self.det_rank, self.det_category, self.det_image))
        g = np.lexsort((self.gt_category, self.gt_image))
        return MatchRecords(
            image_ids=np.sort(self.image_ids),
            det_image=self.det_image[d],
            det_category=self.det_category[d],
            det_rank=self.det_rank[d],
            det_score=self.det_score[d],
            det_matched=self.det_matched[d],
            det_ignored=self.det_ignored[d],
            gt_image=self.gt_image[g],
            gt_category=self.gt_category[g],
            gt_count=self.gt_count[g],
        )

    def to_bytes(self, meta: dict) -> bytes:
        buf = io.BytesIO()
        arrays = {f.name: getattr(self, f.name) for f in fields(MatchRecords)}
        np.savez(buf, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
        return buf.getvalue()

    @staticmethod
    def from_bytes(data: bytes) -> tuple[MatchRecords, dict]:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            records = MatchRecords(**{f.name: npz[f.name] for f in fields(MatchRecords)})
        return records, meta


def save_records(path: str, records: MatchRecords, meta: dict) -> None:
    """Write atomically, so a reader never sees half a file (``publish_bytes``: rename locally, one upload on S3)."""
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    publish_bytes(fs, p, records.to_bytes(meta))


def load_records(path: str) -> tuple[MatchRecords, dict] | None:
    """The records and meta saved at ``path``; None if absent or unreadable (then recompute)."""
    fs, p = resolve(path)
    try:
        with fs.open_input_stream(p) as f:
            return MatchRecords.from_bytes(f.read())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
