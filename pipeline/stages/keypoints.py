"""Person keypoints with torchvision Keypoint R-CNN (``keypointrcnn_resnet50_fpn``).

Output per image: the detect stage's columns (``boxes`` xyxy float32, ``scores``, ``labels``,
``category_ids``; see :mod:`pipeline.stages.detect`) plus ``keypoints``: per box one flat float32
list ``[x1, y1, v1, x2, y2, v2, ...]`` of K keypoints (K = 17 for COCO persons, in COCO's order:
nose, left_eye, right_eye, left_ear, right_ear, left_shoulder, ...) in the decoded image's pixels.
This is the layout of a COCO keypoint result. ``v`` is torchvision's visibility flag, which is
always 1 for a predicted keypoint.

Modes, as for masks (see :mod:`pipeline.stages.heads`): default (detect, then keypoints),
``proposals_column`` (Fast R-CNN on earlier proposals), and ``boxes_column``: keypoints for
boxes an earlier stage found (e.g. a detect stage's persons); only the keypoint head runs and
the stage writes only ``keypoints``, aligned with those boxes. The keypoint head is not
class-specific, so no labels are needed. A box with nothing inside the image gets all-zero
keypoints (v = 0: COCO's "not labelled").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, PositiveInt

from pipeline import schema
from pipeline.models.registry import list_models
from pipeline.stages.common import ragged_vectors
from pipeline.stages.detect import CategoryMap
from pipeline.stages.heads import HeadSpec, HeadStage
from pipeline.stages.rcnn import heads_on_boxes

KEYPOINT_COLUMNS: dict[str, pa.DataType] = {schema.KEYPOINTS: schema.KEYPOINTS_TYPE}  # what the keypoint head adds


class KeypointsSpec(HeadSpec):
    """Parameters of a ``keypoints`` stage (see jobs/keypoints.yaml); detect's keys plus ``boxes_column``."""

    type_name: ClassVar[str] = "keypoints"
    task: ClassVar[str] = "keypoints"
    head: ClassVar[str] = "keypoint"
    head_columns: ClassVar[dict[str, pa.DataType]] = KEYPOINT_COLUMNS

    model: str = Field("keypointrcnn_resnet50_fpn", description="a Keypoint R-CNN: " + ", ".join(list_models("keypoints")))
    num_classes: PositiveInt | None = Field(2, description="classes incl. background: 2 = background + person")

    @classmethod
    def stage_class(cls) -> type:
        return KeypointsStage


DEFAULT = KeypointsSpec.defaults()


class KeypointsStage(HeadStage):
    """Keypoint R-CNN on a batch of decoded images; keypoints aligned with the boxes.

    Example::

        stage = KeypointsStage(model="keypointrcnn_resnet50_fpn", weights="none")
        out = stage(batch)  # + boxes, scores, labels, category_ids, keypoints
    """

    def __init__(
        self,
        *,
        model: str = DEFAULT.model,
        weights: str = DEFAULT.weights,
        num_classes: int | None = DEFAULT.num_classes,
        score_threshold: float = DEFAULT.score_threshold,
        max_detections: int = DEFAULT.max_detections,
        category_map: CategoryMap = DEFAULT.category_map,
        model_kwargs: dict[str, Any] | None = None,
        proposals_column: str | None = DEFAULT.proposals_column,
        boxes_column: str | None = DEFAULT.boxes_column,
        output_prefix: str = DEFAULT.output_prefix,
        dataset_categories: Sequence[dict] = (),
        device: str = "cpu",
        threads: int | None = None,
    ):
        super().__init__(
            model=model,
            weights=weights,
            num_classes=num_classes,
            score_threshold=score_threshold,
            max_detections=max_detections,
            category_map=category_map,
            model_kwargs=model_kwargs,
            proposals_column=proposals_column,
            output_prefix=output_prefix,
            dataset_categories=dataset_categories,
            device=device,
            threads=threads,
        )
        self.use_boxes_column(boxes_column)

    def head_outputs(self, outputs: list[dict]) -> dict[str, pa.Array]:
        return {schema.KEYPOINTS: ragged_vectors([flat_keypoints(o["keypoints"]) for o in outputs])}

    def head_on_boxes(self, batch: pa.Table, images: list[np.ndarray], boxes: list[np.ndarray]) -> dict[str, pa.Array]:
        return {schema.KEYPOINTS: ragged_vectors(self.locate(images, boxes))}

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
