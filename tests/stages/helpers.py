"""Helpers for stage tests: decoded batches as a stage receives them, schema checks."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import schema
from pipeline.data.decode import decode_batch


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def make_batch(images: list[np.ndarray]) -> pa.Table:
    """Decoded batch (the table a stage receives): image columns + in-flight ``pixels``."""
    rows = [
        {"image_id": i, "file_name": f"{i}.png", "width": im.shape[1], "height": im.shape[0], "image": png(im)}
        for i, im in enumerate(images)
    ]
    return decode_batch(schema.image_table(rows))


def with_column(batch: pa.Table, name: str, values: list, dtype: pa.DataType) -> pa.Table:
    """``batch`` plus (or with replaced) column ``name``, as an earlier stage would have left it."""
    array = pa.array(values, dtype)
    if name in batch.column_names:
        return batch.set_column(batch.column_names.index(name), name, array)
    return batch.append_column(name, array)


def assert_declared_types(out: pa.Table, writes: dict[str, pa.DataType]) -> None:
    for name, dtype in writes.items():
        assert out.schema.field(name).type == dtype, name


def boxes_of(row: dict, column: str = schema.BOXES) -> np.ndarray:
    return np.asarray(row[column], np.float32).reshape(-1, 4)
