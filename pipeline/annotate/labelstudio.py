"""Label Studio: predictions out as pre-annotated tasks, a person's reviewed labels back in as a dataset.

**Export** (``pipeline data export-labelstudio PRED tasks.json --image-root URL``) writes one task per
readable image (error rows are left out and counted)::

    [{"data": {"image": IMAGE_ROOT + file_name},
      "predictions": [{"model_version": "<job name>", "score": <min region score>, "result": [region, ...]}]}]

and, beside it, the labelling config the regions need (``tasks.xml`` for ``tasks.json``):
``<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">...``.
A region is ``{"id", "from_name", "to_name", "type", "original_width", "original_height",
"image_rotation": 0, "value": {...}, "score"}``; ids are ``i<image_id>-<n>``, unique in the file.

* boxes (default): ``rectanglelabels`` with ``x, y, width, height`` in **percent** of
  ``original_width`` / ``original_height`` (our xyxy pixels: ``x = 100 * x1 / W``,
  ``width = 100 * (x2 - x1) / W``) and ``rotation: 0``;
* ``masks="polygons"``: ``polygonlabels``, ``points`` in percent: the outline of the mask
  (:func:`pipeline.annotate.yolo.mask_outline`, largest piece; other pieces and holes counted);
* ``masks="brush"``: ``brushlabels`` with ``format: "rle"`` in **Label Studio's own RLE** (the
  RGBA bit-packed run-length code its brush tool uses, NOT COCO RLE), encoded by Label Studio's
  converter (``label_studio_sdk.converter.brush.mask2rle``, or the same module of
  ``label-studio-converter``: the ``annotate`` extra).

With ``masks`` the object is its mask region alone (no rectangle beside it: two regions would be
two objects to the annotator and on import); its box is the mask's extent.

The task ``score`` is the **lowest** region score of the task (absent when nothing was kept), so
sorting tasks by score in Label Studio brings the images with a doubtful region first.
``model_version`` is the predictions' ``info.job`` (the job name), else ``info.model``, else the
prediction folder's name.

**Import** (``pipeline data import-labelstudio export.json OUT --images DIR``) reads a Label Studio
JSON export: per task, the first annotation that was not cancelled (other annotations of the task
are counted, not merged); a task without one uses its first ``predictions`` entry (counted as
``from_predictions``: pre-annotations nobody edited). Regions become COCO-style ``annotations``:
``rectanglelabels`` -> ``bbox`` (**xywh** pixels from the percents), ``polygonlabels`` ->
``segmentation.polygons`` (bbox: the points' extent), ``brushlabels`` -> ``segmentation.rle``
(compressed COCO RLE; bbox: the mask's tight box). Categories are the label names, ids 1..K in
sorted name order; images get ids 1..N in task order. The image file is the basename of
``data.image`` (URL-decoded; ``?d=`` local-file URLs and Label Studio's ``<8 hex>-`` upload prefix
understood), looked up anywhere under ``--images``; a missing file is an error row, as in import-coco.
Any other region type, a rotated rectangle, or a region without exactly one label is an error
naming the task and region.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import numpy as np

from pipeline import schema
from pipeline.annotate import AnnotationError
from pipeline.annotate.select import SelectOptions, Selector
from pipeline.annotate.yolo import decode_mask, mask_outline, safe_relative
from pipeline.data.importers import EXIF_ORIENTATION, read_image_bytes
from pipeline.data.shards import DatasetMeta, ShardWriter, write_meta

MASK_MODES = ("polygons", "brush")
REGION_TYPES = {"rectanglelabels": "RectangleLabels", "polygonlabels": "PolygonLabels", "brushlabels": "BrushLabels"}


def brush_codec():
    """Label Studio's brush RLE module (``mask2rle``, ``decode_rle``), or a clear error naming the extra."""
    try:
        from label_studio_sdk.converter import brush
    except ImportError:
        try:
            from label_studio_converter import brush
        except ImportError:
            raise AnnotationError(
                "brush masks need Label Studio's RLE codec: pip install -e '.[annotate]' "
                "(label-studio-converter), or label-studio-sdk"
            ) from None
    return brush


# --- export -----------------------------------------------------------------------------------------


def export_labelstudio(pred: str, out: str, *, options: SelectOptions, image_root: str, from_name: str = "label",
                       to_name: str = "image", masks: str | None = None, overwrite: bool = False) -> dict:
    """Write Label Studio tasks for ``pred`` to ``out`` and the labelling config beside it; returns counts."""
    if masks not in (None, *MASK_MODES):
        raise AnnotationError(f"masks must be one of {', '.join(MASK_MODES)}, got {masks!r}")
    config_path = config_path_for(out)
    for path in (out, config_path):
        if os.path.exists(path) and not overwrite:
            raise AnnotationError(f"{path} exists; pass --overwrite to replace it")
    brush = brush_codec() if masks == "brush" else None
    selector = Selector(pred, options)
    info = selector.meta.info
    model_version = str(info.get("job") or info.get("model") or posixpath.basename(pred.rstrip("/")))
    region_type = {None: "rectanglelabels", "polygons": "polygonlabels", "brush": "brushlabels"}[masks]
    tasks, counts = [], Counter()
    for im in selector.images(with_masks=masks is not None):
        if im.error is not None:
            continue  # error_rows, counted by the selector
        w, h = int(im.width), int(im.height)
        result = []
        for n, obj in enumerate(im.objects):
            region = {"id": f"i{im.image_id}-{n}", "from_name": from_name, "to_name": to_name, "type": region_type,
                      "original_width": w, "original_height": h, "image_rotation": 0, "score": obj.score}
            if masks is None:
                x1, y1, x2, y2 = obj.box
                value = {"x": 100.0 * x1 / w, "y": 100.0 * y1 / h, "width": 100.0 * (x2 - x1) / w,
                         "height": 100.0 * (y2 - y1) / h, "rotation": 0}
            else:
                mask = decode_mask(obj.mask)
                if mask.shape != (h, w):
                    raise AnnotationError(f"image_id {im.image_id}: a mask of size {mask.shape} on an image of {h}x{w}")
                if not mask.any():
                    counts["empty_masks"] += 1
                    continue
                if masks == "brush":
                    value = {"format": "rle", "rle": [int(v) for v in brush.mask2rle(mask.astype(np.uint8) * 255)]}
                else:
                    polygons, holes = mask_outline(mask)
                    counts["mask_holes_filled"] += holes
                    counts["mask_parts_dropped"] += len(polygons) - 1
                    value = {"points": [[100.0 * x / w, 100.0 * y / h] for x, y in polygons[0]], "closed": True}
            value[region_type] = [obj.category]
            region["value"] = value
            result.append(region)
        prediction = {"model_version": model_version, "result": result}
        if result:
            prediction["score"] = min(r["score"] for r in result)
        rel = safe_relative(im.file_name, im.image_id)
        tasks.append({"data": {"image": join_url(image_root, rel)}, "predictions": [prediction]})
        counts["tasks"] += 1
        counts["regions"] += len(result)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(tasks, allow_nan=False), encoding="utf-8")
    Path(config_path).write_text(
        labeling_config(selector.output_categories, region_type, from_name=from_name, to_name=to_name), encoding="utf-8"
    )
    return {**selector.counts, **counts, "config": config_path, "categories": list(selector.output_categories)}


def config_path_for(out: str) -> str:
    """``tasks.json`` -> ``tasks.xml``: where the labelling config goes."""
    stem, ext = os.path.splitext(out)
    if ext.lower() == ".xml":
        raise AnnotationError(f"{out}: the tasks file must not end in .xml (the labelling config is written as <stem>.xml)")
    return stem + ".xml"


def join_url(root: str, rel: str) -> str:
    """``image_root`` + the URL-quoted file name; a ``/`` is added unless the root ends in ``/`` or ``=``."""
    sep = "" if not root or root.endswith(("/", "=")) else "/"
    return root + sep + quote(rel, safe="/")


def labeling_config(names: list[str], region_type: str, *, from_name: str = "label", to_name: str = "image") -> str:
    """The Label Studio XML that the exported regions belong to (one control tag, every class a Label)."""
    from xml.sax.saxutils import quoteattr

    tag = REGION_TYPES[region_type]
    labels = "".join(f"    <Label value={quoteattr(n)}/>\n" for n in names)
    return (f"<View>\n  <Image name={quoteattr(to_name)} value=\"$image\"/>\n"
            f"  <{tag} name={quoteattr(from_name)} toName={quoteattr(to_name)}>\n{labels}  </{tag}>\n</View>\n")


# --- import -----------------------------------------------------------------------------------------


def import_labelstudio(export_json: str, out: str, *, images_dir: str, rows_per_shard: int = 1000,
                       overwrite: bool = False) -> dict:
    """Read a Label Studio JSON export into a dataset at ``out`` (see the module docstring); returns counts."""
    try:
        with open(export_json, encoding="utf-8") as f:
            tasks = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{export_json}: cannot read it as JSON ({exc})") from exc
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks:
        raise AnnotationError(f"{export_json}: expected a list of tasks (Label Studio's JSON export)")
    root = Path(images_dir)
    if not root.is_dir():
        raise AnnotationError(f"--images {images_dir}: not a folder")
    files: dict[str, list[Path]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            files.setdefault(p.name, []).append(p)

    counts: Counter = Counter()
    chosen = [_chosen_result(t, n, counts) for n, t in enumerate(tasks)]
    names = sorted({_label(r, _task_name(t, n)) for n, (t, res) in enumerate(zip(tasks, chosen)) for r in res})
    category_id = {name: i for i, name in enumerate(names, start=1)}

    writer = ShardWriter(out, rows_per_shard, schema.IMAGE_SCHEMA, overwrite=overwrite)
    errors: list[str] = []
    ann_id = 0
    for n, (task, results) in enumerate(zip(tasks, chosen)):
        where = _task_name(task, n)
        image_id = n + 1
        url = ((task.get("data") or {}).get("image")) if isinstance(task, dict) else None
        if not isinstance(url, str) or not url:
            raise AnnotationError(f"{where}: no data.image")
        name = image_basename(url)
        path, error = _find(files, name, where)
        data = width = height = None
        if path is not None:
            data, error = read_image_bytes(path)
        if data is not None:
            from PIL import Image

            try:
                with Image.open(path) as img:
                    width, height = img.size
                    if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                        width, height = height, width
            except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-image error
                error = f"cannot read image header of {path}: {exc}"
        annotations = []
        for r in results:
            ann_id += 1
            ann = region_to_annotation(r, where, ann_id, category_id, size=(width, height) if error is None else None)
            annotations.append(ann)
            counts[r.get("type", "").lower()] += 1
        if width is None and results:  # no readable file: the size the regions were drawn on
            width, height = int(results[0]["original_width"]), int(results[0]["original_height"])
        if error:
            errors.append(f"image {image_id} ({where}): {error}")
        writer.add({schema.IMAGE_ID: image_id, schema.FILE_NAME: name, schema.WIDTH: width, schema.HEIGHT: height,
                    schema.IMAGE: data, schema.ANNOTATIONS: annotations, schema.ERROR: error})
    writer.flush()
    categories = [{"id": i, "name": name} for name, i in category_id.items()]
    write_meta(out, DatasetMeta(categories=categories, info={"description": "Label Studio export",
                                                             "source": os.path.abspath(export_json)}))
    return {"images": len(tasks), "annotations": ann_id, "shards": writer.shards_written, "errors": errors,
            "counts": dict(counts), "categories": names}


def _task_name(task, n: int) -> str:
    tid = task.get("id") if isinstance(task, dict) else None
    return f"task {tid}" if tid is not None else f"task #{n + 1} (no id)"


def _chosen_result(task, n: int, counts: Counter) -> list[dict]:
    """The regions a task contributes: first non-cancelled annotation, else first prediction."""
    if not isinstance(task, dict):
        raise AnnotationError(f"task #{n + 1}: not a JSON object")
    annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if annotations:
        counts["from_annotations"] += 1
        counts["other_annotations_ignored"] += len(annotations) - 1
        chosen = annotations[0]
    elif task.get("predictions"):
        counts["from_predictions"] += 1
        chosen = task["predictions"][0]
    else:
        counts["without_labels"] += 1
        return []
    result = chosen.get("result") if isinstance(chosen, dict) else None
    if not isinstance(result, list):
        raise AnnotationError(f"{_task_name(task, n)}: its annotation/prediction has no result list")
    where = _task_name(task, n)
    for r in result:
        kind = str(r.get("type", "")).lower() if isinstance(r, dict) else None
        if kind not in REGION_TYPES:
            raise AnnotationError(
                f"{where}: region {r.get('id') if isinstance(r, dict) else r!r} has type {kind!r}; "
                f"import-labelstudio reads {', '.join(REGION_TYPES)}"
            )
    return result


def _label(region: dict, where: str) -> str:
    kind = region["type"].lower()
    labels = (region.get("value") or {}).get(kind)
    if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
        raise AnnotationError(f"{where}: region {region.get('id')!r} ({kind}) must carry exactly one label, has {labels!r}")
    return labels[0]


def image_basename(url: str) -> str:
    """File name of a task's ``data.image``: URL path basename, or the ``?d=`` path of local-file URLs."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    path = query["d"][0] if "d" in query else unquote(parts.path)
    return posixpath.basename(path.replace("\\", "/"))


def _find(files: dict[str, list[Path]], name: str, where: str) -> tuple[Path | None, str | None]:
    candidates = files.get(name)
    if not candidates:
        m = re.fullmatch(r"[0-9a-f]{8}-(.+)", name)  # Label Studio's upload prefix
        candidates = files.get(m.group(1)) if m else None
    if not candidates:
        return None, f"image file not found: {name}"
    if len(candidates) > 1:
        raise AnnotationError(f"{where}: {name} matches several files under --images: {', '.join(map(str, candidates[:3]))}")
    return candidates[0], None


def region_to_annotation(region: dict, where: str, ann_id: int, category_id: dict[str, int], *,
                         size: tuple[int, int] | None) -> dict:
    """One Label Studio region -> our annotation struct (bbox **xywh** pixels, COCO segmentation)."""
    from pycocotools import mask as mask_utils

    kind = region["type"].lower()
    rid = region.get("id")
    value = region.get("value") or {}
    try:
        w, h = int(region["original_width"]), int(region["original_height"])
    except (KeyError, TypeError, ValueError):
        raise AnnotationError(f"{where}: region {rid!r} has no original_width/original_height") from None
    if size is not None and size != (w, h):
        raise AnnotationError(f"{where}: region {rid!r} was drawn on a {w}x{h} image, but the file is {size[0]}x{size[1]}")
    ann = {"id": ann_id, "category_id": category_id[_label(region, where)], "iscrowd": 0, "segmentation": None,
           "keypoints": None, "num_keypoints": None}
    if kind == "rectanglelabels":
        if float(value.get("rotation") or 0) != 0:
            raise AnnotationError(f"{where}: region {rid!r} is a rotated rectangle ({value.get('rotation')} degrees); only axis-aligned boxes import")
        try:
            box = [float(value[k]) for k in ("x", "y", "width", "height")]
        except (KeyError, TypeError, ValueError):
            raise AnnotationError(f"{where}: region {rid!r} has no numeric x, y, width, height") from None
        bbox = [box[0] * w / 100.0, box[1] * h / 100.0, box[2] * w / 100.0, box[3] * h / 100.0]
        _finite(bbox, where, rid)
        ann.update(bbox=bbox, area=bbox[2] * bbox[3])
    elif kind == "polygonlabels":
        points = value.get("points")
        if not isinstance(points, list) or len(points) < 3:
            raise AnnotationError(f"{where}: region {rid!r} is a polygon with fewer than 3 points")
        xy = np.array([[float(p[0]) * w / 100.0, float(p[1]) * h / 100.0] for p in points], dtype=np.float64)
        _finite(xy.ravel(), where, rid)
        x0, y0 = xy.min(axis=0)
        x1, y1 = xy.max(axis=0)
        rle = mask_utils.merge(mask_utils.frPyObjects([xy.ravel().tolist()], h, w))
        ann.update(bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)], area=float(mask_utils.area(rle)),
                   segmentation={"polygons": [xy.ravel().tolist()], "rle": None})
    else:
        rle_ls = value.get("rle", region.get("rle"))
        if not isinstance(rle_ls, list) or not rle_ls:
            raise AnnotationError(f"{where}: region {rid!r} (brushlabels) has no rle list")
        flat = brush_codec().decode_rle(bytes(int(v) for v in rle_ls))
        if flat.size != w * h * 4:
            raise AnnotationError(f"{where}: region {rid!r}: its brush RLE holds {flat.size} values, not {w}x{h}x4")
        mask = np.asfortranarray(flat.reshape(h, w, 4)[:, :, 3] > 0, dtype=np.uint8)
        rle = mask_utils.encode(mask)
        ann.update(bbox=[float(v) for v in mask_utils.toBbox(rle)], area=float(mask_utils.area(rle)),
                   segmentation={"polygons": None, "rle": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
    return ann


def _finite(values, where: str, rid) -> None:
    if not all(math.isfinite(float(v)) for v in values):
        raise AnnotationError(f"{where}: region {rid!r} has a coordinate that is not a finite number")
