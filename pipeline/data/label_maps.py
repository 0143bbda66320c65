"""Label maps: one place to read, write and check them, for importing, evaluating, drawing and exporting.

A label map is an (H, W) uint8 image of category ids (0 = background, 255 = ignore, VOC's "void")
stored as a PNG: 8-bit grey, or palette read by *index*, as VOC's ``SegmentationClass`` files are
(they show colours but hold ids). Any other file (RGB, 16-bit, JPEG...) is refused, since its pixel
values are not ids. Each reader takes the error type its caller's users see (``DataImportError``
when importing, ``EvalInputError`` when evaluating), as :mod:`pipeline.data.coco_file` does.

Also here, because every user of label maps needs them: a segment stage's masks decoded into one
category map (:func:`category_map`), VOC's colour map (:func:`voc_palette`), and what an import of
a label folder needs (:class:`LabelFolder`, :func:`scan_label_file`, :func:`label_problem`, the
categories file and inferred categories).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline import schema
from pipeline.data.shards import DatasetMeta

IGNORE = schema.SEMANTIC_IGNORE
BACKGROUND = 0
UNLABELLED = -1  # in a category map: no mask covers the pixel, or its mask's category is -1 (unmapped)
EXTENSION = ".png"


class LabelMapError(ValueError):
    """A label map or semantic mask that cannot be read (the message names it)."""


# --- reading and writing one map ------------------------------------------------------------------


def decode_png_label_map(data: bytes, *, where: str, error: type[Exception] = LabelMapError) -> np.ndarray:
    """PNG bytes -> (h, w) uint8 values; palette PNGs are read by index (as VOC stores them).

    Raises ``error`` (message starting with ``where``) for bytes that are not a PNG, or a PNG that
    is not 8-bit grey or palette.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise error(f"{where}: cannot read the label map PNG: {exc}") from exc
    with image:
        if image.format != "PNG":
            raise error(f"{where}: label map is a {image.format} file; expected a PNG (values = category ids)")
        if image.mode not in ("L", "P"):
            raise error(f"{where}: label map is a {image.mode} image; expected 8-bit grey or palette (values = category ids)")
        return np.asarray(image, dtype=np.uint8)


def voc_palette() -> list[int]:
    """VOC's colour map: 256 RGB triples, flat (768 ints), as ``Image.putpalette`` takes them.

    The bits of the index are spread over R, G, B, three at a time, from the colour's high bit down
    (the VOC devkit's ``labelcolormap``): 0 black (background), 1 (128, 0, 0), 2 (0, 128, 0),
    3 (128, 128, 0), ..., 255 (224, 224, 192) (void).
    """
    flat = []
    for index in range(256):
        rgb = [0, 0, 0]
        c = index
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << (7 - bit)
            c >>= 3
        flat.extend(rgb)
    return flat


def encode_png_label_map(values: np.ndarray) -> bytes:
    """(h, w) uint8 category ids (255 ignore) -> a palette PNG in VOC's colours: the pixels are the ids."""
    image = Image.fromarray(np.ascontiguousarray(values, dtype=np.uint8), mode="L").convert("P")  # L -> P keeps each value
    image.putpalette(voc_palette())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def category_map(ids, masks, height: int, width: int, *, where: str, error: type[Exception] = LabelMapError) -> np.ndarray:
    """A segment stage's ``semantic_category_ids`` + ``semantic_masks`` of one image -> (height, width)
    int64 category ids; :data:`UNLABELLED` (-1) where no mask covers a pixel or its category is -1/null.

    The masks must be ``height`` x ``width``, as many as the ids, and must not overlap.
    """
    ids, masks = list(ids or []), list(masks or [])
    if len(ids) != len(masks):
        raise error(f"{where}: {len(ids)} {schema.SEMANTIC_CATEGORY_IDS} but {len(masks)} {schema.SEMANTIC_MASKS}")
    out = np.full((height, width), UNLABELLED, np.int64)
    covered = np.zeros((height, width), bool)
    for n, (c, rle) in enumerate(zip(ids, masks)):
        what = f"{where}: semantic mask {n} (category {c})"
        if rle is None or rle.get("size") is None or rle.get("counts") is None:
            raise error(f"{what}: null mask")
        size = [int(v) for v in rle["size"]]
        if size != [height, width]:
            raise error(f"{what} is {size[0] if size else '?'}x{size[1] if len(size) > 1 else '?'}, the image is {height}x{width}")
        try:
            m = mask_utils.decode({"size": size, "counts": rle["counts"].encode()}).astype(bool)
        except Exception as exc:  # noqa: BLE001 - pycocotools raises bare errors on malformed counts
            raise error(f"{what}: unreadable RLE: {exc}") from exc
        if m.shape != (height, width):
            raise error(f"{what}: RLE decodes to {m.shape}, the image is {height}x{width}")
        if (covered & m).any():
            raise error(f"{what} overlaps an earlier mask of the image; semantic masks must not overlap")
        covered |= m
        out[m] = UNLABELLED if c is None else int(c)
    return out


def is_label_map_dataset(meta: DatasetMeta) -> bool:
    """Whether a dataset's semantic ground truth is its label maps (an image without one has none)."""
    return meta.info.get(schema.SEMANTIC_GROUND_TRUTH) == schema.LABEL_MAP


# --- importing a folder of label maps --------------------------------------------------------------


class LabelFolder:
    """The label PNGs under a folder, found by an image's path relative to its folder with ``.png``
    as extension (``2007_000032.jpg`` -> ``2007_000032.png``, ``a/b.jpg`` -> ``a/b.png``)."""

    def __init__(self, root: Path, error: type[Exception] = LabelMapError):
        if not root.is_dir():
            raise error(f"labels: not a folder: {root}")
        self.root = root
        self._files = {
            p.relative_to(root).with_suffix(EXTENSION).as_posix(): p
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() == EXTENSION
        }
        self._paths = set(self._files.values())
        self._used: set[str] = set()

    def holds(self, path: Path) -> bool:
        """Whether ``path`` is one of the label files (not an image, when the folders overlap)."""
        return path in self._paths

    def find(self, image_relative: str) -> Path | None:
        """The label file of the image at ``image_relative`` (posix, relative to the images folder)."""
        key = Path(image_relative).with_suffix(EXTENSION).as_posix()
        path = self._files.get(key)
        if path is not None:
            self._used.add(key)
        return path

    def unused(self) -> list[str]:
        """Label files (relative paths) that no image asked for, sorted."""
        return sorted(set(self._files) - self._used)


@dataclass(frozen=True)
class LabelScan:
    """What the import checks of one label file, without keeping its pixels."""

    shape: tuple[int, int] | None  # (h, w)
    values: frozenset[int]
    error: str | None = None


def scan_label_file(path: Path) -> LabelScan:
    """Decode the label file once: its size and the values it holds, or why it cannot be read."""
    where = f"label map {path}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return LabelScan(None, frozenset(), f"cannot read {where}: {exc}")
    if not data:
        return LabelScan(None, frozenset(), f"{where} is an empty file")
    try:
        values = decode_png_label_map(data, where=where)
    except LabelMapError as exc:
        return LabelScan(None, frozenset(), str(exc))
    return LabelScan(values.shape, frozenset(np.unique(values).tolist()))


def label_problem(scan: LabelScan, path: Path, width: int, height: int, categories: list[dict]) -> str | None:
    """Why this label map cannot be the ground truth of a ``width`` x ``height`` image; None when it can."""
    if scan.error:
        return scan.error
    if scan.shape != (height, width):
        return f"label map {path} is {scan.shape[1]}x{scan.shape[0]}, its image is {width}x{height}"
    bad = sorted(scan.values - {int(c["id"]) for c in categories} - {BACKGROUND, IGNORE})
    if bad:
        return (f"label map {path} has value(s) {bad[:5]} that are no category id "
                f"(nor {BACKGROUND} = background, {IGNORE} = ignore)")
    return None


def inferred_categories(values: set[int]) -> list[dict]:
    """Categories of label maps that came without a categories file: ids 1..max value found, named
    ``class_<id>`` (0, the background, and 255, ignore, are not categories)."""
    top = max((v for v in values if v not in (BACKGROUND, IGNORE)), default=0)
    return [{"id": i, "name": f"class_{i}"} for i in range(1, top + 1)]


def read_categories_file(path: str, error: type[Exception] = LabelMapError) -> list[dict]:
    """``--categories``: a JSON list of COCO category dicts (``{"id": 1, "name": "aeroplane"}``), or of
    names in id order, VOC's way (``["background", "aeroplane", ...]``: the index is the id).

    Returns the categories sorted by id, without id 0: the background is class 0 for every consumer
    (evaluation, training, the segment stage), never a dataset category. Ids must fit a label map
    (1..254) and be unique.
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read categories file {path}: {exc}") from exc
    if not isinstance(raw, list) or not raw:
        raise error(f"{path}: expected a JSON list of category dicts {{'id', 'name'}} or of names (index = id)")
    if all(isinstance(c, str) for c in raw):
        raw = [{"id": i, "name": name} for i, name in enumerate(raw)]
    elif not all(isinstance(c, dict) for c in raw):
        raise error(f"{path}: mixes names and category dicts; use one or the other")
    categories: dict[int, dict] = {}
    for c in raw:
        cid = c.get("id")
        if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid < IGNORE:
            raise error(f"{path}: category {c!r}: id must be an integer 0..{IGNORE - 1} (a label map value)")
        if not isinstance(c.get("name"), str) or not c["name"]:
            raise error(f"{path}: category {c!r} has no name")
        if cid in categories:
            raise error(f"{path}: category id {cid} is listed twice")
        categories[cid] = dict(c)
    categories.pop(BACKGROUND, None)
    return [categories[i] for i in sorted(categories)]
