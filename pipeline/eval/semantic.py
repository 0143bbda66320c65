"""Semantic segmentation evaluation: the computation behind the ``semantic`` IoU type.

The definitions are detectron2's ``SemSegEvaluator``: one confusion matrix summed over every
pixel of every image, turned into numbers only at the end, so per-shard matrices merge exactly
by addition. Reach it through ``evaluate([pred], gt, ["semantic"])``; the entry is
:class:`pipeline.eval.iou_types.SemanticSegmentation`.

Classes: background (category id 0, counted as a class, as in VOC) plus the ground truth's
categories, in id order (a category with id 0 *is* the background class). ``C`` classes.

The confusion matrix, ``(C + 1) x (C + 1)`` int64, ``conf[gt, pred]`` (rows: ground truth,
columns: prediction -- detectron2 stores the transpose):

* row ``C``: ground-truth pixels labelled ignore (255, VOC's "void"; crowd regions). They are
  kept in the matrix but excluded from every metric, as in detectron2.
* column ``C``: **unlabelled** pixels -- no predicted mask covers them, or the covering mask's
  category is ``-1`` / not a ground-truth category (counted in ``skipped``). An unlabelled pixel
  is wrong for every ground-truth class: it counts in its class's ground truth (lowering ACC and
  IoU) but in no class's predictions.
* **error rows** (the image could not be processed) and GT images that **no prediction shard
  holds** are entirely unlabelled: every labelled pixel of theirs is a miss, as detection
  evaluation counts the objects of such images as missed.

Metrics (``tp = diag[:C]``, ``pos_gt = conf[:C, :].sum(1)``, ``pos_pred = conf[:C, :C].sum(0)``):
``ACC_c = tp/pos_gt`` and ``IoU_c = tp/(pos_gt + pos_pred - tp)`` for classes present in the
ground truth (``null`` -- detectron2's NaN -- otherwise); ``mIoU``/``mACC`` their means over
those classes; ``fwIoU`` the IoU weighted by ground-truth pixel frequency; ``pACC =
sum(tp)/sum(pos_gt)``. Fractions 0..1 (detectron2 prints them x100). With no unlabelled pixels
these are exactly detectron2's formulas.

Ground truth per image (a ``(h, w)`` map of class indices):

* a ``label_map`` column (:data:`LABEL_MAP`: PNG bytes, 8-bit grey or palette read by index, pixel
  value = category id, 255 = ignore; read by :mod:`pipeline.data.label_maps`) wins where the row
  has one; any other value is an error naming the image;
* in a **label-map dataset** (its ``dataset.json`` info says ``semantic_ground_truth: label_map``,
  as ``pipeline data import-images --labels`` writes it), a row without a label map (no label
  file, or one the import refused: an error row) has **no** ground truth: the image is left out
  -- neither its pixels nor its prediction count, it is not all background -- and counted as
  ``images_without_label_map``; ``images`` counts the images evaluated;
* otherwise the instance annotations: background everywhere, then each non-crowd annotation's
  mask painted with its category **in annotation order, so where masks overlap the later
  annotation wins**; then crowd regions (``iscrowd=1``) painted ignore, over everything. An
  annotation without a segmentation has its box painted ignore (which of its pixels belong to it
  is unknown), counted as ``gt_annotations_without_mask``.

Predictions: ``semantic_category_ids`` + ``semantic_masks`` (one compressed RLE per category
present, at the image size). A mask of another size than the image, masks that overlap, or a
category list of another length than the masks are errors naming the shard and the image.
An image predicted twice (in two shards or two PRED datasets) counts once: the first wins.

State: each prediction shard's matrix is saved as ``PRED/eval/semantic/part-XXXXX.npz`` with the
key it was computed against (the shard's sha256, the fingerprint of its images' ground truth and
label maps, the classes, the images it was given); it is reused while the key matches.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from pipeline import schema
from pipeline.data.label_maps import UNLABELLED, category_map, is_label_map_dataset
from pipeline.data.label_maps import decode_png_label_map as _decode_png
from pipeline.data.shards import list_shards, read_meta, read_shard, shard_schema
from pipeline.eval.groundtruth import GroundTruth
from pipeline.eval.params import EvalInputError
from pipeline.eval.shard_tasks import (
    claim_shards,
    fill_units,
    is_results_file,
    load_array_state,
    read_checked_table,
    saved_or_warning,
    state_path,
)

LABEL_MAP = schema.LABEL_MAP

IGNORE = schema.SEMANTIC_IGNORE
STATE_VERSION = 1  # bump when the matrix layout or its meaning changes (invalidates saved state)
BACKGROUND = "background"


@dataclass(frozen=True)
class Classes:
    """Background (id 0) + the ground truth's categories, by id; index ``len(ids)`` is ignore/unlabelled."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @staticmethod
    def from_categories(categories: list[dict]) -> Classes:
        by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
        by_id.setdefault(0, BACKGROUND)
        ids = tuple(sorted(by_id))
        names = [by_id[i] for i in ids]
        dup = {n for n in names if names.count(n) > 1}
        return Classes(ids=ids, names=tuple(f"{n} ({i})" if n in dup else n for i, n in zip(ids, names)))

    @property
    def n(self) -> int:
        return len(self.ids)

    def index(self) -> dict[int, int]:
        return {c: k for k, c in enumerate(self.ids)}

    def label_lut(self) -> np.ndarray:
        """uint8 label-map value -> class index (``n`` for 255), -1 where the value is no category."""
        lut = np.full(256, -1, np.int64)
        for k, c in enumerate(self.ids):
            if 0 <= c < IGNORE:
                lut[c] = k
        lut[IGNORE] = self.n
        return lut


# --- one image ------------------------------------------------------------------------------------


def decode_png_label_map(data: bytes, *, where: str) -> np.ndarray:
    """PNG bytes -> (h, w) uint8 values (:func:`pipeline.data.label_maps.decode_png_label_map`), errors as EvalInputError."""
    return _decode_png(data, where=where, error=EvalInputError)


def gt_from_label_map(values: np.ndarray, classes: Classes, *, where: str) -> np.ndarray:
    """Label-map values (category ids, 255 ignore) -> class indices; a value that is no category is an error."""
    idx = classes.label_lut()[values]
    if (idx < 0).any():
        bad = sorted(set(values[idx < 0].tolist()))
        raise EvalInputError(f"{where}: label map value(s) {bad[:5]} are not categories of the ground truth (nor 255 = ignore)")
    return idx


def _decode_segm(segm, h: int, w: int, *, where: str) -> np.ndarray:
    """COCO polygons / RLE (compressed or not) -> (h, w) bool."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm, dict):
        size = [int(v) for v in segm.get("size") or []]
        if size != [h, w]:
            raise EvalInputError(f"{where}: segmentation RLE size {size} is not the image size [{h}, {w}]")
        counts = segm.get("counts")
        rle = mask_utils.frPyObjects(segm, h, w) if isinstance(counts, list) else {"size": size, "counts": str(counts).encode()}
    else:
        raise EvalInputError(f"{where}: unreadable segmentation {type(segm).__name__}")
    return mask_utils.decode(rle).astype(bool)


def gt_from_annotations(ground: GroundTruth, image_id: int, h: int, w: int, classes: Classes, counts: Counter) -> np.ndarray:
    """Class indices of one image from its instance annotations (see the module docstring for the rules)."""
    lo, hi = np.searchsorted(ground.ann_image, [image_id, image_id + 1])
    index = classes.index()
    out = np.full((h, w), index[0], np.int64)
    crowd = []
    for a in range(lo, hi):
        where = f"{ground.source}: image_id {image_id}, annotation id {int(ground.ann_id[a])}"
        segm = ground.ann_segm[a] if ground.ann_segm is not None else None
        if segm is None:
            counts["gt_annotations_without_mask"] += 1
            x, y, bw, bh = ground.ann_bbox[a]
            if np.isfinite([x, y, bw, bh]).all():
                out[max(int(np.floor(y)), 0) : max(int(np.ceil(y + bh)), 0), max(int(np.floor(x)), 0) : max(int(np.ceil(x + bw)), 0)] = classes.n
            continue
        m = _decode_segm(segm, h, w, where=where)
        if ground.ann_iscrowd[a]:
            crowd.append(m)
        else:
            out[m] = index[int(ground.ann_category[a])]  # later annotations win where masks overlap
    for m in crowd:
        out[m] = classes.n
    return out


def prediction_indices(ids, masks, h: int, w: int, classes: Classes, counts: Counter, *, where: str) -> np.ndarray:
    """Class indices of one predicted image (``classes.n`` = unlabelled)."""
    categories = category_map(ids, masks, h, w, where=where, error=EvalInputError)
    index = classes.index()
    for c in ids or []:
        if c is None or int(c) == UNLABELLED:
            counts["unmapped_category_masks"] += 1
        elif int(c) not in index:
            counts["unknown_category_masks"] += 1
    lut_ids = np.asarray(classes.ids, np.int64)
    out = np.full((h, w), classes.n, np.int64)
    known = np.isin(categories, lut_ids)
    out[known] = np.searchsorted(lut_ids, categories[known])  # classes.ids is sorted: position = class index
    return out


def confusion(gt: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``conf[gt, pred]`` pixel counts, ``(n + 1) x (n + 1)`` int64 (index ``n``: ignore / unlabelled)."""
    n = n_classes + 1
    return np.bincount((gt.reshape(-1) * n + pred.reshape(-1)), minlength=n * n).reshape(n, n).astype(np.int64)


# --- the metrics ----------------------------------------------------------------------------------


def semantic_metrics(conf: np.ndarray, classes: Classes) -> dict:
    """detectron2 ``SemSegEvaluator.evaluate``'s numbers (as fractions) from a summed matrix.

    Returns ``{"mIoU", "fwIoU", "mACC", "pACC", "per_category": {name: {"IoU", "ACC"}}}``; a
    value detectron2 gives as NaN (a class without ground truth; no labelled pixel at all) is None.
    """
    C = classes.n
    conf = np.asarray(conf, np.float64)
    tp = conf.diagonal()[:C]
    pos_gt = conf[:C, :].sum(axis=1)  # every prediction of a labelled pixel, unlabelled included
    pos_pred = conf[:C, :C].sum(axis=0)  # predictions of each class on labelled pixels
    acc = np.full(C, np.nan)
    iou = np.full(C, np.nan)
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    iou_valid = acc_valid & (union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    total = pos_gt.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = pos_gt / total
        macc = acc[acc_valid].sum() / acc_valid.sum()
        miou = iou[iou_valid].sum() / iou_valid.sum()
        fwiou = (iou[iou_valid] * weights[iou_valid]).sum() if total > 0 else np.nan
        pacc = tp.sum() / total
    return {
        "mIoU": _num(miou), "fwIoU": _num(fwiou), "mACC": _num(macc), "pACC": _num(pacc),
        "per_category": {name: {"IoU": _num(iou[k]), "ACC": _num(acc[k])} for k, name in enumerate(classes.names)},
    }


def _num(v) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v


# --- per shard: plan, compute (in a Ray task or here), save ------------------------------------------


@dataclass
class SemUnit:
    """One prediction shard and the images it is counted for (its first claim on each)."""

    source: str
    image_ids: np.ndarray  # claimed ids, sorted
    shard_sha256: str
    state_path: str
    key: str
    state: np.ndarray | None = None  # the summed confusion matrix of its images
    counts: Counter = field(default_factory=Counter)
    cached: bool = False


def evaluate_semantic(
    pred_paths: list[str], ground: GroundTruth, iou_type, *,
    use_state: bool = True, use_ray: bool | None = None, task_num_cpus: float = 0.9,
) -> dict:
    """The ``semantic`` entry of ``metrics.json`` for ``pred_paths`` (prediction datasets) against ``ground``."""
    classes = Classes.from_categories(ground.categories)
    label_maps = read_label_maps(ground.source)
    left_out = images_without_ground_truth(ground, label_maps)
    evaluated = np.setdiff1d(ground.image_ids, left_out)
    units = _plan(pred_paths, ground, label_maps, classes, iou_type, use_state=use_state, evaluated=evaluated)
    pending = [u for u in units if u.state is None]
    jobs = [(u, ground.subset(u.image_ids), _subset(label_maps, u.image_ids)) for u in pending]
    ray_tasks = fill_units(semantic_unit, pending, jobs, use_ray=use_ray, min_images=iou_type.ray_min_images,
                           task_num_cpus=task_num_cpus, classes=classes, use_state=use_state)
    n = classes.n + 1
    total = np.zeros((n, n), np.int64)
    counts: Counter = Counter()
    for u in units:
        total += u.state
        counts.update(u.counts)
    claimed = np.concatenate([u.image_ids for u in units]) if units else np.zeros(0, np.int64)
    uncovered = np.setdiff1d(evaluated, claimed)
    if len(uncovered):  # GT images no prediction holds: every labelled pixel is a miss
        conf, c = _shard_matrix(None, ground.subset(uncovered), _subset(label_maps, uncovered), classes, uncovered, where="")
        total += conf
        counts.update(c)
    result = semantic_metrics(total, classes)
    skipped = {k: int(counts[k]) for k in sorted(counts) if k in _SKIP_KEYS and counts[k]}
    result["counts"] = {
        "images": int(len(evaluated)),
        "images_without_label_map": int(len(left_out)),
        "images_without_predictions": int(len(uncovered)),
        "error_rows": int(counts["error_rows"]),
        "pixels": int(total[: classes.n, :].sum()),
        "ignored_pixels": int(total[classes.n, :].sum()),
        "unlabelled_pixels": int(total[: classes.n, classes.n].sum()),
        "gt_label_maps": int(counts["gt_label_maps"]),
        "gt_annotations_without_mask": int(counts["gt_annotations_without_mask"]),
        "skipped": skipped,
        "shards": len(units),
        "shards_from_state": sum(1 for u in units if u.cached),
        "ray_tasks": ray_tasks,
    }
    return result


_SKIP_KEYS = ("unmapped_category_masks", "unknown_category_masks", "null_prediction_rows", "duplicate_images", "duplicate_image_rows")


def read_label_maps(gt_path: str) -> dict[int, bytes]:
    """``image_id -> PNG bytes`` of a ground-truth dataset's :data:`LABEL_MAP` column (non-null rows only);
    empty for a COCO file or a dataset without the column."""
    if is_results_file(gt_path):
        return {}
    out: dict[int, bytes] = {}
    for shard in list_shards(gt_path):
        if LABEL_MAP not in shard_schema(shard).names:
            continue
        table = read_shard(shard, columns=[schema.IMAGE_ID, LABEL_MAP])
        for image_id, data in zip(table[schema.IMAGE_ID].to_pylist(), table[LABEL_MAP].to_pylist()):
            if data is not None:
                out[int(image_id)] = data
    return out


def images_without_ground_truth(ground: GroundTruth, label_maps: dict[int, bytes]) -> np.ndarray:
    """Image ids (sorted) that semantic evaluation leaves out: in a dataset whose semantic ground truth
    is its label maps (``dataset.json`` says so: ``import-images --labels``), the images without one
    (no label file, or one the import refused). Empty for any other ground truth."""
    if is_results_file(ground.source) or not is_label_map_dataset(read_meta(ground.source)):
        return np.zeros(0, np.int64)
    return np.setdiff1d(ground.image_ids, np.fromiter(label_maps, np.int64, len(label_maps)))


def _subset(label_maps: dict[int, bytes], ids) -> dict[int, bytes]:
    return {int(i): label_maps[int(i)] for i in ids if int(i) in label_maps}


def _plan(pred_paths, ground, label_maps, classes, iou_type, *, use_state, evaluated) -> list[SemUnit]:
    units = []
    claims = claim_shards(pred_paths, ground, evaluated, iou_type_name=iou_type.name, made_by="a segment stage's output")
    for shard, sha, claimed, duplicates in claims:
        lm = hashlib.sha256()
        for i in claimed.tolist():
            lm.update(f"{i}:".encode() + hashlib.sha256(label_maps.get(i, b"")).digest())
        payload = {
            "version": STATE_VERSION, "shard_sha256": sha, "classes": list(classes.ids),
            "gt": ground.subset(claimed).fingerprint(iou_type), "label_maps": lm.hexdigest(),
            "images": hashlib.sha256(claimed.tobytes()).hexdigest(),
        }
        key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
        unit = SemUnit(source=shard, image_ids=claimed, shard_sha256=sha, key=key, state_path=state_path(shard, iou_type.name))
        if duplicates:
            unit.counts["duplicate_images"] = duplicates
        if use_state:
            loaded = load_array_state(unit.state_path)
            if loaded is not None and loaded[1].get("key") == key and loaded[0].shape == (classes.n + 1,) * 2:
                unit.state, unit.cached = loaded[0], True
                unit.counts = Counter(loaded[1].get("counts", {}))  # its duplicates included: they are in the key
        units.append(unit)
    return units


def _shard_matrix(table, gt: GroundTruth, label_maps, classes: Classes, image_ids: np.ndarray, *, where: str):
    """The summed matrix of ``image_ids`` (each once) from prediction ``table`` rows (None: no predictions)."""
    n = classes.n + 1
    conf = np.zeros((n, n), np.int64)
    counts: Counter = Counter()
    rows, cols = {}, {}
    if table is not None:
        wanted = set(image_ids.tolist())
        cols = {c: table[c].to_pylist() if c in table.column_names else [None] * table.num_rows
                for c in (schema.IMAGE_ID, schema.ERROR, schema.SEMANTIC_CATEGORY_IDS, schema.SEMANTIC_MASKS)}
        for r in range(table.num_rows):
            i = cols[schema.IMAGE_ID][r]
            if i not in wanted:
                continue  # claimed by an earlier shard (counted by the planner)
            if i in rows:
                counts["duplicate_image_rows"] += 1
                continue
            rows[i] = r
    for image_id in image_ids.tolist():
        h, w = (int(v[0]) for v in gt.image_size(np.array([image_id])))
        here = f"{where or gt.source}: image_id {image_id}"
        if image_id in label_maps:
            values = decode_png_label_map(label_maps[image_id], where=f"{gt.source}: image_id {image_id}")
            if h > 0 and w > 0 and values.shape != (h, w):
                raise EvalInputError(f"{gt.source}: image_id {image_id}: label map is {values.shape[0]}x{values.shape[1]}, the image is {h}x{w}")
            h, w = values.shape
            gt_idx = gt_from_label_map(values, classes, where=f"{gt.source}: image_id {image_id}")
            counts["gt_label_maps"] += 1
        else:
            if h <= 0 or w <= 0:
                h, w = _size_from_prediction(table, rows.get(image_id), here)
            gt_idx = gt_from_annotations(gt, image_id, h, w, classes, counts)
        r = rows.get(image_id)
        if r is None or cols[schema.ERROR][r] is not None or cols[schema.SEMANTIC_MASKS][r] is None:
            if r is not None and cols[schema.ERROR][r] is not None:
                counts["error_rows"] += 1
            elif r is not None:
                counts["null_prediction_rows"] += 1
            pred_idx = np.full((h, w), classes.n, np.int64)  # all unlabelled: every labelled pixel is a miss
        else:
            pred_idx = prediction_indices(cols[schema.SEMANTIC_CATEGORY_IDS][r], cols[schema.SEMANTIC_MASKS][r],
                                          h, w, classes, counts, where=here)
        conf += confusion(gt_idx, pred_idx, classes.n)
    return conf, counts


def _size_from_prediction(table, r, where) -> tuple[int, int]:
    masks = table[schema.SEMANTIC_MASKS][r].as_py() if table is not None and r is not None else None
    if masks:
        return tuple(int(v) for v in masks[0]["size"])
    raise EvalInputError(f"{where}: the ground truth has no image size and no label map or prediction gives one")


def semantic_unit(unit: SemUnit, gt: GroundTruth, label_maps: dict[int, bytes], classes: Classes, *, use_state: bool):
    """The work of one task: read and check the shard, sum its matrix, save state. Returns (conf, counts, warnings)."""
    table = read_checked_table(unit.source, unit.shard_sha256)
    for column in (schema.SEMANTIC_CATEGORY_IDS, schema.SEMANTIC_MASKS):
        if column not in table.column_names:
            raise EvalInputError(f"{unit.source}: no {column!r} column; run a segment stage first")
    conf, counts = _shard_matrix(table, gt, label_maps, classes, unit.image_ids, where=unit.source)
    counts.update(unit.counts)  # duplicate images found by the planner
    warnings = saved_or_warning(use_state, unit.state_path, conf, {"key": unit.key, "shard": unit.source, "counts": dict(counts)})
    return conf, counts, warnings


