"""A deterministic synthetic dataset of shapes with exact boxes and instance masks.

It is the project's embedded sample data: tests, the demo and the training recipe use it because
its ground truth is exact by construction (no labelling noise) and it needs no download.

Each image (PNG, lossless) has a textured background and 1-4 filled shapes (circle, rectangle,
triangle; rotated; sizes from 12% to 50% of the short side) that may overlap. Shapes are painted
in order, so a later shape occludes an earlier one: the ground-truth mask is the *visible* part,
the bbox (xywh) is that mask's tight box, and ``area`` is its pixel count. A shape left with fewer
than ``MIN_VISIBLE_PIXELS`` visible pixels is not labelled.

Image ``i`` depends only on (seed, i), so the first k images of a 1,000-image set equal a k-image set.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from pipeline import schema
from pipeline.data.shards import DatasetMeta, ShardWriter, write_meta

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
MIN_VISIBLE_PIXELS = 16


def _shape_polygon(rng: np.random.Generator, category: int, cx: float, cy: float, r: float) -> list[tuple]:
    """Vertices of a rotated shape of 'radius' r around (cx, cy); circles get many vertices."""
    angle = rng.uniform(0, 2 * math.pi)
    if category == 1:
        n, radii = 64, [r] * 64
    elif category == 2:
        aspect = rng.uniform(0.5, 1.0)
        half_w, half_h = r, r * aspect
        corners = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]
    else:
        n, radii = 3, [r] * 3
    return [
        (cx + radii[k] * math.cos(angle + 2 * math.pi * k / n), cy + radii[k] * math.sin(angle + 2 * math.pi * k / n))
        for k in range(n)
    ]


def synth_image(seed: int, index: int, size: int = 128) -> tuple[bytes, int, int, list[dict]]:
    """Render image ``index`` of the set ``seed``: (png_bytes, width, height, coco_annotations)."""
    rng = np.random.default_rng([seed, index])
    width = int(rng.integers(int(size * 0.75), int(size * 1.25) + 1))
    height = int(rng.integers(int(size * 0.75), int(size * 1.25) + 1))

    # Background: a colour gradient plus noise, so the detector cannot rely on flat colour.
    base = rng.uniform(0, 255, size=3)
    grad = rng.uniform(-60, 60, size=3)
    ramp = np.linspace(0, 1, width)[None, :, None]
    pixels = np.broadcast_to(base + grad * ramp, (height, width, 3)).copy()

    labels = np.zeros((height, width), dtype=np.int32)  # which shape (1-based) owns each pixel
    shapes = []
    short = min(width, height)
    for k in range(1, int(rng.integers(1, 5)) + 1):
        category = int(rng.integers(1, len(CATEGORIES) + 1))
        r = rng.uniform(0.06, 0.25) * short
        cx = rng.uniform(r, width - r)
        cy = rng.uniform(r, height - r)
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - base).sum() < 120:  # keep shapes distinguishable from the background
            colour = 255 - base
        canvas = Image.new("L", (width, height), 0)
        ImageDraw.Draw(canvas).polygon(_shape_polygon(rng, category, cx, cy, r), fill=1)
        drawn = np.asarray(canvas, dtype=bool)
        labels[drawn] = k
        pixels[drawn] = colour
        shapes.append(category)

    pixels += rng.normal(0, 8, size=pixels.shape)
    rgb = np.clip(pixels, 0, 255).astype(np.uint8)

    annotations = []
    for k, category in enumerate(shapes, start=1):
        visible = labels == k
        area = int(visible.sum())
        if area < MIN_VISIBLE_PIXELS:
            continue
        ys, xs = np.nonzero(visible)
        x0, y0 = int(xs.min()), int(ys.min())
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        annotations.append(
            {
                "id": (index + 1) * 10 + k,
                "category_id": category,
                "bbox": [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)],
                "area": float(area),
                "iscrowd": 0,
                "segmentation": {"rle": {"size": [height, width], "counts": rle["counts"].decode("ascii")}},
            }
        )

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue(), width, height, annotations


def synth_dataset(out: str, *, images: int, seed: int, size: int = 128, rows_per_shard: int = 256, overwrite: bool = False) -> dict:
    """Write ``images`` synthetic images as a dataset at ``out`` (empty, or ``overwrite``); returns counts."""
    writer = ShardWriter(out, rows_per_shard, schema.IMAGE_SCHEMA, overwrite=overwrite)
    n_annotations = 0
    for index in range(images):
        png, width, height, annotations = synth_image(seed, index, size)
        n_annotations += len(annotations)
        writer.add(
            {
                schema.IMAGE_ID: index + 1,
                schema.FILE_NAME: f"synth-{seed}-{index:06d}.png",
                schema.WIDTH: width,
                schema.HEIGHT: height,
                schema.IMAGE: png,
                schema.ANNOTATIONS: annotations,
            }
        )
    writer.flush()
    info = {"description": "pipeline synthetic shapes", "seed": seed, "size": size, "images": images}
    write_meta(out, DatasetMeta(categories=CATEGORIES, info=info))
    return {"images": images, "annotations": n_annotations, "shards": writer.shards_written}
