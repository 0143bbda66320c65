"""A stage for fault tests: deterministic output, adjustable pace, fails on request.

It writes ``pixel_sum`` (sum of the decoded pixels) so runs can be compared row by row, sleeps
``sleep_s`` per image so a test can act mid-job, and raises for ``image_id >= fail_from`` (or on
everything once the file ``fail_if_exists`` appears) like a broken stage would. It is shipped to Ray workers by value (tests are not an installed package).
"""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.config.spec import StageSpec
from pipeline.stages.common import batch_images


class ProbeStage:
    writes: ClassVar[dict[str, pa.DataType]] = {"pixel_sum": pa.int64()}

    def __init__(self, *, sleep_s: float = 0.0, fail_from: int | None = None, fail_if_exists: str | None = None):
        self.sleep_s, self.fail_from, self.fail_if_exists = sleep_s, fail_from, fail_if_exists

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.fail_if_exists and os.path.exists(self.fail_if_exists):
            raise RuntimeError(f"probe: {self.fail_if_exists} exists")
        if self.fail_from is not None and pc.max(batch[schema.IMAGE_ID]).as_py() >= self.fail_from:
            raise RuntimeError(f"probe: refusing image ids >= {self.fail_from}")
        time.sleep(self.sleep_s * batch.num_rows)
        sums = [int(img.sum()) for img in batch_images(batch)]
        return batch.append_column("pixel_sum", pa.array(sums, pa.int64()))


class ProbeSpec(StageSpec):
    type_name: ClassVar[str] = "probe"
    sleep_s: float = 0.0
    fail_from: int | None = None
    fail_if_exists: str | None = None

    def stage_kwargs(self, categories: list[dict]) -> dict[str, Any]:
        return {"sleep_s": self.sleep_s, "fail_from": self.fail_from, "fail_if_exists": self.fail_if_exists}

    @classmethod
    def stage_class(cls) -> type:
        return ProbeStage
