"""Detections to evaluate, read from our prediction shards or from a COCO results JSON file.

Both sources become one column-wise :class:`Detections` with the values pycocotools would hold
after ``COCO.loadRes`` -- which is what makes our numbers equal to a pycocotools run on the file
``pipeline data export-coco`` writes:

* ``bbox`` is COCO **xywh** float64. Our shards store **xyxy** float32 (``boxes``); we convert as
  ``[x1, y1, x2 - x1, y2 - y1]`` in float64, the same numbers the export writes.
* ``area`` (used only to ignore unmatched detections outside an area range) follows ``loadRes``:
  when results carry a ``bbox`` it is ``w * h`` even for segm/keypoints evaluation (our export
  always writes the box, like detectron2 does); mask area for mask-only results; the keypoints'
  extent for keypoint-only results.
* Detection order is the source order (rows, then boxes within a row): pycocotools breaks score
  ties by it.

Bad input never yields a silently wrong number: detections with category -1 (no mapping) or a
category the ground truth does not have are skipped and counted (pycocotools drops the latter
silently); unknown image ids, non-finite or negative-size boxes, non-finite scores and malformed
masks or keypoints raise :class:`EvalInputError` naming the shard, row, image and detection.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pycocotools import mask as mask_utils

from pipeline import schema
from pipeline.eval.groundtruth import GroundTruth, int_id
from pipeline.eval.iou_types import NUM_KEYPOINTS
from pipeline.eval.params import EvalInputError
from pipeline.eval.rle_check import check_counts


@dataclass
class Detections:
    """Column-wise detections; row order is the source order."""

    image_id: np.ndarray  # int64
    category_id: np.ndarray  # int64
    score: np.ndarray  # float64
    bbox: np.ndarray  # (n, 4) float64, xywh
    area: np.ndarray  # float64
    segm: list | None = None  # per detection: compressed RLE {"size": [h, w], "counts": str|bytes}
    keypoints: list | None = None  # per detection: [x, y, v] * 17 floats

    def __len__(self) -> int:
        return len(self.image_id)

    def take(self, idx: np.ndarray) -> Detections:
        idx = np.asarray(idx, dtype=np.int64)
        return Detections(
            image_id=self.image_id[idx],
            category_id=self.category_id[idx],
            score=self.score[idx],
            bbox=self.bbox[idx],
            area=self.area[idx],
            segm=None if self.segm is None else [self.segm[i] for i in idx],
            keypoints=None if self.keypoints is None else [self.keypoints[i] for i in idx],
        )

    @staticmethod
    def empty(*, segm: bool = False, keypoints: bool = False) -> Detections:
        return Detections(
            image_id=np.zeros(0, np.int64),
            category_id=np.zeros(0, np.int64),
            score=np.zeros(0, np.float64),
            bbox=np.zeros((0, 4), np.float64),
            area=np.zeros(0, np.float64),
            segm=[] if segm else None,
            keypoints=[] if keypoints else None,
        )


@dataclass
class ShardPredictions:
    """One prediction shard, read: the images it covers and its usable detections."""

    image_ids: np.ndarray  # int64, unique, every image the shard has a row for (error rows too)
    detections: Detections
    skipped: Counter  # reason -> count
    file_names: list | None = None  # per image_ids entry
    widths: np.ndarray | None = None
    heights: np.ndarray | None = None


def _list_column(table: pa.Table, name: str) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """A list column -> (flat values, per-row lengths, per-row null flags)."""
    col = table[name].combine_chunks() if isinstance(table[name], pa.ChunkedArray) else table[name]
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    nulls = col.is_null().to_numpy(zero_copy_only=False)
    return pc.list_flatten(col), lengths, nulls


def read_prediction_table(
    table: pa.Table,
    *,
    source: str,
    gt: GroundTruth | None,
    category_ids: set[int] | None,
    masks: bool = False,
    keypoints: bool = False,
) -> ShardPredictions:
    """Validate one prediction shard's rows and turn them into :class:`Detections`.

    ``gt``: when given, every image must be a GT image and masks must have the GT image's size;
    otherwise (export) masks must have the row's own ``height``/``width``. ``category_ids``: the
    categories that count; others are skipped and counted (-1 always is).
    """
    skipped: Counter = Counter()
    for col in (schema.IMAGE_ID, schema.BOXES, schema.SCORES, schema.CATEGORY_IDS):
        if col not in table.column_names:
            raise EvalInputError(f"{source}: no '{col}' column; not a detection prediction shard")
    for flag, col, what in ((masks, schema.MASKS, "segm"), (keypoints, schema.KEYPOINTS, "keypoints")):
        if flag and col not in table.column_names:
            raise EvalInputError(f"{source}: no '{col}' column, which {what} evaluation needs")

    ids_all = table[schema.IMAGE_ID].to_numpy().astype(np.int64)
    _, first = np.unique(ids_all, return_index=True)
    rows = np.sort(first)
    if len(rows) != len(ids_all):
        skipped["duplicate_image_rows"] += len(ids_all) - len(rows)
        table = table.take(pa.array(rows))
    image_ids = table[schema.IMAGE_ID].to_numpy().astype(np.int64)
    if gt is not None:
        unknown = ~gt.has_images(image_ids)
        if unknown.any():
            r = int(np.flatnonzero(unknown)[0])
            raise EvalInputError(
                f"{source}: row {r}: image_id {image_ids[r]} is not in the ground truth {gt.source} "
                f"({int(unknown.sum())} such image(s))"
            )
    if schema.ERROR in table.column_names:
        skipped["error_rows"] += table.num_rows - table[schema.ERROR].null_count

    def where_row(r: int) -> str:
        return f"{source}: row {r} (image_id {image_ids[r]})"

    def where(i: int) -> str:
        return f"{where_row(int(row_of[i]))}, detection {int(det_in_row[i])}"

    flat_boxes, n_boxes, _ = _list_column(table, schema.BOXES)
    flat_scores, n_scores, _ = _list_column(table, schema.SCORES)
    flat_cats, n_cats, _ = _list_column(table, schema.CATEGORY_IDS)
    for name, n in ((schema.SCORES, n_scores), (schema.CATEGORY_IDS, n_cats)):
        mismatch = np.flatnonzero(n != n_boxes)
        if len(mismatch):
            r = int(mismatch[0])
            raise EvalInputError(f"{where_row(r)}: {n[r]} {name} for {n_boxes[r]} boxes")
    row_of = np.repeat(np.arange(table.num_rows), n_boxes)
    det_in_row = np.arange(len(row_of)) - np.repeat(np.cumsum(n_boxes) - n_boxes, n_boxes)

    xyxy = np.asarray(pc.list_flatten(flat_boxes).to_numpy(zero_copy_only=False), dtype=np.float64).reshape(-1, 4)
    if len(xyxy) != len(row_of):
        raise EvalInputError(f"{source}: boxes must have 4 numbers (x1, y1, x2, y2) each")
    scores = np.asarray(flat_scores.to_numpy(zero_copy_only=False), dtype=np.float64)
    cats = np.asarray(flat_cats.to_numpy(zero_copy_only=False), dtype=np.int64)

    bad = np.flatnonzero(~np.isfinite(xyxy).all(axis=1))
    if len(bad):
        raise EvalInputError(f"{where(bad[0])}: box {xyxy[bad[0]].tolist()} is not finite (xyxy)")
    bad = np.flatnonzero((xyxy[:, 2] < xyxy[:, 0]) | (xyxy[:, 3] < xyxy[:, 1]))
    if len(bad):
        raise EvalInputError(f"{where(bad[0])}: box {xyxy[bad[0]].tolist()} has negative width or height (xyxy)")
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise EvalInputError(f"{where(bad[0])}: score {scores[bad[0]]} is not finite")

    keep = cats != -1
    skipped["unmapped_category"] += int((~keep).sum())
    if category_ids is not None:
        known = np.isin(cats, np.fromiter(category_ids, np.int64, len(category_ids)))
        skipped["unknown_category"] += int((keep & ~known).sum())
        keep &= known
    keep_idx = np.flatnonzero(keep)

    bbox = np.column_stack([xyxy[:, 0], xyxy[:, 1], xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]])
    det_images = image_ids[row_of]
    segm = kps = None
    if masks:
        segm = _read_masks(table, n_boxes, keep_idx, det_images, row_of, gt, where, where_row)
    if keypoints:
        kps = _read_keypoints(table, n_boxes, keep_idx, where, where_row)
    dets = Detections(
        image_id=det_images[keep_idx],
        category_id=cats[keep_idx],
        score=scores[keep_idx],
        bbox=bbox[keep_idx],
        area=bbox[keep_idx, 2] * bbox[keep_idx, 3],
        segm=segm,
        keypoints=kps,
    )
    out = ShardPredictions(image_ids=image_ids, detections=dets, skipped=+skipped)
    if schema.FILE_NAME in table.column_names:
        out.file_names = table[schema.FILE_NAME].to_pylist()
    if schema.WIDTH in table.column_names and schema.HEIGHT in table.column_names:
        out.widths = np.asarray(table[schema.WIDTH].to_numpy(zero_copy_only=False), dtype=np.float64)
        out.heights = np.asarray(table[schema.HEIGHT].to_numpy(zero_copy_only=False), dtype=np.float64)
    return out


def _read_masks(table, n_boxes, keep_idx, det_images, row_of, gt, where, where_row) -> list[dict]:
    flat, n_masks, _ = _list_column(table, schema.MASKS)
    mismatch = np.flatnonzero(n_masks != n_boxes)
    if len(mismatch):
        r = int(mismatch[0])
        raise EvalInputError(f"{where_row(r)}: {n_masks[r]} masks for {n_boxes[r]} boxes")
    counts = flat.field("counts").to_pylist()
    size_col = flat.field("size")
    size_len = pc.fill_null(pc.list_value_length(size_col), 0).to_numpy(zero_copy_only=False)
    if len(size_len) and (size_len != 2).any():
        i = int(np.flatnonzero(size_len != 2)[0])
        raise EvalInputError(f"{where(i)}: mask size must be [height, width]")
    sizes = np.asarray(pc.list_flatten(size_col).to_numpy(zero_copy_only=False), dtype=np.int64).reshape(-1, 2)
    if gt is not None:
        h, w = gt.image_size(det_images)
    else:
        h = np.asarray(pc.fill_null(table[schema.HEIGHT], -1).to_numpy(zero_copy_only=False), np.int64)[row_of]
        w = np.asarray(pc.fill_null(table[schema.WIDTH], -1).to_numpy(zero_copy_only=False), np.int64)[row_of]
    expected = np.column_stack([h, w])
    wrong = keep_idx[(sizes[keep_idx] != expected[keep_idx]).any(axis=1)]
    if len(wrong):
        i = int(wrong[0])
        raise EvalInputError(
            f"{where(i)}: mask size {sizes[i].tolist()} differs from the image's [height, width] {expected[i].tolist()}"
        )
    kept_counts = [counts[i] for i in keep_idx]
    reasons = check_counts(kept_counts, sizes[keep_idx])
    for j, reason in enumerate(reasons):
        if reason is not None:
            raise EvalInputError(f"{where(int(keep_idx[j]))}: malformed RLE mask: {reason}")
    return [{"size": [int(a), int(b)], "counts": c} for (a, b), c in zip(sizes[keep_idx].tolist(), kept_counts)]


def _read_keypoints(table, n_boxes, keep_idx, where, where_row) -> list[list[float]]:
    flat, n_kps, _ = _list_column(table, schema.KEYPOINTS)
    mismatch = np.flatnonzero(n_kps != n_boxes)
    if len(mismatch):
        r = int(mismatch[0])
        raise EvalInputError(f"{where_row(r)}: {n_kps[r]} keypoint lists for {n_boxes[r]} boxes")
    lengths = pc.fill_null(pc.list_value_length(flat), 0).to_numpy(zero_copy_only=False)
    values = np.asarray(pc.list_flatten(flat).to_numpy(zero_copy_only=False), dtype=np.float64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    out = []
    for i in keep_idx:
        if lengths[i] != 3 * NUM_KEYPOINTS:
            raise EvalInputError(f"{where(int(i))}: {lengths[i]} keypoint values, expected {3 * NUM_KEYPOINTS} (x, y, v)")
        v = values[offsets[i] : offsets[i + 1]]
        if not np.isfinite(v).all():
            raise EvalInputError(f"{where(int(i))}: keypoints are not finite")
        out.append(v.tolist())
    return out


# --- COCO results JSON ---------------------------------------------------------------------------


def results_to_detections(
    results, *, gt: GroundTruth, source: str, masks: bool = False, keypoints: bool = False
) -> tuple[Detections, Counter]:
    """A COCO results list -> :class:`Detections`, with exactly ``COCO.loadRes``' semantics.

    Like ``loadRes``, the first record decides how every record is read: with a ``bbox`` the
    area is ``w * h`` (and a missing segmentation becomes the box polygon); with only a
    ``segmentation`` the area is the mask's and the box its bounding box; with only
    ``keypoints`` box and area come from the keypoints' extent. Polygon and uncompressed-RLE
    segmentations are converted to compressed RLE with the image size, as ``annToRLE`` does.
    Segmentations and keypoints are read (and checked) only when ``masks`` / ``keypoints`` ask for
    them, so a file is not rejected over a field no requested evaluation uses.
    """
    if not isinstance(results, list):
        raise EvalInputError(f"{source}: a COCO results file is a JSON list of detections")
    skipped: Counter = Counter()
    if not results:
        return Detections.empty(segm=masks, keypoints=keypoints), skipped
    first = results[0]
    if not isinstance(first, dict):
        raise EvalInputError(f"{source}: record 0 is not an object")
    if "bbox" in first and first["bbox"] != []:
        mode = "bbox"
    elif "segmentation" in first:
        mode = "segm"
    elif "keypoints" in first:
        mode = "keypoints"
    else:
        raise EvalInputError(f"{source}: record 0 has none of bbox, segmentation, keypoints")
    if mode == "bbox":
        fast = _bbox_results_fast(results, gt=gt, source=source, masks=masks, keypoints=keypoints)
        if fast is not None:
            return fast
    categories = {int(c) for c in gt.category_ids}
    sizes = _image_sizes(gt)
    cols: dict[str, list] = {k: [] for k in ("image_id", "category_id", "score", "bbox", "area", "segm", "keypoints")}
    mask_at: list[tuple[int, int]] = []  # (record, image id) of each mask whose counts are not checked yet
    try:
        _results_loop(results, mode, gt, source, masks, keypoints, categories, sizes, cols, mask_at, skipped)
    except EvalInputError:
        _check_masks(cols["segm"], mask_at, source)  # an earlier record's bad mask is the first error
        raise
    _check_masks(cols["segm"], mask_at, source)
    dets = Detections(
        image_id=np.array(cols["image_id"], np.int64),
        category_id=np.array(cols["category_id"], np.int64),
        score=np.array(cols["score"], np.float64),
        bbox=np.array(cols["bbox"], np.float64).reshape(-1, 4),
        area=np.array(cols["area"], np.float64),
        segm=cols["segm"] if masks else None,
        keypoints=cols["keypoints"] if keypoints else None,
    )
    return dets, skipped


def _results_loop(results, mode, gt, source, masks, keypoints, categories, sizes, cols, mask_at, skipped) -> None:
    """The per-record reading of :func:`results_to_detections` (into ``cols``)."""
    for n, ann in enumerate(results):
        where = f"{source}: record {n}"
        if not isinstance(ann, dict):
            raise EvalInputError(f"{where}: not an object")
        image_id = int_id(ann.get("image_id"), f"{where}: image_id")
        if image_id not in sizes:
            raise EvalInputError(f"{where}: image_id {image_id} is not in the ground truth {gt.source}")
        where = f"{where} (image_id {image_id})"
        category = int_id(ann.get("category_id"), f"{where}: category_id")
        if category not in categories:
            skipped["unmapped_category" if category == -1 else "unknown_category"] += 1
            continue
        score = ann.get("score")
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
            raise EvalInputError(f"{where}: score {score!r} is not a finite number")
        h, w = sizes[image_id]
        seg = ann.get("segmentation")
        kps = ann.get("keypoints")
        if mode == "bbox":
            bbox = _check_bbox(ann.get("bbox"), where)
            x1, y1, bw, bh = bbox
            if seg is None:
                seg = [[x1, y1, x1, y1 + bh, x1 + bw, y1 + bh, x1 + bw, y1]]
            area = bbox[2] * bbox[3]
        elif mode == "segm":
            if seg is None:
                raise EvalInputError(f"{where}: no segmentation (the first record has one, so every record needs one)")
            seg = _to_rle(seg, h, w, where)
            area = float(mask_utils.area(seg))
            bbox = _check_bbox(ann["bbox"], where) if "bbox" in ann else [float(v) for v in mask_utils.toBbox(seg)]
        else:
            kps = _check_keypoints(kps, where)
            x, y = np.asarray(kps[0::3]), np.asarray(kps[1::3])
            x0, x1, y0, y1 = np.min(x), np.max(x), np.min(y), np.max(y)
            area = float((x1 - x0) * (y1 - y0))
            bbox = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
        cols["image_id"].append(image_id)
        cols["category_id"].append(category)
        cols["score"].append(float(score))
        cols["bbox"].append(bbox)
        cols["area"].append(area)
        if masks:
            if mode == "segm":
                cols["segm"].append(seg)  # already converted and checked above
            else:
                cols["segm"].append(_to_rle(seg, h, w, where, check=False))
                mask_at.append((n, image_id))
        if keypoints:
            cols["keypoints"].append(kps if mode == "keypoints" else _check_keypoints(kps, where))


def _check_masks(segm: list, mask_at: list[tuple[int, int]], source: str) -> None:
    """:func:`check_counts` over the last ``len(mask_at)`` masks of ``segm`` at once (one call, not
    one per record: it is vectorised); raises for the first malformed one, naming its record."""
    if not mask_at:
        return
    todo = segm[len(segm) - len(mask_at):]
    reasons = check_counts([m["counts"] for m in todo], np.array([m["size"] for m in todo], np.int64).reshape(-1, 2))
    for (n, image_id), reason in zip(mask_at, reasons):
        if reason is not None:
            raise EvalInputError(f"{source}: record {n} (image_id {image_id}): malformed RLE mask: {reason}")


def _image_sizes(gt: GroundTruth) -> dict[int, tuple[int, int]]:
    """GT image id -> (height, width): one dict lookup per record instead of numpy calls."""
    return dict(zip(gt.image_ids.tolist(), zip(gt.heights.tolist(), gt.widths.tolist())))


def _bbox_results_fast(results: list, *, gt: GroundTruth, source: str, masks: bool, keypoints: bool):
    """:func:`results_to_detections` for ``bbox`` mode, column-wise; ``None`` when any record is
    not plainly well formed (then the per-record loop runs and names the offending record).

    Accepts only what the loop accepts *and* converts to the same values: dict records, ``int``
    ids, ``int``/``float`` finite scores, ``[x, y, w, h]`` lists of ``int``/``float`` (finite,
    ``w, h >= 0``). Anything else (numeric strings, bools, bad values, ...) falls back.
    """
    if set(map(type, results)) != {dict}:
        return None
    image_ids = [r.get("image_id") for r in results]
    cats = [r.get("category_id") for r in results]
    if not set(map(type, image_ids)) <= {int} or not set(map(type, cats)) <= {int}:
        return None
    try:
        image_id = np.array(image_ids, np.int64)
        category = np.array(cats, np.int64)
    except OverflowError:
        return None
    if not gt.has_images(image_id).all():
        return None
    known = np.isin(category, gt.category_ids)
    keep = np.flatnonzero(known)
    skipped: Counter = Counter()
    unknown = category[~known]
    if len(unknown):
        n_unmapped = int(np.count_nonzero(unknown == -1))
        for reason, n in (("unmapped_category", n_unmapped), ("unknown_category", len(unknown) - n_unmapped)):
            if n:
                skipped[reason] += n
    kept = [results[i] for i in keep.tolist()] if len(keep) != len(results) else results
    scores = [r.get("score") for r in kept]
    boxes = [r.get("bbox") for r in kept]
    if not set(map(type, scores)) <= {int, float} or not set(map(type, boxes)) <= {list}:
        return None
    if not set(map(len, boxes)) <= {4}:
        return None
    if not set(map(type, (v for b in boxes for v in b))) <= {int, float}:
        return None
    try:
        score = np.array(scores, np.float64)
        bbox = np.array(boxes, np.float64).reshape(-1, 4)
    except (OverflowError, ValueError, TypeError):
        return None
    if not np.isfinite(score).all() or not np.isfinite(bbox).all() or (bbox[:, 2:] < 0).any():
        return None
    segm = kps = None
    if masks or keypoints:
        sizes = _image_sizes(gt)
        segm, kps = [] if masks else None, [] if keypoints else None
        try:  # any error: the per-record loop finds the first one and names it
            for n, ann, image_id_n in zip(keep.tolist(), kept, image_id[keep].tolist()):
                where = f"{source}: record {n} (image_id {image_id_n})"
                if masks:
                    h, w = sizes[image_id_n]
                    seg = ann.get("segmentation")
                    if seg is None:
                        x1, y1, bw, bh = bbox[len(segm)].tolist()
                        seg = [[x1, y1, x1, y1 + bh, x1 + bw, y1 + bh, x1 + bw, y1]]
                    segm.append(_to_rle(seg, h, w, where, check=False))
                if keypoints:
                    kps.append(_check_keypoints(ann.get("keypoints"), where))
            if masks:
                _check_masks(segm, [(int(n), 0) for n in keep.tolist()], source)
        except EvalInputError:
            return None
    dets = Detections(
        image_id=image_id[keep],
        category_id=category[keep],
        score=score,
        bbox=bbox,
        area=bbox[:, 2] * bbox[:, 3],
        segm=segm,
        keypoints=kps,
    )
    return dets, skipped


def _check_bbox(bbox, where: str) -> list[float]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise EvalInputError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
    try:
        box = [float(v) for v in bbox]
    except (TypeError, ValueError) as exc:
        raise EvalInputError(f"{where}: bbox {bbox!r} is not numeric") from exc
    if not all(math.isfinite(v) for v in box):
        raise EvalInputError(f"{where}: bbox {bbox!r} is not finite")
    if box[2] < 0 or box[3] < 0:
        raise EvalInputError(f"{where}: bbox {bbox!r} has negative width or height (xywh)")
    return box


def _check_keypoints(kps, where: str) -> list[float]:
    if not isinstance(kps, list) or len(kps) != 3 * NUM_KEYPOINTS:
        n = len(kps) if isinstance(kps, list) else kps
        raise EvalInputError(f"{where}: keypoints must be {3 * NUM_KEYPOINTS} numbers (x, y, v), got {n!r}")
    values = [float(v) for v in kps]
    if not all(math.isfinite(v) for v in values):
        raise EvalInputError(f"{where}: keypoints are not finite")
    return values


def _to_rle(seg, h: int, w: int, where: str, *, check: bool = True) -> dict:
    """Polygons / uncompressed RLE / compressed RLE -> validated compressed RLE (``annToRLE``)."""
    if isinstance(seg, list):
        if h < 0 or w < 0:
            raise EvalInputError(f"{where}: polygon needs the image size, which the ground truth lacks")
        try:
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, int(h), int(w)))
        except Exception as exc:  # noqa: BLE001 - pycocotools raises bare Exceptions on bad polygons
            raise EvalInputError(f"{where}: malformed polygon segmentation ({exc})") from exc
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        rle = seg
        if isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, int(h), int(w))
    else:
        raise EvalInputError(f"{where}: segmentation is neither polygons nor RLE")
    size = [int(v) for v in rle["size"]]
    if size != [int(h), int(w)]:
        raise EvalInputError(f"{where}: mask size {size} differs from the image's [height, width] {[int(h), int(w)]}")
    counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
    if not check:  # the caller checks many at once (check_counts is vectorised)
        return {"size": size, "counts": counts}
    reason = check_counts([counts], np.array([size]))[0]
    if reason is not None:
        raise EvalInputError(f"{where}: malformed RLE mask: {reason}")
    return {"size": size, "counts": counts}
