"""A dataset seeded with every kind of awkward image users have: used by decode and runner tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline import schema
from pipeline.data.shards import DatasetMeta, ShardWriter, write_meta


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def bad_images() -> dict[str, tuple[bytes | None, str]]:
    """name -> (bytes, expectation) where expectation is 'ok' or 'error'."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    jpeg = _encode(rgb, "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    grey16 = Image.fromarray((np.arange(60 * 80, dtype=np.uint16).reshape(60, 80) * 13).astype(np.uint16))
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    return {
        "ok.png": (_encode(rgb, "PNG"), "ok"),
        "ok.jpg": (jpeg, "ok"),
        "cmyk.jpg": (_encode(rgb.convert("CMYK"), "JPEG"), "ok"),
        "grey.png": (_encode(rgb.convert("L"), "PNG"), "ok"),
        "rgba.png": (_encode(rgb.convert("RGBA"), "PNG"), "ok"),
        "grey16.png": (_encode(grey16, "PNG"), "ok"),
        "palette.png": (_encode(palette, "PNG", transparency=0), "ok"),
        "rotated.jpg": (_encode(rgb, "JPEG", exif=exif), "ok"),
        "corrupt.jpg": (b"\xff\xd8\xff\xe0 this is not really a jpeg", "error"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "error"),
        "empty.png": (b"", "error"),
        "missing.png": (None, "error"),
        "huge.png": (_encode(Image.new("RGB", (3000, 2000)), "PNG"), "error"),  # over the test's max_pixels
        "text.txt": (b"hello, I am not an image", "error"),
    }


HUGE_LIMIT = 1_000_000  # decode.max_pixels for tests: huge.png (6 MP) is over it, the rest under


def write_bad_dataset(out: str, rows_per_shard: int = 5) -> dict[int, tuple[str, str]]:
    """Write the awkward images as a dataset; returns image_id -> (name, expectation)."""
    writer = ShardWriter(out, rows_per_shard, schema.IMAGE_SCHEMA)
    expected = {}
    for image_id, (name, (data, expectation)) in enumerate(bad_images().items(), start=1):
        writer.add({schema.IMAGE_ID: image_id, schema.FILE_NAME: name, schema.IMAGE: data, schema.WIDTH: 80, schema.HEIGHT: 60})
        expected[image_id] = (name, expectation)
    writer.flush()
    write_meta(out, DatasetMeta(categories=[{"id": 1, "name": "thing"}]))
    return expected
