"""What ``pipeline eval`` can measure: one registry entry per IoU type, the only place a type is named.

An entry knows, for its type: the prediction columns it reads (:attr:`IoUType.pred_columns`), the
per-object fields of ground truth and detections it needs (``gt_fields``, ``det_fields``: any of
``bbox``, ``segm``, ``keypoints``), the names of the numbers it produces (``stat_keys``: its keys
in ``metrics.json``, in order) and how it computes them. The name is checked once, by
:func:`get_iou_type` (the CLI's ``--iou-type`` choices are :func:`list_iou_types`); everything
past that receives entries, never names plus flags.

Two kinds of entry:

* **matched per image** (``per_image_matching = True``; :class:`CocoIoUType`: ``bbox``, ``segm``,
  ``keypoints``): evaluated by the shared, distributed COCO machinery (:mod:`~pipeline.eval.matching`
  -> :mod:`~pipeline.eval.records` -> :class:`~pipeline.eval.evaluator.COCOEvaluator`). The entry
  gives pycocotools' parameters, which GT counts as ignored, the fields pycocotools' per-object
  views hold, and its IoU (OKS) matrix per (image, category) group -- plus, for ``bbox``, the
  same floats for many groups at once (the hot path).
* **self-contained** (``proposals``: class-agnostic recall; ``semantic``: a confusion matrix per
  shard, as detectron2's ``SemSegEvaluator``, :mod:`~pipeline.eval.semantic`; ``classification``:
  top-1/top-5 hits per category per shard, :mod:`~pipeline.eval.classification`):
  :meth:`IoUType.evaluate` does the whole evaluation (its own per-shard tasks and state, if any,
  under the ``use_state`` / ``use_ray`` options it is given) and returns the type's
  ``metrics.json`` entry; the CLI choice, the ``metrics.json`` writer and
  :func:`iou_types_for_columns` follow from its entry.

Adding a type: subclass :class:`IoUType` (or :class:`CocoIoUType`) and :func:`register` an
instance below. This module is imported by ``pipeline --help``: it loads numpy and pycocotools'
``cocoeval`` only (no pyarrow, no Ray).

Example::

    from pipeline.eval.iou_types import get_iou_type
    segm = get_iou_type("segm")
    segm.stat_keys[:3]        # ('AP', 'AP50', 'AP75')
    segm.params().iouThrs     # pycocotools' own Params
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval, Params

from pipeline.eval.params import FORMAT_VERSION, EvalInputError

DETECTION_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_STATS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")

NUM_KEYPOINTS = len(Params(iouType="keypoints").kpt_oks_sigmas)
"""17: keypoint AP needs COCO's person keypoints, the ones pycocotools has OKS sigmas for."""


def _schema():
    from pipeline import schema  # late: schema loads pyarrow, and `pipeline --help` imports this module

    return schema


class IoUType:
    """One kind of evaluation. Instances are singletons in the registry; they pickle by name."""

    name: str = ""
    stat_keys: tuple[str, ...] = ()
    gt_fields: tuple[str, ...] = ()  # GroundTruth per-annotation fields read, besides ids/area/iscrowd
    det_fields: tuple[str, ...] = ()  # Detections per-detection fields read, besides score/area
    per_image_matching = False  # True: the shared COCO machinery evaluates it (CocoIoUType)
    merges_predictions = True  # several PRED may be given (an image predicted twice counts once)
    auto = True  # evaluated at the end of a job whose stages write its pred_columns (`metrics: auto`)
    help = ""  # one line for `pipeline eval --help`, where the name alone does not say it

    @property
    def pred_columns(self) -> tuple[str, ...]:
        """Prediction-shard columns this type reads (all must be present)."""
        raise NotImplementedError

    @property
    def title(self) -> str:
        """Heading of this type's table in ``pipeline eval``'s output."""
        return self.name

    @property
    def stat_labels(self) -> dict[str, str] | None:
        """What each stat averages over (a column of the printed table), or None for no such column."""
        return None

    def evaluate(self, pred_paths: list[str], ground, **options) -> dict:
        """Self-contained types: this type's ``metrics.json`` entry for ``pred_paths`` against ``ground``
        (a :class:`~pipeline.eval.groundtruth.GroundTruth` with at least ``gt_fields`` loaded).
        ``options``: ``use_state``, ``use_ray``, ``task_num_cpus`` as :func:`~pipeline.eval.evaluation.evaluate`
        got them; a type that neither saves state nor runs tasks ignores them."""
        raise NotImplementedError(f"{self.name} is evaluated by the shared per-image matching")

    def has_own_ground_truth(self, ground) -> bool:
        """Whether ``ground`` holds something this type evaluates against besides annotations
        (a ground truth without annotations is otherwise refused)."""
        return False

    def counts_text(self, counts: dict) -> str:
        """One line for ``pipeline eval``'s output from this type's ``counts``."""
        raise NotImplementedError

    def __reduce__(self):  # a Ray task gets the registered entry back, so entries compare by identity
        return get_iou_type, (self.name,)

    def __repr__(self) -> str:
        return f"<IoU type {self.name}>"


# --- COCO-style types: matched per image, accumulated and summarised as pycocotools does ------------

STAT_LABELS = {
    "AP": "IoU=0.50:0.95 area=all", "AP50": "IoU=0.50 area=all", "AP75": "IoU=0.75 area=all",
    "APs": "area=small", "APm": "area=medium", "APl": "area=large",
    "AR1": "maxDets=1", "AR10": "maxDets=10", "AR100": "maxDets=100",
    "AR": "IoU=0.50:0.95 area=all", "AR50": "IoU=0.50", "AR75": "IoU=0.75",
    "ARs": "area=small", "ARm": "area=medium", "ARl": "area=large",
}


class CocoIoUType(IoUType):
    """A type ``COCOeval`` knows (its ``iouType``): our numbers equal ``COCOeval``'s on the same data.

    ``group_ious`` and friends receive the matcher's ``_Groups`` (:mod:`~pipeline.eval.matching`):
    GT and detections cut into (image, category) groups, ``ds``/``dn`` and ``gs``/``gn`` the start
    and size of one group's detections / GT in group order.
    """

    per_image_matching = True
    stat_keys = DETECTION_STATS
    ray_min_images = 15_000  # see pipeline.eval.evaluation.RAY_AUTO_MIN_IMAGES

    @property
    def pred_columns(self) -> tuple[str, ...]:
        s = _schema()
        return (s.BOXES, s.SCORES, s.CATEGORY_IDS)

    @property
    def stat_labels(self) -> dict[str, str]:
        return {k: STAT_LABELS[k] for k in self.stat_keys}

    def params(self) -> Params:
        """pycocotools' default parameters for this type (a fresh object each call)."""
        p = Params(iouType=self.name)
        p.maxDets = sorted(p.maxDets)
        if len(p.iouThrs) > 16:  # match flags are packed into uint16 bit masks
            raise ValueError("at most 16 IoU thresholds are supported")
        return p

    def params_fingerprint(self) -> str:
        """Everything a per-image match record depends on besides the data itself."""
        p = self.params()
        payload = {
            "format": FORMAT_VERSION,
            "iou_type": self.name,
            "iouThrs": [float(t) for t in p.iouThrs],
            "areaRng": [[float(a), float(b)] for a, b in p.areaRng],
            "maxDets": [int(m) for m in p.maxDets],
            "sigmas": [float(s) for s in getattr(p, "kpt_oks_sigmas", np.zeros(0))],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def gt_ignored(self, gt, idx: np.ndarray) -> np.ndarray:
        """``gt['ignore']`` as ``COCOeval._prepare`` sets it, for annotations ``idx``."""
        return gt.ann_iscrowd[idx] != 0

    def group_ious(self, groups, key: int, ds: int, dn: int, gs: int, gn: int) -> np.ndarray:
        """IoU matrix (dn x gn) of one group, with pycocotools' own functions."""
        raise NotImplementedError

    def batch_ious(self, groups, keys, ds, dn, gs, gn, d_rows, g_rows, g_ok, crowd) -> np.ndarray:
        """IoUs of a chunk of groups, (n, dmax, gp) as ``d_rows``/``g_rows``; padding is masked by the caller."""
        iou = np.zeros(d_rows.shape + g_rows.shape[1:])
        for c, (k, s, m, t, n) in enumerate(zip(keys.tolist(), ds.tolist(), dn.tolist(), gs.tolist(), gn.tolist())):
            iou[c, :m, :n] = self.group_ious(groups, k, s, m, t, n)
        return iou

    def reference_ious(self, shim, key: int):
        """What ``COCOeval.evaluate`` stores in ``ious[key, 0]`` (the ``pycocotools`` matching method)."""
        return COCOeval.computeIoU(shim, key, 0)

    def counts_text(self, c: dict) -> str:
        return (
            f"{self.name}: {c['images']} images ({c['images_without_predictions']} without predictions), "
            f"{c['detections']} detections, {c['shards']} shard(s) ({c['shards_from_state']} from saved state)"
        )


def bbox_ious(groups, d_rows: np.ndarray, g_rows: np.ndarray, g_ok: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """pycocotools' ``bbIou`` (maskApi.c) for a batch of groups at once: (n, dmax, gp) IoUs.

    ``d_rows`` (n, dmax) / ``g_rows`` (n, gp) index the group-ordered detections / GT (``g_ok``:
    not padding); the same double operations in the same order as the C loop, so the very same
    floats (x86-64 wheels are built without FMA contraction; the tests compare against it).
    Boxes are COCO **xywh**.
    """
    D = groups.dets.bbox[groups.d_idx[d_rows]]
    G = groups.gt.ann_bbox[groups.g_idx[g_rows]]
    bad = np.isnan(G).any(-1) & g_ok
    if bad.any():
        groups.gt_bbox(groups.g_idx[g_rows[bad][0]])  # raises, naming the annotation
    dx, dy, dw, dh = (D[:, :, None, k] for k in range(4))
    gx, gy, gw, gh = (G[:, None, :, k] for k in range(4))
    da, ga = dw * dh, gw * gh
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    i = w * h
    u = np.where(crowd[:, None, :], da, da + ga - i)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), i / u, 0.0)


class BBoxType(CocoIoUType):
    name = "bbox"
    gt_fields = ("bbox",)
    det_fields = ("bbox",)
    ray_min_images = 100_000  # matching is cheap: see pipeline.eval.evaluation.RAY_AUTO_MIN_IMAGES

    def group_ious(self, groups, key, ds, dn, gs, gn):
        d = np.ascontiguousarray(groups.dets.bbox[groups.d_idx[ds : ds + dn]])
        g = np.ascontiguousarray([groups.gt_bbox(i) for i in groups.g_idx[gs : gs + gn]], dtype=np.float64)
        return np.asarray(mask_utils.iou(d, g, groups.crowd(gs, gn))).reshape(dn, gn)

    def batch_ious(self, groups, keys, ds, dn, gs, gn, d_rows, g_rows, g_ok, crowd):
        return bbox_ious(groups, d_rows, g_rows, g_ok, crowd)


class SegmType(CocoIoUType):
    name = "segm"
    gt_fields = ("segm",)
    det_fields = ("segm",)

    @property
    def pred_columns(self):
        return (*super().pred_columns, _schema().MASKS)

    def group_ious(self, groups, key, ds, dn, gs, gn):
        d = [groups.dets.segm[i] for i in groups.d_idx[ds : ds + dn]]
        g = [groups.gt_rle(j) for j in range(gs, gs + gn)]
        return np.asarray(mask_utils.iou(d, g, groups.crowd(gs, gn))).reshape(dn, gn)


class KeypointsType(CocoIoUType):
    """OKS with COCO's sigmas for its 17 person keypoints (:data:`NUM_KEYPOINTS`)."""

    name = "keypoints"
    stat_keys = KEYPOINT_STATS
    gt_fields = ("bbox", "keypoints")  # OKS of GT without visible keypoints is measured to its box
    det_fields = ("keypoints",)

    @property
    def pred_columns(self):
        return (*super().pred_columns, _schema().KEYPOINTS)

    def gt_ignored(self, gt, idx):
        return (gt.ann_iscrowd[idx] != 0) | (gt.ann_num_keypoints[idx] == 0)

    def group_ious(self, groups, key, ds, dn, gs, gn):
        shim = SimpleNamespace(params=groups.p, _gts={(key, 0): groups.gt_dicts(gs, gn)}, _dts={(key, 0): groups.dt_dicts(ds, dn)})
        return np.asarray(COCOeval.computeOks(shim, key, 0)).reshape(dn, gn)

    def reference_ious(self, shim, key):
        return COCOeval.computeOks(shim, key, 0)


# --- self-contained types -------------------------------------------------------------------------


_PROPOSAL_MAX_DETS = (100, 300, 1000)  # Detectron's and torchvision's RPN recall reports


class ProposalRecall(IoUType):
    """Proposal quality as COCO-style recall: AR@100, AR@300, AR@1000, and AR by object size @1000.

    Class-agnostic pycocotools on boxes (``useCats = 0``, ``maxDets = [100, 300, 1000]``), in one
    process: see :mod:`pipeline.eval.proposal_recall`.
    """

    name = "proposals"
    max_dets = _PROPOSAL_MAX_DETS
    stat_keys = (*(f"AR@{m}" for m in _PROPOSAL_MAX_DETS), *(f"AR{a}@{_PROPOSAL_MAX_DETS[-1]}" for a in "sml"))
    gt_fields = ("bbox",)
    merges_predictions = False
    auto = False  # a job's summary reports AP; recall is asked for by name
    help = "recall AR@100/300/1000 of a proposals stage"
    title = "proposals (class-agnostic recall, IoU 0.50:0.95)"

    @property
    def pred_columns(self):
        return (_schema().PROPOSALS,)  # PROPOSAL_SCORES when present; else proposals are taken best first

    def evaluate(self, pred_paths, ground, **options):  # one process, no state: see the module
        from pipeline.eval.proposal_recall import class_agnostic_recall  # late: pyarrow, not for `pipeline --help`

        (pred,) = pred_paths  # merges_predictions is False: the driver has checked
        stats, counts = class_agnostic_recall(pred, ground, max_dets=list(self.max_dets))
        return {**{k: float(v) for k, v in zip(self.stat_keys, stats)}, "counts": counts}

    def counts_text(self, c):
        return f"{c['images']} images ({c['images_with_proposals']} with proposals), {c['proposals']} proposals, {c['skipped']} skipped"


class SemanticSegmentation(IoUType):
    """Semantic segmentation as detectron2's ``SemSegEvaluator`` measures it: one confusion matrix
    per prediction shard (Ray tasks, saved under ``PRED/eval/semantic/``), summed, then mIoU,
    fwIoU, mACC, pACC and per-category IoU/ACC. Background (category 0) is a class; label 255 is
    ignored. Definitions (unlabelled pixels, missing images, overlaps): :mod:`pipeline.eval.semantic`.
    """

    name = "semantic"
    stat_keys = ("mIoU", "fwIoU", "mACC", "pACC")
    gt_fields = ("segm",)  # instance masks -> the per-category union; or the GT's label_map column
    ray_min_images = 2_000  # decoding + bincount of a VOC-sized image: a few ms (see evaluation.RAY_AUTO_MIN_IMAGES)
    help = "mIoU/fwIoU/mACC/pACC of a segment stage (label maps)"
    title = "semantic (confusion matrix over every pixel; background counted, 255 ignored)"

    @property
    def pred_columns(self):
        s = _schema()
        return (s.SEMANTIC_CATEGORY_IDS, s.SEMANTIC_MASKS)

    @property
    def stat_labels(self):
        return {"mIoU": "mean over classes in the GT", "fwIoU": "weighted by GT pixels",
                "mACC": "mean over classes in the GT", "pACC": "all labelled pixels"}

    def evaluate(self, pred_paths, ground, **options):
        from pipeline.eval.semantic import evaluate_semantic  # late: pyarrow, not for `pipeline --help`

        return evaluate_semantic(pred_paths, ground, self, **options)

    def has_own_ground_truth(self, ground):
        from pipeline.eval.semantic import read_label_maps  # late: pyarrow, not for `pipeline --help`

        return bool(read_label_maps(ground.source))

    def counts_text(self, c):
        return (
            f"{self.name}: {c['images']} images ({c['images_without_predictions']} without predictions, "
            f"{c['error_rows']} error rows), {c['pixels']} labelled pixels ({c['unlabelled_pixels']} unlabelled), "
            f"{c['ignored_pixels']} ignored, {c['shards']} shard(s) ({c['shards_from_state']} from saved state)"
        )


class Classification(IoUType):
    """Image classification against image-level labels (the ground truth's ``label`` column): top-1
    and top-5 accuracy and per-category top-1 recall, from per-shard hit counts (Ray tasks, saved
    under ``PRED/eval/classification/``), summed. Definitions (unlabelled images, missing images,
    when top-5 is null): :mod:`pipeline.eval.classification`.
    """

    name = "classification"
    stat_keys = ("top1", "top5")
    ray_min_images = 200_000  # a few list lookups per image: Ray's start-up only pays off for very large sets
    help = "top-1/top-5 accuracy of a classify stage against image labels"
    title = "classification (image-level labels; unlabelled images left out)"

    @property
    def pred_columns(self):
        s = _schema()
        return (s.CLASS_LABELS, s.CLASS_SCORES, s.CLASS_CATEGORY_IDS)

    @property
    def stat_labels(self):
        return {"top1": "best class is the label", "top5": "label among the 5 best (null below 5 categories)"}

    def evaluate(self, pred_paths, ground, **options):
        from pipeline.eval.classification import evaluate_classification  # late: pyarrow, not for `pipeline --help`

        return evaluate_classification(pred_paths, ground, self, **options)

    def has_own_ground_truth(self, ground):
        from pipeline.eval.classification import read_labels  # late: pyarrow, not for `pipeline --help`

        return bool(read_labels(ground))

    def counts_text(self, c):
        return (
            f"{self.name}: {c['images']} labelled images ({c['images_without_label']} without label, "
            f"{c['images_without_predictions']} without predictions, {c['error_rows']} error rows), "
            f"{c['top1_hits']} top-1 hits, {c['shards']} shard(s) ({c['shards_from_state']} from saved state)"
        )


# --- the registry -----------------------------------------------------------------------------------

_REGISTRY: dict[str, IoUType] = {}


def register(entry: IoUType) -> IoUType:
    """Add an IoU type; a name registered twice is an error."""
    if not entry.name or entry.name in _REGISTRY:
        raise ValueError(f"IoU type {entry.name!r} is {'already registered' if entry.name else 'unnamed'}")
    _REGISTRY[entry.name] = entry
    return entry


def get_iou_type(name: str | IoUType) -> IoUType:
    """The registered entry called ``name`` (an entry is returned as is); unknown names are an error."""
    if isinstance(name, IoUType):
        return name
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise EvalInputError(f"unknown IoU type {name!r}; choose from {', '.join(_REGISTRY)}")
    return entry


def list_iou_types() -> list[str]:
    """Registered names, in registration order."""
    return list(_REGISTRY)


def iou_types_for_columns(columns) -> list[str]:
    """Types evaluated at the end of a job whose stages write ``columns`` (``metrics: auto``)."""
    written = set(columns)
    return [t.name for t in _REGISTRY.values() if t.auto and set(t.pred_columns) <= written]


for _entry in (BBoxType(), SegmType(), KeypointsType(), ProposalRecall()):
    register(_entry)
register(SemanticSegmentation())
register(Classification())

IOU_TYPES = tuple(_REGISTRY)
"""The built-in names: ``bbox``, ``segm``, ``keypoints``, ``proposals``, ``semantic``, ``classification``."""
