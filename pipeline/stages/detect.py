"""Object detection with a torchvision detector (Faster R-CNN family, RetinaNet, FCOS, SSD...).

Output per image (all in the decoded image's pixels; torchvision rescales from its internal size):

* ``boxes``: list of [x1, y1, x2, y2] float32 (xyxy, *not* COCO's xywh);
* ``scores``: float32, sorted descending as the model returns them;
* ``labels``: the model's own label indices (int64);
* ``category_ids``: the dataset's category ids for those labels (``-1`` where the mapping has none).

The score threshold and detections cap are passed *into* the model (``box_score_thresh`` /
``score_thresh`` ...), so the stage returns exactly what a direct torchvision call with the same
settings returns -- the fidelity test relies on that.

Two keys connect this stage to earlier ones (see :mod:`pipeline.stages.chain`):

* ``proposals_column`` (R-CNN models only): Fast R-CNN. Instead of the model's own RPN, the RoI
  heads run on the boxes an earlier stage wrote (e.g. ``proposals`` from selective search),
  with the backbone run once per image. See :func:`pipeline.stages.rcnn.detect_from_proposals`.
* ``output_prefix``: the columns become ``PREFIX + boxes`` etc., so two detectors (or a detector
  and a masks stage) can run in one job without writing the same column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, PositiveInt, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from pipeline import schema
from pipeline.config.paths import path_field
from pipeline.config.spec import StageSpec
from pipeline.models.registry import build_model, check_state_dict, get_entry, require_detector, unknown_kwargs_messages
from pipeline.models.weights import load_checkpoint, resolve_weights
from pipeline.stages.columns import ragged, ragged_boxes
from pipeline.stages.common import append_columns, batch_images, parse_boxes, prefixed, torch_device
from pipeline.stages.rcnn import detect_from_proposals, is_rcnn

CategoryMap = Literal["auto", "identity", "by_name"] | dict[int, int]

DETECT_COLUMNS: dict[str, pa.DataType] = {  # what a detect stage writes, before its output_prefix
    schema.BOXES: schema.BOXES_TYPE,
    schema.SCORES: schema.SCORES_TYPE,
    schema.LABELS: schema.IDS_TYPE,
    schema.CATEGORY_IDS: schema.IDS_TYPE,
}


class DetectSpec(StageSpec):
    """Parameters of a ``detect`` stage (see jobs/detect.yaml)."""

    type_name: ClassVar[str] = "detect"

    model: str = Field("fasterrcnn_mobilenet_v3_large_320_fpn", description="registered model name")
    weights: str = path_field("none", "'none', a torchvision weights name (DEFAULT, COCO_V1...) or a .pth path")
    num_classes: PositiveInt | None = Field(None, description="classes incl. background (weights none/bare state dict)")
    score_threshold: float = Field(0.05, ge=0, le=1)
    max_detections: PositiveInt = 100
    category_map: CategoryMap = "auto"
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra builder kwargs, e.g. min_size")
    proposals_column: str | None = Field(
        None, description="Fast R-CNN: run the RoI heads on this earlier stage's boxes (xyxy) instead of the RPN"
    )
    output_prefix: str = Field("", description="prepended to every column this stage writes, e.g. 'det_'")

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return require_detector(value)  # raises ValueError listing the known detectors

    @field_validator("proposals_column")
    @classmethod
    def _proposals_need_rcnn(cls, value: str | None, info: ValidationInfo) -> str | None:
        model = info.data.get("model")
        if value is not None and model is not None and not is_rcnn(model):
            raise ValueError(
                f"proposals_column needs an R-CNN model (fasterrcnn_*, maskrcnn_*, keypointrcnn_*); {model} has no RoI heads"
            )
        return value

    @model_validator(mode="after")
    def _known_model_kwargs(self) -> "DetectSpec":
        check_model_kwargs(self, self.model, self.model_kwargs)
        return self

    @classmethod
    def stage_class(cls) -> type:
        return DetectStage

    def input_columns(self) -> dict[str, tuple[str, pa.DataType]]:
        return {"proposals_column": (self.proposals_column, schema.BOXES_TYPE)} if self.proposals_column else {}

    def output_columns(self) -> dict[str, pa.DataType]:
        return prefixed(DETECT_COLUMNS, self.output_prefix)

    def preflight(self) -> None:
        check_weights(self.model, self.weights, self.num_classes)

    def model_categories(self) -> list[dict] | None:
        return resolve_weights(self.model, self.weights).categories()


DEFAULT = DetectSpec.defaults()


class DetectStage:
    """Run a torchvision detector on a batch of decoded images.

    Example::

        stage = DetectStage(model="fasterrcnn_mobilenet_v3_large_320_fpn", weights="none", num_classes=4)
        out = stage(batch)  # batch: pyarrow.Table with pixels/width/height columns; + DETECT_COLUMNS

    Defaults are :class:`DetectSpec`'s; the spec also checks the settings (e.g. that
    ``proposals_column`` has an R-CNN model), so a stage built directly is trusted with them.
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
        output_prefix: str = DEFAULT.output_prefix,
        dataset_categories: Sequence[dict] = (),
        device: str = "cpu",
        threads: int | None = None,
    ):
        self.device = torch_device(device, threads)
        self.model, model_categories = build_model(
            model,
            resolve_weights(model, weights),
            num_classes=num_classes,
            score_threshold=score_threshold,
            max_detections=max_detections,
            extra=model_kwargs,
        )
        self.model.to(self.device)
        self.label_to_category = category_mapping(category_map, model_categories, list(dataset_categories))
        self.proposals_column = proposals_column
        self.output_prefix = output_prefix

    def to_tensors(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """RGB uint8 (H, W, 3) -> float (3, H, W) in [0, 1] on the stage's device, as torchvision wants."""
        return [torch.from_numpy(np.array(img)).to(self.device).permute(2, 0, 1).float().div(255) for img in images]

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray], proposals: list[np.ndarray] | None = None) -> list[dict[str, np.ndarray]]:
        """RGB uint8 (H, W, 3) arrays -> torchvision output dicts as numpy (boxes xyxy, scores, labels).

        ``proposals``: per image (N, 4) xyxy float32 in original pixels; given, the model's RPN is
        skipped (Fast R-CNN, R-CNN models only).
        """
        tensors = self.to_tensors(images)
        if proposals is None:
            outputs = self.model(tensors)
        else:
            outputs = detect_from_proposals(self.model, tensors, [torch.from_numpy(p).to(self.device) for p in proposals])
        return [self.to_numpy(out) for out in outputs]

    def to_numpy(self, output: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in output.items()}

    def __call__(self, batch: pa.Table) -> pa.Table:
        outputs = self.predict(batch_images(batch), self.read_proposals(batch))
        return self.append(batch, self.columns(outputs))

    def read_proposals(self, batch: pa.Table) -> list[np.ndarray] | None:
        """Per row (N, 4) xyxy float32 from ``proposals_column``; None without one. Raises on malformed rows."""
        if not self.proposals_column:
            return None
        return [parse_boxes(cell, self.proposals_column) for cell in batch[self.proposals_column].to_pylist()]

    def columns(self, outputs: list[dict[str, np.ndarray]]) -> dict[str, pa.Array]:
        """The :data:`DETECT_COLUMNS` (unprefixed names) from the model's outputs."""
        labels = [o["labels"].astype(np.int64) for o in outputs]
        mapping = self.label_to_category
        categories = labels if mapping is None else [np.array([mapping.get(int(x), -1) for x in lab], np.int64) for lab in labels]
        return {
            schema.BOXES: ragged_boxes([o["boxes"] for o in outputs]),
            schema.SCORES: ragged([o["scores"] for o in outputs], pa.float32()),
            schema.LABELS: ragged(labels, pa.int64()),
            schema.CATEGORY_IDS: ragged(categories, pa.int64()),
        }

    def append(self, batch: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
        """Append ``columns`` (unprefixed names) under this stage's ``output_prefix``."""
        return append_columns(batch, columns, self.output_prefix)


def category_mapping(
    category_map: CategoryMap, model_categories: list[dict] | None, dataset_categories: list[dict]
) -> dict[int, int] | None:
    """Model label -> dataset category id; None means identity (label == category id).

    ``auto`` maps by name when both sides have names (COCO weights on a COCO-named dataset, a
    project checkpoint on its own dataset) and is the identity otherwise.
    """
    if isinstance(category_map, dict):
        return {int(k): int(v) for k, v in category_map.items()}
    if category_map == "auto":
        category_map = "by_name" if model_categories and dataset_categories else "identity"
    if category_map == "identity":
        return None
    if not model_categories:
        raise ValueError("category_map: by_name needs weights that name their categories (torchvision or project checkpoints)")
    ids_by_name = {c["name"]: int(c["id"]) for c in dataset_categories}
    return {c["label"]: ids_by_name[c["name"]] for c in model_categories if c["name"] in ids_by_name}


def check_weights(model: str, weights: str, num_classes: int | None) -> None:
    """Fail before any data is read if ``weights`` are missing or do not fit ``model``."""
    resolved = resolve_weights(model, weights)
    if resolved.kind == "checkpoint":  # shape-check on the meta device: no memory, no time
        ckpt = load_checkpoint(resolved.path)
        classes = ckpt.get("num_classes") or num_classes or 91
        with torch.device("meta"):
            built = get_entry(model).builder(
                weights=None, weights_backbone=None, num_classes=classes, **ckpt.get("build_kwargs", {})
            )
        check_state_dict(built, ckpt["model"], resolved.path, model)


def check_model_kwargs(spec: StageSpec, model: str, kwargs: dict[str, Any]) -> None:
    """Raise a ValidationError at ``model_kwargs.KEY`` for each key ``model``'s builder would ignore.

    torchvision hands unknown keywords to its transform, which drops them: a misspelt ``min_sise``
    would run with the default. Checked when the spec is validated, before data or Ray.
    """
    problems = unknown_kwargs_messages(model, kwargs)
    if problems:
        raise ValidationError.from_exception_data(
            type(spec).__name__,
            [
                InitErrorDetails(type=PydanticCustomError("unknown_model_kwarg", message), loc=("model_kwargs", key), input=kwargs[key])
                for key, message in problems.items()
            ],
        )
