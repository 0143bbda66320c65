"""``pipeline data merge DS PRED OUT``: a labelled dataset plus a model's predictions -> a new dataset.

``DS`` is an images dataset (``import-coco``, ``import-images``, ``synth``, an earlier merge) with
its ``annotations`` (COCO-style, **xywh** boxes); ``PRED`` a job's predictions on those images
(**xyxy** ``boxes``, ``masks``, ``keypoints``), matched to them by ``image_id`` (and checked by
``file_name``: predictions made on other images are an error naming one). Which predictions count
is decided by :mod:`pipeline.annotate.select`, as for every export (``--min-score``,
``--min-score-per-class``, ``--categories``, ``--allow-unmatched``); their classes, after the map,
must be categories of ``DS`` by name (else an error listing them) -- or, when ``DS`` has no
categories at all (a folder of photos), they become its categories, ids 1..K.

Modes, per image:

* ``append``: every selected prediction is added to the existing annotations;
* ``fill-missing``: a selected prediction is added only if it matches no existing annotation of
  its category: its box IoU with each is below ``iou`` (COCO's IoU, ``pycocotools.mask.iou``; a
  crowd region counts as matched when the prediction lies inside it: intersection over the
  prediction's area). Matched predictions are skipped and counted;
* ``replace``: the image's annotations are replaced by its selected predictions -- for images
  with a readable prediction row; images without one keep their annotations.

Existing annotations are never changed: they are copied as they are (same struct, same id), or,
in ``replace``, left out and counted (``replaced``). An added prediction becomes an annotation
with a fresh ``id`` (after the largest in ``DS``), ``category_id`` (DS's), ``bbox`` xywh
(``[x1, y1, x2 - x1, y2 - y1]`` of the float32 box), ``area`` (the mask's, else ``w * h``),
``iscrowd`` 0, ``segmentation.rle`` (the mask) and ``keypoints``.

Where each annotation came from is stored beside it, in two columns parallel to ``annotations``
(one entry per annotation, same order):

* ``annotation_sources`` (list<string>): ``"human"`` for an annotation of ``DS`` (or the source
  an earlier merge recorded for it), else the predictions' source line
  (:func:`pipeline.annotate.select.prediction_source`: job, model, weights file and sha256, job id);
* ``annotation_scores`` (list<float64>): the model's score, null for human labels.

Readers that know only the image schema (jobs, ``eval``, ``train``) ignore them.

Counts, per ``DS`` category: ``kept`` (existing annotations in the output), ``replaced``,
``added``, ``skipped`` (fill-missing: matched an existing annotation) and ``below_threshold``;
plus images and the selection's drop reasons. They are printed, returned, written to
``OUT/merge.json`` and recorded in ``OUT/dataset.json`` (``info.merge``). ``OUT`` must be empty or
absent; ``overwrite`` replaces an earlier dataset there (and its ``merge.json``).

Memory: the selected predictions (objects only, masks as RLE strings) are held by image id while
``DS`` streams through one batch of rows at a time.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa

from pipeline import schema
from pipeline.annotate import AnnotationError
from pipeline.annotate.coco import check_masks
from pipeline.annotate.select import DROP_REASONS, SelectOptions, Selector, prediction_source
from pipeline.data.shards import (
    DATASET_JSON,
    DatasetMeta,
    ShardWriter,
    iter_shard,
    list_shards,
    publish_bytes,
    read_meta,
    read_shard,
    resolve,
    shard_schema,
    write_meta,
)

ANNOTATION_SOURCES = "annotation_sources"  # list<string>: one per annotation, "human" or a prediction source
ANNOTATION_SCORES = "annotation_scores"  # list<float64>: one per annotation, null for human labels
HUMAN = "human"
MODES = ("append", "replace", "fill-missing")
MERGE_JSON = "merge.json"
MERGED_SCHEMA = pa.schema(list(schema.IMAGE_SCHEMA) + [
    pa.field(ANNOTATION_SOURCES, pa.list_(pa.string())),
    pa.field(ANNOTATION_SCORES, pa.list_(pa.float64())),
])
PER_CATEGORY = ("kept", "replaced", "added", "skipped", "below_threshold")
BATCH_ROWS = 256


def merge(ds: str, pred: str, out: str, *, mode: str, iou: float = 0.5, options: SelectOptions | None = None,
          rows_per_shard: int = 1000, overwrite: bool = False) -> dict:
    """Merge ``pred`` into ``ds`` as ``mode`` says and write the result to ``out``; returns the report."""
    if mode not in MODES:
        raise AnnotationError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not (0.0 <= iou <= 1.0):
        raise AnnotationError(f"--iou must be between 0 and 1, got {iou}")
    options = options or SelectOptions()
    ds_meta = read_meta(ds)
    if ds_meta.kind == "predictions":
        raise AnnotationError(f"{ds} is a prediction dataset; DS is the images dataset whose labels the predictions join")
    ds_shards = list_shards(ds)
    files, max_id, used_ids = _scan(ds_shards)
    selector = Selector(pred, options, source=ds)
    source = prediction_source(selector.meta, pred)
    categories, category_id = _target_categories(ds, ds_meta, selector.output_categories, used_ids)
    names = {int(c["id"]): str(c.get("name") or f"category {c['id']}") for c in categories}
    predictions = _predictions(selector, pred, ds, files)

    _remove_old_report(out, overwrite)
    writer = ShardWriter(out, rows_per_shard, MERGED_SCHEMA, overwrite=overwrite)
    per_category: dict[str, Counter] = defaultdict(Counter)
    images: Counter = Counter()
    next_id = max_id + 1
    for shard in ds_shards:
        columns = [c for c in MERGED_SCHEMA.names if c in shard_schema(shard).names]
        for table in iter_shard(shard, BATCH_ROWS, columns=columns):
            for row in table.to_pylist():
                images["images"] += 1
                found = predictions.get(int(row[schema.IMAGE_ID]))
                images["with_predictions" if found is not None else "without_predictions"] += 1
                anns, sources, scores = _existing(row, shard)
                if mode == "replace" and found is not None:
                    for a in anns:
                        per_category[names.get(a["category_id"], f"category {a['category_id']}")]["replaced"] += 1
                    anns, sources, scores = [], [], []
                else:
                    for a in anns:
                        per_category[names.get(a["category_id"], f"category {a['category_id']}")]["kept"] += 1
                objects = found.objects if found is not None else []
                matched = _matched(objects, anns, category_id, iou) if mode == "fill-missing" else [False] * len(objects)
                anns = list(anns)
                for obj, hit in zip(objects, matched):
                    name = names[category_id[obj.category]]
                    if hit:
                        per_category[name]["skipped"] += 1
                        continue
                    anns.append(_annotation(obj, next_id, category_id[obj.category]))
                    sources.append(source)
                    scores.append(obj.score)
                    next_id += 1
                    per_category[name]["added"] += 1
                row[schema.ANNOTATIONS], row[ANNOTATION_SOURCES], row[ANNOTATION_SCORES] = anns, sources, scores
                writer.add({c: row.get(c) for c in MERGED_SCHEMA.names})
    writer.flush()
    for (reason, name), n in selector.dropped_by_class.items():
        if reason == "below_threshold":
            per_category[name]["below_threshold"] += n
    report = {
        "ds": ds, "pred": pred, "out": out, "mode": mode, "iou": iou, "source": source,
        "selection": {"min_score": options.min_score, "min_score_per_class": dict(options.min_score_per_class),
                      "categories": dict(options.category_map) if options.category_map is not None else None,
                      "allow_unmatched": options.allow_unmatched},
        "images": {**images, "prediction_error_rows": selector.counts["error_rows"]},
        "per_category": {name: {k: int(c.get(k, 0)) for k in PER_CATEGORY} for name, c in sorted(per_category.items())},
        "totals": {k: int(sum(c.get(k, 0) for c in per_category.values())) for k in PER_CATEGORY},
        "dropped": {k: int(selector.counts[k]) for k in DROP_REASONS if selector.counts.get(k)},
        "shards": writer.shards_written,
    }
    info = {"description": f"{mode} merge of {pred} into {ds}", "source": ds, "merge": report,
            "predictions": selector.meta.info}
    write_meta(out, DatasetMeta(categories=categories, info=info))
    _write_report(out, report)
    return report


def _scan(shards: list[str]) -> tuple[dict[int, str | None], int, set[int]]:
    """image_id -> file_name, the largest annotation id, and the category ids the annotations use."""
    import pyarrow.compute as pc

    files: dict[int, str | None] = {}
    max_id, used = 0, set()
    for shard in shards:
        present = shard_schema(shard).names
        table = read_shard(shard, columns=[c for c in (schema.IMAGE_ID, schema.FILE_NAME, schema.ANNOTATIONS) if c in present])
        names = table[schema.FILE_NAME].to_pylist() if schema.FILE_NAME in present else [None] * table.num_rows
        for image_id, name in zip(table[schema.IMAGE_ID].to_pylist(), names):
            if image_id in files:
                raise AnnotationError(f"{shard}: image_id {image_id} ({name}) appears twice in the dataset")
            files[int(image_id)] = name
        if schema.ANNOTATIONS in present:
            flat = pc.list_flatten(table[schema.ANNOTATIONS])
            if len(flat):
                ids = pc.struct_field(flat, "id")
                max_id = max(max_id, int(pc.max(ids).as_py() or 0))
                used.update(int(c) for c in pc.unique(pc.struct_field(flat, "category_id")).to_pylist() if c is not None)
    return files, max_id, used


def _target_categories(ds: str, meta, outputs: list[str], used: set[int]) -> tuple[list[dict], dict[str, int]]:
    """DS's categories (or, when it has none, the predictions' classes as 1..K) and name -> DS id."""
    if meta.categories:
        by_name: dict[str, int] = {}
        for c in meta.categories:
            name = str(c.get("name") or "")
            if name in by_name:
                raise AnnotationError(f"{ds}: category name {name!r} is used by ids {by_name[name]} and {c['id']}; merge matches classes by name")
            by_name[name] = int(c["id"])
        missing = [n for n in outputs if n not in by_name]
        if missing:
            raise AnnotationError(
                f"the predictions' class(es) {', '.join(missing)} are not categories of {ds} "
                f"(its categories: {', '.join(by_name)}); map them with --categories map.yaml "
                "(model_name: dataset_name, or null to drop)"
            )
        return list(meta.categories), {n: by_name[n] for n in outputs}
    if used:
        raise AnnotationError(f"{ds} has annotations (category ids {', '.join(map(str, sorted(used)[:5]))}) but no "
                              "categories in its dataset.json: their classes are unknown, so predictions cannot join them")
    categories = [{"id": i, "name": n} for i, n in enumerate(outputs, start=1)]
    return categories, {n: i for i, n in enumerate(outputs, start=1)}


def _predictions(selector: Selector, pred: str, ds: str, files: dict[int, str | None]) -> dict:
    """Readable prediction rows with their selected objects, by image_id; checked against DS."""
    present = [set(shard_schema(s).names) for s in list_shards(pred)]
    with_masks = any(schema.MASKS in p for p in present)
    with_keypoints = all(schema.KEYPOINTS in p for p in present)
    out, foreign = {}, []
    for im in selector.images(with_masks=with_masks, with_keypoints=with_keypoints):
        if im.image_id not in files:
            foreign.append(im)
            continue
        if files[im.image_id] != im.file_name:
            raise AnnotationError(f"image_id {im.image_id} is {im.file_name!r} in {pred} but {files[im.image_id]!r} in {ds}: "
                                  "these predictions were not made on this dataset")
        if im.error is not None:
            continue  # counted by the selector (error_rows): the image keeps its annotations
        if with_masks:
            check_masks(im, f"{pred}: image_id {im.image_id} ({im.file_name})")
        out[im.image_id] = im
    if foreign:
        examples = ", ".join(f"{im.image_id} ({im.file_name})" for im in foreign[:3])
        raise AnnotationError(f"{len(foreign)} image(s) of {pred} are not in {ds} (image_id {examples}): "
                              "these predictions were made on another dataset")
    return out


def _existing(row: dict, shard: str) -> tuple[list[dict], list[str | None], list[float | None]]:
    anns = list(row.get(schema.ANNOTATIONS) or [])
    sources = row.get(ANNOTATION_SOURCES)
    scores = row.get(ANNOTATION_SCORES)
    sources = list(sources) if sources is not None else [HUMAN] * len(anns)
    scores = list(scores) if scores is not None else [None] * len(anns)
    if len(sources) != len(anns) or len(scores) != len(anns):
        raise AnnotationError(f"{shard}: image_id {row[schema.IMAGE_ID]}: {len(anns)} annotations but "
                              f"{len(sources)} {ANNOTATION_SOURCES} and {len(scores)} {ANNOTATION_SCORES}")
    return anns, sources, scores


def _matched(objects: list, anns: list[dict], category_id: dict[str, int], threshold: float) -> list[bool]:
    """For each predicted object: does an existing annotation of its category overlap it by IoU >= threshold?"""
    from pycocotools import mask as mask_utils

    if not objects or not anns:
        return [False] * len(objects)
    boxes = [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in (o.box for o in objects)]
    gt = [list(a["bbox"]) if a.get("bbox") is not None else _bbox_of(a) for a in anns]
    crowd = [int(a.get("iscrowd") or 0) for a in anns]
    ious = np.asarray(mask_utils.iou(boxes, gt, crowd), dtype=np.float64).reshape(len(objects), len(anns))
    same = np.array([[category_id[o.category] == a["category_id"] for a in anns] for o in objects], dtype=bool)
    return list(((ious >= threshold) & same).any(axis=1))


def _bbox_of(ann: dict) -> list[float]:
    """An annotation without a bbox: the extent of its segmentation (else an empty box, matching nothing)."""
    from pycocotools import mask as mask_utils

    seg = ann.get("segmentation") or {}
    if seg.get("rle"):
        rle = seg["rle"]
        return [float(v) for v in mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode("ascii")})]
    if seg.get("polygons"):
        xy = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in seg["polygons"]])
        (x0, y0), (x1, y1) = xy.min(axis=0), xy.max(axis=0)
        return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    return [0.0, 0.0, 0.0, 0.0]


def _annotation(obj, ann_id: int, category_id: int) -> dict:
    """A selected prediction as an annotation struct (bbox xywh; its score goes to ``annotation_scores``)."""
    from pycocotools import mask as mask_utils

    x1, y1, x2, y2 = obj.box
    ann = {"id": ann_id, "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
           "iscrowd": 0, "segmentation": None, "keypoints": None, "num_keypoints": None}
    if obj.mask is not None:
        counts = obj.mask["counts"]
        rle = {"size": [int(v) for v in obj.mask["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
        ann["segmentation"] = {"polygons": None, "rle": rle}
        ann["area"] = float(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))
    if obj.keypoints is not None:
        ann["keypoints"] = [float(v) for v in obj.keypoints]
        ann["num_keypoints"] = int(sum(1 for v in obj.keypoints[2::3] if v > 0))
    return ann


def _remove_old_report(out: str, overwrite: bool) -> None:
    """With ``overwrite``, an earlier merge's ``merge.json`` goes with its dataset (prepare_output keeps other files)."""
    import pyarrow.fs as pafs

    if not overwrite:
        return
    fs, root = resolve(out)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    names = {e.base_name for e in entries}
    dataset_files = {n for n in names if n == DATASET_JSON or n.startswith("part-") or ".tmp-" in n}
    if MERGE_JSON in names and names - dataset_files == {MERGE_JSON}:
        fs.delete_file(posixpath.join(root, MERGE_JSON))


def _write_report(out: str, report: dict) -> None:
    fs, root = resolve(out)
    publish_bytes(fs, posixpath.join(root, MERGE_JSON), json.dumps(report, indent=2).encode("utf-8"))

