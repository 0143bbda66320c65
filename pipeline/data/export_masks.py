"""Write a segment stage's predictions as label maps: one palette PNG per image, as VOC stores them.

Each file is an (H, W) map at the image's size whose pixel values are category ids: the id of the
``semantic_masks`` entry covering the pixel, 255 where none does or its category is -1 (unmapped),
i.e. VOC's "void". The palette is VOC's colour map (:func:`pipeline.data.label_maps.voc_palette`), so
the file opens as a coloured picture and reads back by index (``np.asarray(Image.open(f))``).

Names follow the image's ``file_name``, its folders kept, with ``.png`` (``a/b.jpg`` ->
``OUT/a/b.png``): where ``pipeline data import-images IMAGES --labels OUT`` looks for an image's label
map, so an export imports back as ground truth. A row without a file name gets ``<image_id>.png``; a
name this export has already written (``a.jpg`` and ``a.png``) becomes ``<stem>_<image_id>.png``,
listed in the result. Error rows and rows without masks have no file; they are counted.
"""

from __future__ import annotations

import os
import posixpath

import numpy as np

from pipeline import schema
from pipeline.data.label_maps import EXTENSION, IGNORE, UNLABELLED, category_map, encode_png_label_map
from pipeline.data.shards import DatasetError, iter_shard, list_shards, read_meta, shard_schema

COLUMNS = (schema.SEMANTIC_CATEGORY_IDS, schema.SEMANTIC_MASKS)


def export_masks(pred: str, out_dir: str, *, overwrite: bool = False) -> dict:
    """Write one label PNG per predicted image of ``pred`` into ``out_dir``; returns counts and paths.

    ``{"written": n, "error_rows": n, "empty_rows": n, "renamed": [(image_id, name)], "paths": [...]}``.
    A non-empty ``out_dir`` is refused unless ``overwrite``; a category id that a uint8 map cannot
    hold (over 254) is refused before anything is written (the dataset's categories) or at its row.
    """
    shards = list_shards(pred)
    if not any(set(COLUMNS) <= set(shard_schema(s).names) for s in shards):
        available = sorted({n for s in shards for n in shard_schema(s).names} - set(schema.PREDICTION_BASE_SCHEMA.names))
        raise DatasetError(f"{pred} has no {schema.SEMANTIC_MASKS!r} column (its prediction columns: "
                           f"{', '.join(available) or 'none'}); export-masks writes a segment stage's output")
    too_big = [c["id"] for c in read_meta(pred).categories if int(c["id"]) >= IGNORE]
    if too_big:
        raise DatasetError(f"{pred}: category id(s) {too_big[:5]} do not fit an 8-bit label map (0..{IGNORE - 1}; {IGNORE} = unlabelled)")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise DatasetError(f"output {out_dir} is not empty; pass --overwrite to write into it, or choose an empty folder")
    os.makedirs(out_dir, exist_ok=True)
    paths, renamed, taken = [], [], set()
    error_rows = empty_rows = 0
    wanted = [schema.IMAGE_ID, schema.FILE_NAME, schema.WIDTH, schema.HEIGHT, schema.ERROR, *COLUMNS]
    for shard in shards:
        for table in iter_shard(shard, 64, columns=wanted):
            for row in table.to_pylist():
                if row.get(schema.ERROR) is not None:
                    error_rows += 1
                    continue
                if row.get(schema.SEMANTIC_MASKS) is None:
                    empty_rows += 1
                    continue
                values = label_values(row, where=f"{shard}: image_id {row[schema.IMAGE_ID]}")
                name = mask_name(row[schema.IMAGE_ID], row.get(schema.FILE_NAME))
                if name in taken:
                    name = _other_name(name, row[schema.IMAGE_ID], taken)
                    renamed.append((row[schema.IMAGE_ID], name))
                taken.add(name)
                path = os.path.join(out_dir, *name.split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(encode_png_label_map(values))
                paths.append(path)
    return {"written": len(paths), "error_rows": error_rows, "empty_rows": empty_rows, "renamed": renamed, "paths": paths}


def label_values(row: dict, *, where: str) -> np.ndarray:
    """A prediction row's (H, W) uint8 label map: category ids, 255 where unlabelled (-1 or no mask)."""
    masks = row[schema.SEMANTIC_MASKS]
    height, width = row.get(schema.HEIGHT), row.get(schema.WIDTH)
    if (height is None or width is None) and masks:
        height, width = (int(v) for v in masks[0]["size"])
    if not height or not width:
        raise DatasetError(f"{where}: no image size (width, height) and no mask to take it from")
    categories = category_map(row[schema.SEMANTIC_CATEGORY_IDS], masks, height, width, where=where, error=DatasetError)
    wrong = sorted({int(c) for c in np.unique(categories)} - {UNLABELLED} - set(range(IGNORE)))
    if wrong:
        raise DatasetError(f"{where}: category id(s) {wrong[:5]} do not fit an 8-bit label map (0..{IGNORE - 1}; {IGNORE} = unlabelled)")
    return np.where(categories == UNLABELLED, IGNORE, categories).astype(np.uint8)


def mask_name(image_id: int, file_name: str | None) -> str:
    """Relative posix path of an image's label map: ``file_name`` with ``.png``, folders kept
    (``..`` and empty parts dropped, so it stays inside the export); ``<image_id>.png`` without one."""
    parts = [p for p in (file_name or "").replace("\\", "/").split("/") if p not in ("", ".", "..")]
    stem = posixpath.splitext("/".join(parts))[0] if parts else ""
    return f"{stem}{EXTENSION}" if stem else f"{image_id}{EXTENSION}"


def _other_name(name: str, image_id: int, taken: set[str]) -> str:
    """``<stem>_<image_id>.png`` (then ``_2``, ``_3``... in the unlikely case that is taken too)."""
    stem = name[: -len(EXTENSION)]
    candidate, n = f"{stem}_{image_id}{EXTENSION}", 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}_{image_id}_{n}{EXTENSION}"
    return candidate
