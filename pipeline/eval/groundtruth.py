"""Ground truth for evaluation, from one of our datasets or a COCO annotations file.

Held column-wise (numpy arrays + a few per-annotation lists) so that the subset belonging to one
prediction shard is cheap to cut out and ship to a Ray task. Annotation order within an image is
the order of the source (COCO file order, which ``import_coco`` preserves): pycocotools breaks
IoU ties by that order, so it is part of the data.

Box format: ``bbox`` is COCO **xywh** float64, exactly as in the COCO file.

Semantics follow ``COCO`` + ``COCOeval._prepare`` with ``useCats=1``:

* every image of the dataset is evaluated, including images whose file was missing at import
  (error rows) and images with no annotation;
* annotations whose category is not among the dataset's categories are left out (pycocotools
  never loads them); their number is reported as ``gt_annotations_unknown_category``;
* ``ignore`` is ``iscrowd``; an IoU type may add to it (keypoints: ``num_keypoints == 0``;
  :meth:`~pipeline.eval.iou_types.CocoIoUType.gt_ignored`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.data import coco_file
from pipeline.data.shards import list_shards, read_meta, read_shard, shard_schema
from pipeline.eval.params import EvalInputError

GT_COLUMNS = [schema.IMAGE_ID, schema.WIDTH, schema.HEIGHT, schema.ANNOTATIONS]


def int_id(value, what: str) -> int:
    return coco_file.int_id(value, what, EvalInputError)


@dataclass
class GroundTruth:
    """Images, categories and annotations, column-wise; annotations sorted by image (stable)."""

    image_ids: np.ndarray  # int64, sorted, unique
    heights: np.ndarray  # int64 (-1 when unknown)
    widths: np.ndarray
    categories: list[dict]  # COCO category dicts, sorted by id
    ann_image: np.ndarray  # int64
    ann_category: np.ndarray  # int64
    ann_id: np.ndarray  # int64
    ann_area: np.ndarray  # float64
    ann_iscrowd: np.ndarray  # int64
    ann_bbox: np.ndarray  # (n, 4) float64 xywh; NaN row when the annotation has none
    ann_segm: list | None  # per annotation: None | polygons [[x, y, ...]] | RLE {"size", "counts"}
    ann_keypoints: list | None  # per annotation: None | [x, y, v, ...]; the list is None if not loaded
    ann_num_keypoints: np.ndarray  # int64
    source: str = ""
    stats: dict = field(default_factory=dict)

    @property
    def category_ids(self) -> np.ndarray:
        return np.array(sorted(int(c["id"]) for c in self.categories), dtype=np.int64)

    def image_size(self, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(heights, widths) of ``image_ids`` (all must be GT images)."""
        pos = np.searchsorted(self.image_ids, image_ids)
        return self.heights[pos], self.widths[pos]

    def has_images(self, image_ids: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(self.image_ids, image_ids), 0, max(len(self.image_ids) - 1, 0))
        return (self.image_ids[pos] == image_ids) if len(self.image_ids) else np.zeros(len(image_ids), bool)

    def subset(self, image_ids) -> GroundTruth:
        """The images ``image_ids`` (GT images only) with their annotations, same layout."""
        ids = np.unique(np.asarray(image_ids, dtype=np.int64))
        ids = ids[self.has_images(ids)]
        pos = np.searchsorted(self.image_ids, ids)
        lo = np.searchsorted(self.ann_image, ids, side="left")
        hi = np.searchsorted(self.ann_image, ids, side="right")
        take = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]) if len(ids) else np.zeros(0, np.int64)
        take = take.astype(np.int64)
        return GroundTruth(
            image_ids=ids,
            heights=self.heights[pos],
            widths=self.widths[pos],
            categories=self.categories,
            ann_image=self.ann_image[take],
            ann_category=self.ann_category[take],
            ann_id=self.ann_id[take],
            ann_area=self.ann_area[take],
            ann_iscrowd=self.ann_iscrowd[take],
            ann_bbox=self.ann_bbox[take],
            ann_segm=None if self.ann_segm is None else [self.ann_segm[i] for i in take],
            ann_keypoints=None if self.ann_keypoints is None else [self.ann_keypoints[i] for i in take],
            ann_num_keypoints=self.ann_num_keypoints[take],
            source=self.source,
        )

    def fingerprint(self, iou_type) -> str:
        """Content hash of everything ``iou_type`` evaluation reads (ids, sizes, categories, the
        entry's ``gt_fields`` and the annotations' order); a change anywhere else keeps saved state
        valid. ``iou_type``: a :mod:`~pipeline.eval.iou_types` entry."""
        h = hashlib.sha256(iou_type.name.encode())
        h.update(self.category_ids.tobytes())
        for arr in (self.image_ids, self.heights, self.widths, self.ann_image, self.ann_category, self.ann_id,
                    self.ann_iscrowd):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.ann_area, dtype=np.float64).tobytes())
        for part in iou_type.gt_fields:  # in the entry's order: state saved before the registry stays valid
            if part == "bbox":
                h.update(np.ascontiguousarray(self.ann_bbox, dtype=np.float64).tobytes())
            elif part == "segm":
                h.update(json.dumps(self.ann_segm, separators=(",", ":")).encode())
            elif part == "keypoints":
                h.update(np.ascontiguousarray(self.ann_num_keypoints, dtype=np.int64).tobytes())
                h.update(json.dumps(self.ann_keypoints, separators=(",", ":")).encode())
            else:
                raise ValueError(f"unknown ground-truth field {part!r}")
        return h.hexdigest()[:16]

    def to_coco_dict(self) -> dict:
        """The ground truth as a COCO annotations dict (what pycocotools' ``COCO`` would load)."""
        images = [
            {"id": int(i), "height": int(h), "width": int(w)} for i, h, w in zip(self.image_ids, self.heights, self.widths)
        ]
        anns = []
        for n in range(len(self.ann_id)):
            ann = {
                "id": int(self.ann_id[n]),
                "image_id": int(self.ann_image[n]),
                "category_id": int(self.ann_category[n]),
                "area": float(self.ann_area[n]),
                "iscrowd": int(self.ann_iscrowd[n]),
            }
            if not np.isnan(self.ann_bbox[n]).any():
                ann["bbox"] = [float(v) for v in self.ann_bbox[n]]
            if self.ann_segm is not None and self.ann_segm[n] is not None:
                ann["segmentation"] = self.ann_segm[n]
            if self.ann_keypoints is not None and self.ann_keypoints[n] is not None:
                ann["keypoints"] = self.ann_keypoints[n]
                ann["num_keypoints"] = int(self.ann_num_keypoints[n])
            anns.append(ann)
        return {"images": images, "annotations": anns, "categories": self.categories}


def load_ground_truth(path: str, *, segm: bool = True, keypoints: bool = True) -> GroundTruth:
    """Read ground truth from a dataset folder (shards with ``annotations``) or a COCO JSON file.

    ``segm`` / ``keypoints``: also read segmentations / keypoints (the large part of a COCO file);
    leave them out when no requested IoU type needs them.
    """
    if path.endswith(".json") and "://" not in path and os.path.isfile(path):
        return _from_coco_file(path, segm=segm, keypoints=keypoints)
    return _from_dataset(path, segm=segm, keypoints=keypoints)


def _from_dataset(path: str, *, segm: bool, keypoints: bool) -> GroundTruth:
    """Column-wise straight from Arrow: no Python object per annotation unless masks are needed."""
    meta = read_meta(path)
    parts: dict[str, list] = {k: [] for k in ("ids", "h", "w", "image", "id", "category", "area", "iscrowd", "bbox", "nkp")}
    segms: list = []
    kps: list = []
    for shard in list_shards(path):
        present = shard_schema(shard).names
        if schema.ANNOTATIONS not in present:
            raise EvalInputError(f"{shard}: no '{schema.ANNOTATIONS}' column; ground truth must be an annotated dataset")
        table = read_shard(shard, columns=[c for c in GT_COLUMNS if c in present])
        n = table.num_rows
        ids = table[schema.IMAGE_ID].to_numpy().astype(np.int64)
        parts["ids"].append(ids)
        for key, col in (("h", schema.HEIGHT), ("w", schema.WIDTH)):
            present_col = col in table.column_names
            parts[key].append(
                np.asarray(pc.fill_null(table[col], -1).to_numpy(), np.int64) if present_col else np.full(n, -1, np.int64)
            )
        anns = table[schema.ANNOTATIONS].combine_chunks()
        lengths = pc.fill_null(pc.list_value_length(anns), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(anns)
        parts["image"].append(np.repeat(ids, lengths))
        parts["id"].append(_int_field(flat, "id", -1))
        parts["category"].append(_int_field(flat, "category_id", -1))
        parts["area"].append(np.asarray(pc.fill_null(flat.field("area"), np.nan).to_numpy(zero_copy_only=False), np.float64))
        parts["iscrowd"].append(_int_field(flat, "iscrowd", 0))
        parts["nkp"].append(_int_field(flat, "num_keypoints", -1))
        box_col = flat.field("bbox")
        box = np.full((len(flat), 4), np.nan)
        valid = box_col.is_valid().to_numpy(zero_copy_only=False)
        box[valid] = np.asarray(box_col.flatten().to_numpy(zero_copy_only=False), np.float64).reshape(-1, 4)
        parts["bbox"].append(box)
        if segm:
            for seg in flat.field("segmentation").to_pylist():
                if seg is not None:
                    seg = seg["polygons"] if seg.get("polygons") is not None else seg.get("rle")
                segms.append(_segm(seg))
        if keypoints:
            kps.extend(v or None for v in flat.field("keypoints").to_pylist())
    cat = lambda k, shape=(0,): np.concatenate(parts[k]) if parts[k] else np.zeros(shape)  # noqa: E731
    return _assemble(
        image_ids=cat("ids"), heights=cat("h"), widths=cat("w"), categories=meta.categories,
        image=cat("image"), ann_id=cat("id"), category=cat("category"), area=cat("area"), iscrowd=cat("iscrowd"),
        bbox=cat("bbox", (0, 4)), num_keypoints=cat("nkp"), segms=segms if segm else None,
        keypoints=kps if keypoints else None, source=path,
    )


def _int_field(flat: pa.StructArray, name: str, missing: int) -> np.ndarray:
    if flat.type.get_field_index(name) < 0:
        return np.full(len(flat), missing, np.int64)
    return np.asarray(pc.fill_null(flat.field(name), missing).to_numpy(zero_copy_only=False), np.int64)


def _from_coco_file(path: str, *, segm: bool, keypoints: bool) -> GroundTruth:
    coco = coco_file.read_coco_file(path, EvalInputError)
    images = [
        (int_id(im["id"], "image id"), int(im.get("height", -1) or -1), int(im.get("width", -1) or -1))
        for im in coco["images"]
    ]
    return from_coco_dicts(images, coco.get("annotations", []), coco.get("categories", []), source=path,
                           segm=segm, keypoints=keypoints)


def from_coco_dicts(
    images: list[tuple[int, int, int]], anns: list[dict], categories: list[dict], *, source: str,
    segm: bool = True, keypoints: bool = True,
) -> GroundTruth:
    """Ground truth from COCO-style dicts: ``images`` as (id, height, width), annotations as in COCO."""
    cols = _plain_columns(anns)
    if cols is None:
        cols = _columns_one_by_one(anns, source)
    if segm:
        cols["segm"] = [_segm(ann.get("segmentation")) for ann in anns]
    if keypoints:
        cols["kps"] = [[float(v) for v in kp] if (kp := ann.get("keypoints") or None) else None for ann in anns]
    return _assemble(
        image_ids=np.array([i for i, _, _ in images], np.int64),
        heights=np.array([h for _, h, _ in images], np.int64),
        widths=np.array([w for _, _, w in images], np.int64),
        categories=categories,
        image=np.asarray(cols["image"], np.int64),
        ann_id=np.asarray(cols["id"], np.int64),
        category=np.asarray(cols["category"], np.int64),
        area=np.asarray(cols["area"], np.float64),
        iscrowd=np.asarray(cols["iscrowd"], np.int64),
        bbox=np.asarray(cols["bbox"], np.float64).reshape(-1, 4),
        num_keypoints=np.asarray(cols["nkp"], np.int64),
        segms=cols["segm"] if segm else None,
        keypoints=cols["kps"] if keypoints else None,
        source=source,
    )


def _columns_one_by_one(anns: list, source: str) -> dict[str, list]:
    """The numeric annotation columns, one annotation at a time: converts loose values ("7" ids,
    missing fields) and names the annotation that cannot be read."""
    cols: dict[str, list] = {k: [] for k in ("image", "id", "category", "area", "iscrowd", "bbox", "nkp")}
    for ann in anns:
        where = f"{source}: annotation id {ann.get('id')!r}"
        bbox = ann.get("bbox")
        if bbox is not None and len(bbox) != 4:
            raise EvalInputError(f"{where}: bbox must have 4 numbers (x, y, w, h), got {bbox!r}")
        area = ann.get("area")
        cols["image"].append(int_id(ann.get("image_id"), f"{where}: image_id"))
        cols["id"].append(int_id(ann.get("id"), f"{where}: id"))
        cols["category"].append(int_id(ann.get("category_id"), f"{where}: category_id"))
        cols["area"].append(np.nan if area is None else float(area))
        cols["iscrowd"].append(int(ann.get("iscrowd") or 0))
        cols["bbox"].append([np.nan] * 4 if bbox is None else [float(v) for v in bbox])
        nkp = ann.get("num_keypoints")
        cols["nkp"].append(-1 if nkp is None else int(nkp))
    return cols


def _plain_columns(anns: list) -> dict | None:
    """The numeric annotation columns of :func:`from_coco_dicts` without a Python loop per
    annotation, when every annotation is plainly well formed (``int`` ids, ``iscrowd`` and
    ``num_keypoints`` ``int`` or absent, numeric ``area``, ``bbox`` absent or 4 numbers); ``None``
    otherwise, and the per-annotation loop converts or names the offending annotation."""
    if set(map(type, anns)) - {dict}:
        return None
    get = lambda key: [a.get(key) for a in anns]  # noqa: E731
    image, ann_id, category, area = get("image_id"), get("id"), get("category_id"), get("area")
    iscrowd, nkp, bbox = get("iscrowd"), get("num_keypoints"), get("bbox")
    if not all(set(map(type, col)) <= {int} for col in (image, ann_id, category)):
        return None
    if not (set(map(type, area)) <= {int, float, type(None)} and set(map(type, iscrowd)) <= {int, type(None)}
            and set(map(type, nkp)) <= {int, type(None)} and set(map(type, bbox)) <= {list, type(None)}):
        return None
    boxes = [b for b in bbox if b is not None]
    if not set(map(len, boxes)) <= {4} or not set(map(type, (v for b in boxes for v in b))) <= {int, float}:
        return None
    try:
        cols = {
            "image": np.array(image, np.int64),
            "id": np.array(ann_id, np.int64),
            "category": np.array(category, np.int64),
            "area": np.array([np.nan if a is None else a for a in area], np.float64),
            "iscrowd": np.array([c or 0 for c in iscrowd], np.int64),
            "nkp": np.array([-1 if n is None else n for n in nkp], np.int64),
        }
        box = np.full((len(anns), 4), np.nan)
        has = np.fromiter((b is not None for b in bbox), bool, len(bbox))
        box[has] = np.array(boxes, np.float64).reshape(-1, 4)
    except (OverflowError, ValueError, TypeError):
        return None
    cols["bbox"] = box
    return cols


def _assemble(*, image_ids, heights, widths, categories, image, ann_id, category, area, iscrowd, bbox,
              num_keypoints, segms, keypoints, source) -> GroundTruth:
    """Checks and pycocotools' filtering, then annotations sorted by image (stably)."""
    order = np.argsort(image_ids, kind="stable")
    image_ids, heights, widths = image_ids[order], heights[order], widths[order]
    if len(image_ids) and (np.diff(image_ids) == 0).any():
        dup = int(image_ids[1:][np.diff(image_ids) == 0][0])
        raise EvalInputError(f"{source}: image id {dup} appears more than once in the ground truth")
    categories = sorted((dict(c, id=int_id(c["id"], "category id")) for c in categories), key=lambda c: c["id"])
    cat_ids = np.array([c["id"] for c in categories], np.int64)
    known_image = np.isin(image, image_ids)  # pycocotools never evaluates images not in 'images'
    known_cat = np.isin(category, cat_ids)
    keep = np.flatnonzero(known_image & known_cat)
    missing_area = keep[np.isnan(area[keep])]
    if len(missing_area):
        raise EvalInputError(
            f"{source}: annotation id {int(ann_id[missing_area[0]])}: no 'area'; COCO evaluation needs it to "
            "assign area ranges"
        )
    keep = keep[np.argsort(image[keep], kind="stable")]  # each image's annotations stay in source order
    nkp = num_keypoints[keep]
    kps = None if keypoints is None else [keypoints[i] for i in keep]
    if kps is not None:  # num_keypoints missing: count the labelled ones, as COCO defines it
        for j in np.flatnonzero(nkp < 0):
            nkp[j] = int(np.count_nonzero(np.asarray(kps[j], np.float64)[2::3] > 0)) if kps[j] else 0
    nkp[nkp < 0] = 0
    return GroundTruth(
        image_ids=image_ids,
        heights=heights,
        widths=widths,
        categories=categories,
        ann_image=image[keep],
        ann_category=category[keep],
        ann_id=ann_id[keep],
        ann_area=area[keep],
        ann_iscrowd=iscrowd[keep],
        ann_bbox=bbox[keep],
        ann_segm=None if segms is None else [segms[i] for i in keep],
        ann_keypoints=kps,
        ann_num_keypoints=nkp,
        source=source,
        stats={
            "gt_images": len(image_ids),
            "gt_annotations": len(keep),
            "gt_annotations_unknown_category": int((known_image & ~known_cat).sum()),
            "gt_annotations_unknown_image": int((~known_image).sum()),
        },
    )


def _segm(seg):
    """Keep polygons / RLE as COCO has them (RLE counts as str); [] and None mean 'no mask'."""
    if seg is None or (isinstance(seg, list) and len(seg) == 0):
        return None
    if isinstance(seg, dict) and isinstance(seg.get("counts"), bytes):
        return {"size": list(seg["size"]), "counts": seg["counts"].decode("ascii")}
    return seg
