"""Helpers the model stages share: batch pixels in, checked boxes in, ragged columns out, a device.

Box format everywhere in this module is **xyxy** (x1, y1, x2, y2) in the pixels of the decoded
image, the format of ``boxes`` and ``proposals`` columns. COCO's **xywh** only appears in ground
truth; :func:`parse_boxes` refuses boxes whose x2 < x1 or y2 < y1 with a message that says so,
which catches xywh boxes fed to a stage by mistake.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def encode_column_crops(
    flat: torch.Tensor, shapes: Sequence[tuple[int, int]], offsets: Sequence[tuple[int, int]], height: int, width: int
) -> list[dict]:
    """Binary masks given as crops -> compressed COCO RLEs at the full ``height x width``.

    Mask i is zero outside a crop of ``shapes[i] = (h, w)`` pixels whose top-left pixel is
    ``offsets[i] = (y0, x0)``; the crop must lie inside the image, and may be empty (``h * w``
    0: an empty mask). ``flat`` (bool, (sum of h * w,), any device) holds the crops one after
    the other, each flattened column by column -- Fortran order, the order of COCO's runs.

    The result is byte for byte :func:`encode_masks` of the full-size masks, at the cost of the
    crops only: no full-size array is made. The runs of ones are found in ``flat`` by a few
    whole-tensor operations (on the GPU when ``flat`` is there; a crop column's first and last
    pixel end a run, since the pixels around the crop are zero), one copy brings their start
    and end positions to the CPU, where they become indices of the full mask in column-major
    order. A run that reaches the bottom row and goes on at the top of the next column (a crop
    spanning the image's height) is one run there, so such pairs join. The counts -- pixels
    before the first one, then alternately ones and zeros, no empty run at the end -- are what
    pycocotools' ``rleEncode`` gives, and pycocotools compresses them into its string format.
    """
    n = len(shapes)
    if n == 0:
        return []
    hs, ws = (np.array(v, np.int64).reshape(n) for v in zip(*shapes))
    y0s, x0s = (np.array(v, np.int64).reshape(n) for v in zip(*offsets))
    empty = hs * ws == 0
    outside = ~empty & ((y0s < 0) | (x0s < 0) | (y0s + hs > height) | (x0s + ws > width))
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(f"crop {hs[i]}x{ws[i]} at (y {y0s[i]}, x {x0s[i]}) is not inside the {height}x{width} image")
    sizes = np.where(empty, 0, hs * ws)
    starts = np.concatenate(([0], np.cumsum(sizes)))  # crop i is flat[starts[i]:starts[i + 1]]
    if flat.shape != (starts[-1],):
        raise ValueError(f"flat has shape {tuple(flat.shape)}; the crops' shapes add up to ({starts[-1]},)")

    # The first pixel of every crop column in flat; the last is h - 1 further.
    columns = np.where(empty, 0, ws)
    crop_of_column = np.repeat(np.arange(n), columns)
    column_in_crop = np.arange(columns.sum()) - np.repeat(np.cumsum(columns) - columns, columns)
    first = starts[crop_of_column] + column_in_crop * hs[crop_of_column]
    last = first + hs[crop_of_column] - 1
    device = flat.device
    flat = flat.to(torch.bool)
    before = torch.zeros_like(flat)  # the pixel before in the same column (zero above the crop)
    before[1:] = flat[:-1]
    before[torch.from_numpy(first).to(device)] = False
    after = torch.zeros_like(flat)  # the pixel after in the same column (zero below the crop)
    after[:-1] = flat[1:]
    after[torch.from_numpy(last).to(device)] = False
    edges = torch.nonzero(torch.stack((flat & ~before, flat & ~after))).cpu().numpy()
    runs = len(edges) // 2  # rows (0, first one of a run) then rows (1, last one), each in flat order
    run_first, run_last = edges[:runs, 1], edges[runs:, 1]

    # To the full mask's column-major indices: a run's start, and the index after its last one.
    crop = np.searchsorted(starts, run_first, side="right") - 1
    local = run_first - starts[crop]
    begin = (x0s[crop] + local // hs[crop]) * height + y0s[crop] + local % hs[crop]
    end = begin + (run_last - run_first) + 1
    changes = np.empty(2 * runs, np.int64)
    changes[0::2], changes[1::2] = begin, end
    joined = (end[:-1] == begin[1:]) & (crop[:-1] == crop[1:])
    keep = np.ones(2 * runs, bool)
    keep[1:-1:2][joined] = False
    keep[2::2][joined] = False
    changes, change_crop = changes[keep], np.repeat(crop, 2)[keep]

    # Counts: the pixels from the previous change (or 0) to each change, then to the end of the
    # mask -- left out when the last run of ones ends at the last pixel.
    area = height * width
    bounds = np.searchsorted(change_crop, np.arange(n + 1))  # crop i's changes: changes[bounds[i]:bounds[i + 1]]
    some = bounds[1:] > bounds[:-1]
    previous = np.empty_like(changes)
    previous[1:] = changes[:-1]
    previous[bounds[:-1][some]] = 0
    last_change = np.zeros(n, np.int64)
    last_change[some] = changes[bounds[1:][some] - 1]
    tails = area - last_change
    counts = np.split(changes - previous, bounds[1:-1])
    uncompressed = [
        {"size": [height, width], "counts": np.append(c, tail) if tail else c} for c, tail in zip(counts, tails.tolist())
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
