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

from pipeline.eval.iou_types import CocoIoUType
from pipeline.eval.records import MatchRecords


def accumulate(records: MatchRecords, *, category_ids: np.ndarray, iou_type: CocoIoUType) -> dict:
    """Precision [T,R,K,A,M], recall [T,K,A,M] and scores [T,R,K,A,M], as ``COCOeval.eval``."""
    p = iou_type.params()
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

    rec_thrs = np.asarray(p.recThrs, dtype=np.float64)
    for k in range(K):
        areas = np.flatnonzero(g_counts[k] > 0)  # pycocotools skips (k, a) without GT: stays -1
        if len(areas) == 0:
            continue
        npig = g_counts[k, areas].astype(np.float64)[:, None, None]  # int -> double, as `tp_sum / npig`
        # recall tp / npig >= r  <=>  tp >= need[a, r]: the same float divisions, done once per count
        need = np.stack([np.searchsorted(np.arange(g + 1, dtype=np.float64) / g, rec_thrs, side="left")
                         for g in g_counts[k, areas].tolist()])  # (A', R)
        need = np.repeat(need, T, axis=0)  # rows (a, t)
        idx = d[d_lo[k] : d_hi[k]]
        by_score = idx[np.argsort(-records.det_score[idx], kind="mergesort")]
        rank = records.det_rank[by_score]
        matched = records.det_matched[by_score][:, areas]
        ignored = records.det_ignored[by_score][:, areas]
        for m, max_det in enumerate(p.maxDets):
            keep = rank < max_det
            nd = int(np.count_nonzero(keep))
            if nd == 0:
                recall[:, k, areas, m] = 0
                precision[:, :, k, areas, m] = 0
                scores[:, :, k, areas, m] = 0
                continue
            # (A', T, nd): bit t of each kept detection, for every area range with GT at once
            dtm = ((matched[keep].T[:, None, :] >> t_bits[None]) & 1).astype(bool)
            dt_ig = ((ignored[keep].T[:, None, :] >> t_bits[None]) & 1).astype(bool)
            tps = np.logical_and(dtm, np.logical_not(dt_ig))
            fps = np.logical_and(np.logical_not(dtm), np.logical_not(dt_ig))
            tp_count = np.cumsum(tps, axis=2)
            tp_sum = tp_count.astype(dtype=float)
            fp_sum = np.cumsum(fps, axis=2).astype(dtype=float)
            rc = tp_sum / npig
            pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
            recall[:, k, areas, m] = rc[:, :, -1].T
            envelope = np.maximum.accumulate(pr[..., ::-1], axis=2)[..., ::-1].reshape(-1, nd)
            inds = _first_at_least(tp_count.reshape(-1, nd), need)  # searchsorted(rc[a, t], recThrs, "left")
            ok = inds < nd
            inds = np.minimum(inds, nd - 1)
            q = np.where(ok, np.take_along_axis(envelope, inds, axis=1), 0.0)
            ss = np.where(ok, records.det_score[by_score[keep]][inds], 0.0)
            precision[:, :, k, areas, m] = q.reshape(len(areas), T, R).transpose(1, 2, 0)
            scores[:, :, k, areas, m] = ss.reshape(len(areas), T, R).transpose(1, 2, 0)
    return {"params": p, "counts": [T, R, K, A, M], "precision": precision, "recall": recall, "scores": scores}


def _first_at_least(counts: np.ndarray, need: np.ndarray) -> np.ndarray:
    """For every row ``i`` (non-decreasing integers): the first position where ``counts[i] >=
    need[i, j]`` (the row length if none), for all rows in one integer ``searchsorted``: row ``i``
    is shifted by ``i * span``, ``span`` exceeding every value, so rows never interleave."""
    n, width = counts.shape
    span = int(max(counts.max(initial=0), need.max(initial=0))) + 1
    shift = np.arange(n, dtype=np.int64)[:, None] * span
    found = np.searchsorted((counts + shift).ravel(), (need + shift).ravel(), side="left")
    return found.reshape(n, -1) - np.arange(n)[:, None] * width


def summarize(eval_result: dict, *, iou_type: CocoIoUType) -> np.ndarray:
    """pycocotools' ``COCOeval.summarize`` on an accumulated result: the 12 (10) stats."""
    e = COCOeval(iouType=iou_type.name)
    e.params = iou_type.params()
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
