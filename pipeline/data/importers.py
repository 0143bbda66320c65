"""Turn what users arrive with (a COCO file + image folder, or a bare image folder) into shards.

Image bytes are copied as found on disk (never re-encoded), so importing is lossless and fast.
A row whose image cannot be read is still written, with ``image`` null and ``error`` saying why:
every image the user named is accounted for, and the job later reports it as an error row.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from PIL import Image
from pycocotools import mask as mask_utils

from pipeline import schema
from pipeline.data.coco_file import int_id, read_coco_file
from pipeline.data.shards import DatasetMeta, ShardWriter, write_meta

EXIF_ORIENTATION = 0x0112
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataImportError(ValueError):
    """The input as a whole cannot be imported (unreadable annotation file, unsafe path...)."""


def _safe_image_path(images_dir: Path, file_name: str) -> Path:
    """Resolve ``file_name`` inside ``images_dir``; refuse absolute paths and ``..`` escapes."""
    if os.path.isabs(file_name):
        raise DataImportError(f"file_name {file_name!r} is an absolute path; it must be relative to the images folder")
    root = images_dir.resolve()
    candidate = (root / file_name).resolve()
    if candidate != root and root not in candidate.parents:
        raise DataImportError(f"file_name {file_name!r} escapes the images folder {images_dir}")
    return candidate


def _read_image_bytes(path: Path) -> tuple[bytes | None, str | None]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, f"image file not found: {path}"
    except OSError as exc:
        return None, f"cannot read image file {path}: {exc}"
    if not data:
        return None, f"image file is empty: {path}"
    return data, None


def _int_id(value, what: str) -> int:
    return int_id(value, what, DataImportError)


def _segmentation(seg, height: int, width: int, where: str) -> dict | None:
    """COCO segmentation (polygons, compressed or uncompressed RLE) -> our struct."""
    if seg is None or seg == []:
        return None
    if isinstance(seg, list):
        return {"polygons": [[float(v) for v in poly] for poly in seg]}
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if isinstance(seg["counts"], list):  # uncompressed RLE (crowd regions): compress it
            rle = mask_utils.frPyObjects(seg, int(seg["size"][0]), int(seg["size"][1]))
        else:
            rle = seg
        counts = rle["counts"]
        if isinstance(counts, bytes):
            counts = counts.decode("ascii")
        return {"rle": {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}}
    raise DataImportError(f"{where}: segmentation is neither polygons nor RLE")


def coco_annotation_to_row(ann: dict, height: int, width: int) -> dict:
    where = f"annotation id {ann.get('id')!r}"
    bbox = ann.get("bbox")
    if bbox is not None and len(bbox) != 4:
        raise DataImportError(f"{where}: bbox must have 4 numbers (x, y, w, h), got {bbox!r}")
    keypoints = ann.get("keypoints")
    return {
        "id": _int_id(ann["id"], "annotation id"),
        "category_id": _int_id(ann["category_id"], f"{where}: category_id"),
        "bbox": [float(v) for v in bbox] if bbox is not None else None,
        "area": float(ann["area"]) if ann.get("area") is not None else None,
        "iscrowd": int(ann.get("iscrowd", 0)),
        "segmentation": _segmentation(ann.get("segmentation"), height, width, where),
        "keypoints": [float(v) for v in keypoints] if keypoints else None,
        "num_keypoints": int(ann["num_keypoints"]) if ann.get("num_keypoints") is not None else None,
    }


def import_coco(
    images_dir: str,
    annotations_file: str,
    out: str,
    *,
    rows_per_shard: int = 1000,
    overwrite: bool = False,
    allow_missing_images: bool = False,
) -> dict:
    """Import a COCO annotations file and its image folder. Returns counts and per-image errors.

    An image file that is missing or unreadable becomes an error row (its annotations are kept).
    A folder that holds none of the file's images is refused before anything is written (almost
    always the wrong ``--images``), unless ``allow_missing_images``: ground truth imported only to
    evaluate predictions against (``pipeline eval --gt``) needs no image bytes.
    """
    coco = read_coco_file(annotations_file, DataImportError)

    images = sorted(coco["images"], key=lambda im: _int_id(im["id"], "image id"))
    by_image: dict[int, list[dict]] = defaultdict(list)
    known = {_int_id(im["id"], "image id") for im in images}
    for ann in coco.get("annotations", []):
        image_id = _int_id(ann["image_id"], f"annotation {ann.get('id')!r} image_id")
        if image_id not in known:
            raise DataImportError(f"{annotations_file}: annotation {ann.get('id')!r} refers to unknown image_id {image_id}")
        by_image[image_id].append(ann)

    root = Path(images_dir)
    if not images:
        raise DataImportError(f"{annotations_file}: no images listed; nothing to import")
    if not allow_missing_images and not any(_safe_image_path(root, im["file_name"]).is_file() for im in images):
        examples = ", ".join(im["file_name"] for im in images[:3])
        raise DataImportError(
            f"none of the {len(images)} images of {annotations_file} is in {images_dir} (e.g. {examples}); "
            "nothing was imported: check --images (file_names are relative to it), or pass --allow-missing-images "
            "to import the annotations alone (ground truth for pipeline eval)"
        )
    writer = ShardWriter(out, rows_per_shard, schema.IMAGE_SCHEMA, overwrite=overwrite)
    errors: list[str] = []
    for im in images:
        image_id = _int_id(im["id"], "image id")
        file_name = im["file_name"]
        data, error = _read_image_bytes(_safe_image_path(root, file_name))
        if error:
            errors.append(f"image {image_id}: {error}")
        height, width = int(im["height"]), int(im["width"])
        writer.add(
            {
                schema.IMAGE_ID: image_id,
                schema.FILE_NAME: file_name,
                schema.WIDTH: width,
                schema.HEIGHT: height,
                schema.IMAGE: data,
                schema.ANNOTATIONS: [coco_annotation_to_row(a, height, width) for a in by_image.get(image_id, [])],
                schema.ERROR: error,
            }
        )
    writer.flush()
    categories = sorted(coco.get("categories", []), key=lambda c: c["id"])
    raw_info = coco.get("info") or {}
    info = dict(raw_info) if isinstance(raw_info, dict) else {"description": str(raw_info)}  # some files use a string
    info["source"] = os.path.abspath(annotations_file)
    write_meta(out, DatasetMeta(categories=categories, info=info))
    n_ann = sum(len(v) for v in by_image.values())
    return {"images": len(images), "annotations": n_ann, "shards": writer.shards_written, "errors": errors}


def import_images(images_dir: str, out: str, *, rows_per_shard: int = 1000, overwrite: bool = False) -> dict:
    """Import every image file under ``images_dir`` (recursively), unlabelled.

    ``image_id`` is 1..N in sorted relative-path order, so re-importing the same folder gives the
    same ids. Width/height come from the file header (no full decode).
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise DataImportError(f"not a folder: {images_dir}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataImportError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {images_dir}")
    writer = ShardWriter(out, rows_per_shard, schema.IMAGE_SCHEMA, overwrite=overwrite)
    errors: list[str] = []
    for image_id, path in enumerate(files, start=1):
        data, error = _read_image_bytes(path)
        width = height = None
        if data is not None:
            try:
                with Image.open(path) as img:
                    width, height = img.size
                    if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # stored rotated 90 degrees
                        width, height = height, width
            except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-image error
                error = f"cannot read image header of {path}: {exc}"
        if error:
            errors.append(f"image {image_id}: {error}")
        writer.add(
            {
                schema.IMAGE_ID: image_id,
                schema.FILE_NAME: str(path.relative_to(root)),
                schema.WIDTH: width,
                schema.HEIGHT: height,
                schema.IMAGE: data,
                schema.ERROR: error,
            }
        )
    writer.flush()
    write_meta(out, DatasetMeta(info={"source": os.path.abspath(images_dir)}))
    return {"images": len(files), "annotations": 0, "shards": writer.shards_written, "errors": errors}
