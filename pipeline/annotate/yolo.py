"""``pipeline data export-yolo``: predictions as an Ultralytics/YOLO dataset folder, for training or review.

Layout::

    DIR/images/<file_name>       the original image bytes from the images dataset (never re-encoded)
    DIR/labels/<file stem>.txt   one line per kept object
    DIR/data.yaml                path, train: images, val: images, names: {0: name, ...}

A box line is ``class cx cy w h``: our **xyxy** pixel box turned into centre and size, each divided
by the image width or height (so in [0, 1] for a box inside the image), written with 8 decimals
(1e-8 of the side: far below 0.01 px for any real image). With ``segments`` a line is
``class x1 y1 x2 y2 ...``: the object's mask outline (see :func:`mask_outline`), normalised the
same way. An object's mask may be in several pieces (an occluder cuts it): YOLO gives one line per
object, so the **largest piece** is written and the others are counted (``mask_parts_dropped``),
as are filled holes (``mask_holes_filled``) and masks with no pixel (``empty_masks``, not written).

Class indices are 0..K-1 in the order of the selection's output categories
(:mod:`pipeline.annotate.select`), so an index out of range cannot be written. An image with no
kept object gets an empty ``.txt`` (looked at, nothing found); an error row (the image could not be
read) gets neither image nor label, and is counted. Width and height are those of the image as
displayed (EXIF applied), as YOLO readers (Ultralytics, OpenCV) see it.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline import schema
from pipeline.annotate import AnnotationError
from pipeline.annotate.select import SelectOptions, Selector
from pipeline.data.shards import list_shards, read_shard, shard_schema

OUTLINE_SCALE = 4  # outline traced on the mask upsampled by this factor: see mask_outline


def mask_outline(mask: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Outline polygons of a binary mask (H x W), largest first, and the number of holes filled.

    Each polygon is an (N, 2) float array of x, y in **pixel-edge** coordinates (pixel (0, 0)
    covers [0, 1) x [0, 1)). cv2.findContours on the mask itself (thresholded at 0.5) would trace
    the *centres* of the boundary pixels, an outline half a pixel inside the mask: a 35-pixel shape
    drawn back from it loses a fifth of its area. So the mask (cropped to its box) is upsampled
    ``OUTLINE_SCALE`` times and its contour taken there: the outline lies 1/8 px inside the pixel
    edges, and rasterising it again (pycocotools, pixel centres) gives back exactly the mask for a
    mask in one piece without holes. Holes (RETR_CCOMP inner contours) are filled, i.e. counted.
    """
    import cv2

    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [], 0
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    crop = np.ascontiguousarray(mask[y0:y1, x0:x1] > 0.5, dtype=np.uint8)
    up = np.pad(np.kron(crop, np.ones((OUTLINE_SCALE, OUTLINE_SCALE), np.uint8)), 1)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    outer = [c for c, h in zip(contours, hierarchy[0]) if h[3] < 0]
    holes = len(contours) - len(outer)
    polygons = []
    for c in sorted(outer, key=cv2.contourArea, reverse=True):
        p = c.reshape(-1, 2).astype(np.float64) - 1.0  # undo the pad
        polygons.append((p + 0.5) / OUTLINE_SCALE + np.array([x0, y0], dtype=np.float64))
    return polygons, holes


def decode_mask(rle: dict) -> np.ndarray:
    """Our mask column entry (compressed COCO RLE ``{size: [h, w], counts: str}``) -> bool H x W."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    return mask_utils.decode({"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}).astype(bool)


class ImageSource:
    """Image bytes of an images dataset by image_id, read one shard at a time (never the whole set)."""

    def __init__(self, path: str, pred: str):
        self.path = path
        self._where: dict[int, tuple[str, str | None]] = {}  # image_id -> (shard, file_name)
        for shard in list_shards(path):
            if schema.IMAGE not in shard_schema(shard).names:
                raise AnnotationError(f"{path} holds no image bytes (no '{schema.IMAGE}' column): pass the images dataset with --images")
            for r in read_shard(shard, columns=[schema.IMAGE_ID, schema.FILE_NAME]).to_pylist():
                self._where.setdefault(int(r[schema.IMAGE_ID]), (shard, r.get(schema.FILE_NAME)))
        self.pred = pred

    def read(self, images: list) -> dict[int, bytes]:
        """Bytes for these SelectedImages; an id missing from the dataset, another file name or no bytes is an error."""
        import pyarrow as pa
        import pyarrow.compute as pc

        by_shard: dict[str, list[int]] = {}
        for im in images:
            if im.image_id not in self._where:
                raise AnnotationError(f"image_id {im.image_id} ({im.file_name}) of {self.pred} is not in the images dataset {self.path}")
            shard, name = self._where[im.image_id]
            if name != im.file_name:
                raise AnnotationError(
                    f"image_id {im.image_id} is {im.file_name!r} in {self.pred} but {name!r} in {self.path}: "
                    "not the images these predictions were made on (pass the right one with --images)"
                )
            by_shard.setdefault(shard, []).append(im.image_id)
        out: dict[int, bytes] = {}
        for shard, ids in by_shard.items():
            table = read_shard(shard, columns=[schema.IMAGE_ID, schema.IMAGE])
            table = table.filter(pc.is_in(table[schema.IMAGE_ID], value_set=pa.array(ids, pa.int64())))
            for r in table.to_pylist():
                out.setdefault(int(r[schema.IMAGE_ID]), r[schema.IMAGE])
        for i in out:
            if not out[i]:
                raise AnnotationError(f"image_id {i} has no image bytes in {self.path}")
        return out


def safe_relative(file_name: str | None, image_id: int) -> str:
    """The file name as a relative path inside the export; refuse absolute paths and ``..``."""
    if not file_name:
        raise AnnotationError(f"image_id {image_id} has no file_name; YOLO needs one per image")
    norm = posixpath.normpath(file_name.replace("\\", "/"))
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or os.path.isabs(file_name):
        raise AnnotationError(f"image_id {image_id}: file_name {file_name!r} is not a relative path inside the images folder")
    return norm


def export_yolo(pred: str, out_dir: str, *, options: SelectOptions, segments: bool = False, images: str | None = None,
                overwrite: bool = False) -> dict:
    """Write ``pred`` as a YOLO dataset folder at ``out_dir`` (see the module docstring); returns counts.

    ``images``: the images dataset (default: ``info.source`` of the predictions' dataset.json).
    ``out_dir`` must be empty or absent; ``overwrite`` removes an earlier export's ``images/``,
    ``labels/`` and ``data.yaml`` first, and refuses a folder holding anything else.
    """
    import yaml

    selector = Selector(pred, options, source=images)
    source = images or selector.meta.info.get("source")
    if not source:
        raise AnnotationError(f"{pred}: dataset.json names no source dataset; pass the images dataset with --images")
    image_source = ImageSource(source, pred)
    out = Path(out_dir)
    _prepare(out, overwrite)
    counts: Counter = Counter()
    used: dict[str, int] = {}
    batch: list = []

    def flush() -> None:
        data = image_source.read(batch)
        for im in batch:
            rel = safe_relative(im.file_name, im.image_id)
            stem = posixpath.splitext(rel)[0]
            if stem in used:
                raise AnnotationError(
                    f"image_id {im.image_id} ({rel}) and image_id {used[stem]} would write the same label file {stem}.txt"
                )
            used[stem] = im.image_id
            (out / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / "images" / rel).write_bytes(data[im.image_id])
            lines = [_line(obj, im, segments, counts) for obj in im.objects]
            lines = [line for line in lines if line is not None]
            counts["objects_written"] += len(lines)
            label = out / "labels" / (stem + ".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            counts["images_written"] += 1
            counts["empty_label_files"] += not lines
        batch.clear()

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    for im in selector.images(with_masks=segments):
        if im.error is not None:
            continue  # counted by the selector as error_rows: no image, no label
        batch.append(im)
        if len(batch) >= 256:
            flush()
    if batch:
        flush()
    names = {i: n for i, n in enumerate(selector.output_categories)}
    data_yaml = {"path": str(out.resolve()), "train": "images", "val": "images", "names": names}
    (out / "data.yaml").write_text(yaml.safe_dump(data_yaml, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return {**selector.counts, **counts, "categories": list(selector.output_categories)}


def _line(obj, im, segments: bool, counts: Counter) -> str | None:
    w, h = float(im.width), float(im.height)
    if not segments:
        x1, y1, x2, y2 = obj.box
        values = ((x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h)
        return f"{obj.class_index} " + " ".join(f"{v:.8f}" for v in values)
    mask = decode_mask(obj.mask)
    if mask.shape != (im.height, im.width):
        raise AnnotationError(f"image_id {im.image_id}: a mask of size {mask.shape} on an image of {im.height}x{im.width}")
    polygons, holes = mask_outline(mask)
    counts["mask_holes_filled"] += holes
    if not polygons:
        counts["empty_masks"] += 1
        return None
    counts["mask_parts_dropped"] += len(polygons) - 1
    p = polygons[0] / np.array([w, h])
    return f"{obj.class_index} " + " ".join(f"{v:.8f}" for v in p.ravel())


def _prepare(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise AnnotationError(f"output {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    ours = {"images", "labels", "data.yaml"}
    if not overwrite:
        raise AnnotationError(f"output {out} is not empty ({', '.join(entries[:3])}); pass --overwrite to replace an export there")
    others = [e for e in entries if e not in ours]
    if others:
        raise AnnotationError(f"output {out} holds files that are not part of a YOLO export ({', '.join(others[:5])}); choose an empty folder")
    for e in entries:
        p = out / e
        shutil.rmtree(p) if p.is_dir() else p.unlink()
