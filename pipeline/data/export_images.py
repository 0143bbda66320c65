"""Write an image column of a prediction dataset (e.g. the style stage's ``stylized``) out as files.

Files are named ``<image_id>_<stem of file_name>.<jpg|png>`` (the extension from the bytes), so
names are unique and still say which input they came from. Error rows and rows without the
column have no file; they are counted.

The contact sheet ``contact_sheet.png`` is one PNG a person can look at: one line per image, the
original (read from the job's input dataset -- ``info.source`` in the predictions'
``dataset.json``, or ``images=``) next to its result, each scaled to fit a ``cell`` px square,
for the first ``sheet_limit`` exported rows. Without the input dataset the sheet shows the
results alone.
"""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image, ImageDraw

from pipeline import schema
from pipeline.data.decode import DecodeError, decode_image
from pipeline.data.shards import (
    DatasetError,
    iter_shard,
    list_shards,
    read_meta,
    read_shard,
    shard_schema,
)

SHEET = "contact_sheet.png"
BACKGROUND = (32, 32, 32)
LABEL_HEIGHT = 14


def export_images(
    pred: str,
    out_dir: str,
    *,
    column: str = schema.STYLIZED,
    images: str | None = None,
    sheet: bool = True,
    sheet_limit: int = 16,
    cell: int = 192,
    overwrite: bool = False,
) -> dict:
    """Write every non-null ``column`` value of ``pred`` as a file in ``out_dir``; returns counts and paths.

    A non-empty ``out_dir`` is refused unless ``overwrite`` (files of another export would mix in).

    ``{"written": n, "error_rows": n, "empty_rows": n, "sheet": path or None, "paths": [...]}``.
    Shards are streamed; only the sheet's thumbnails are kept in memory.
    """
    shards = list_shards(pred)
    if not any(column in shard_schema(s).names for s in shards):
        available = sorted({n for s in shards for n in shard_schema(s).names} - set(schema.PREDICTION_BASE_SCHEMA.names))
        raise DatasetError(f"{pred} has no column {column!r} (its prediction columns: {', '.join(available) or 'none'})")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise DatasetError(f"output {out_dir} is not empty; pass --overwrite to write into it, or choose an empty folder")
    os.makedirs(out_dir, exist_ok=True)
    paths, thumbs = [], []  # thumbs: (image_id, file_name, result thumbnail)
    error_rows = empty_rows = 0
    wanted = [schema.IMAGE_ID, schema.FILE_NAME, schema.ERROR, column]
    for shard in shards:
        present = shard_schema(shard).names
        if column not in present:
            continue
        for table in iter_shard(shard, 64, columns=[c for c in wanted if c in present]):
            for row in table.to_pylist():
                data = row.get(column)
                if row.get(schema.ERROR) is not None:
                    error_rows += 1
                    continue
                if not data:
                    empty_rows += 1
                    continue
                path = os.path.join(out_dir, file_name_for(row[schema.IMAGE_ID], row.get(schema.FILE_NAME), data))
                with open(path, "wb") as f:
                    f.write(data)
                paths.append(path)
                if sheet and len(thumbs) < sheet_limit:
                    try:
                        thumbs.append((row[schema.IMAGE_ID], row.get(schema.FILE_NAME), thumbnail(decode_image(data), cell)))
                    except DecodeError:
                        pass  # written as it is; a picture that cannot be shown stays off the sheet
    sheet_path = None
    if sheet and thumbs:
        originals = read_originals(images or read_meta(pred).info.get("source"), {t[0] for t in thumbs}, cell)
        sheet_path = os.path.join(out_dir, SHEET)
        contact_sheet(thumbs, originals, cell).save(sheet_path)
    return {"written": len(paths), "error_rows": error_rows, "empty_rows": empty_rows, "sheet": sheet_path, "paths": paths}


def file_name_for(image_id: int, file_name: str | None, data: bytes) -> str:
    """``<image_id>_<safe stem>.<ext>``; the extension from the encoded bytes (JPEG or PNG)."""
    stem = os.path.splitext(os.path.basename(file_name or ""))[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:80]
    ext = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg" if data[:3] == b"\xff\xd8\xff" else "bin"
    return f"{image_id}_{stem}.{ext}" if stem else f"{image_id}.{ext}"


def thumbnail(rgb: np.ndarray, cell: int) -> Image.Image:
    image = Image.fromarray(rgb)
    image.thumbnail((cell, cell))
    return image


def read_originals(source: str | None, ids: set[int], cell: int) -> dict[int, Image.Image]:
    """Thumbnails of the input images with these ids (decoded like the job did, EXIF applied).

    Empty when the source dataset is not named or not found: the sheet then shows results only.
    """
    if not source:
        return {}
    try:
        shards = list_shards(source)
    except DatasetError:
        return {}
    found: dict[int, Image.Image] = {}
    for shard in shards:
        table = read_shard(shard, columns=[schema.IMAGE_ID, schema.IMAGE])
        for image_id, data in zip(table[schema.IMAGE_ID].to_pylist(), table[schema.IMAGE].to_pylist()):
            if image_id in ids and image_id not in found:
                try:
                    found[image_id] = thumbnail(decode_image(data), cell)
                except DecodeError:
                    continue
        if len(found) == len(ids):
            break
    return found


def contact_sheet(thumbs: list[tuple[int, str | None, Image.Image]], originals: dict[int, Image.Image], cell: int) -> Image.Image:
    """One line per image: original | result, centred in ``cell`` squares, labelled with id and file name."""
    columns = 2 if originals else 1
    pad = 4
    line = cell + LABEL_HEIGHT + pad
    sheet = Image.new("RGB", (columns * (cell + pad) + pad, len(thumbs) * line + pad), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for n, (image_id, file_name, result) in enumerate(thumbs):
        top = pad + n * line
        draw.text((pad, top), f"{image_id} {file_name or ''}"[:60], fill=(220, 220, 220))
        pictures = [originals.get(image_id), result] if originals else [result]
        for k, picture in enumerate(pictures):
            left = pad + k * (cell + pad)
            if picture is None:
                draw.text((left + 4, top + LABEL_HEIGHT + cell // 2), "original not found", fill=(200, 80, 80))
                continue
            sheet.paste(picture, (left + (cell - picture.width) // 2, top + LABEL_HEIGHT + (cell - picture.height) // 2))
    return sheet

