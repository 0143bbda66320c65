"""Which columns each stage of a job reads and writes, checked before anything runs.

Stages chain through columns: ``proposals`` (selective search) -> ``detect`` with
``proposals_column: proposals``; ``detect`` -> ``keypoints`` with ``boxes_column: boxes``. Two
stages writing one column would silently overwrite each other's outputs (or break the row
schema), and a stage reading a column no earlier stage writes would fail on every row. Both are
spec errors, found here from the specs alone, without building a model:

* every stage spec declares ``input_columns() -> {config key: (column, arrow type)}`` and
  ``output_columns() -> {column: arrow type}`` (:class:`pipeline.config.spec.StageSpec`);
* every input column must be written by an *earlier* stage, with the type the reader expects;
* no column may be written twice, nor be one of the image columns a row already has.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline import schema
from pipeline.config.spec import StageSpec

ROW_COLUMNS = tuple(schema.PREDICTION_BASE_SCHEMA.names) + (schema.IMAGE, schema.PIXELS, schema.ANNOTATIONS)


def check_columns(stages: list[StageSpec]) -> list[str]:
    """Problems with the column flow of ``stages`` (in job order), one line each; empty when fine.

    Lines are formatted like the loader's: ``stages.1 (detect).proposals_column: ...``.
    """
    problems: list[str] = []
    written: dict[str, tuple[str, pa.DataType]] = {}  # column -> (which stage, type)
    for i, spec in enumerate(stages):
        where = f"stages.{i} ({spec.name})"
        for key, (column, dtype) in spec.input_columns().items():
            if column not in written:
                earlier = ", ".join(sorted(written)) or "none"
                problems.append(
                    f"{where}.{key}: column {column!r} is not written by an earlier stage (earlier stages write: {earlier})"
                )
            elif written[column][1] != dtype:
                problems.append(f"{where}.{key}: column {column!r} is {written[column][1]}, this stage needs {dtype}")
        for column, dtype in spec.output_columns().items():
            if column in ROW_COLUMNS:
                problems.append(f"{where}: would overwrite the image column {column!r}; set output_prefix")
            elif column in written:
                problems.append(
                    f"{where}: writes column {column!r}, which {written[column][0]} already writes; set output_prefix on "
                    "one of them (or, for masks/keypoints on earlier boxes, boxes_column)"
                )
            else:
                written[column] = (where, dtype)
    return problems
