"""Draw predictions on their images, so a person can look at what a job produced.

A prediction dataset holds no image bytes; they are read from the job's input dataset (named in
the predictions' ``dataset.json`` as ``info.source``, or given explicitly) and joined by
``image_id``. Boxes are drawn from ``boxes`` (xyxy), masks from ``masks`` (RLE, filled at 40%),
keypoints from ``keypoints`` (visible points), labelled with category names and scores.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from pipeline import schema
from pipeline.data.decode import DecodeError, decode_image
from pipeline.data.shards import list_shards, read_meta, read_shard, shard_schema

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def render_predictions(pred: str, out_dir: str, *, images: str | None = None, limit: int = 8, min_score: float = 0.3) -> list[str]:
    """Write up to ``limit`` PNGs of predictions drawn on their images; returns their paths."""
    meta = read_meta(pred)
    source = images or meta.info.get("source")
    if not source:
        raise ValueError(f"{pred}: dataset.json names no source dataset; pass the images dataset explicitly")
    names = {int(c["id"]): c.get("name", str(c["id"])) for c in meta.categories}
    wanted = [schema.IMAGE_ID, schema.BOXES, schema.SCORES, schema.CATEGORY_IDS, schema.MASKS, schema.KEYPOINTS, schema.ERROR]
    rows = []
    for shard in list_shards(pred):
        present = shard_schema(shard).names
        rows += read_shard(shard, columns=[c for c in wanted if c in present]).to_pylist()
        if len(rows) >= limit:
            break
    rows = rows[:limit]
    ids = {r[schema.IMAGE_ID] for r in rows}
    pictures: dict[int, bytes] = {}
    for shard in list_shards(source):
        table = read_shard(shard, columns=[schema.IMAGE_ID, schema.IMAGE])
        for image_id, data in zip(table[schema.IMAGE_ID].to_pylist(), table[schema.IMAGE].to_pylist()):
            if image_id in ids:
                pictures[image_id] = data
        if len(pictures) == len(ids):
            break
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for row in rows:
        try:
            rgb = decode_image(pictures.get(row[schema.IMAGE_ID]))
        except DecodeError:
            continue  # an error row: nothing to draw on
        path = os.path.join(out_dir, f"{row[schema.IMAGE_ID]}.png")
        draw_row(rgb, row, names, min_score).save(path)
        written.append(path)
    return written


def draw_row(rgb: np.ndarray, row: dict, names: dict[int, str], min_score: float) -> Image.Image:
    canvas = rgb.astype(np.float32)
    scores = row.get(schema.SCORES) or []
    keep = [i for i, s in enumerate(scores) if s >= min_score]
    for i in keep:
        masks = row.get(schema.MASKS)
        if masks and masks[i]:
            m = mask_utils.decode({"size": masks[i]["size"], "counts": masks[i]["counts"].encode("ascii")}).astype(bool)
            colour = np.array(PALETTE[i % len(PALETTE)], np.float32)
            canvas[m] = 0.6 * canvas[m] + 0.4 * colour
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    boxes = row.get(schema.BOXES) or []
    categories = row.get(schema.CATEGORY_IDS) or []
    for i in keep:
        colour = PALETTE[i % len(PALETTE)]
        x1, y1, x2, y2 = boxes[i]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        label = names.get(categories[i], str(categories[i])) if i < len(categories) else ""
        draw.text((x1 + 2, y1 + 1), f"{label} {scores[i]:.2f}", fill=colour)
        keypoints = row.get(schema.KEYPOINTS)
        if keypoints and keypoints[i]:
            k = np.asarray(keypoints[i]).reshape(-1, 3)
            for x, y, v in k:
                if v > 0:
                    draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    return image
