"""Helpers the model stages share: batch pixels in, checked boxes in, ragged columns out, a device.

Box format everywhere in this module is **xyxy** (x1, y1, x2, y2) in the pixels of the decoded
image, the format of ``boxes`` and ``proposals`` columns. COCO's **xywh** only appears in ground
truth; :func:`parse_boxes` refuses boxes whose x2 < x1 or y2 < y1 with a message that says so,
which catches xywh boxes fed to a stage by mistake.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import pyarrow as pa
import torch
from pycocotools import mask as mask_utils

from pipeline import schema
from pipeline.data.decode import pixels_to_array


def batch_images(batch: pa.Table) -> list[np.ndarray]:
    """The in-flight ``pixels`` of a batch as RGB uint8 arrays of shape (H, W, 3)."""
    return [
        pixels_to_array(buf, h, w)
        for buf, h, w in zip(
            batch[schema.PIXELS].to_pylist(), batch[schema.HEIGHT].to_pylist(), batch[schema.WIDTH].to_pylist()
        )
    ]


def parse_boxes(cell, column: str) -> np.ndarray:
    """One row's boxes (list of [x1, y1, x2, y2], or a flat list of 4k values) -> float32 (N, 4).

    Raises ValueError with the column name and the reason for anything that is not a list of
    finite xyxy boxes: a null cell, a length that is not a multiple of 4, NaN/inf, x2 < x1.
    An empty list is valid and gives shape (0, 4).
    """
    if cell is None:
        raise ValueError(f"{column}: null for this row (the stage that writes it did not produce it)")
    try:
        values = np.asarray(cell, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{column}: not a list of [x1, y1, x2, y2] boxes ({exc})") from None
    if values.size == 0:
        return np.zeros((0, 4), np.float32)
    if values.ndim == 1:
        if values.size % 4:
            raise ValueError(f"{column}: {values.size} values is not a multiple of 4 (expected xyxy boxes)")
        values = values.reshape(-1, 4)
    if values.ndim != 2 or values.shape[1] != 4:
        raise ValueError(f"{column}: expected boxes of 4 values, got an array of shape {values.shape}")
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if len(bad):
        raise ValueError(f"{column}: box {bad[0]} is not finite: {values[bad[0]].tolist()}")
    bad = np.flatnonzero((values[:, 2] < values[:, 0]) | (values[:, 3] < values[:, 1]))
    if len(bad):
        raise ValueError(
            f"{column}: box {bad[0]} {values[bad[0]].tolist()} has x2 < x1 or y2 < y1; boxes must be xyxy, not COCO xywh"
        )
    return values.astype(np.float32)


def parse_labels(cell, column: str, count: int, num_classes: int) -> np.ndarray:
    """One row's model labels -> int64 (N,), checked against the box count and the class range."""
    if cell is None:
        raise ValueError(f"{column}: null for this row")
    labels = np.asarray(cell, dtype=np.int64).reshape(-1)
    if len(labels) != count:
        raise ValueError(f"{column}: {len(labels)} labels for {count} boxes")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise ValueError(f"{column}: label {labels[bad[0]]} outside the model's classes 0..{num_classes - 1}")
    return labels


def ragged_vectors(values: list[np.ndarray | None]) -> pa.Array:
    """Per-row (N, D) float arrays -> ``list<list<float32>>`` (e.g. N keypoint vectors of 3K values)."""
    valid = [np.asarray(v, np.float32) for v in values if v is not None]
    if any(v.ndim != 2 for v in valid):
        raise ValueError(f"ragged_vectors wants (N, D) arrays, got shapes {[v.shape for v in valid]}")
    flat = np.concatenate([v.reshape(-1) for v in valid]) if valid else np.zeros(0, np.float32)
    inner_lengths = np.concatenate([np.full(len(v), v.shape[1], np.int32) for v in valid]) if valid else np.zeros(0, np.int32)
    inner_offsets = pa.array(np.concatenate([[0], np.cumsum(inner_lengths)]).astype(np.int32))
    inner = pa.ListArray.from_arrays(inner_offsets, pa.array(flat, pa.float32()))
    counts = np.array([0 if v is None else len(v) for v in values], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, inner, mask=pa.array([v is None for v in values], pa.bool_()))


def encode_masks(masks: np.ndarray) -> list[dict]:
    """Binary masks (N, H, W) -> N compressed COCO RLEs ``{"size": [H, W], "counts": str}``.

    pycocotools wants a Fortran-ordered uint8 (H, W, N) array; its ``counts`` bytes are ASCII.
    """
    n, h, w = masks.shape
    if n == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [h, w], "counts": r["counts"].decode("ascii")} for r in rles]


def crop_run_lengths(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """COCO's uncompressed RLE counts of a ``height x width`` mask that is zero outside one crop.

    ``crop`` (bool, (h, w)) holds the mask's rows ``y0..y0+h-1`` and columns ``x0..x0+w-1``; it
    must lie inside the image. The counts are what pycocotools' ``rleEncode`` gives for the full
    mask: run lengths in column-major (Fortran) order, the first run a run of zeros (possibly of
    length 0), no empty run at the end. Only the crop is read, never a full-size array.
    """
    h, w = crop.shape
    area = height * width
    if not (0 <= y0 and y0 + h <= height and 0 <= x0 and x0 + w <= width):
        raise ValueError(f"crop {h}x{w} at (y {y0}, x {x0}) is not inside the {height}x{width} image")
    if crop.size == 0 or not crop.any():
        return np.array([area], np.int64)
    # Each crop column framed by a zero above and below: +1 where a run of ones starts, -1 after it ends.
    framed = np.zeros((w, h + 2), np.int8)
    framed[:, 1:-1] = crop.T
    cols, rows = np.nonzero(np.diff(framed, axis=1))
    # Index, in the full mask's column-major order, of the first pixel after each change. C order
    # of nonzero() makes these non-decreasing; an equal pair is a run that ends at the bottom of
    # one column (crop touches row height-1) and goes on at the top of the next (crop touches row
    # 0): no change there in the full mask, so both go.
    changes = (x0 + cols).astype(np.int64) * height + y0 + rows
    same = changes[1:] == changes[:-1]
    if same.any():
        keep = np.ones(len(changes), bool)
        keep[1:][same] = False
        keep[:-1][same] = False
        changes = changes[keep]
    if changes[-1] == area:  # ones up to the last pixel: that run is the last count
        changes = changes[:-1]
    return np.diff(np.concatenate(([0], changes, [area])))


def encode_mask_crops(crops: list[np.ndarray], offsets: list[tuple[int, int]], height: int, width: int) -> list[dict]:
    """Binary masks given as crops -> compressed COCO RLEs at the full ``height x width``.

    ``crops[i]`` (bool, (h, w)) sits at ``offsets[i] = (y0, x0)``; the mask is zero elsewhere. The
    result is byte for byte what :func:`encode_masks` gives for the full-size masks, at the cost of
    the crops only: the counts come from :func:`crop_run_lengths`, and pycocotools compresses them
    into its string format exactly as it does for its own encoder.
    """
    if not crops:
        return []
    uncompressed = [
        {"size": [height, width], "counts": crop_run_lengths(c, y0, x0, height, width)} for c, (y0, x0) in zip(crops, offsets)
    ]
    rles = mask_utils._mask.frUncompressedRLE(uncompressed, height, width)
    return [{"size": [height, width], "counts": r["counts"].decode("ascii")} for r in rles]


T = TypeVar("T")


def prefixed(columns: dict[str, T], prefix: str) -> dict[str, T]:
    """Output column names with a stage's ``output_prefix`` (``""`` keeps the schema names).

    The one place the prefix is applied: to the declared ``{column: type}`` of a spec's
    ``output_columns`` and to the ``{column: array}`` a stage appends (:func:`append_columns`).
    """
    return {prefix + name: value for name, value in columns.items()}


def append_columns(batch: pa.Table, columns: dict[str, pa.Array], prefix: str = "") -> pa.Table:
    """``batch`` with ``columns`` (schema names) appended, in order, under ``prefix + name``."""
    for name, values in prefixed(columns, prefix).items():
        batch = batch.append_column(name, values)
    return batch


def torch_device(device: str, threads: int | None) -> torch.device:
    """A stage's torch device (``cpu``/``cuda``), after setting its intra-op ``threads`` (None: torch's default).

    Raises where the stage asks for a GPU this node's torch cannot see: failing the actor at once
    beats running a GPU-sized pool on the CPU.
    """
    if threads:
        torch.set_num_threads(threads)
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("stage asks for a GPU (num_gpus > 0) but torch sees no CUDA device on this node")
    return resolved
