"""A stage for fault tests: deterministic output, adjustable pace, fails on request.

It writes ``pixel_sum`` (sum of the decoded pixels) so runs can be compared row by row, sleeps
``sleep_s`` per image so a test can act mid-job, and raises for ``image_id >= fail_from`` (or on
everything once the file ``fail_if_exists`` appears) like a broken stage would. It is shipped to Ray workers by value (tests are not an installed package).

It is also the smallest whole example of a stage module: a spec (settings, columns, the class it
builds) and a stage class; ``register(ProbeSpec)`` makes it a stage type (tests/engine/test_faults.py,
tests/stages/test_registry.py).
"""

from __future__ import annotations

import os
import time
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.config.spec import StageSpec
from pipeline.stages.common import batch_images

PROBE_COLUMNS: dict[str, pa.DataType] = {"pixel_sum": pa.int64()}


class ProbeSpec(StageSpec):
    type_name: ClassVar[str] = "probe"
    sleep_s: float = 0.0
    fail_from: int | None = None
    fail_if_exists: str | None = None

    @classmethod
    def stage_class(cls) -> type:
        return ProbeStage

    def input_columns(self) -> dict[str, tuple[str, pa.DataType]]:
        return {}

    def output_columns(self) -> dict[str, pa.DataType]:
        return dict(PROBE_COLUMNS)


DEFAULT = ProbeSpec.defaults()


class ProbeStage:
    def __init__(
        self,
        *,
        sleep_s: float = DEFAULT.sleep_s,
        fail_from: int | None = DEFAULT.fail_from,
        fail_if_exists: str | None = DEFAULT.fail_if_exists,
    ):
        self.sleep_s, self.fail_from, self.fail_if_exists = sleep_s, fail_from, fail_if_exists

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.fail_if_exists and os.path.exists(self.fail_if_exists):
            raise RuntimeError(f"probe: {self.fail_if_exists} exists")
        if self.fail_from is not None and pc.max(batch[schema.IMAGE_ID]).as_py() >= self.fail_from:
            raise RuntimeError(f"probe: refusing image ids >= {self.fail_from}")
        time.sleep(self.sleep_s * batch.num_rows)
        sums = [int(img.sum()) for img in batch_images(batch)]
        return batch.append_column("pixel_sum", pa.array(sums, PROBE_COLUMNS["pixel_sum"]))
