"""``pipeline data export-coco``: predictions as COCO JSON -- a results list, or a COCO dataset for labelling tools.

Which objects leave, and under which class, is decided by :mod:`pipeline.annotate.select`, as for
every export: ``--min-score``, ``--min-score-per-class``, ``--categories`` (strict unless
``--allow-unmatched``). Both forms take them.

**Results** (``export_coco(pred, out)``): one record per kept detection, in shard/row/box order::

    {"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float,
     "segmentation": {"size": [h, w], "counts": str},   # when the shards have masks
     "keypoints": [x1, y1, v1, ...]}                      # when the shards have keypoints

Boxes are converted from our **xyxy** float32 to COCO **xywh** in float64 exactly as the
evaluator does (``w = x2 - x1``), and written with Python's shortest round-trip float repr, so
pycocotools on this file sees the very numbers ``pipeline eval`` evaluated (with the default
options: no threshold, no map). The order is the source order, by which pycocotools breaks score
ties. This form is what evaluators read, so it carries nothing else (no provenance per record;
polygons are refused: ``COCO.loadRes`` takes RLE only).

**Dataset** (``as_dataset=True``): ``images`` (every prediction row but error rows: ``id``,
``file_name``, ``width``, ``height``), ``categories``, and ``annotations`` with ``id`` 1..N,
``iscrowd`` 0, ``area``, ``score`` and ``attributes: {"source": ...}`` (the model and weights the
label came from: :func:`pipeline.annotate.select.prediction_source`, e.g. ``"shapes_masks:
small_maskrcnn small_maskrcnn_shapes.pth sha256:1f0c6d2a9b3e; job ..."``), plus ``segmentation``
/ ``keypoints`` + ``num_keypoints`` when present; ``info`` holds the whole provenance record of
the predictions' ``dataset.json`` and the selection used. CVAT and datumaro read ``score`` and
``attributes`` into each object's attributes. ``area`` is the mask's area when there are masks
(of the polygons as written, with ``polygons``), else ``w * h``.

``polygons=True`` (``--polygons``, dataset form only) writes each mask as COCO polygons, for tools
that take polygons only: :func:`mask_polygons` -- one polygon per part of the mask, holes kept
(cut into their polygon: see there), simplified with ``polygon_tolerance`` pixels. A mask with no
pixel then has no polygon: that object is left out and counted (``empty_masks``). The default
stays RLE (exact).

Categories: without a class map, the predictions' own categories and ids (the dataset's, never a
model's label indices; names from the prediction dataset, else its images dataset, else ``class
<id>``, as ``pipeline data render`` labels them); with ``--categories``, the map's dataset names,
ids 1..K in the order they first appear in the map file.

Error rows (``error`` set: the image could not be decoded, so it has no size and no detections)
are left out of both forms and counted: ``error_rows``. Every other object that does not leave is
counted by reason (``no_category``, ``dropped_by_map``, ``unmapped``, ``below_threshold``; a
repeated image: ``duplicate_images``, first shard wins). Malformed input -- a box that is not
finite or has negative size, a mask whose size is not the image's or whose RLE is malformed,
keypoints not in (x, y, v) triples -- is an error naming the shard, image and object.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter

import numpy as np

from pipeline import schema
from pipeline.annotate import AnnotationError
from pipeline.annotate.select import DROP_REASONS, SelectOptions, Selector, prediction_source
from pipeline.data.render import known_categories
from pipeline.data.shards import list_shards, publish_bytes, resolve, shard_schema
from pipeline.eval.rle_check import check_counts

POLYGON_TOLERANCE = 0.5  # pixels: Douglas-Peucker epsilon of --polygons (0 keeps every corner)
OUTLINE_SCALE = 4  # contours traced on the mask upsampled by this factor: see mask_polygons


def export_coco(pred_path: str, out_path: str, *, as_dataset: bool = False, options: SelectOptions | None = None,
                polygons: bool = False, polygon_tolerance: float = POLYGON_TOLERANCE) -> dict:
    """Write ``pred_path`` as COCO results (or a COCO dataset) to ``out_path``; returns counts.

    The counts: ``images`` and ``detections`` written, ``error_rows``, each drop reason of
    :mod:`pipeline.annotate.select` (also under ``skipped``), ``categories`` (names written) and,
    with polygons, ``empty_masks``, ``multipart_masks`` and ``mask_holes``.
    """
    options = options or SelectOptions()
    if polygons and not as_dataset:
        raise AnnotationError("--polygons needs --as-dataset: a COCO results list (for evaluators) takes RLE masks only")
    if not (polygon_tolerance >= 0):
        raise AnnotationError(f"--polygon-tolerance must be >= 0 pixels, got {polygon_tolerance}")
    selector = Selector(pred_path, options, name_unknown=True)
    shards = list_shards(pred_path)
    names_per_shard = [set(shard_schema(s).names) for s in shards]
    with_masks = any(schema.MASKS in n for n in names_per_shard)
    with_keypoints = all(schema.KEYPOINTS in n for n in names_per_shard)
    if polygons and not with_masks:
        raise AnnotationError(f"--polygons: {pred_path} has no '{schema.MASKS}' column (a masks stage writes it)")
    categories, category_id = _categories(selector)
    source = prediction_source(selector.meta, pred_path)

    images: list[dict] = []
    records: list[dict] = []
    counts: Counter = Counter()
    for im in selector.images(with_masks=with_masks, with_keypoints=with_keypoints):
        if im.error is not None:
            continue  # counted by the selector as error_rows
        images.append({"id": im.image_id, "file_name": im.file_name, "width": int(im.width), "height": int(im.height)})
        where = f"{pred_path}: image_id {im.image_id} ({im.file_name})"
        if with_masks:
            check_masks(im, where)
        for n, obj in enumerate(im.objects):
            x1, y1, x2, y2 = obj.box
            rec = {"image_id": im.image_id, "category_id": category_id(obj), "bbox": [x1, y1, x2 - x1, y2 - y1],
                   "score": obj.score}
            if obj.mask is not None:
                rec["segmentation"] = {"size": [int(v) for v in obj.mask["size"]], "counts": _str(obj.mask["counts"])}
            if with_keypoints:
                if obj.keypoints is None or len(obj.keypoints) % 3 or not all(np.isfinite(obj.keypoints)):
                    raise AnnotationError(f"{where}: object {n}: keypoints must be finite (x, y, v) triples, got {obj.keypoints}")
                rec["keypoints"] = [float(v) for v in obj.keypoints]
            if polygons:
                parts = mask_polygons(_decode(rec["segmentation"]), tolerance=polygon_tolerance, counts=counts)
                if not parts:
                    counts["empty_masks"] += 1
                    continue
                rec["segmentation"] = parts
            records.append(rec)
    if as_dataset:
        payload = _as_dataset(records, images, categories, source=source, info=selector.meta.info, options=options,
                              pred_path=pred_path)
    else:
        payload = records
    fs, p = resolve(out_path)
    if posixpath.dirname(p):
        fs.create_dir(posixpath.dirname(p), recursive=True)
    publish_bytes(fs, p, json.dumps(payload, allow_nan=False).encode("utf-8"))
    skipped = {k: selector.counts[k] for k in DROP_REASONS if selector.counts.get(k)}
    if counts.get("empty_masks"):
        skipped["empty_masks"] = counts["empty_masks"]
    return {**selector.counts, **counts, "images": len(images), "detections": len(records), "skipped": skipped,
            "categories": [c["name"] for c in categories], "source": source}


def _categories(selector: Selector):
    """(COCO categories, object -> category_id): the predictions' own ids, or 1..K under a class map."""
    if selector.options.category_map is None:
        known = known_categories(selector.meta) or [{"id": i, "name": n} for i, n in selector.source_names.items()]
        categories = [{**c, "id": int(c["id"]), "name": selector.source_names[int(c["id"])]}
                      for c in sorted(known, key=lambda c: int(c["id"]))]
        return categories, lambda obj: obj.source_category_id
    categories = [{"id": i, "name": name} for i, name in enumerate(selector.output_categories, start=1)]
    return categories, lambda obj: obj.class_index + 1


def check_masks(im, where: str) -> None:
    """Each kept mask has the image's size and a well-formed RLE (pycocotools does not check)."""
    masks = [obj.mask for obj in im.objects]
    if not masks:
        return
    for n, m in enumerate(masks):
        if m.get("size") is None or len(m["size"]) != 2 or [int(v) for v in m["size"]] != [int(im.height), int(im.width)]:
            raise AnnotationError(f"{where}: object {n}: mask size {m.get('size')} differs from the image's "
                                  f"[height, width] [{im.height}, {im.width}]")
    reasons = check_counts([_str(m["counts"]) for m in masks], np.array([m["size"] for m in masks], dtype=np.int64))
    for n, reason in enumerate(reasons):
        if reason is not None:
            raise AnnotationError(f"{where}: object {n}: malformed RLE mask: {reason}")


def mask_polygons(mask: np.ndarray, *, tolerance: float = POLYGON_TOLERANCE, counts: Counter | None = None) -> list[list[float]]:
    """COCO polygons (flat ``[x0, y0, x1, y1, ...]`` lists) of a binary mask (H x W), largest part first.

    * Contours of the mask thresholded at 0.5 (``cv2.findContours``, RETR_CCOMP: outer boundaries
      and the holes inside them), traced on the mask upsampled ``OUTLINE_SCALE`` times, so that the
      outline lies 1/8 px inside the **pixel edges** (pixel (0, 0) covers [0, 1) x [0, 1)), not on
      the boundary pixels' centres half a pixel in (which would lose a fifth of a 35-pixel shape).
    * One polygon per part: COCO unions an object's polygons.
    * Holes are kept by cutting each into its part's polygon with a zero-width bridge (the
      "keyhole": outer ring, over to the hole, round it, back). COCO has no hole polygons --
      every reader unions the polygons of a segmentation, so a hole written as a polygon of its
      own would be filled -- but the even-odd rasterisation of pycocotools (which CVAT's and
      datumaro's COCO readers use) and the non-zero rule of drawing tools (holes run the other
      way) both leave a keyhole's hole empty.
    * Each ring is simplified with Douglas-Peucker (``cv2.approxPolyDP``) at ``tolerance`` pixels,
      and kept unsimplified if that leaves fewer than 3 points.

    With ``tolerance=0`` the polygons rasterised again by pycocotools give back exactly the mask.
    ``counts`` (optional) gets ``multipart_masks`` (masks in several parts) and ``mask_holes``.
    """
    import cv2

    ys, xs = np.nonzero(np.asarray(mask) > 0.5)
    if len(xs) == 0:
        return []
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    crop = np.ascontiguousarray(np.asarray(mask)[y0:y1, x0:x1] > 0.5, dtype=np.uint8)
    up = np.pad(np.kron(crop, np.ones((OUTLINE_SCALE, OUTLINE_SCALE), np.uint8)), 1)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    hierarchy = hierarchy[0]
    offset = np.array([x0, y0], dtype=np.float64)

    def ring(c: np.ndarray) -> np.ndarray:
        if tolerance > 0:
            simple = cv2.approxPolyDP(c, tolerance * OUTLINE_SCALE, True)
            if len(simple) >= 3:
                c = simple
        p = c.reshape(-1, 2).astype(np.float64) - 1.0  # undo the pad
        return (p + 0.5) / OUTLINE_SCALE + offset

    parts = []
    for i, c in enumerate(contours):
        if hierarchy[i][3] >= 0:
            continue  # a hole: joined to its parent below
        polygon = ring(c)
        holes = [ring(h) for h, info in zip(contours, hierarchy) if info[3] == i]
        for hole in holes:
            polygon = _keyhole(polygon, hole)
        parts.append((cv2.contourArea(c), polygon))
        if counts is not None:
            counts["mask_holes"] += len(holes)
    if counts is not None and len(parts) > 1:
        counts["multipart_masks"] += 1
    parts.sort(key=lambda a: -a[0])
    return [p.ravel().tolist() for _, p in parts if len(p) >= 3]


def _keyhole(outer: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """``outer`` with ``hole`` cut in: a zero-width bridge between their two closest points."""
    d = ((outer[:, None, :] - hole[None, :, :]) ** 2).sum(axis=-1)
    i, j = np.unravel_index(int(d.argmin()), d.shape)
    return np.concatenate([outer[: i + 1], np.roll(hole, -j, axis=0), hole[j : j + 1], outer[i:]])


def _as_dataset(records: list[dict], images: list[dict], categories: list[dict], *, source: str, info: dict,
                options: SelectOptions, pred_path: str) -> dict:
    from pycocotools import mask as mask_utils

    annotations = []
    for n, rec in enumerate(records, start=1):
        ann = {"id": n, **rec, "iscrowd": 0}
        seg = rec.get("segmentation")
        if isinstance(seg, list):
            ann["area"] = None  # filled by _polygon_areas, which knows each image's size
        elif seg is not None:
            ann["area"] = float(mask_utils.area(seg))
        else:
            ann["area"] = rec["bbox"][2] * rec["bbox"][3]
        if "keypoints" in rec:
            ann["num_keypoints"] = int(sum(1 for v in rec["keypoints"][2::3] if v > 0))
        ann["attributes"] = {"source": source}
        annotations.append(ann)
    _polygon_areas(annotations, images)
    selection = {"min_score": options.min_score, "min_score_per_class": dict(options.min_score_per_class),
                 "categories": dict(options.category_map) if options.category_map is not None else None,
                 "allow_unmatched": options.allow_unmatched}
    return {"info": {"description": "pipeline predictions", "source": source, "predictions": pred_path,
                     "provenance": info, "selection": selection},
            "images": images, "categories": categories, "annotations": annotations}


def _polygon_areas(annotations: list[dict], images: list[dict]) -> None:
    """Area of polygon segmentations: pixels of the polygons as written, rasterised by pycocotools."""
    from pycocotools import mask as mask_utils

    size = {im["id"]: (im["height"], im["width"]) for im in images}
    for ann in annotations:
        if isinstance(ann.get("segmentation"), list):
            h, w = size[ann["image_id"]]
            ann["area"] = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))))


def _decode(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})


def _str(counts) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else counts
