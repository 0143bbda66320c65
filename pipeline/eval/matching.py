"""Per-image matching of detections to ground truth: pycocotools' ``evaluateImg``, for many images.

:func:`match_images` turns the ground truth and detections of a set of images into
:class:`~pipeline.eval.records.MatchRecords`. It runs inside a Ray task, one per prediction
shard. Two methods give identical records (the tests hold them to it):

``"pycocotools"``
    calls ``COCOeval.computeIoU`` / ``computeOks`` (the IoU type's ``reference_ious``) and
    ``evaluateImg`` themselves, per (image, category, area range), on a stand-in object that holds
    only this shard's data. Exact by construction, but ``evaluateImg``'s threshold x detection x
    GT Python loop is slow.
``"vectorized"`` (default)
    the same greedy assignment, run in lock step over many (image, category) groups at once with
    numpy. IoUs come from the IoU type's entry (:mod:`~pipeline.eval.iou_types`): pycocotools'
    ``mask.iou`` / ``computeOks`` per group, or for bbox the same floats for many groups at once.
    For one detection ``d`` at threshold ``t``, ``evaluateImg`` scans the GT (non-ignored first,
    each block in source order) and keeps the *last* GT whose IoU is >= the best so far (starting
    at ``min(t, 1 - 1e-10)``), skipping non-crowd GT already taken, and stops at the ignored block
    once it holds a non-ignored match. Equivalently: among available GT with IoU >= t, take the
    last maximum of the non-ignored ones if there is any, else the last maximum of the ignored
    ones. A match to a GT whose id is 0 counts as unmatched for ``accumulate`` (it stores the GT
    id as the match), as in pycocotools.

Boxes are COCO **xywh** here (``GroundTruth.ann_bbox``, ``Detections.bbox``). Nothing here names
an IoU type: what differs between types is a property or method of its entry.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from pipeline.eval.detections import Detections
from pipeline.eval.groundtruth import GroundTruth
from pipeline.eval.iou_types import NUM_KEYPOINTS, CocoIoUType
from pipeline.eval.params import EvalInputError
from pipeline.eval.records import MatchRecords

METHODS = ("vectorized", "pycocotools")
CHUNK_ELEMENTS = 1 << 20  # groups x max(max detections, thresholds x areas) x max GT per chunk


def match_images(
    gt: GroundTruth, dets: Detections, *, image_ids, iou_type: CocoIoUType, method: str = "vectorized"
) -> MatchRecords:
    """Match ``dets`` to ``gt`` on ``image_ids`` (GT images) for ``iou_type`` (a registry entry,
    :func:`~pipeline.eval.iou_types.get_iou_type`); see the module doc."""
    if method not in METHODS:
        raise ValueError(f"unknown matching method {method!r}; choose from {', '.join(METHODS)}")
    image_ids = np.unique(np.asarray(image_ids, dtype=np.int64))
    groups = _Groups(gt, dets, image_ids, iou_type)
    if method == "pycocotools":
        det_rows = _match_reference(groups, groups.p)
    else:
        det_rows = _match_vectorized(groups, groups.p)
    return MatchRecords(image_ids=image_ids, **det_rows, **groups.gt_rows())


class _Groups:
    """GT and detections of the evaluated images cut into (image, category) groups.

    Detections are sorted by (image, category, -score, source order) -- the order ``evaluateImg``
    sees after its stable sort -- and cut to ``maxDets[-1]`` per group; GT keeps source order.
    The IoU type's entry computes IoUs from the accessors below (``gt_bbox``, ``gt_rle``, ``crowd``,
    ``gt_dicts``, ``dt_dicts``...).
    """

    def __init__(self, gt: GroundTruth, dets: Detections, image_ids: np.ndarray, iou_type: CocoIoUType):
        self.gt, self.iou_type = gt, iou_type
        self.p = p = iou_type.params()
        self.cat_ids = gt.category_ids
        self.image_ids = image_ids
        K = max(len(self.cat_ids), 1)
        area = np.asarray(p.areaRng, dtype=np.float64)

        # ground truth of these images and known categories
        g = np.flatnonzero(np.isin(gt.ann_image, image_ids) & np.isin(gt.ann_category, self.cat_ids))
        gkey = np.searchsorted(image_ids, gt.ann_image[g]) * K + np.searchsorted(self.cat_ids, gt.ann_category[g])
        order = np.lexsort((np.arange(len(g)), gkey))
        self.g_idx, self.g_key = g[order], gkey[order]
        self.g_ignore = iou_type.gt_ignored(gt, self.g_idx)  # (G,): gt["ignore"]
        ga = gt.ann_area[self.g_idx][:, None]
        self.g_out = self.g_ignore[:, None] | (ga < area[:, 0]) | (ga > area[:, 1])  # (G, A): _ignore per area
        self.g_height, self.g_width = gt.image_size(gt.ann_image[self.g_idx])

        # detections of these images and known categories, in evaluateImg's order
        d = np.flatnonzero(np.isin(dets.image_id, image_ids) & np.isin(dets.category_id, self.cat_ids))
        dkey = np.searchsorted(image_ids, dets.image_id[d]) * K + np.searchsorted(self.cat_ids, dets.category_id[d])
        order = np.lexsort((np.arange(len(d)), -dets.score[d], dkey))
        d, dkey = d[order], dkey[order]
        starts = np.concatenate([[0], np.flatnonzero(dkey[1:] != dkey[:-1]) + 1]) if len(d) else np.zeros(0, np.int64)
        rank = np.arange(len(d)) - np.repeat(starts, np.diff(np.append(starts, len(d))))
        keep = rank < p.maxDets[-1]
        self.d_idx, self.d_key, self.d_rank = d[keep], dkey[keep], rank[keep].astype(np.int32)
        da = dets.area[self.d_idx][:, None]
        self.d_out = (da < area[:, 0]) | (da > area[:, 1])  # (D, A)
        self.dets = dets
        self.K = K

        # group boundaries
        self.d_keys, self.d_start, self.d_len = _runs(self.d_key)
        self.g_keys, self.g_start, self.g_len = _runs(self.g_key)

    def image_of(self, key: np.ndarray) -> np.ndarray:
        return self.image_ids[key // self.K]

    def category_of(self, key: np.ndarray) -> np.ndarray:
        return self.cat_ids[key % self.K]

    def gt_rows(self) -> dict:
        counts = np.add.reduceat((~self.g_out).astype(np.int32), self.g_start, axis=0) if len(self.g_key) else None
        return {
            "gt_image": self.image_of(self.g_keys),
            "gt_category": self.category_of(self.g_keys),
            "gt_count": counts if counts is not None else np.zeros((0, self.g_out.shape[1]), np.int32),
        }

    def paired(self) -> list[tuple[int, int, int, int, int]]:
        """(group key, det start, det count, gt start, gt count) for groups with both."""
        both, di, gi = np.intersect1d(self.d_keys, self.g_keys, assume_unique=True, return_indices=True)
        return list(zip(both.tolist(), self.d_start[di].tolist(), self.d_len[di].tolist(),
                        self.g_start[gi].tolist(), self.g_len[gi].tolist()))

    # --- pycocotools-shaped views of one group --------------------------------------------------

    def gt_dicts(self, start: int, count: int) -> list[dict]:
        """GT ``start:start+count`` (group order) as ``COCOeval._gts`` holds them: the common keys and
        the IoU type's ``gt_fields``."""
        gt, fields, out = self.gt, self.iou_type.gt_fields, []
        for j in range(start, start + count):
            i = self.g_idx[j]
            ann = {
                "id": int(gt.ann_id[i]),
                "area": float(gt.ann_area[i]),
                "iscrowd": int(gt.ann_iscrowd[i]),
                "ignore": bool(self.g_ignore[j]),
                "num_keypoints": int(gt.ann_num_keypoints[i]),
            }
            for field in fields:
                ann[_COCO_KEY[field]] = _GT_FIELD[field](self, j)
            out.append(ann)
        return out

    def dt_dicts(self, start: int, count: int) -> list[dict]:
        """Detections ``start:start+count`` (group order) as ``COCOeval._dts`` holds them."""
        dets, fields, out = self.dets, self.iou_type.det_fields, []
        for j in range(start, start + count):
            i = self.d_idx[j]
            det = {"id": j - start + 1, "score": float(dets.score[i]), "area": float(dets.area[i])}
            for field in fields:
                det[_COCO_KEY[field]] = _DT_FIELD[field](dets, i)
            out.append(det)
        return out

    def ious(self, key: int, ds: int, dn: int, gs: int, gn: int) -> np.ndarray:
        """IoU / OKS matrix (dn x gn) of one group, with pycocotools' own functions."""
        return self.iou_type.group_ious(self, key, ds, dn, gs, gn)

    def crowd(self, gs: int, gn: int) -> list[int]:
        """``iscrowd`` of GT ``gs:gs+gn`` (group order), as ``mask.iou`` takes it."""
        return [int(c) for c in self.gt.ann_iscrowd[self.g_idx[gs : gs + gn]]]

    def _where(self, i: int) -> str:
        return f"{self.gt.source}: annotation id {int(self.gt.ann_id[i])} (image_id {int(self.gt.ann_image[i])})"

    def gt_bbox(self, i: int) -> list[float]:
        """Annotation ``i``'s box (xywh); an error naming it when it has none."""
        box = self.gt.ann_bbox[i]
        if np.isnan(box).any():
            raise EvalInputError(f"{self._where(i)}: no bbox, which {self.iou_type.name} evaluation needs")
        return box.tolist()

    def gt_keypoints(self, i: int) -> list[float]:
        if self.gt.ann_keypoints is None:
            raise ValueError("ground truth was loaded without keypoints (load_ground_truth(keypoints=True))")
        kps = self.gt.ann_keypoints[i]
        if kps is None:
            kps = [0.0] * (3 * NUM_KEYPOINTS)  # no keypoints: num_keypoints == 0, so it is ignored
        if len(kps) != 3 * NUM_KEYPOINTS:
            raise EvalInputError(f"{self._where(i)}: {len(kps)} keypoint values, expected {3 * NUM_KEYPOINTS}")
        return kps

    def gt_rle(self, j: int) -> dict:
        """``COCO.annToRLE`` of the ``j``-th GT in group order: polygons merged into one RLE."""
        i = self.g_idx[j]
        if self.gt.ann_segm is None:
            raise ValueError("ground truth was loaded without segmentations (load_ground_truth(segm=True))")
        seg = self.gt.ann_segm[i]
        if seg is None:
            raise EvalInputError(f"{self._where(i)}: no segmentation, which segm evaluation needs")
        if isinstance(seg, list) or isinstance(seg.get("counts"), list):
            h, w = self.g_height[j], self.g_width[j]
            if h < 0 or w < 0:
                raise EvalInputError(f"{self._where(i)}: the image has no width/height to rasterise its polygon")
            rle = mask_utils.frPyObjects(seg, int(h), int(w))
            return mask_utils.merge(rle) if isinstance(seg, list) else rle
        return seg


def _runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted keys -> (distinct keys, start of each run, length of each run)."""
    if len(keys) == 0:
        z = np.zeros(0, np.int64)
        return z, z, z
    starts = np.concatenate([[0], np.flatnonzero(keys[1:] != keys[:-1]) + 1])
    return keys[starts], starts, np.diff(np.append(starts, len(keys)))


# the per-object fields an IoU type names (gt_fields / det_fields): pycocotools' key, and how to read one
_COCO_KEY = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}
_GT_FIELD = {  # by row j of the group order
    "bbox": lambda groups, j: groups.gt_bbox(groups.g_idx[j]),
    "segm": lambda groups, j: groups.gt_rle(j),
    "keypoints": lambda groups, j: groups.gt_keypoints(groups.g_idx[j]),
}
_DT_FIELD = {
    "bbox": lambda dets, i: dets.bbox[i].tolist(),
    "segm": lambda dets, i: dets.segm[i],
    "keypoints": lambda dets, i: dets.keypoints[i],
}


def _det_rows(groups: _Groups, matched: np.ndarray, ignored: np.ndarray) -> dict:
    """Per-detection outputs (matched/ignored bit masks per area) -> record columns."""
    return {
        "det_image": groups.image_of(groups.d_key),
        "det_category": groups.category_of(groups.d_key),
        "det_rank": groups.d_rank,
        "det_score": groups.dets.score[groups.d_idx].astype(np.float64),
        "det_matched": matched,
        "det_ignored": ignored,
    }


def _match_vectorized(groups: _Groups, p) -> dict:
    T, A = len(p.iouThrs), len(p.areaRng)
    all_bits = np.uint16((1 << T) - 1)
    n_det = len(groups.d_idx)
    matched = np.zeros((n_det, A), np.uint16)
    from_gt_ignore = np.zeros((n_det, A), np.uint16)
    thr = np.minimum(np.asarray(p.iouThrs, dtype=np.float64), 1 - 1e-10)
    both, di, gi = np.intersect1d(groups.d_keys, groups.g_keys, assume_unique=True, return_indices=True)
    keys, ds, dn = both, groups.d_start[di], groups.d_len[di]
    gs, gn = groups.g_start[gi], groups.g_len[gi]
    # bucket by GT count (padded to a power of two), longest detection lists first
    gpad = np.array([1 << max(int(n) - 1, 0).bit_length() for n in gn.tolist()], np.int64)
    order = np.lexsort((-dn, gpad))
    gpad_o, dn_o = gpad[order].tolist(), dn[order].tolist()
    j = 0
    while j < len(order):
        gp, dmax = gpad_o[j], dn_o[j]
        per_chunk = max(CHUNK_ELEMENTS // (max(dmax, T * A) * gp), 1)  # bounds iou and (n, A, T, gp)
        end = j + 1
        while end < len(order) and end - j < per_chunk and gpad_o[end] == gp:
            end += 1
        c = order[j:end]
        rows, m_bits, i_bits = _lockstep(groups, keys[c], ds[c], dn[c], gs[c], gn[c], gp, dmax, thr)
        matched[rows] = m_bits
        from_gt_ignore[rows] = i_bits
        j = end
    out_of_area = np.where(groups.d_out, all_bits, np.uint16(0))
    ignored = from_gt_ignore | (~matched & all_bits & out_of_area)
    return _det_rows(groups, matched, ignored)


def _lockstep(groups: _Groups, keys, ds, dn, gs, gn, gp: int, dmax: int, thr: np.ndarray):
    """Greedy matching of a chunk of groups in lock step over detection rank.

    Returns (detection rows, matched bits (rows, A), ignored-because-matched-to-an-ignored-GT bits
    (rows, A)), bit t for IoU threshold t, for the detections that have a GT with IoU >= the
    lowest threshold; every other detection matches nothing at any threshold and is left out.

    Per step, among the available candidates (IoU >= t, not taken unless crowd) the GT taken is
    the one with the largest key ``non_ignored * gp + rank``, ``rank`` being the GT's position in
    a stable ascending sort of the detection's IoUs: non-ignored GT first, then the largest IoU,
    then the last in source order -- evaluateImg's choice (see the module doc).
    """
    n, T, A = len(keys), len(thr), groups.g_out.shape[1]
    d_ar, g_ar = np.arange(dmax), np.arange(gp)
    d_ok = d_ar[None, :] < dn[:, None]
    g_ok = g_ar[None, :] < gn[:, None]
    d_rows = np.where(d_ok, ds[:, None] + d_ar[None, :], 0)
    g_rows = np.where(g_ok, gs[:, None] + g_ar[None, :], 0)
    crowd = (groups.gt.ann_iscrowd[groups.g_idx[g_rows]] != 0) & g_ok
    nonzero_id = groups.gt.ann_id[groups.g_idx[g_rows]] != 0
    gt_ig = np.transpose(groups.g_out[g_rows], (0, 2, 1)) | ~g_ok[:, None, :]  # (n, A, gp)
    iou = groups.iou_type.batch_ious(groups, keys, ds, dn, gs, gn, d_rows, g_rows, g_ok, crowd)
    iou = np.where(d_ok[:, :, None] & g_ok[:, None, :], iou, -np.inf)

    # only detections with some candidate at the lowest threshold can match; pack them per group
    relevant = (iou >= thr.min()).any(-1)  # (n, dmax)
    count = relevant.sum(1)
    c_of, d_of = np.nonzero(relevant)
    if len(c_of) == 0:
        z = np.zeros((0, A), np.uint16)
        return np.zeros(0, np.int64), z, z
    by_count = np.argsort(-count, kind="stable")
    new_c = np.empty(n, np.int64)
    new_c[by_count] = np.arange(n)
    count = count[by_count]
    rmax = int(count[0])
    # position of each relevant detection among its group's relevant ones (c_of is ascending)
    per_group = np.bincount(c_of, minlength=n)
    pc, pk = new_c[c_of], np.arange(len(c_of)) - (np.cumsum(per_group) - per_group)[c_of]
    packed = np.full((n, rmax, gp), -np.inf)
    packed[pc, pk] = iou[c_of, d_of]
    rank = np.empty((n, rmax, gp), np.int32)
    np.put_along_axis(rank, np.argsort(packed, axis=-1, kind="stable"), g_ar.astype(np.int32)[None, None, :], -1)
    crowd, nonzero_id, gt_ig = crowd[by_count], nonzero_id[by_count], gt_ig[by_count]
    base = np.where(gt_ig, 0, gp).astype(np.int32)  # (n, A, gp)
    crowd4 = crowd[:, None, None, :]

    taken = np.zeros((n, A, T, gp), bool)
    m_out = np.zeros((n, A, T, rmax), bool)
    i_out = np.zeros((n, A, T, rmax), bool)
    thr4 = thr[None, :, None]
    for k in range(rmax):
        na = int(np.count_nonzero(count > k))  # groups are sorted by relevant count, descending
        ge = packed[:na, k, None, :] >= thr4  # (na, T, gp)
        cand = (~taken[:na] | crowd4[:na]) & ge[:, None, :, :]  # (na, A, T, gp)
        key = np.where(cand, (base[:na] + rank[:na, k, None, :])[:, :, None, :], -1)
        g = key.argmax(-1)  # (na, A, T)
        c, a, t = np.nonzero(np.take_along_axis(key, g[..., None], -1)[..., 0] >= 0)
        g = g[c, a, t]
        taken[c, a, t, g] = True
        m_out[c, a, t, k] = nonzero_id[c, g]
        i_out[c, a, t, k] = gt_ig[c, a, g]
    weights = (1 << np.arange(T, dtype=np.uint16))[None, None, :, None]
    m_bits = (m_out * weights).sum(2, dtype=np.uint16)  # (n, A, rmax)
    i_bits = (i_out * weights).sum(2, dtype=np.uint16)
    rows = ds[c_of] + d_of
    return rows, m_bits[pc, :, pk], i_bits[pc, :, pk]


def _match_reference(groups: _Groups, p) -> dict:
    """``COCOeval.evaluateImg`` itself, per (image, category, area range)."""
    T, A = len(p.iouThrs), len(p.areaRng)
    n_det = len(groups.d_idx)
    matched = np.zeros((n_det, A), np.uint16)
    ignored = np.zeros((n_det, A), np.uint16)
    weights = 1 << np.arange(T)
    shim = SimpleNamespace(params=p, _gts={}, _dts={}, ious={})
    g_at = dict(zip(groups.g_keys.tolist(), zip(groups.g_start.tolist(), groups.g_len.tolist())))
    for key, ds, dn in zip(groups.d_keys.tolist(), groups.d_start.tolist(), groups.d_len.tolist()):
        gs, gn = g_at.get(key, (0, 0))
        # evaluateImg re-sorts by score (stably) and cuts to maxDet: hand it the kept ones in order
        shim._dts[key, 0] = groups.dt_dicts(ds, dn)
        shim._gts[key, 0] = groups.gt_dicts(gs, gn)
        shim.ious[key, 0] = groups.iou_type.reference_ious(shim, key)
        for a, area_range in enumerate(p.areaRng):
            e = COCOeval.evaluateImg(shim, key, 0, area_range, p.maxDets[-1])
            rows = ds + np.arange(len(e["dtScores"]))
            matched[rows, a] = ((np.asarray(e["dtMatches"]) != 0) * weights[:, None]).sum(0)
            ignored[rows, a] = (np.asarray(e["dtIgnore"]).astype(bool) * weights[:, None]).sum(0)
        del shim._dts[key, 0], shim._gts[key, 0], shim.ious[key, 0]
    return _det_rows(groups, matched, ignored)
