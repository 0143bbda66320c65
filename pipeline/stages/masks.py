"""Instance segmentation with torchvision Mask R-CNN (``maskrcnn_resnet50_fpn``, ``_v2``).

Output per image: the detect stage's columns (``boxes`` xyxy float32, ``scores``, ``labels``,
``category_ids``; see :mod:`pipeline.stages.detect`) plus ``masks``: one compressed COCO RLE
``{"size": [height, width], "counts": str}`` per box, in the same order. A mask is the model's
mask probability pasted into its box at the decoded image's size (torchvision does the pasting)
and thresholded as ``probability > mask_threshold`` -- the rule of torchvision's COCO reference
evaluation. Full-size masks exist only inside the stage; the output holds RLE strings, which is
what COCO tools read and what keeps a shard small.

Modes (keys shared with detect, see there):

* default: the model detects, then segments its own detections;
* ``proposals_column``: Fast R-CNN on an earlier stage's proposals, then segments;
* ``boxes_column``: segment boxes an earlier stage found (e.g. ``detect``): only the mask head
  runs, and the stage writes only ``masks``, aligned with those boxes. The mask head is
  class-specific, so it also reads each box's label from ``labels_column`` (the mask model's label
  space). Boxes are clipped to the image; a box with nothing inside the image gets an empty mask.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, field_validator, model_validator

from pipeline import schema
from pipeline.models.registry import get_entry, list_models
from pipeline.stages.common import batch_images, encode_masks, parse_boxes, parse_labels
from pipeline.stages.detect import DetectSpec, DetectStage
from pipeline.stages.rcnn import heads_on_boxes


class MasksStage(DetectStage):
    """Mask R-CNN on a batch of decoded images; masks as COCO RLE aligned with the boxes.

    Example::

        stage = MasksStage(model="maskrcnn_resnet50_fpn", weights="none", num_classes=4)
        out = stage(batch)  # + boxes, scores, labels, category_ids, masks
    """

    writes: ClassVar[dict[str, pa.DataType]] = {**DetectStage.writes, schema.MASKS: schema.MASKS_TYPE}
    head_writes: ClassVar[dict[str, pa.DataType]] = {schema.MASKS: schema.MASKS_TYPE}
    task: ClassVar[str] = "masks"

    def __init__(
        self,
        *,
        mask_threshold: float = 0.5,
        boxes_column: str | None = None,
        labels_column: str = schema.LABELS,
        **detect_kwargs: Any,
    ):
        if boxes_column and detect_kwargs.get("proposals_column"):
            raise ValueError("boxes_column and proposals_column exclude each other")
        super().__init__(**detect_kwargs)
        self.mask_threshold = mask_threshold
        self.boxes_column = boxes_column
        self.labels_column = labels_column
        self.writes = self.output_columns(output_prefix=self.output_prefix, boxes_column=boxes_column)

    def to_numpy(self, output: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Threshold in torch, before anything full-size is copied: masks become bool (N, H, W)."""
        masks = output.pop("masks")
        out = super().to_numpy(output)
        out["masks"] = (masks[:, 0] > self.mask_threshold).cpu().numpy()
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not self.boxes_column:
            outputs = self.predict(batch_images(batch), self.read_proposals(batch))
            columns = self.columns(outputs)
            columns[schema.MASKS] = pa.array([encode_masks(o["masks"]) for o in outputs], schema.MASKS_TYPE)
            return self.append(batch, columns)
        boxes = [parse_boxes(cell, self.boxes_column) for cell in batch[self.boxes_column].to_pylist()]
        num_classes = self.model.roi_heads.mask_predictor.mask_fcn_logits.out_channels
        labels = [
            parse_labels(cell, self.labels_column, len(b), num_classes)
            for cell, b in zip(batch[self.labels_column].to_pylist(), boxes)
        ]
        masks = self.segment(batch_images(batch), boxes, labels)
        return self.append(batch, {schema.MASKS: pa.array([encode_masks(m) for m in masks], schema.MASKS_TYPE)})

    @torch.inference_mode()
    def segment(self, images: list[np.ndarray], boxes: list[np.ndarray], labels: list[np.ndarray]) -> list[np.ndarray]:
        """Masks (bool, (N, H, W)) for given xyxy boxes and their model labels; only the mask head runs."""
        probs = heads_on_boxes(
            self.model,
            self.to_tensors(images),
            [torch.from_numpy(b).to(self.device) for b in boxes],
            labels=[torch.from_numpy(lab).to(self.device) for lab in labels],
            task="masks",
        )
        return [(p[:, 0] > self.mask_threshold).cpu().numpy() for p in probs]


class MasksSpec(DetectSpec):
    """Parameters of a ``masks`` stage (see jobs/maskrcnn.yaml); detect's keys plus the ones below."""

    type_name: ClassVar[str] = "masks"

    model: str = Field("maskrcnn_resnet50_fpn", description="a Mask R-CNN: " + ", ".join(list_models("masks")))
    mask_threshold: float = Field(0.5, ge=0, le=1, description="a pixel is in the mask when probability > this")
    boxes_column: str | None = Field(None, description="segment this earlier stage's boxes (xyxy) instead of detecting")
    labels_column: str = Field(schema.LABELS, description="with boxes_column: each box's label in this model's classes")

    @field_validator("model")
    @classmethod
    def _mask_model(cls, value: str) -> str:
        if get_entry(value).task != "masks":
            raise ValueError(f"{value} has no mask head; use one of {', '.join(list_models('masks'))}")
        return value

    @model_validator(mode="after")
    def _one_box_source(self) -> "MasksSpec":
        if self.boxes_column and self.proposals_column:
            raise ValueError(
                "boxes_column and proposals_column exclude each other (boxes: mask head only; proposals: Fast R-CNN)"
            )
        return self

    @classmethod
    def stage_class(cls) -> type:
        return MasksStage

    def input_columns(self) -> dict[str, tuple[str, pa.DataType]]:
        if self.boxes_column:
            return {
                "boxes_column": (self.boxes_column, schema.BOXES_TYPE),
                "labels_column": (self.labels_column, schema.IDS_TYPE),
            }
        return super().input_columns()

    def output_columns(self) -> dict[str, pa.DataType]:
        return MasksStage.output_columns(output_prefix=self.output_prefix, boxes_column=self.boxes_column)

    def stage_kwargs(self, categories: list[dict]) -> dict[str, Any]:
        return {
            **super().stage_kwargs(categories),
            "mask_threshold": self.mask_threshold,
            "boxes_column": self.boxes_column,
            "labels_column": self.labels_column,
        }

