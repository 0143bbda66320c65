"""A deterministic synthetic dataset of shapes with exact boxes and instance masks.

It is the project's embedded sample data: tests, the demo and the training recipe use it because
its ground truth is exact by construction (no labelling noise) and it needs no download.

Each image (PNG, lossless) has a textured background and 1-4 filled shapes (circle, rectangle,
triangle; rotated; sizes from 12% to 50% of the short side) that may overlap. Shapes are painted
in order, so a later shape occludes an earlier one: the ground-truth mask is the *visible* part,
the bbox (xywh) is that mask's tight box, and ``area`` is its pixel count. A shape left with fewer
than ``MIN_VISIBLE_PIXELS`` visible pixels is not labelled.

Image ``i`` depends only on (seed, i), so the first k images of a 1,000-image set equal a k-image set.

``classification=True`` makes an image classification set instead (:func:`synth_classification_image`):
the same background, one shape per image (same three categories), large (22-38% of the short side
as its 'radius') and near the centre (within 12% of the image size), at a random position, size,
rotation and colour; its category id is the image's ``label`` column, and the shape also gets its
instance annotation (visible mask, tight xywh box, area). Its images come from their own random
streams, so a classification set never repeats a detection set of the same seed.
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
    pixels, labels, base, width, height = _background(rng, size)
    shapes = []
    short = min(width, height)
    for k in range(1, int(rng.integers(1, 5)) + 1):
        category = int(rng.integers(1, len(CATEGORIES) + 1))
        r = rng.uniform(0.06, 0.25) * short
        cx = rng.uniform(r, width - r)
        cy = rng.uniform(r, height - r)
        _paint_shape(rng, pixels, labels, k, base, category, cx, cy, r)
        shapes.append(category)
    return _finish(rng, pixels, labels, shapes, index)


def synth_classification_image(seed: int, index: int, size: int = 128) -> tuple[bytes, int, int, list[dict], int]:
    """Image ``index`` of the classification set ``seed``: (png_bytes, width, height, coco_annotations, label).

    One shape, centred-ish and large, on the same background as :func:`synth_image`; ``label`` is its
    category id, and ``coco_annotations`` its one instance annotation (none only if fewer than
    ``MIN_VISIBLE_PIXELS`` pixels of it are visible, which needs an image of a few pixels).
    """
    rng = np.random.default_rng([seed, index, 1])  # a stream of its own: never synth_image's (seed, index)
    pixels, labels, base, width, height = _background(rng, size)
    category = int(rng.integers(1, len(CATEGORIES) + 1))
    r = rng.uniform(0.22, 0.38) * min(width, height)
    cx = width / 2 + rng.uniform(-0.12, 0.12) * width  # |offset| + r <= 0.5 of the side: the centre fits
    cy = height / 2 + rng.uniform(-0.12, 0.12) * height
    _paint_shape(rng, pixels, labels, 1, base, category, cx, cy, r)
    png, width, height, annotations = _finish(rng, pixels, labels, [category], index)
    return png, width, height, annotations, category


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(pixels (H, W, 3) float64, owner map (H, W) int32 of zeros, base colour (3,), width, height)."""
    width = int(rng.integers(int(size * 0.75), int(size * 1.25) + 1))
    height = int(rng.integers(int(size * 0.75), int(size * 1.25) + 1))

    # Background: a colour gradient plus noise, so the detector cannot rely on flat colour.
    base = rng.uniform(0, 255, size=3)
    grad = rng.uniform(-60, 60, size=3)
    ramp = np.linspace(0, 1, width)[None, :, None]
    pixels = np.broadcast_to(base + grad * ramp, (height, width, 3)).copy()
    labels = np.zeros((height, width), dtype=np.int32)  # which shape (1-based) owns each pixel
    return pixels, labels, base, width, height


def _paint_shape(rng, pixels: np.ndarray, labels: np.ndarray, k: int, base: np.ndarray, category: int, cx: float, cy: float, r: float) -> None:
    """Paint shape ``k`` (a random colour that stands out from ``base``) over ``pixels``; it owns its pixels in ``labels``."""
    height, width = labels.shape
    colour = rng.uniform(0, 255, size=3)
    if np.abs(colour - base).sum() < 120:  # keep shapes distinguishable from the background
        colour = 255 - base
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(_shape_polygon(rng, category, cx, cy, r), fill=1)
    drawn = np.asarray(canvas, dtype=bool)
    labels[drawn] = k
    pixels[drawn] = colour


def _finish(rng, pixels: np.ndarray, labels: np.ndarray, shapes: list[int], index: int) -> tuple[bytes, int, int, list[dict]]:
    """Noise, PNG encoding, and the annotation of each shape's visible part: (png_bytes, width, height, annotations)."""
    height, width = labels.shape
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


def synth_dataset(
    out: str, *, images: int, seed: int, size: int = 128, rows_per_shard: int = 256, overwrite: bool = False,
    classification: bool = False,
) -> dict:
    """Write ``images`` synthetic images as a dataset at ``out`` (empty, or ``overwrite``); returns counts.

    ``classification``: one shape per image (:func:`synth_classification_image`) and a ``label``
    column (int64, the shape's category id: :data:`pipeline.schema.LABEL`); the counts then add
    ``labels`` (images per category name). Otherwise 1-4 shapes per image and no ``label`` column.
    """
    writer = ShardWriter(out, rows_per_shard, schema.LABEL_IMAGE_SCHEMA if classification else schema.IMAGE_SCHEMA, overwrite=overwrite)
    n_annotations = 0
    per_label = dict.fromkeys((c["id"] for c in CATEGORIES), 0)
    for index in range(images):
        if classification:
            png, width, height, annotations, label = synth_classification_image(seed, index, size)
            per_label[label] += 1
            extra = {schema.LABEL: label}
            file_name = f"synth-classification-{seed}-{index:06d}.png"
        else:
            png, width, height, annotations = synth_image(seed, index, size)
            extra = {}
            file_name = f"synth-{seed}-{index:06d}.png"
        n_annotations += len(annotations)
        writer.add(
            {
                schema.IMAGE_ID: index + 1,
                schema.FILE_NAME: file_name,
                schema.WIDTH: width,
                schema.HEIGHT: height,
                schema.IMAGE: png,
                schema.ANNOTATIONS: annotations,
                **extra,
            }
        )
    writer.flush()
    info = {"description": "pipeline synthetic shapes", "seed": seed, "size": size, "images": images}
    if classification:
        info = {**info, "description": "pipeline synthetic shapes, one per image (classification)", "classification": True}
    write_meta(out, DatasetMeta(categories=CATEGORIES, info=info))
    counts = {"images": images, "annotations": n_annotations, "shards": writer.shards_written}
    if classification:
        counts["labels"] = {c["name"]: per_label[c["id"]] for c in CATEGORIES}
    return counts
