"""Decode encoded image bytes into RGB pixels: the stateless CPU step before the stages.

Every row comes out: a decodable image gets ``pixels`` (RGB uint8, HxWx3, row-major bytes) and
its decoded ``width``/``height``; anything else gets ``error`` with the reason and null pixels.
What is converted rather than refused:

* greyscale, palette, CMYK -> RGB (PIL's conversions);
* RGBA / LA -> RGB by dropping alpha (what torchvision and Detectron2 readers do);
* 16-bit greyscale PNG (modes I;16 / I) -> 8-bit by scaling 0..65535 to 0..255, not clipping;
* EXIF orientation is applied, so boxes come out in the frame a person sees.

Refused with a reason: empty or missing bytes, a truncated or corrupt file, a format PIL cannot
read, or more pixels than ``max_pixels`` (checked from the header, before decoding).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from pipeline import schema

DEFAULT_MAX_PIXELS = 64_000_000


class DecodeError(ValueError):
    pass


def decode_image(data: bytes | None, *, max_pixels: int = DEFAULT_MAX_PIXELS, exif_transpose: bool = True) -> np.ndarray:
    """Bytes -> RGB uint8 array of shape (H, W, 3). Raises DecodeError with a readable reason."""
    if data is None:
        raise DecodeError("no image bytes")
    if len(data) == 0:
        raise DecodeError("image bytes are empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeError(f"image is {w}x{h} = {w * h} pixels, over the limit decode.max_pixels={max_pixels}")
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image refused by PIL's decompression-bomb check: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files; all become reasons
        raise DecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def pixels_to_array(buf: bytes, height: int, width: int) -> np.ndarray:
    """The in-flight ``pixels`` column back to an (H, W, 3) uint8 array (zero-copy, read-only)."""
    return np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3)


def decode_batch(batch: pa.Table, *, max_pixels: int = DEFAULT_MAX_PIXELS, exif_transpose: bool = True) -> pa.Table:
    """Ray Data UDF: replace ``image`` (and ground truth) by ``pixels``; keep every row."""
    images = batch[schema.IMAGE].to_pylist()
    errors = batch[schema.ERROR].to_pylist() if schema.ERROR in batch.column_names else [None] * batch.num_rows
    widths = batch[schema.WIDTH].to_pylist()
    heights = batch[schema.HEIGHT].to_pylist()
    pixels: list[bytes | None] = []
    for i, data in enumerate(images):
        if errors[i] is not None:
            pixels.append(None)
            continue
        try:
            rgb = decode_image(data, max_pixels=max_pixels, exif_transpose=exif_transpose)
        except DecodeError as exc:
            errors[i] = str(exc)
            pixels.append(None)
            continue
        heights[i], widths[i] = int(rgb.shape[0]), int(rgb.shape[1])
        pixels.append(rgb.tobytes())
    out = batch.drop_columns([c for c in schema.IN_FLIGHT_COLUMNS if c in batch.column_names])
    out = _set(out, schema.WIDTH, pa.array(widths, pa.int32()))
    out = _set(out, schema.HEIGHT, pa.array(heights, pa.int32()))
    out = _set(out, schema.ERROR, pa.array(errors, pa.string()))
    # large_binary: a batch of big photos can exceed binary's 2 GiB offset limit.
    return out.append_column(schema.PIXELS, pa.array(pixels, pa.large_binary()))


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def encode_png(pixels: np.ndarray) -> bytes:
    """RGB uint8 (H, W, 3) -> PNG bytes (lossless: what was measured on the array is what is stored)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()
