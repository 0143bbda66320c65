"""Tiny image and label-map files on disk, as a user's VOC-style folders hold them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_rgb(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random RGB image written as PNG (or JPEG, by extension); returns its pixels as written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def write_grey(path: Path, values) -> np.ndarray:
    """An 8-bit grey PNG holding ``values`` (category ids) exactly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.asarray(values, np.uint8)
    Image.fromarray(values, mode="L").save(path)
    return values
