"""Object detection with a torchvision detector (Faster R-CNN family, RetinaNet, FCOS, SSD...).

Output per image (all in the decoded image's pixels; torchvision rescales from its internal size):

* ``boxes``: list of [x1, y1, x2, y2] float32 (xyxy, *not* COCO's xywh);
* ``scores``: float32, sorted descending as the model returns them;
* ``labels``: the model's own label indices (int64);
* ``category_ids``: the dataset's category ids for those labels (``-1`` where the mapping has none).

The score threshold and detections cap are passed *into* the model (``box_score_thresh`` /
``score_thresh`` ...), so the stage returns exactly what a direct torchvision call with the same
settings returns -- the fidelity test relies on that.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, PositiveInt, field_validator

from pipeline import schema
from pipeline.config.spec import StageSpec
from pipeline.data.decode import pixels_to_array
from pipeline.models.registry import build_model, check_state_dict, get_entry
from pipeline.models.weights import load_checkpoint, resolve_weights
from pipeline.stages.columns import ragged, ragged_boxes

CategoryMap = Literal["auto", "identity", "by_name"] | dict[int, int]


class DetectStage:
    """Run a torchvision detector on a batch of decoded images.

    Example::

        stage = DetectStage(model="fasterrcnn_mobilenet_v3_large_320_fpn", weights="none", num_classes=4)
        out = stage(batch)  # batch: pyarrow.Table with pixels/width/height columns
    """

    writes: ClassVar[dict[str, pa.DataType]] = {
        schema.BOXES: schema.BOXES_TYPE,
        schema.SCORES: schema.SCORES_TYPE,
        schema.LABELS: schema.IDS_TYPE,
        schema.CATEGORY_IDS: schema.IDS_TYPE,
    }

    def __init__(
        self,
        *,
        model: str,
        weights: str = "none",
        num_classes: int | None = None,
        score_threshold: float = 0.05,
        max_detections: int = 100,
        category_map: CategoryMap = "auto",
        dataset_categories: list[dict] = (),
        device: str = "cpu",
        threads: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("stage asks for a GPU (num_gpus > 0) but torch sees no CUDA device on this node")
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

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """RGB uint8 (H, W, 3) arrays -> torchvision output dicts as numpy (boxes xyxy, scores, labels)."""
        tensors = [torch.from_numpy(np.array(img)).to(self.device).permute(2, 0, 1).float().div(255) for img in images]
        outputs = self.model(tensors)
        return [{k: v.detach().cpu().numpy() for k, v in out.items()} for out in outputs]

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = [
            pixels_to_array(buf, h, w)
            for buf, h, w in zip(
                batch[schema.PIXELS].to_pylist(), batch[schema.HEIGHT].to_pylist(), batch[schema.WIDTH].to_pylist()
            )
        ]
        outputs = self.predict(images)
        labels = [o["labels"].astype(np.int64) for o in outputs]
        mapping = self.label_to_category
        categories = labels if mapping is None else [np.array([mapping.get(int(x), -1) for x in lab], np.int64) for lab in labels]
        return (
            batch.append_column(schema.BOXES, ragged_boxes([o["boxes"] for o in outputs]))
            .append_column(schema.SCORES, ragged([o["scores"] for o in outputs], pa.float32()))
            .append_column(schema.LABELS, ragged(labels, pa.int64()))
            .append_column(schema.CATEGORY_IDS, ragged(categories, pa.int64()))
        )


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


class DetectSpec(StageSpec):
    """Parameters of a ``detect`` stage (see jobs/detect.yaml)."""

    type_name: ClassVar[str] = "detect"

    model: str = Field("fasterrcnn_mobilenet_v3_large_320_fpn", description="registered model name")
    weights: str = Field("none", description="'none', a torchvision weights name (DEFAULT, COCO_V1...) or a .pth path")
    num_classes: PositiveInt | None = Field(None, description="classes incl. background (weights none/bare state dict)")
    score_threshold: float = Field(0.05, ge=0, le=1)
    max_detections: PositiveInt = 100
    category_map: CategoryMap = "auto"
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when num_gpus > 0")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra builder kwargs, e.g. min_size")

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        get_entry(value)  # raises ValueError listing the known models
        return value

    @classmethod
    def stage_class(cls) -> type:
        return DetectStage

    def preflight(self) -> None:
        resolved = resolve_weights(self.model, self.weights)
        if resolved.kind == "checkpoint":  # shape-check on the meta device: no memory, no time
            ckpt = load_checkpoint(resolved.path)
            classes = ckpt.get("num_classes") or self.num_classes or 91
            with torch.device("meta"):
                model = get_entry(self.model).builder(
                    weights=None, weights_backbone=None, num_classes=classes, **ckpt.get("build_kwargs", {})
                )
            check_state_dict(model, ckpt["model"], resolved.path, self.model)

    def stage_kwargs(self, categories: list[dict]) -> dict[str, Any]:
        return {
            "model": self.model,
            "weights": self.weights,
            "num_classes": self.num_classes,
            "score_threshold": self.score_threshold,
            "max_detections": self.max_detections,
            "category_map": self.category_map,
            "dataset_categories": categories,
            "device": ("cuda" if self.num_gpus > 0 else "cpu") if self.device == "auto" else self.device,
            "threads": self.threads or max(1, math.ceil(self.num_cpus)),
            "model_kwargs": self.model_kwargs,
        }


