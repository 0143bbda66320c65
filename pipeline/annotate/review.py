"""``pipeline review``: which images a person should look at first, and why, object by object.

Every object of a predictions dataset and of its ground truth gets a status from COCO's own
matching rule at one IoU threshold (``iou``, default 0.5), named as FiftyOne names it:

``eval``
    ``tp`` (a prediction matched to a ground-truth object, and that object), ``fp`` (a prediction
    that matches nothing), ``fn`` (a ground-truth object no prediction matched: a miss), or
    ``ignored`` (a crowd region, and a prediction matched to one: pycocotools counts neither).
``eval_id``
    the partner's ``id`` (null when unmatched). Ids are ``gt-<annotation id>`` and
    ``pred-<image_id>-<n>``, ``n`` being the box's position in its row of the prediction shard.
``eval_iou``
    the IoU with that partner (null when unmatched).

The matching is pycocotools' ``COCOeval.evaluateImg`` for one threshold, area range ``all``,
per image and category (:func:`greedy_match`): predictions in decreasing score order (ties in
shard order), each takes the ground-truth object of its class with the highest IoU >= ``iou``
that no earlier prediction took (the last such object on a tie, as pycocotools), non-crowd objects
before crowd regions, which any number of predictions may match. IoUs are pycocotools'
(``mask.iou``: boxes for ``bbox``, masks for ``segm``). Two differences, both deliberate: every
prediction gets a status (pycocotools evaluates only the 100 best per image and class), and there
is no area range. ``tests/annotate/test_review.py`` holds the statuses to pycocotools'
``evalImgs`` (``dtMatches`` / ``gtMatches``) on COCO val2014 results and on a real model run.

Review score of an image (higher = look first), with ``T = score_threshold`` (default 0.5) and
``M = margin`` (default 0.1)::

    review_score = sum over fp predictions with score s >= T  of  s          (confident false positives)
                 + number of fn ground-truth objects                         (misses, 1 each)
                 + 0.5 * sum over predictions with |s - T| < M  of  (1 - |s - T| / M)   (low margin)

A confident false positive weighs its score (0.9 is almost a miss), low-scoring ones weigh
nothing (an export at ``T`` would drop them); a prediction right at the threshold adds 0.5, one
at the edge of the margin nothing: whichever side of ``T`` it falls, a person should confirm it.
Crowd regions add nothing. Images are ranked by score, worst first (ties by image_id).

Which images: every ground-truth image, as in COCO evaluation; an image the predictions do not
cover, or an error row (the job could not read the image), has its objects as misses, like the
evaluator counts them, and error rows are listed with their reason (``error`` column and
``errors``). Predictions with no category the ground truth knows (``category_ids`` -1, or an id
not in the ground truth's categories) cannot be matched: they are counted
(``skipped_predictions``), not reviewed.

Boxes in the table are **xyxy** pixels (COCO ``bbox`` xywh converted; predictions as in the shard).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline import schema
from pipeline.annotate import AnnotationError
from pipeline.data import coco_file
from pipeline.data.shards import list_shards, read_shard, shard_schema
from pipeline.eval.detections import Detections, read_prediction_table
from pipeline.eval.groundtruth import load_ground_truth

STATUSES = ("tp", "fp", "fn", "ignored")
PREDICTION, GROUND_TRUTH = "prediction", "ground_truth"
LOW_MARGIN_WEIGHT = 0.5
TABLE = "review.parquet"
SUMMARY = "review.json"
PAGE = "index.html"
THUMBS = "thumbs"

REVIEW_SCHEMA = pa.schema([
    pa.field("review_rank", pa.int32()),  # 1 = the image to look at first
    pa.field("review_score", pa.float64()),  # the image's score (module docstring), on each of its rows
    pa.field("image_id", pa.int64()),
    pa.field("file_name", pa.string()),
    pa.field("kind", pa.string()),  # "prediction" | "ground_truth"
    pa.field("id", pa.string()),  # "pred-<image_id>-<n>" | "gt-<annotation id>"
    pa.field("category_id", pa.int64()),
    pa.field("category", pa.string()),
    pa.field("score", pa.float64()),  # null for ground truth
    pa.field("box", pa.list_(pa.float64(), 4)),  # xyxy pixels
    pa.field("eval", pa.string()),  # tp | fp | fn | ignored
    pa.field("eval_id", pa.string()),  # the partner's id, null when unmatched
    pa.field("eval_iou", pa.float64()),  # IoU with the partner, null when unmatched
    pa.field("error", pa.string()),  # why the job could not read the image; null when it could
])


def greedy_match(ious: np.ndarray, *, iou_threshold: float, gt_crowd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pycocotools' ``evaluateImg`` matching of one (image, category) at one IoU threshold.

    ``ious`` (D, G): detections in decreasing score order (ties in source order), ground truth in
    source order; ``gt_crowd`` (G,) bool (crowd = ignored). Returns ``det_gt`` (D,) the index of
    each detection's ground truth or -1, and ``gt_det`` (G,) the index of the (last) detection
    matched to each ground truth or -1. The loop is evaluateImg's own, line for line.
    """
    n_det, n_gt = ious.shape
    crowd = np.asarray(gt_crowd, dtype=bool)
    order = np.argsort(crowd, kind="mergesort")  # evaluateImg sorts GT by ignore flag (stable)
    det_gt = np.full(n_det, -1, np.int64)
    gt_det = np.full(n_gt, -1, np.int64)
    for d in range(n_det):
        best, m = min(iou_threshold, 1 - 1e-10), -1
        for g in order:
            if gt_det[g] >= 0 and not crowd[g]:
                continue  # already matched, and not a crowd region
            if m > -1 and not crowd[m] and crowd[g]:
                break  # a real object is matched: crowd regions come after, stop
            if ious[d, g] < best:
                continue
            best, m = ious[d, g], g
        if m >= 0:
            det_gt[d], gt_det[m] = m, d
    return det_gt, gt_det


@dataclass
class ObjectMatches:
    """Per-object results of :func:`match_objects`; partners are indices into the other side."""

    det_status: np.ndarray  # (D,) str
    det_partner: np.ndarray  # (D,) int64, index into the GT annotations, -1
    det_iou: np.ndarray  # (D,) float64, NaN when unmatched
    gt_status: np.ndarray  # (G,) str
    gt_partner: np.ndarray  # (G,) int64, index into the detections, -1
    gt_iou: np.ndarray  # (G,) float64


def match_objects(gt, dets, *, iou: float = 0.5, iou_type: str = "bbox") -> ObjectMatches:
    """Match :class:`~pipeline.eval.detections.Detections` to a :class:`~pipeline.eval.groundtruth.GroundTruth`.

    Every detection and every ground-truth annotation (of every GT image) gets a status; see
    the module docstring. ``iou_type``: ``bbox`` (``dets.bbox`` / ``gt.ann_bbox``, COCO xywh) or
    ``segm`` (``dets.segm`` RLE / ``gt.ann_segm`` polygons or RLE).
    """
    from pycocotools import mask as mask_utils

    if iou_type not in ("bbox", "segm"):
        raise AnnotationError(f"--iou-type {iou_type!r}: review matches bbox or segm")
    if not 0.0 < iou <= 1.0:
        raise AnnotationError(f"--iou {iou}: must be in (0, 1]")
    n_det, n_gt = len(dets.image_id), len(gt.ann_id)
    out = ObjectMatches(
        det_status=np.full(n_det, "fp", dtype=object), det_partner=np.full(n_det, -1, np.int64),
        det_iou=np.full(n_det, np.nan), gt_status=np.where(gt.ann_iscrowd != 0, "ignored", "fn").astype(object),
        gt_partner=np.full(n_gt, -1, np.int64), gt_iou=np.full(n_gt, np.nan),
    )
    gt_groups = _groups(gt.ann_image, gt.ann_category, np.arange(n_gt))
    det_groups = _groups(dets.image_id, dets.category_id, np.lexsort((np.arange(n_det), -dets.score)))
    for key, d in det_groups.items():
        g = gt_groups.get(key)
        if g is None:
            continue
        crowd = gt.ann_iscrowd[g] != 0
        if iou_type == "bbox":
            bad = g[np.isnan(gt.ann_bbox[g]).any(axis=1)]
            if len(bad):
                raise AnnotationError(f"{gt.source}: annotation id {int(gt.ann_id[bad[0]])} has no bbox, which bbox review needs")
            ious = mask_utils.iou(np.ascontiguousarray(dets.bbox[d]), np.ascontiguousarray(gt.ann_bbox[g]), crowd.tolist())
        else:
            ious = mask_utils.iou([dets.segm[i] for i in d], [_gt_rle(gt, i) for i in g], crowd.tolist())
        ious = np.asarray(ious, dtype=np.float64).reshape(len(d), len(g))
        det_gt, gt_det = greedy_match(ious, iou_threshold=iou, gt_crowd=crowd)
        for k in np.flatnonzero(det_gt >= 0):
            j = det_gt[k]
            out.det_partner[d[k]], out.det_iou[d[k]] = g[j], ious[k, j]
            out.det_status[d[k]] = "ignored" if crowd[j] else "tp"
        for j in np.flatnonzero(gt_det >= 0):
            k = gt_det[j]
            out.gt_partner[g[j]], out.gt_iou[g[j]] = d[k], ious[k, j]
            if not crowd[j]:
                out.gt_status[g[j]] = "tp"
    return out


def _groups(images: np.ndarray, categories: np.ndarray, order: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """(image, category) -> indices, each group in the order ``order`` gives."""
    groups: dict[tuple[int, int], list] = {}
    for i, c, n in zip(images[order].tolist(), categories[order].tolist(), order.tolist()):
        groups.setdefault((i, c), []).append(n)
    return {k: np.asarray(v, np.int64) for k, v in groups.items()}


def _gt_rle(gt, i: int) -> dict:
    """The ``i``-th annotation's mask as one compressed RLE (``COCO.annToRLE``)."""
    from pycocotools import mask as mask_utils

    seg = gt.ann_segm[i]
    if seg is None:
        raise AnnotationError(f"{gt.source}: annotation id {int(gt.ann_id[i])} has no segmentation, which segm review needs")
    if isinstance(seg, list) or isinstance(seg.get("counts"), list):
        h, w = gt.image_size(np.array([gt.ann_image[i]]))
        rle = mask_utils.frPyObjects(seg, int(h[0]), int(w[0]))
        return mask_utils.merge(rle) if isinstance(seg, list) else rle
    return seg


def review_score(kinds, scores, statuses, *, score_threshold: float = 0.5, margin: float = 0.1) -> float:
    """One image's review score from its objects (the formula in the module docstring)."""
    total = 0.0
    for kind, s, status in zip(kinds, scores, statuses):
        if kind == GROUND_TRUTH:
            total += status == "fn"
            continue
        if status == "fp" and s >= score_threshold:
            total += s
        if margin > 0 and abs(s - score_threshold) < margin:
            total += LOW_MARGIN_WEIGHT * (1 - abs(s - score_threshold) / margin)
    return float(total)


# --- the review of a predictions dataset -------------------------------------------------------


@dataclass
class ImageReview:
    """One image of the review: its objects (dicts with the table's per-object columns) and score."""

    image_id: int
    file_name: str | None
    width: int | None
    height: int | None
    error: str | None = None
    objects: list[dict] = field(default_factory=list)
    score: float = 0.0
    rank: int = 0

    def counts(self) -> Counter:
        return Counter(o["eval"] for o in self.objects)


@dataclass
class Review:
    images: list[ImageReview]  # worst first
    categories: dict[int, str]
    counts: dict
    settings: dict

    def table(self) -> pa.Table:
        rows = []
        for im in self.images:
            for o in im.objects:
                rows.append({"review_rank": im.rank, "review_score": im.score, "image_id": im.image_id,
                             "file_name": im.file_name, "error": im.error, **o})
        return pa.Table.from_pylist(rows, schema=REVIEW_SCHEMA)


def build_review(pred: str, gt: str, *, iou: float = 0.5, iou_type: str = "bbox", score_threshold: float = 0.5,
                 margin: float = 0.1) -> Review:
    """Match ``pred`` (a predictions dataset) against ``gt`` (a dataset or COCO file) and score each image."""
    if margin < 0:
        raise AnnotationError(f"--margin {margin}: must be >= 0")
    ground = load_ground_truth(gt, segm=iou_type == "segm", keypoints=False)
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in ground.categories}
    read = _read_predictions(pred, ground, masks=iou_type == "segm")
    dets = read["detections"] or Detections.empty(segm=iou_type == "segm")
    m = match_objects(ground, dets, iou=iou, iou_type=iou_type)

    gt_names = _gt_file_names(gt)
    images: dict[int, ImageReview] = {}
    for i, h, w in zip(ground.image_ids.tolist(), ground.heights.tolist(), ground.widths.tolist()):
        row = read["rows"].get(i, {})
        images[i] = ImageReview(image_id=i, file_name=row.get("file_name") or gt_names.get(i),
                                width=row.get("width") or (w if w > 0 else None),
                                height=row.get("height") or (h if h > 0 else None), error=row.get("error"))
    det_ids, boxes = read["det_ids"], read["boxes"]
    gt_ids = [f"gt-{a}" for a in ground.ann_id.tolist()]
    for k in range(len(dets.image_id)):
        p = m.det_partner[k]
        images[int(dets.image_id[k])].objects.append(_obj(
            PREDICTION, det_ids[k], int(dets.category_id[k]), names, float(dets.score[k]), boxes[k],
            m.det_status[k], gt_ids[p] if p >= 0 else None, m.det_iou[k]))
    for j in range(len(ground.ann_id)):
        p = m.gt_partner[j]
        x, y, bw, bh = ground.ann_bbox[j].tolist()
        if np.isnan([x, y, bw, bh]).any() and ground.ann_segm is not None:
            from pycocotools import mask as mask_utils

            x, y, bw, bh = mask_utils.toBbox(_gt_rle(ground, j)).tolist()
        images[int(ground.ann_image[j])].objects.append(_obj(
            GROUND_TRUTH, gt_ids[j], int(ground.ann_category[j]), names, None, [x, y, x + bw, y + bh],
            m.gt_status[j], det_ids[p] if p >= 0 else None, m.gt_iou[j]))
    for im in images.values():
        im.objects.sort(key=lambda o: (o["kind"] != PREDICTION, -(o["score"] or 0.0)))  # predictions best first, then GT
        im.score = review_score([o["kind"] for o in im.objects], [o["score"] for o in im.objects],
                                [o["eval"] for o in im.objects], score_threshold=score_threshold, margin=margin)
    ranked = sorted(images.values(), key=lambda im: (-im.score, im.image_id))
    for r, im in enumerate(ranked, 1):
        im.rank = r
    counts = _counts(ranked, read, ground)
    settings = {"pred": pred, "gt": gt, "iou": iou, "iou_type": iou_type, "score_threshold": score_threshold,
                "margin": margin, "formula": FORMULA}
    return Review(images=ranked, categories=names, counts=counts, settings=settings)


FORMULA = ("review_score = sum(s of fp predictions with s >= T) + count(fn) "
           "+ 0.5 * sum(1 - |s - T| / M over predictions with |s - T| < M)")


def _obj(kind, obj_id, category_id, names, score, box, status, partner, iou) -> dict:
    return {"kind": kind, "id": obj_id, "category_id": category_id, "category": names.get(category_id),
            "score": score, "box": [float(v) for v in box], "eval": str(status), "eval_id": partner,
            "eval_iou": None if np.isnan(iou) else float(iou)}


def _read_predictions(pred: str, ground, *, masks: bool) -> dict:
    """Every shard through the evaluator's reader (its checks and skips), plus what review shows."""
    cat_ids = set(ground.category_ids.tolist())
    parts, det_ids, boxes = [], [], []
    rows: dict[int, dict] = {}
    skipped: Counter = Counter()
    for shard in list_shards(pred):
        table = read_shard(shard)
        sp = read_prediction_table(table, source=shard, gt=ground, category_ids=cat_ids, masks=masks)
        skipped.update(sp.skipped)
        # the rows read_prediction_table kept (first of each image_id), and its detections' positions in them
        ids = table[schema.IMAGE_ID].to_numpy().astype(np.int64)
        first = np.sort(np.unique(ids, return_index=True)[1])
        kept = table.take(pa.array(first)).to_pylist()
        fresh = np.ones(len(sp.detections.image_id), bool)
        for r in kept:
            i = int(r[schema.IMAGE_ID])
            if i in rows:  # an image an earlier shard already had: the first one counts, as in the evaluator
                skipped["duplicate_images"] += 1
                fresh &= sp.detections.image_id != i
                continue
            rows[i] = {"file_name": r.get(schema.FILE_NAME), "width": r.get(schema.WIDTH),
                       "height": r.get(schema.HEIGHT), "error": r.get(schema.ERROR)}
            for n, (c, box) in enumerate(zip(r.get(schema.CATEGORY_IDS) or [], r.get(schema.BOXES) or [])):
                if c != -1 and c in cat_ids:
                    det_ids.append(f"pred-{i}-{n}")
                    boxes.append(box)
        parts.append(sp.detections.take(np.flatnonzero(fresh)))
    dets = _concat(parts) if parts else None
    if dets is not None and len(dets.image_id) != len(det_ids):  # the two readers must agree object for object
        raise AnnotationError(f"{pred}: {len(dets.image_id)} detections read for evaluation but {len(det_ids)} boxes listed")
    return {"detections": dets, "rows": rows, "det_ids": det_ids, "boxes": boxes,
            "skipped": skipped}


def _concat(parts):
    return Detections(
        image_id=np.concatenate([p.image_id for p in parts]),
        category_id=np.concatenate([p.category_id for p in parts]),
        score=np.concatenate([p.score for p in parts]),
        bbox=np.concatenate([p.bbox for p in parts]).reshape(-1, 4),
        area=np.concatenate([p.area for p in parts]),
        segm=None if parts[0].segm is None else [s for p in parts for s in p.segm],
    )


def _gt_file_names(gt: str) -> dict[int, str]:
    """image_id -> file_name of the ground truth's images (for images no prediction row names)."""
    if gt.endswith(".json") and os.path.isfile(gt):
        coco = coco_file.read_coco_file(gt, AnnotationError)
        return {coco_file.int_id(im["id"], "image id", AnnotationError): im.get("file_name") for im in coco["images"]}
    out: dict[int, str] = {}
    for shard in list_shards(gt):
        if schema.FILE_NAME in shard_schema(shard).names:
            t = read_shard(shard, columns=[schema.IMAGE_ID, schema.FILE_NAME])
            out.update(zip(t[schema.IMAGE_ID].to_pylist(), t[schema.FILE_NAME].to_pylist()))
    return out


def _counts(images: list[ImageReview], read: dict, ground) -> dict:
    preds, gts = Counter(), Counter()
    for im in images:
        for o in im.objects:
            (preds if o["kind"] == PREDICTION else gts)[o["eval"]] += 1
    skipped = {k: int(v) for k, v in sorted(read["skipped"].items()) if v and k != "error_rows"}
    return {
        "images": len(images),
        "images_without_predictions": sum(1 for im in images if im.image_id not in read["rows"]),
        "error_rows": [{"image_id": im.image_id, "file_name": im.file_name, "error": im.error} for im in images if im.error],
        "predictions": {s: preds[s] for s in STATUSES if s != "fn"},
        "ground_truth": {s: gts[s] for s in STATUSES if s != "fp"},
        "skipped_predictions": skipped,
        "gt_annotations_unknown_category": int(ground.stats.get("gt_annotations_unknown_category", 0)),
    }


# --- writing ------------------------------------------------------------------------------------


def write_review(pred: str, gt: str, out: str, *, images: str | None = None, max_images: int = 500,
                 overwrite: bool = False, **settings) -> dict:
    """Review ``pred`` against ``gt`` into the folder ``out``; returns the counts (``review.json``).

    Writes ``review.parquet`` (one row per object, :data:`REVIEW_SCHEMA`, worst image first),
    ``index.html`` with ``thumbs/*.png`` (the ``max_images`` worst images; opens from the folder,
    no server) and ``review.json`` (settings, counts, error rows). ``images``: the dataset holding
    the image bytes (default: ``gt`` when it has them, else the predictions' ``info.source``).
    ``settings``: ``iou``, ``iou_type``, ``score_threshold``, ``margin`` (:func:`build_review`).
    """
    from pipeline.annotate.review_page import write_page  # late: review_page draws a Review, so it imports this module

    if "://" in out:
        raise AnnotationError(f"--out {out}: the review is a local folder (a page to open in a browser)")
    if max_images < 0:
        raise AnnotationError(f"--max-images {max_images}: must be >= 0")
    prepare_review_dir(out, overwrite=overwrite)
    review = build_review(pred, gt, **settings)
    os.makedirs(out, exist_ok=True)
    import pyarrow.parquet as pq

    pq.write_table(review.table(), os.path.join(out, TABLE))
    page = write_page(review, out, images=images, max_images=max_images)
    summary = {**review.counts, **page, "settings": review.settings,
               "worst": [{"rank": im.rank, "image_id": im.image_id, "file_name": im.file_name, "review_score": im.score}
                         for im in review.images[:10]]}
    with open(os.path.join(out, SUMMARY), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def prepare_review_dir(out: str, *, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``; then remove only an earlier review's files
    (``review.parquet``, ``review.json``, ``index.html``, ``thumbs/``) and refuse anything else
    (the convention of :func:`pipeline.data.shards.prepare_output`)."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise AnnotationError(f"output {out} exists and is not a folder")
    entries = sorted(os.listdir(out))
    if not entries:
        return
    if not overwrite:
        raise AnnotationError(f"output {out} is not empty ({len(entries)} entries, e.g. {', '.join(entries[:3])}); "
                              "pass --overwrite to replace the review there, or choose an empty folder")
    ours = {TABLE, SUMMARY, PAGE, THUMBS}
    others = [e for e in entries if e not in ours]
    if others:
        raise AnnotationError(f"output {out} holds files that are not part of a review ({', '.join(others[:5])}); "
                              "--overwrite only replaces a review: choose an empty folder")
    for e in entries:
        p = os.path.join(out, e)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
