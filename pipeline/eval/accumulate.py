"""``COCOeval.accumulate`` and ``summarize`` over merged match records, bit for bit.

``accumulate`` concatenates, for each (category k, area a, maxDet m), the per-image
``dtScores[0:m]`` in image-id order, sorts them with a stable sort on ``-score``, and turns the
cumulative true/false positive counts into a precision envelope sampled at 101 recall points.
We rebuild the same arrays from records sorted by (category, image, rank):

* a stable sort restricted to a subset equals the stable sort of that subset, so one sort per
  category serves every area range and maxDet (detections of rank >= m are just masked out);
* ``rc = tp / npig``, ``pr = tp / (tp + fp + eps)`` are the same element-wise float operations;
  pycocotools' backward loop ``pr[i-1] = max(pr[i-1], pr[i])`` is a suffix maximum, which
  ``np.maximum.accumulate`` on the reversed row computes without arithmetic;
* recall points past the last detection stay 0, as pycocotools' ``try/except IndexError`` leaves
  them.

``summarize`` is pycocotools' own, run on the resulting ``eval`` dict, so the 12 (10) numbers
are the very same floating-point reductions.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.cocoeval import COCOeval

from pipeline.eval.params import coco_params
from pipeline.eval.records import MatchRecords


def accumulate(records: MatchRecords, *, category_ids: np.ndarray, iou_type: str) -> dict:
    """Precision [T,R,K,A,M], recall [T,K,A,M] and scores [T,R,K,A,M], as ``COCOeval.eval``."""
    p = coco_params(iou_type)
    T, R, K, A, M = len(p.iouThrs), len(p.recThrs), len(category_ids), len(p.areaRng), len(p.maxDets)
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    scores = -np.ones((T, R, K, A, M))
    t_bits = np.arange(T, dtype=np.uint16)[:, None]

    d = np.lexsort((records.det_rank, records.det_image, records.det_category))
    d_cat = records.det_category[d]
    d_lo = np.searchsorted(d_cat, category_ids, side="left")
    d_hi = np.searchsorted(d_cat, category_ids, side="right")
    g_counts = np.zeros((K, A), np.int64)
    g_k = np.searchsorted(category_ids, records.gt_category)
    known = (g_k < K) & (category_ids[np.minimum(g_k, K - 1)] == records.gt_category) if K else g_k < 0
    np.add.at(g_counts, g_k[known], records.gt_count[known].astype(np.int64))

    for k in range(K):
        idx = d[d_lo[k] : d_hi[k]]
        by_score = idx[np.argsort(-records.det_score[idx], kind="mergesort")]
        rank = records.det_rank[by_score]
        for a in range(A):
            npig = int(g_counts[k, a])
            if npig == 0:
                continue
            for m, max_det in enumerate(p.maxDets):
                sel = by_score[rank < max_det]
                nd = len(sel)
                tp_bits = (records.det_matched[sel, a][None, :] >> t_bits) & 1
                ig_bits = (records.det_ignored[sel, a][None, :] >> t_bits) & 1
                dtm, dt_ig = tp_bits.astype(bool), ig_bits.astype(bool)
                tps = np.logical_and(dtm, np.logical_not(dt_ig))
                fps = np.logical_and(np.logical_not(dtm), np.logical_not(dt_ig))
                tp_sum = np.cumsum(tps, axis=1).astype(dtype=float)
                fp_sum = np.cumsum(fps, axis=1).astype(dtype=float)
                rc = tp_sum / npig
                pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
                recall[:, k, a, m] = rc[:, -1] if nd else 0
                envelope = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
                dt_scores = records.det_score[sel]
                for t in range(T):
                    inds = np.searchsorted(rc[t], p.recThrs, side="left")
                    ok = inds < nd
                    q = np.zeros(R)
                    ss = np.zeros(R)
                    q[ok] = envelope[t, inds[ok]]
                    ss[ok] = dt_scores[inds[ok]]
                    precision[t, :, k, a, m] = q
                    scores[t, :, k, a, m] = ss
    return {"params": p, "counts": [T, R, K, A, M], "precision": precision, "recall": recall, "scores": scores}


def summarize(eval_result: dict, *, iou_type: str) -> np.ndarray:
    """pycocotools' ``COCOeval.summarize`` on an accumulated result: the 12 (10) stats."""
    e = COCOeval(iouType=iou_type)
    e.params = coco_params(iou_type)
    e.eval = eval_result
    with contextlib.redirect_stdout(io.StringIO()):
        e.summarize()
    return np.asarray(e.stats, dtype=np.float64)


def per_category_ap(eval_result: dict) -> np.ndarray:
    """AP@[.50:.95] per category (area all, largest maxDet); -1 where the category has no GT.

    As detectron2 computes it: the mean over thresholds and recall points of the precision
    entries that are not -1.
    """
    precision = eval_result["precision"]
    out = np.full(precision.shape[2], -1.0)
    for k in range(precision.shape[2]):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        if p.size:
            out[k] = float(np.mean(p))
    return out
