"""numpy <-> Arrow for the ragged per-image outputs (N boxes per row) that stages write."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def ragged(values: list[np.ndarray | None], value_type: pa.DataType) -> pa.Array:
    """Per-row 1-D arrays -> ``list<value_type>``; None stays a null row (not an empty list)."""
    return pa.array([None if v is None else np.asarray(v).tolist() for v in values], pa.list_(value_type))


def ragged_boxes(values: list[np.ndarray | None]) -> pa.Array:
    """Per-row (N, 4) float arrays -> ``list<fixed_size_list<float32, 4>>`` without Python loops per box."""
    valid = [v for v in values if v is not None]
    flat = np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in valid]) if valid else np.zeros(0, np.float32)
    boxes = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), 4)
    counts = np.array([0 if v is None else len(v) for v in values], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    mask = pa.array([v is None for v in values], pa.bool_())
    return pa.ListArray.from_arrays(offsets, boxes, mask=mask)


def boxes_to_numpy(cell: list | None) -> np.ndarray:
    """One row's ``boxes`` value (as from ``to_pylist``) -> float32 array of shape (N, 4)."""
    if not cell:
        return np.zeros((0, 4), np.float32)
    return np.asarray(cell, dtype=np.float32).reshape(-1, 4)
