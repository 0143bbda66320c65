"""Draw predictions on their images, so a person can look at what a job produced.

A prediction dataset holds no image bytes; they are read from the job's input dataset (named in
the predictions' ``dataset.json`` as ``info.source``, or given explicitly with ``images=``) and
joined by ``image_id``. Before anything is drawn, the rows to draw are checked against that
dataset: every image_id must be there, with the same ``file_name`` and the same size; otherwise
the boxes would land on the wrong picture, so nothing is drawn and the differences are listed.

What a picture shows, made to be read at any image size:

* images whose short side is under ``MIN_SIDE`` (512) px are first upscaled by an integer factor
  (nearest neighbour: the pixels the model saw, only bigger), boxes scaled with them;
* attribution maps (an explain stage's ``attribution_maps``) as heat (matplotlib's ``inferno``)
  over the image, per pixel the maximum of a row's maps when it has several (one per explained
  box), the boxes drawn on top;
* masks (``masks``, COCO RLE) as translucent fills, boxes (``boxes``, xyxy) as outlines whose
  width grows with the image, keypoints (``keypoints``) as dots;
* one label per box, ``<category name> <score>`` (e.g. ``circle 0.93``), in DejaVu Sans (the
  TrueType font matplotlib ships) sized to the image, on a filled rectangle in the box colour with
  black or white text, whichever contrasts; the label sits above the box when there is room, else
  inside it, and never leaves the picture. Names come from the predictions' ``dataset.json``
  categories, else the images dataset's; only when neither names a category is it ``class <id>``.

Semantic segmentation (a segment stage's ``semantic_category_ids`` + ``semantic_masks``, or the
``label_map`` of a ground-truth dataset given as PRED: an images dataset is its own source) is drawn
as a translucent fill per category in its colour; background (0) is left as it is, and pixels that
are unlabelled (no mask, category -1) or ignored (255) get VOC's pale "void" tint. Under the
picture, a legend strip names each category present beside its colour swatch (background as an
empty swatch). A mask or label map that cannot be read skips its row like undecodable bytes.

Files are ``<image_id>_<file stem>.png`` plus ``contact_sheet.png``: a grid of thumbnails of the
drawn pictures with their ids and file names. Error rows (``error`` set) have no picture; they
are skipped and listed in the result, as are rows whose image bytes cannot be decoded.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from pipeline import schema
from pipeline.data.decode import DecodeError, decode_image
from pipeline.data.export_images import BACKGROUND, SHEET, contact_sheet, thumbnail
from pipeline.data.label_maps import IGNORE, UNLABELLED, LabelMapError, category_map, decode_png_label_map, voc_palette
from pipeline.data.shards import DatasetError, DatasetMeta, list_shards, read_meta, read_shard, shard_schema

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
MIN_SIDE = 512  # smaller images are upscaled to at least this short side before drawing
SHEET_CELL = 256
MAX_LISTED = 5  # mismatches / skipped rows named in messages
SEMANTIC_ALPHA = 0.5  # weight of a category's colour over the picture
VOID_COLOUR = tuple(voc_palette()[3 * IGNORE : 3 * IGNORE + 3])  # (224, 224, 192): unlabelled / ignored pixels
LEGEND_TEXT = (235, 235, 235)


def render_predictions(
    pred: str,
    out_dir: str,
    *,
    images: str | None = None,
    limit: int = 8,
    min_score: float = 0.3,
    sheet: bool = True,
) -> dict:
    """Draw the first ``limit`` usable rows of ``pred`` as PNGs in ``out_dir``.

    Returns ``{"paths": [...], "sheet": path or None, "error_rows": [(image_id, file_name, reason)],
    "undecodable": [(image_id, file_name, reason)]}``. Raises :class:`DatasetError` when the images
    dataset is unknown, or does not hold the same images (ids, file names, sizes) as ``pred``.
    """
    meta = read_meta(pred)
    source = images or (pred if meta.kind == "images" else meta.info.get("source"))  # a dataset holds its own images
    if not source:
        raise DatasetError(f"{pred}: dataset.json names no source dataset; pass the images dataset with --images")
    names = category_names(known_categories(meta, source))

    rows, error_rows = _read_rows(pred, limit)
    pictures = _read_images(source, {r[schema.IMAGE_ID] for r in rows})
    check_same_images(rows, pictures, pred, source)

    os.makedirs(out_dir, exist_ok=True)
    written, thumbs, undecodable = [], [], []
    for row in rows:
        image_id = row[schema.IMAGE_ID]
        file_name = row.get(schema.FILE_NAME) or pictures[image_id][0]
        try:
            rgb = decode_image(pictures[image_id][3])
            semantic = semantic_layer(row, *rgb.shape[:2])
        except (DecodeError, LabelMapError) as exc:
            undecodable.append((image_id, file_name, str(exc)))
            continue
        image = draw_row(rgb, row, names, min_score, semantic=semantic)
        path = os.path.join(out_dir, picture_name(image_id, file_name))
        image.save(path)
        written.append(path)
        if sheet:
            thumbs.append((image_id, file_name, thumbnail(np.asarray(image), SHEET_CELL)))
    sheet_path = None
    if thumbs:
        sheet_path = os.path.join(out_dir, SHEET)
        grid_sheet(thumbs, SHEET_CELL).save(sheet_path)
    return {"paths": written, "sheet": sheet_path, "error_rows": error_rows, "undecodable": undecodable}


# --- reading ------------------------------------------------------------------------------------


def _read_rows(pred: str, limit: int) -> tuple[list[dict], list[tuple]]:
    """The first ``limit`` rows without an error, and the error rows met on the way."""
    wanted = [schema.IMAGE_ID, schema.FILE_NAME, schema.WIDTH, schema.HEIGHT, schema.ERROR, schema.BOXES,
              schema.SCORES, schema.CATEGORY_IDS, schema.LABELS, schema.MASKS, schema.KEYPOINTS,
              schema.SEMANTIC_CATEGORY_IDS, schema.SEMANTIC_MASKS, schema.LABEL_MAP, schema.ATTRIBUTION_MAPS,
              schema.CLASS_CATEGORY_IDS, schema.CLASS_SCORES, schema.CLASS_LABELS]
    rows: list[dict] = []
    errors: list[tuple] = []
    for shard in list_shards(pred):
        present = shard_schema(shard).names
        for row in read_shard(shard, columns=[c for c in wanted if c in present]).to_pylist():
            if row.get(schema.ERROR) is not None:
                errors.append((row[schema.IMAGE_ID], row.get(schema.FILE_NAME), row[schema.ERROR]))
            elif len(rows) < limit:
                rows.append(row)
        if len(rows) >= limit:
            break
    return rows, errors


def _read_images(source: str, ids: set[int]) -> dict[int, tuple]:
    """image_id -> (file_name, width, height, image bytes) for these ids (first shard wins)."""
    found: dict[int, tuple] = {}
    if not ids:
        return found
    for shard in list_shards(source):
        present = shard_schema(shard).names
        if schema.IMAGE not in present:
            raise DatasetError(f"{source} holds no image bytes (no '{schema.IMAGE}' column): pass the images dataset with --images")
        cols = [c for c in (schema.IMAGE_ID, schema.FILE_NAME, schema.WIDTH, schema.HEIGHT, schema.IMAGE) if c in present]
        for r in read_shard(shard, columns=cols).to_pylist():
            i = r[schema.IMAGE_ID]
            if i in ids and i not in found:
                found[i] = (r.get(schema.FILE_NAME), r.get(schema.WIDTH), r.get(schema.HEIGHT), r.get(schema.IMAGE))
        if len(found) == len(ids):
            break
    return found


def displayed_size(data: bytes | None) -> tuple[int, int] | None:
    """(width, height) as decoded (EXIF orientation applied), from the header; None if unreadable."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
            return w, h
    except Exception:  # noqa: BLE001 - unreadable bytes are reported when drawing
        return None


def check_same_images(rows: list[dict], pictures: dict[int, tuple], pred: str, source: str) -> None:
    """Refuse when the images dataset does not hold the predictions' images (ids, file names, sizes)."""
    problems: list[str] = []
    differ: set[int] = set()
    for row in rows:
        i = row[schema.IMAGE_ID]
        if i not in pictures:
            problems.append(f"image_id {i} is not in {source}")
            differ.add(i)
            continue
        name, width, height, data = pictures[i]
        mine = row.get(schema.FILE_NAME)
        if mine is not None and name is not None and mine != name:
            problems.append(f"image_id {i}: file_name {mine!r} in the predictions, {name!r} in the images")
            differ.add(i)
        pw, ph = row.get(schema.WIDTH), row.get(schema.HEIGHT)
        if pw is None or ph is None:
            continue
        shown = displayed_size(data) or ((width, height) if width is not None and height is not None else None)
        if shown is not None and (pw, ph) != tuple(shown):
            problems.append(f"image_id {i} ({mine or name}): {pw}x{ph} in the predictions, {shown[0]}x{shown[1]} in the images")
            differ.add(i)
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DatasetError(
            f"the images in {source} are not the ones {pred} was predicted on ({len(differ)} of {len(rows)} "
            f"image(s) differ); nothing drawn:\n  " + "\n  ".join(problems[:MAX_LISTED]) + more
        )


# --- labels and layout --------------------------------------------------------------------------


def known_categories(meta: DatasetMeta, source: str | None = None) -> list[dict]:
    """The categories naming a prediction dataset's ``category_ids``: its own ``dataset.json``'s,
    else (none recorded) those of its images dataset ``source`` (default: ``info.source``)."""
    if meta.categories:
        return list(meta.categories)
    source = source or meta.info.get("source")
    if source:
        try:
            return list(read_meta(source).categories)
        except (DatasetError, OSError, ValueError):
            return []  # e.g. info.source names a COCO JSON file or a folder that has gone
    return []


def category_names(categories: list[dict]) -> dict[int, str]:
    return {int(c["id"]): str(c["name"]) for c in categories or [] if c.get("name") not in (None, "")}


def label_text(category_id: int | None, score: float | None, names: dict[int, str], label: int | None = None) -> str:
    """``<name> <score>``: the category's name, ``class <id>`` when no name is known anywhere."""
    if category_id is None or category_id == -1:
        what = f"unmapped label {label}" if label is not None else "unmapped"
    else:
        what = names.get(int(category_id)) or f"class {category_id}"
    return f"{what} {score:.2f}" if score is not None else what


def style_for(short_side: int) -> tuple[int, int]:
    """(line width, font size) in pixels for an image of this short side."""
    return max(2, round(short_side / 300)), max(12, round(short_side / 40))


def upscale_factor(width: int, height: int, min_side: int = MIN_SIDE) -> int:
    short = min(width, height)
    return 1 if short >= min_side or short <= 0 else math.ceil(min_side / short)


def label_rect(box: tuple[float, float, float, float], size: tuple[int, int], width: int, height: int,
               line: int = 0, where: str = "above") -> tuple[int, int, int, int]:
    """Where a label of ``size`` (w, h) goes for ``box`` (xyxy): [x0, y0, x1, y1), always inside the image.

    ``where``: "above" the box's top-left corner when there is room, else just inside its top
    edge; "inside" under the top edge; "below" under the bottom edge. The rectangle is then
    shifted left/up/down to stay in the picture (and cut to the picture when wider than it).
    """
    w, h = min(size[0], width), min(size[1], height)
    x1, y1, _, y2 = box
    x = int(round(x1))
    if where == "below":
        y = int(round(y2))
    else:
        y = int(round(y1)) - h
        if where == "inside" or y < 0:
            y = int(round(y1)) + line  # inside, under the top edge
    x = min(max(x, 0), width - w)
    y = min(max(y, 0), height - h)
    return x, y, x + w, y + h


def layout_labels(boxes: list, sizes: list[tuple[int, int]], width: int, height: int, line: int = 0) -> list[tuple]:
    """One rectangle per label (boxes in priority order, best first), avoiding labels already placed.

    Tries above, inside and below its box, then above shifted further up; when every place is
    taken the label goes above (or inside) its box anyway. Every rectangle is inside the image.
    """
    placed: list[tuple] = []
    for box, size in zip(boxes, sizes):
        first = label_rect(box, size, width, height, line)
        candidates = [first, label_rect(box, size, width, height, line, "inside"),
                      label_rect(box, size, width, height, line, "below")]
        for k in range(1, 4):
            candidates.append(label_rect((box[0], box[1] - k * size[1], box[2], box[3]), size, width, height, line))
        free = next((c for c in candidates if not any(_overlap(c, p) for p in placed)), first)
        placed.append(free)
    return placed


def _overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@functools.lru_cache(maxsize=32)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(_font_path(), size)


@functools.lru_cache(maxsize=1)
def _font_path() -> str:
    import matplotlib

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
    if os.path.exists(path):
        return path
    from matplotlib import font_manager

    return font_manager.findfont("DejaVu Sans")


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def colour_for(category_id: int | None) -> tuple[int, int, int]:
    return PALETTE[(category_id if category_id is not None and category_id >= 0 else len(PALETTE) - 1) % len(PALETTE)]


# --- drawing ------------------------------------------------------------------------------------


def draw_row(rgb: np.ndarray, row: dict, names: dict[int, str], min_score: float,
             semantic: tuple[np.ndarray, str] | None = None) -> Image.Image:
    """The row's predictions scoring at least ``min_score`` drawn on ``rgb`` (upscaled if small).

    ``semantic``: (category map (H, W), what -1 means there) from :func:`semantic_layer`: tinted
    under everything else, with a legend strip added under the picture.
    """
    height, width = rgb.shape[:2]
    scores = row.get(schema.SCORES) or []
    boxes = row.get(schema.BOXES) or []
    categories = row.get(schema.CATEGORY_IDS) or []
    labels = row.get(schema.LABELS) or []
    masks = row.get(schema.MASKS) or []
    keypoints = row.get(schema.KEYPOINTS) or []
    keep = [i for i, s in enumerate(scores) if s is not None and s >= min_score and i < len(boxes)]

    def cat(i):
        return categories[i] if i < len(categories) else None

    canvas = rgb.astype(np.float32)
    if semantic is not None:
        tint_categories(canvas, semantic[0])
    heat = heat_layer(row, height, width)
    if heat is not None:
        blend_heat(canvas, heat)
    for i in keep:
        if i < len(masks) and masks[i] and masks[i].get("counts"):
            m = mask_utils.decode({"size": list(masks[i]["size"]), "counts": masks[i]["counts"].encode("ascii")}).astype(bool)
            if m.shape == canvas.shape[:2]:
                canvas[m] = 0.55 * canvas[m] + 0.45 * np.array(colour_for(cat(i)), np.float32)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    f = upscale_factor(width, height)
    if f > 1:
        image = image.resize((width * f, height * f), Image.NEAREST)
    W, H = image.size
    line, size = style_for(min(W, H))
    draw = ImageDraw.Draw(image)
    typeface = font(size)
    pad = max(2, size // 6)
    order = sorted(keep, key=lambda i: scores[i])  # best drawn last, on top
    for i in order:
        x1, y1, x2, y2 = (float(v) * f for v in boxes[i])
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour_for(cat(i)), width=line)
        if i < len(keypoints) and keypoints[i]:
            r = max(2, line + 1)
            for x, y, v in np.asarray(keypoints[i], dtype=np.float64).reshape(-1, 3):
                if v > 0:
                    x, y = x * f, y * f
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=colour_for(cat(i)), outline=(255, 255, 255))
    best_first = order[::-1]
    texts = [label_text(cat(i), scores[i], names, labels[i] if i < len(labels) else None) for i in best_first]
    extents = [draw.textbbox((0, 0), t, font=typeface) for t in texts]
    rects = layout_labels([tuple(float(v) * f for v in boxes[i]) for i in best_first],
                          [(r - l + 2 * pad, b - t + 2 * pad) for l, t, r, b in extents], W, H, line)
    for i, text, (left, top, _, _), rect in reversed(list(zip(best_first, texts, extents, rects))):
        colour = colour_for(cat(i))
        draw.rectangle([rect[0], rect[1], rect[2] - 1, rect[3] - 1], fill=colour, outline=tuple(c // 2 for c in colour))
        draw.text((rect[0] + pad - left, rect[1] + pad - top), text, font=typeface, fill=text_colour(colour))
    top1 = (row.get(schema.CLASS_CATEGORY_IDS) or [None])[0], (row.get(schema.CLASS_SCORES) or [None])[0]
    if top1[1] is not None:  # a classify stage's best class, as a caption in the top-left corner
        label = (row.get(schema.CLASS_LABELS) or [None])[0]
        text = label_text(top1[0] if top1[0] is not None and top1[0] >= 0 else None, top1[1], names, label)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=typeface)
        colour = colour_for(top1[0])
        draw.rectangle([0, 0, right - left + 2 * pad - 1, bottom - top + 2 * pad - 1], fill=colour)
        draw.text((pad - left, pad - top), text, font=typeface, fill=text_colour(colour))
    if semantic is not None:
        image = with_legend(image, legend_entries(semantic[0], names, semantic[1]), size)
    return image


# --- attribution maps (an explain stage) -------------------------------------------------------------

HEAT_ALPHA = 0.6  # weight of the heat colour where the map is at its maximum (0 where the map is 0)


def heat_layer(row: dict, height: int, width: int) -> np.ndarray | None:
    """The row's attribution maps as one (H, W) layer of floats in 0..1: per pixel the maximum over
    its maps (one per explained prediction: a class, or each box), maps not at the image's size and
    empty ones (boxes not explained) left out; None when none is left."""
    layers = []
    for png in row.get(schema.ATTRIBUTION_MAPS) or []:
        if not png:
            continue
        with Image.open(io.BytesIO(png)) as im:
            values = np.asarray(im.convert("L"), np.float32) / 255.0
        if values.shape == (height, width):
            layers.append(values)
    return np.max(layers, axis=0) if layers else None


def blend_heat(canvas: np.ndarray, heat: np.ndarray) -> None:
    """Tint ``canvas`` (H, W, 3 float) with matplotlib's ``inferno`` colours of ``heat``, opaque where it is hot."""
    from matplotlib import colormaps  # late: only pictures of attribution maps need it

    colours = colormaps["inferno"](heat)[..., :3].astype(np.float32) * 255
    alpha = (HEAT_ALPHA * heat)[..., None]
    canvas[...] = (1 - alpha) * canvas + alpha * colours


# --- semantic segmentation --------------------------------------------------------------------------


def semantic_layer(row: dict, height: int, width: int) -> tuple[np.ndarray, str] | None:
    """The row's per-pixel categories, (height, width) int64 with -1 where none (unlabelled or
    ignored), and the word for -1 there; None when the row has no semantic masks and no label map.

    Raises :class:`LabelMapError` (naming the image) for masks or a label map that cannot be read
    or are not the image's size.
    """
    where = f"image_id {row[schema.IMAGE_ID]}"
    if row.get(schema.SEMANTIC_MASKS) is not None:
        return category_map(row.get(schema.SEMANTIC_CATEGORY_IDS), row[schema.SEMANTIC_MASKS], height, width, where=where), "unlabelled"
    if row.get(schema.LABEL_MAP) is not None:
        values = decode_png_label_map(row[schema.LABEL_MAP], where=where)
        if values.shape != (height, width):
            raise LabelMapError(f"{where}: label map is {values.shape[1]}x{values.shape[0]}, the image is {width}x{height}")
        return np.where(values == IGNORE, UNLABELLED, values.astype(np.int64)), "ignore (255)"
    return None


def tint_categories(canvas: np.ndarray, categories: np.ndarray) -> None:
    """Blend each category's colour over ``canvas`` (H, W, 3 float32, in place); background stays,
    -1 (unlabelled / ignored) gets :data:`VOID_COLOUR`."""
    for c in np.unique(categories).tolist():
        if c == 0:
            continue
        where = categories == c
        colour = np.array(VOID_COLOUR if c == UNLABELLED else colour_for(c), np.float32)
        canvas[where] = (1 - SEMANTIC_ALPHA) * canvas[where] + SEMANTIC_ALPHA * colour


def legend_entries(categories: np.ndarray, names: dict[int, str], unlabelled: str) -> list[tuple[tuple | None, str]]:
    """(swatch colour, text) per value present, in id order: background (None: an empty swatch, it is
    not tinted), each category by name, then -1 as ``unlabelled``."""
    present = np.unique(categories).tolist()
    entries = [(None, names.get(0) or "background")] if 0 in present else []
    entries += [(colour_for(c), names.get(c) or f"class {c}") for c in present if c > 0]
    if UNLABELLED in present:
        entries.append((VOID_COLOUR, unlabelled))
    return entries


def with_legend(image: Image.Image, entries: list[tuple[tuple | None, str]], size: int) -> Image.Image:
    """``image`` with a strip under it: one ``[swatch] name`` per entry, left to right, wrapping.

    Swatches are ``size`` px squares (the label font size) filled with the category's colour, so a
    colour in the picture can be looked up; the strip is as wide as the image.
    """
    typeface = font(size)
    pad = max(2, size // 3)
    probe = ImageDraw.Draw(image)
    widths = [size + pad + (probe.textbbox((0, 0), text, font=typeface)[2]) for _, text in entries]
    lines, x = [[]], pad
    for entry, w in zip(entries, widths):
        if lines[-1] and x + w > image.width - pad:
            lines.append([])
            x = pad
        lines[-1].append((entry, x))
        x += w + 2 * size
    line_height = size + 2 * pad
    out = Image.new("RGB", (image.width, image.height + len(lines) * line_height + pad), BACKGROUND)
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for n, line in enumerate(lines):
        top = image.height + pad + n * line_height
        for ((colour, text), left) in line:
            box = [left, top + pad, left + size - 1, top + pad + size - 1]
            draw.rectangle(box, fill=colour, outline=LEGEND_TEXT if colour is None else colour)
            draw.text((left + size + pad, top + pad + size // 2), text, font=typeface, fill=LEGEND_TEXT, anchor="lm")
    return out


def picture_name(image_id: int, file_name: str | None) -> str:
    """``<image_id>_<safe file stem>.png`` (``<image_id>.png`` without a file name)."""
    stem = os.path.splitext(os.path.basename(file_name or ""))[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:80]
    return f"{image_id}_{stem}.png" if stem else f"{image_id}.png"


def grid_sheet(thumbs: list[tuple[int, str | None, Image.Image]], cell: int) -> Image.Image:
    """A near-square grid of export-images' contact-sheet columns (thumbnails with id and file name)."""
    columns = max(1, math.ceil(math.sqrt(len(thumbs))))
    parts = [contact_sheet(thumbs[k::columns], {}, cell) for k in range(min(columns, len(thumbs)))]  # row by row
    sheet = Image.new("RGB", (sum(p.width for p in parts), max(p.height for p in parts)), BACKGROUND)
    left = 0
    for p in parts:
        sheet.paste(p, (left, 0))
        left += p.width
    return sheet
