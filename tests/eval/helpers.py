"""Test helpers: fixture paths, the pycocotools reference, a tie-heavy stress case, and
pycocotools' evalImgs turned into our match records."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline import schema
from pipeline.eval.iou_types import get_iou_type
from pipeline.eval.records import MatchRecords

FIXTURES = Path(__file__).parents[1] / "fixtures"
COCO_EVAL = FIXTURES / "coco-eval"
EXACT = 1e-12


def pycocotools_eval(gt, results, iou_type: str) -> COCOeval:
    """Single-process pycocotools: the reference. ``gt``/``results``: paths or loaded JSON."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt)) if isinstance(gt, (str, Path)) else _coco(gt)
        res = str(results) if isinstance(results, (str, Path)) else json.loads(json.dumps(results))
        e = COCOeval(coco_gt, coco_gt.loadRes(res), iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e


def _coco(dataset: dict) -> COCO:
    c = COCO()
    c.dataset = json.loads(json.dumps(dataset))
    c.createIndex()
    return c


def stats_of(metrics: dict, iou_type: str) -> np.ndarray:
    """The 12 (10) numbers of one IoU type of a metrics dict, in pycocotools' order."""
    return np.array([metrics[iou_type][k] for k in get_iou_type(iou_type).stat_keys])


def stress_case(seed: int, *, images: int = 30, categories: int = 3, max_side: int = 120) -> tuple[dict, list[dict]]:
    """Small integer boxes on a small canvas: IoU ties, score ties, crowds, GT id 0, > maxDets
    detections in one group, boxes exactly on the area-range borders (32x32, 96x96)."""
    rng = np.random.default_rng(seed)
    images_, anns, results = [], [], []
    next_id = 0  # GT id 0 exists: pycocotools then treats matches to it as misses; we must too
    for image_id in range(1, images + 1):
        W, H = int(rng.integers(40, max_side)), int(rng.integers(40, max_side))
        images_.append({"id": image_id, "width": W, "height": H, "file_name": f"{image_id}.png"})
        for _ in range(int(rng.integers(0, 8))):
            if rng.random() < 0.15:
                w, h = 32, 32
            else:
                w, h = int(rng.integers(1, W // 2 + 2)), int(rng.integers(1, H // 2 + 2))
            x, y = int(rng.integers(0, max(W - w, 1))), int(rng.integers(0, max(H - h, 1)))
            poly = [x, y, x + w, y, x + w, y + h, x, y + h]
            anns.append({
                "id": next_id, "image_id": image_id, "category_id": int(rng.integers(1, categories + 1)),
                "bbox": [x, y, w, h], "area": float(w * h) if rng.random() < 0.8 else float(rng.choice([1024, 9216])),
                "iscrowd": int(rng.random() < 0.15), "segmentation": [poly],
            })
            next_id += 1
        many = rng.random() < 0.1
        for _ in range(int(rng.integers(105, 130)) if many else int(rng.integers(0, 15))):
            if anns and anns[-1]["image_id"] == image_id and rng.random() < 0.6:
                x, y, w, h = anns[-1 - int(rng.integers(0, 2)) if len(anns) > 1 else -1]["bbox"]
                x, y = x + int(rng.integers(-2, 3)), y + int(rng.integers(-2, 3))
                w, h = max(w + int(rng.integers(-2, 3)), 1), max(h + int(rng.integers(-2, 3)), 1)
            else:
                w, h = int(rng.integers(1, W // 2 + 2)), int(rng.integers(1, H // 2 + 2))
                x, y = int(rng.integers(0, max(W - w, 1))), int(rng.integers(0, max(H - h, 1)))
            results.append({
                "image_id": image_id, "category_id": 1 if many else int(rng.integers(1, categories + 1)),
                "bbox": [float(x), float(y), float(w), float(h)], "score": float(rng.integers(0, 5)) / 4,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            })
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, categories + 2)]  # the last has no GT
    return {"images": images_, "annotations": anns, "categories": cats}, results


def records_from_cocoeval(e: COCOeval) -> MatchRecords:
    """What accumulate reads from ``e.evalImgs``, in our record layout."""
    p = e.params
    A, T = len(p.areaRng), len(p.iouThrs)
    weights = 1 << np.arange(T)
    det: dict[tuple, dict] = {}
    gt: dict[tuple, list] = {}
    for ev in e.evalImgs:
        if ev is None:
            continue
        a = [tuple(r) for r in p.areaRng].index(tuple(ev["aRng"]))
        key = (ev["image_id"], ev["category_id"])
        for r, score in enumerate(ev["dtScores"]):
            row = det.setdefault(key + (r,), {"score": score, "m": np.zeros(A, np.uint16), "i": np.zeros(A, np.uint16)})
            row["m"][a] = ((ev["dtMatches"][:, r] != 0) * weights).sum()
            row["i"][a] = (ev["dtIgnore"][:, r].astype(bool) * weights).sum()
        if len(ev["gtIds"]):
            gt.setdefault(key, [0] * A)[a] = int(np.count_nonzero(np.asarray(ev["gtIgnore"]) == 0))
    dk, gk = sorted(det), sorted(gt)
    return MatchRecords(
        image_ids=np.array(sorted(p.imgIds), np.int64),
        det_image=np.array([k[0] for k in dk], np.int64).reshape(-1),
        det_category=np.array([k[1] for k in dk], np.int64).reshape(-1),
        det_rank=np.array([k[2] for k in dk], np.int32).reshape(-1),
        det_score=np.array([det[k]["score"] for k in dk], np.float64).reshape(-1),
        det_matched=np.array([det[k]["m"] for k in dk], np.uint16).reshape(-1, A),
        det_ignored=np.array([det[k]["i"] for k in dk], np.uint16).reshape(-1, A),
        gt_image=np.array([k[0] for k in gk], np.int64).reshape(-1),
        gt_category=np.array([k[1] for k in gk], np.int64).reshape(-1),
        gt_count=np.array([gt[k] for k in gk], np.int32).reshape(-1, A),
    ).sorted()


def assert_same_records(ours: MatchRecords, theirs: MatchRecords) -> None:
    ours, theirs = ours.sorted(), theirs.sorted()
    for name in ("det_image", "det_category", "det_rank", "det_score", "det_matched", "det_ignored",
                 "gt_image", "gt_category", "gt_count"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name), err_msg=name)


def rows_to_results(rows: list[dict], *, masks: bool, keypoints: bool) -> list[dict]:
    """Prediction rows (xyxy float32) -> COCO results, as export-coco writes them."""
    out = []
    for row in rows:
        for n, box in enumerate(row.get(schema.BOXES) or []):
            c = row[schema.CATEGORY_IDS][n]
            if c == -1:
                continue
            x1, y1, x2, y2 = (float(np.float32(v)) for v in box)
            rec = {"image_id": row[schema.IMAGE_ID], "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1],
                   "score": float(np.float32(row[schema.SCORES][n]))}
            if masks:
                rec["segmentation"] = row[schema.MASKS][n]
            if keypoints:
                rec["keypoints"] = [float(np.float32(v)) for v in row[schema.KEYPOINTS][n]]
            out.append(rec)
    return out
