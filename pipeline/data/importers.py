"""Turn what users arrive with (a COCO file + image folder, a bare image folder, one with label maps, or class folders) into shards.

Image bytes are copied as found on disk (never re-encoded), so importing is lossless and fast.
A row whose image cannot be read is still written, with ``image`` null and ``error`` saying why:
every image the user named is accounted for, and the job later reports it as an error row.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image
from pycocotools import mask as mask_utils

from pipeline import schema
from pipeline.data.coco_file import int_id, read_coco_file
from pipeline.data.decode import encode_png
from pipeline.data.label_maps import (
    EXTENSION,
    LabelFolder,
    LabelScan,
    inferred_categories,
    label_problem,
    read_categories_file,
    scan_label_file,
)
from pipeline.data.shards import DATASET_JSON, DatasetMeta, ShardWriter, list_shards, read_shard, shard_schema, write_meta

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


def read_image_bytes(path: Path) -> tuple[bytes | None, str | None]:
    """The file's bytes, or ``None`` and why it cannot be used (missing, unreadable, empty): an error row's message."""
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
    """Import a COCO annotations file and its images. Returns counts and per-image errors.

    ``images_dir`` is either

    * a **folder** the ``file_name`` values are relative to. A name not found there is looked up by its
      base name anywhere under the folder (labelling tools often export ``file_name`` without the
      folders, or under a folder of their own): a unique match is used, and the row's
      ``file_name`` becomes that file's path relative to the folder (counted: ``relinked``);
      several matches are an error naming them. An image file that is missing or unreadable
      becomes an error row (its annotations are kept). A folder that holds none of the file's
      images is refused before anything is written (almost always the wrong ``--images``), unless
      ``allow_missing_images``: ground truth imported only to evaluate predictions against
      (``pipeline eval --gt``) needs no image bytes.
    * one of our **datasets** (a folder with ``dataset.json``, or a URI): the original images a
      labelling tool's export was made from. Each image of the file is relinked to the dataset's
      image of the same ``file_name`` (else the same base name, if unique): the row gets the
      dataset's ``image_id``, ``file_name`` and image bytes, so the corrected labels line up with
      the original dataset and with predictions made on it, whatever ids the tool gave
      (tools renumber images and annotations). An image the dataset does not hold, two images of
      the file relinked to one image, or a size that differs from the original's is an error
      naming the image. ``allow_missing_images`` does not apply.

    Annotations follow their image through the file's own ``image_id``; their ``id`` values are kept.
    """
    coco = read_coco_file(annotations_file, DataImportError)

    images = sorted(coco["images"], key=lambda im: _int_id(im["id"], "image id"))
    by_image: dict[int, list[dict]] = defaultdict(list)
    known = {_int_id(im["id"], "image id") for im in images}
    if len(known) != len(images):
        raise DataImportError(f"{annotations_file}: an image id is listed twice")
    for ann in coco.get("annotations", []):
        image_id = _int_id(ann["image_id"], f"annotation {ann.get('id')!r} image_id")
        if image_id not in known:
            raise DataImportError(f"{annotations_file}: annotation {ann.get('id')!r} refers to unknown image_id {image_id}")
        by_image[image_id].append(ann)
    if not images:
        raise DataImportError(f"{annotations_file}: no images listed; nothing to import")

    if is_dataset(images_dir):
        rows, relinked = _relink_to_dataset(images_dir, images, annotations_file)
        errors = [f"image {r[schema.IMAGE_ID]}: {r[schema.ERROR]}" for r, _ in rows if r[schema.ERROR]]
        writer = ShardWriter(out, rows_per_shard, schema.IMAGE_SCHEMA, overwrite=overwrite)
        for row, im in rows:
            height, width = row[schema.HEIGHT], row[schema.WIDTH]
            anns = by_image.get(_int_id(im["id"], "image id"), [])
            writer.add({**row, schema.ANNOTATIONS: [coco_annotation_to_row(a, height, width) for a in anns]})
    else:
        root = Path(images_dir)
        finder = _FolderImages(root)
        found = [finder.find(im["file_name"]) for im in images]
        if not allow_missing_images and not any(path is not None for path, _ in found):
            examples = ", ".join(im["file_name"] for im in images[:3])
            raise DataImportError(
                f"none of the {len(images)} images of {annotations_file} is in {images_dir} (e.g. {examples}); "
                "nothing was imported: check --images (file_names are relative to it), or pass --allow-missing-images "
                "to import the annotations alone (ground truth for pipeline eval)"
            )
        writer = ShardWriter(out, rows_per_shard, schema.IMAGE_SCHEMA, overwrite=overwrite)
        errors: list[str] = []
        relinked = 0
        for im, (path, other_name) in zip(images, found):
            image_id = _int_id(im["id"], "image id")
            file_name = im["file_name"]
            if other_name is not None:
                file_name = other_name
                relinked += 1
            data, error = read_image_bytes(path if path is not None else _safe_image_path(root, file_name))
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
    if is_dataset(images_dir):
        info["images_from"] = images_dir
    write_meta(out, DatasetMeta(categories=categories, info=info))
    n_ann = sum(len(v) for v in by_image.values())
    return {"images": len(images), "annotations": n_ann, "shards": writer.shards_written, "errors": errors,
            "relinked": relinked}


def is_dataset(path: str) -> bool:
    """A URI, or a folder holding ``dataset.json``: one of our datasets rather than a folder of image files."""
    return "://" in path or (Path(path) / DATASET_JSON).is_file()


class _FolderImages:
    """Find a COCO ``file_name`` under a folder: as a relative path, else by base name (unique)."""

    def __init__(self, root: Path):
        self.root = root
        self._by_name: dict[str, list[str]] | None = None

    def find(self, file_name: str) -> tuple[Path | None, str | None]:
        """(the file, or None; its path relative to the folder when found under another name)."""
        exact = _safe_image_path(self.root, file_name)
        if exact.is_file():
            return exact, None
        if self._by_name is None:  # listed once, on the first name not found as written
            self._by_name = defaultdict(list)
            if self.root.is_dir():
                for p in sorted(self.root.rglob("*")):
                    if p.is_file():
                        self._by_name[p.name].append(p.relative_to(self.root).as_posix())
        candidates = self._by_name.get(_basename(file_name), [])
        if len(candidates) > 1:
            raise DataImportError(
                f"file_name {file_name!r} is not under {self.root} as written, and its base name matches several files: "
                f"{', '.join(candidates[:3])}"
            )
        if not candidates:
            return None, None
        return _safe_image_path(self.root, candidates[0]), candidates[0]


def _basename(file_name: str) -> str:
    return file_name.replace("\\", "/").rsplit("/", 1)[-1]


def _relink_to_dataset(dataset: str, images: list[dict], annotations_file: str) -> tuple[list[tuple[dict, dict]], int]:
    """Rows (image columns, from the dataset) paired with the file's image dicts, in the dataset's image_id order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    where: dict[str, tuple[str, int]] = {}  # file_name -> (shard, image_id)
    by_base: dict[str, list[str]] = defaultdict(list)
    sizes: dict[int, tuple] = {}
    for shard in list_shards(dataset):
        present = shard_schema(shard).names
        table = read_shard(shard, columns=[c for c in (schema.IMAGE_ID, schema.FILE_NAME, schema.WIDTH, schema.HEIGHT) if c in present])
        for r in table.to_pylist():
            name = r.get(schema.FILE_NAME)
            if name is None or name in where:
                continue
            where[name] = (shard, int(r[schema.IMAGE_ID]))
            by_base[_basename(name)].append(name)
            sizes[int(r[schema.IMAGE_ID])] = (r.get(schema.WIDTH), r.get(schema.HEIGHT))
    links: dict[int, dict] = {}
    relinked, missing = 0, []
    for im in images:
        name = im["file_name"]
        if name not in where:
            same = by_base.get(_basename(name), [])
            if len(same) > 1:
                raise DataImportError(f"{annotations_file}: image {im['id']} ({name}) is not in {dataset} by that name, and its "
                                      f"base name matches several of its images: {', '.join(same[:3])}")
            if not same:
                missing.append(f"{im['id']} ({name})")
                continue
            name = same[0]
            relinked += 1
        shard, image_id = where[name]
        if image_id in links:
            raise DataImportError(f"{annotations_file}: images {links[image_id]['id']} ({links[image_id]['file_name']}) and "
                                  f"{im['id']} ({im['file_name']}) both relink to image_id {image_id} ({name}) of {dataset}")
        width, height = sizes[image_id]
        if width is not None and (int(im["width"]), int(im["height"])) != (int(width), int(height)):
            raise DataImportError(f"{annotations_file}: image {im['id']} ({im['file_name']}) is {im['width']}x{im['height']}, "
                                  f"but {name} of {dataset} is {width}x{height}: not the same image")
        links[image_id] = im
    if missing:
        raise DataImportError(f"{annotations_file}: {len(missing)} image(s) are not in {dataset}, by file name or base name "
                              f"(e.g. image {', '.join(missing[:3])}); nothing was imported")
    rows: list[tuple[dict, dict]] = []
    by_shard: dict[str, list[int]] = defaultdict(list)
    for name, (shard, image_id) in where.items():
        if image_id in links:
            by_shard[shard].append(image_id)
    emitted: set[int] = set()
    for shard, ids in by_shard.items():
        present = shard_schema(shard).names
        cols = [c for c in (schema.IMAGE_ID, schema.FILE_NAME, schema.WIDTH, schema.HEIGHT, schema.IMAGE, schema.ERROR) if c in present]
        table = read_shard(shard, columns=cols)
        table = table.filter(pc.is_in(table[schema.IMAGE_ID], value_set=pa.array(ids, pa.int64())))
        for r in table.to_pylist():
            image_id = int(r[schema.IMAGE_ID])
            if image_id not in links or image_id in emitted:
                continue
            emitted.add(image_id)
            im = links[image_id]
            rows.append(({
                schema.IMAGE_ID: image_id,
                schema.FILE_NAME: r[schema.FILE_NAME],
                schema.WIDTH: int(im["width"]),
                schema.HEIGHT: int(im["height"]),
                schema.IMAGE: r.get(schema.IMAGE),
                schema.ERROR: r.get(schema.ERROR) or (None if r.get(schema.IMAGE) else f"no image bytes in {dataset}"),
            }, im))
    rows.sort(key=lambda pair: pair[0][schema.IMAGE_ID])
    return rows, relinked


def import_images(
    images_dir: str,
    out: str,
    *,
    rows_per_shard: int = 1000,
    overwrite: bool = False,
    labels_dir: str | None = None,
    categories_file: str | None = None,
    class_folders: bool = False,
) -> dict:
    """Import every image file under ``images_dir`` (recursively); unlabelled, with label maps, or by class folder.

    ``image_id`` is 1..N in sorted relative-path order, so re-importing the same folder gives the
    same ids. Width/height come from the file header (no full decode).

    ``labels_dir``: semantic ground truth, VOC style (:mod:`pipeline.data.label_maps`): the label PNG
    of ``IMAGES/a/b.jpg`` is ``LABELS/a/b.png``, pixel value = category id, 255 = ignore. Its bytes
    go, as found, into the ``label_map`` column, and ``dataset.json`` says (``info``) that label maps
    are this dataset's semantic ground truth. Then:

    * an image without a label file is kept with ``label_map`` null: it has no ground truth, and
      semantic evaluation leaves it out (counted: ``images_without_label_file``);
    * a label file that is unreadable, not an 8-bit grey/palette PNG, of another size than its image
      (as displayed, EXIF applied), or holding a value that is no category (nor 0, nor 255) makes
      the row an error row naming the file and why; the image bytes are kept, ``label_map`` is null;
    * label files no image asks for are listed (``labels_without_image``), not imported;
    * categories come from ``categories_file`` (:func:`~pipeline.data.label_maps.read_categories_file`),
      else from the values found: ids 1..max, named ``class_<id>``.

    A label folder that holds no image's label file is refused (almost always the wrong folder).

    ``class_folders``: an image classification set in torchvision's ``ImageFolder`` layout,
    ``IMAGES/<class>/**/<image>``. The categories are the sub-folders of ``images_dir`` in sorted name
    order (as ``ImageFolder`` numbers them), with ids 1..K (``ImageFolder``'s index + 1) named after
    the folders; each row's ``label`` column (:data:`pipeline.schema.LABEL`) is the id of its
    top-level folder, also on an error row. ``dataset.json`` says (``info.labels_from``) where the
    labels came from; the counts add ``categories`` and ``images_per_category`` (by name). Refused
    before anything is written, as ``ImageFolder`` refuses them: image files directly in
    ``images_dir`` (no class: most likely the wrong folder) and a class folder without images. Not
    with ``labels_dir`` or ``categories_file``.
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise DataImportError(f"not a folder: {images_dir}")
    if class_folders and (labels_dir or categories_file):
        raise DataImportError("--class-folders takes the categories and image labels from the folder names; "
                              "it does not go with --labels or --categories (label maps)")
    if categories_file and not labels_dir:
        raise DataImportError("categories name the values of label maps: give --labels with --categories")
    labels = LabelFolder(Path(labels_dir), DataImportError) if labels_dir else None
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not (labels and labels.holds(p)))
    if not files:
        raise DataImportError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {images_dir}")
    info = {"source": os.path.abspath(images_dir)}
    categories: list[dict] = []
    scans: dict[Path, tuple[Path, LabelScan]] = {}
    label_of: dict[Path, int] = {}
    if class_folders:
        categories, label_of = _class_folders(root, files)
        info |= {"labels_from": "class folders", "classification": True}
    if labels is not None:
        scans = _scan_labels(files, root, labels)
        if categories_file:
            categories = read_categories_file(categories_file, DataImportError)
        else:
            categories = inferred_categories({v for _, scan in scans.values() if not scan.error for v in scan.values})
        info |= {"labels": os.path.abspath(labels_dir), schema.SEMANTIC_GROUND_TRUTH: schema.LABEL_MAP,
                 "categories_from": os.path.abspath(categories_file) if categories_file else "label values"}
    row_schema = schema.LABEL_IMAGE_SCHEMA if class_folders else schema.LABEL_MAP_IMAGE_SCHEMA if labels else schema.IMAGE_SCHEMA
    writer = ShardWriter(out, rows_per_shard, row_schema, overwrite=overwrite)
    errors: list[str] = []
    with_label = 0
    for image_id, path in enumerate(files, start=1):
        row = _image_row(image_id, path, root)
        if labels is not None:
            row[schema.LABEL_MAP], row[schema.ERROR] = _label_map(row, scans.get(path), categories)
            with_label += row[schema.LABEL_MAP] is not None
        if class_folders:
            row[schema.LABEL] = label_of[path]  # an error row keeps it: the image is still of that class
        if row[schema.ERROR]:
            errors.append(f"image {image_id}: {row[schema.ERROR]}")
        writer.add(row)
    writer.flush()
    write_meta(out, DatasetMeta(categories=categories, info=info))
    result = {"images": len(files), "annotations": 0, "shards": writer.shards_written, "errors": errors}
    if labels is not None:
        result |= {"label_maps": with_label, "images_without_label_file": len(files) - len(scans),
                   "labels_without_image": labels.unused(), "categories": categories,
                   "categories_inferred": not categories_file}
    if class_folders:
        per_id = Counter(label_of.values())
        result |= {"categories": categories, "images_per_category": {c["name"]: per_id[c["id"]] for c in categories}}
    return result


def _class_folders(root: Path, files: list[Path]) -> tuple[list[dict], dict[Path, int]]:
    """(categories, image file -> category id) of an ``ImageFolder`` layout; refuses loose images and empty classes."""
    loose = [p.name for p in files if p.parent == root]
    if loose:
        raise DataImportError(
            f"--class-folders: {len(loose)} image(s) lie directly in {root}, in no class folder (e.g. {', '.join(loose[:3])}); "
            f"class folders hold the images ({root}/<class>/...): is this the right folder? Nothing was imported"
        )
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())  # torchvision's find_classes
    categories = [{"id": k, "name": name} for k, name in enumerate(names, start=1)]
    id_of = {c["name"]: c["id"] for c in categories}
    label_of = {p: id_of[p.relative_to(root).parts[0]] for p in files}
    used = set(label_of.values())
    empty = [c["name"] for c in categories if c["id"] not in used]
    if empty:
        raise DataImportError(
            f"--class-folders: {len(empty)} class folder(s) of {root} hold no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
            f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}; remove them or add images (torchvision's ImageFolder "
            "refuses them too). Nothing was imported"
        )
    return categories, label_of


def _image_row(image_id: int, path: Path, root: Path) -> dict:
    """The image columns of one file: bytes as found, size from the header (EXIF applied), or why not."""
    data, error = read_image_bytes(path)
    width = height = None
    if data is not None:
        try:
            with Image.open(path) as img:
                width, height = img.size
                if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # stored rotated 90 degrees
                    width, height = height, width
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-image error
            error = f"cannot read image header of {path}: {exc}"
    return {
        schema.IMAGE_ID: image_id,
        schema.FILE_NAME: str(path.relative_to(root)),
        schema.WIDTH: width,
        schema.HEIGHT: height,
        schema.IMAGE: data,
        schema.ERROR: error,
    }


def _scan_labels(files: list[Path], root: Path, labels: LabelFolder) -> dict[Path, tuple[Path, LabelScan]]:
    """image file -> (its label file, what that holds), for the images that have one; refuses a folder matching none."""
    scans = {}
    for path in files:
        label = labels.find(path.relative_to(root).as_posix())
        if label is not None:
            scans[path] = (label, scan_label_file(label))
    if not scans:
        example = files[0].relative_to(root).with_suffix(EXTENSION).as_posix()
        raise DataImportError(
            f"none of the {len(files)} images under {root} has a label file under {labels.root} "
            f"(the label of an image is its relative path with .png, e.g. {example}); nothing was imported"
        )
    return scans


def _label_map(row: dict, found: tuple[Path, LabelScan] | None, categories: list[dict]) -> tuple[bytes | None, str | None]:
    """(``label_map`` bytes or None, ``error``) of an image row: its error, else its label file's problem."""
    if found is None or row[schema.ERROR]:
        return None, row[schema.ERROR]  # no label file; or the image itself is unusable, which says enough
    path, scan = found
    problem = label_problem(scan, path, row[schema.WIDTH], row[schema.HEIGHT], categories)
    if problem:
        return None, problem
    try:
        return path.read_bytes(), None  # as found, like the image (scanned once already)
    except OSError as exc:
        return None, f"cannot read label map {path}: {exc}"


def import_arrays(out: str, images: list, *, prefix: str = "image", rows_per_shard: int = 256, overwrite: bool = False) -> str:
    """An images dataset from RGB uint8 (H, W, 3) arrays, PNG-encoded (lossless), ids 1..N, no annotations:
    the reference sets that measurements build (real images made small, noise; see bench/generative.py)."""
    writer = ShardWriter(out, rows_per_shard, schema.IMAGE_SCHEMA, overwrite=overwrite)
    for i, pixels in enumerate(images):
        writer.add({schema.IMAGE_ID: i + 1, schema.FILE_NAME: f"{prefix}-{i:06d}.png", schema.WIDTH: int(pixels.shape[1]),
                    schema.HEIGHT: int(pixels.shape[0]), schema.IMAGE: encode_png(pixels), schema.ANNOTATIONS: []})
    writer.flush()
    write_meta(out, DatasetMeta(info={"description": f"{len(images)} {prefix} images from arrays"}))
    return out
