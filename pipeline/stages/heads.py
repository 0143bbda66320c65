"""Detect, plus one more R-CNN head (masks, keypoints): what the masks and keypoints stages share.

Three modes, chosen by the spec's keys (see :mod:`pipeline.stages.chain` for how stages connect):

* default: the model detects, then its extra head runs on its own detections; the stage writes
  the detect columns (:data:`pipeline.stages.detect.DETECT_COLUMNS`) plus the head's columns;
* ``proposals_column``: the same on an earlier stage's proposals (Fast R-CNN);
* ``boxes_column``: only the extra head, on boxes an earlier stage found (e.g. ``detect``); the
  stage writes only the head's columns, aligned with those boxes.

A subclass names its head's columns (``head_columns`` on the spec) and computes them twice: from a
full forward's outputs (:meth:`HeadStage.head_outputs`) and for given boxes
(:meth:`HeadStage.head_on_boxes`); everything else here is common.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from pipeline import schema
from pipeline.models.registry import get_entry, list_models
from pipeline.stages.common import batch_images, parse_boxes, prefixed
from pipeline.stages.detect import DETECT_COLUMNS, DetectSpec, DetectStage


class HeadSpec(DetectSpec):
    """Detect's keys plus ``boxes_column``; the model must have the head (``task``)."""

    task: ClassVar[str]  # the registry task of the models with this head: "masks", "keypoints"
    head: ClassVar[str]  # how the messages name the head: "mask", "keypoint"
    head_columns: ClassVar[dict[str, pa.DataType]]  # what the head writes, before output_prefix

    boxes_column: str | None = Field(None, description="run only the head, on this earlier stage's boxes (xyxy), instead of detecting")

    @field_validator("model")
    @classmethod
    def _model_has_the_head(cls, value: str) -> str:
        if get_entry(value).task != cls.task:
            raise ValueError(f"{value} has no {cls.head} head; use one of {', '.join(list_models(cls.task))}")
        return value

    @model_validator(mode="after")
    def _one_box_source(self) -> "HeadSpec":
        if self.boxes_column and self.proposals_column:
            raise ValueError(
                f"boxes_column and proposals_column exclude each other (boxes: {self.head} head only; proposals: Fast R-CNN)"
            )
        return self

    def input_columns(self) -> dict[str, tuple[str, pa.DataType]]:
        if self.boxes_column:
            return {"boxes_column": (self.boxes_column, schema.BOXES_TYPE)}
        return super().input_columns()

    def output_columns(self) -> dict[str, pa.DataType]:
        columns = self.head_columns if self.boxes_column else {**DETECT_COLUMNS, **self.head_columns}
        return prefixed(columns, self.output_prefix)


class HeadStage(DetectStage):
    """A detector with one more head; subclasses call :meth:`use_boxes_column` in their ``__init__``."""

    boxes_column: str | None = None

    def use_boxes_column(self, boxes_column: str | None) -> None:
        """Run only the head on ``boxes_column``'s boxes (None: detect first).

        Checked here as well as in the spec: a stage built directly with both sources would
        otherwise quietly ignore the proposals.
        """
        if boxes_column and self.proposals_column:
            raise ValueError("boxes_column and proposals_column exclude each other")
        self.boxes_column = boxes_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = batch_images(batch)
        if self.boxes_column:
            boxes = [parse_boxes(cell, self.boxes_column) for cell in batch[self.boxes_column].to_pylist()]
            return self.append(batch, self.head_on_boxes(batch, images, boxes))
        outputs = self.predict(images, self.read_proposals(batch))
        return self.append(batch, {**self.columns(outputs), **self.head_outputs(outputs)})

    def head_outputs(self, outputs: list[dict]) -> dict[str, pa.Array]:
        """The head's columns (unprefixed names) from :meth:`predict`'s outputs, aligned with their boxes."""
        raise NotImplementedError

    def head_on_boxes(self, batch: pa.Table, images: list[np.ndarray], boxes: list[np.ndarray]) -> dict[str, pa.Array]:
        """The head's columns for given xyxy ``boxes`` (per image (N, 4) float32), aligned with them."""
        raise NotImplementedError
