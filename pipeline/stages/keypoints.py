"""Person keypoints with torchvision Keypoint R-CNN (``keypointrcnn_resnet50_fpn``).

Output per image: the detect stage's columns (``boxes`` xyxy float32, ``scores``, ``labels``,
``category_ids``; see :mod:`pipeline.stages.detect`) plus ``keypoints``: per box one flat float32
list ``[x1, y1, v1, x2, y2, v2, ...]`` of K keypoints (K = 17 for COCO persons, in COCO's order:
nose, left_eye, right_eye, left_ear, right_ear, left_shoulder, ...) in the decoded image's pixels.
This is the layout of a COCO keypoint result. ``v`` is torchvision's visibility flag, which is
always 1 for a predicted keypoint.

Modes, as for masks (see :mod:`pipeline.stages.masks`): default (detect, then keypoints),
``proposals_column`` (Fast R-CNN on earlier proposals), and ``boxes_column``: keypoints for
boxes an earlier stage found (e.g. a detect stage's persons); only the keypoint head runs and
the stage writes only ``keypoints``, aligned with those boxes. The keypoint head is not
class-specific, so no labels are needed. A box with nothing inside the image gets all-zero
keypoints (v = 0: COCO's "not labelled").
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, PositiveInt, field_validator, model_validator

from pipeline import schema
from pipeline.models.registry import get_entry, list_models
from pipeline.stages.common import batch_images, parse_boxes, ragged_vectors
from pipeline.stages.detect import DetectSpec, DetectStage
from pipeline.stages.rcnn import heads_on_boxes


class KeypointsStage(DetectStage):
    """Keypoint R-CNN on a batch of decoded images; keypoints aligned with the boxes.

    Example::

        stage = KeypointsStage(model="keypointrcnn_resnet50_fpn", weights="none", num_classes=2)
        out = stage(batch)  # + boxes, scores, labels, category_ids, keypoints
    """

    writes: ClassVar[dict[str, pa.DataType]] = {**DetectStage.writes, schema.KEYPOINTS: schema.KEYPOINTS_TYPE}
    head_writes: ClassVar[dict[str, pa.DataType]] = {schema.KEYPOINTS: schema.KEYPOINTS_TYPE}
    task: ClassVar[str] = "keypoints"

    def __init__(self, *, boxes_column: str | None = None, **detect_kwargs: Any):
        if boxes_column and detect_kwargs.get("proposals_column"):
            raise ValueError("boxes_column and proposals_column exclude each other")
        detect_kwargs.setdefault("num_classes", 2)
        super().__init__(**detect_kwargs)
        self.boxes_column = boxes_column
        self.writes = self.output_columns(output_prefix=self.output_prefix, boxes_column=boxes_column)

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = batch_images(batch)
        if self.boxes_column:
            boxes = [parse_boxes(cell, self.boxes_column) for cell in batch[self.boxes_column].to_pylist()]
            return self.append(batch, {schema.KEYPOINTS: ragged_vectors(self.locate(images, boxes))})
        outputs = self.predict(images, self.read_proposals(batch))
        columns = self.columns(outputs)
        columns[schema.KEYPOINTS] = ragged_vectors([flat_keypoints(o["keypoints"]) for o in outputs])
        return self.append(batch, columns)

    @torch.inference_mode()
    def locate(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """Keypoints (N, 3K) float32 for given xyxy boxes; only the keypoint head runs."""
        kps = heads_on_boxes(
            self.model, self.to_tensors(images), [torch.from_numpy(b).to(self.device) for b in boxes], task="keypoints"
        )
        return [flat_keypoints(k.cpu().numpy()) for k in kps]


def flat_keypoints(keypoints: np.ndarray) -> np.ndarray:
    """torchvision's (N, K, 3) keypoints -> (N, 3K) float32 rows ``[x1, y1, v1, x2, y2, v2, ...]``."""
    keypoints = np.asarray(keypoints, np.float32)
    return keypoints.reshape(keypoints.shape[0], keypoints.shape[1] * keypoints.shape[2])


class KeypointsSpec(DetectSpec):
    """Parameters of a ``keypoints`` stage (see jobs/keypoints.yaml); detect's keys plus the ones below."""

    type_name: ClassVar[str] = "keypoints"

    model: str = Field("keypointrcnn_resnet50_fpn", description="a Keypoint R-CNN: " + ", ".join(list_models("keypoints")))
    num_classes: PositiveInt | None = Field(2, description="classes incl. background: 2 = background + person")
    boxes_column: str | None = Field(None, description="keypoints for this earlier stage's boxes (xyxy) instead of detecting")

    @field_validator("model")
    @classmethod
    def _keypoint_model(cls, value: str) -> str:
        if get_entry(value).task != "keypoints":
            raise ValueError(f"{value} has no keypoint head; use one of {', '.join(list_models('keypoints'))}")
        return value

    @model_validator(mode="after")
    def _one_box_source(self) -> "KeypointsSpec":
        if self.boxes_column and self.proposals_column:
            raise ValueError(
                "boxes_column and proposals_column exclude each other (boxes: keypoint head only; proposals: Fast R-CNN)"
            )
        return self

    @classmethod
    def stage_class(cls) -> type:
        return KeypointsStage

    def input_columns(self) -> dict[str, tuple[str, pa.DataType]]:
        if self.boxes_column:
            return {"boxes_column": (self.boxes_column, schema.BOXES_TYPE)}
        return super().input_columns()

    def output_columns(self) -> dict[str, pa.DataType]:
        return KeypointsStage.output_columns(output_prefix=self.output_prefix, boxes_column=self.boxes_column)

    def stage_kwargs(self, categories: list[dict]) -> dict[str, Any]:
        return {**super().stage_kwargs(categories), "boxes_column": self.boxes_column}
