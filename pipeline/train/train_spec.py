"""The typed training spec (``pipeline train TRAIN.yaml``); unknown keys are errors, like job specs.

One spec trains the three kinds of model the stages run (:attr:`TrainSpec.kind`): detectors
(``detect``/``masks``/``keypoints`` stages; images resized by the model to ``min_size``/``max_size``),
semantic segmentation models (``segment`` stage; random ``crop_size`` crops at native resolution,
class-weighted cross-entropy) and classifiers (``classify`` stage; shorter side resized to
``resize_size``, random ``crop_size`` crops, cross-entropy against the image's ``label``), and
generative models (``pipeline generate samples``; ``image_size`` squares, bits per dimension). Keys
that only some kinds use are refused for the others, naming the key.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from pipeline.config.spec import Strict
from pipeline.models.registry import get_entry

Kind = Literal["detector", "semantic", "classifier", "generative"]
KEYS_OF: dict[str, tuple[str, ...]] = {  # keys only some kinds use -> those kinds
    "min_size": ("detector",), "max_size": ("detector",),
    "crop_size": ("semantic", "classifier"), "hflip": ("semantic", "classifier"),
    "class_weights": ("semantic",), "resize_size": ("classifier",), "image_size": ("generative",),
}
KIND_OF_TASK = {"semantic": "semantic", "classify": "classifier", "generative": "generative"}  # registry task -> kind; the rest are detectors


class OptimizerSpec(Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: PositiveFloat = 2e-3
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, description="sgd only")
    beta1: float = Field(0.9, ge=0, lt=1, description="adamw only: the first moment's decay (DCGAN: 0.5)")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up, then cosine decay to 0")


class TrainSpec(Strict):
    name: str
    train: str = Field(description="training dataset (shards with annotations)")
    val: str | None = Field(None, description="validation dataset; COCO AP is reported on it every epoch")
    output: str = Field(description="folder for checkpoints (ray-train/), train.json and model.pth")
    model: str = "small_maskrcnn"
    weights: str = Field("none", description="'none' (from scratch) or a checkpoint path to fine-tune")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="more keyword arguments for the model's builder (e.g. fpn_channels, box_batch_size_per_image); "
        "kept in the checkpoint so the stages build the same network",
    )
    min_size: PositiveInt = Field(128, description="detectors: images are resized so their short side is this")
    max_size: PositiveInt = Field(160, description="detectors: ... and their long side at most this")
    crop_size: PositiveInt = Field(
        96, description="semantic models: random square crops of this side at native resolution; classifiers: the model's "
        "input side (random crops in training, the center crop in the stage; set it, the default is the semantic one)"
    )
    resize_size: PositiveInt | None = Field(
        None, description="classifiers: shorter side before the crop (default crop_size * 8 / 7, ImageNet's 256/224)"
    )
    image_size: PositiveInt = Field(32, description="generative models: the side of the square images they learn and make")
    hflip: bool = Field(True, description="semantic models and classifiers: flip half of the samples left-right")
    class_weights: Literal["sqrt_inverse_frequency", "none"] = Field(
        "sqrt_inverse_frequency", description="semantic models: per-class loss weights from the training set's pixel counts"
    )
    epochs: PositiveInt = 10
    steps: PositiveInt | None = Field(None, description="stop after this many optimizer steps (the schedule fits it)")
    time_limit_minutes: PositiveFloat | None = Field(None, description="stop after this long (schedule fits it)")
    batch_size: PositiveInt = Field(8, description="images per step per worker")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    seed: int = 0
    workers: PositiveInt = 1
    worker_num_cpus: PositiveFloat = Field(1.0, description="CPUs reserved per training worker")
    worker_num_gpus: float = Field(0.0, ge=0)
    log_every_steps: PositiveInt = Field(50, description="a progress line (loss, lr, images/s) every this many steps")
    threads: PositiveInt | None = Field(None, description="torch threads per worker (default: ceil(worker_num_cpus))")

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        get_entry(value)  # raises listing the known models
        return value

    @model_validator(mode="after")
    def _keys_of_its_kind(self) -> "TrainSpec":
        for key, kinds in KEYS_OF.items():
            if key in self.model_fields_set and self.kind not in kinds:
                raise ValueError(f"{key}: not used when training {self.model} (a {self.kind}); leave it out")
        return self

    @property
    def kind(self) -> Kind:
        """``detector`` (detect/masks/keypoints stages), ``semantic`` (segment), ``classifier`` (classify) or
        ``generative`` (pipeline generate samples)."""
        return KIND_OF_TASK.get(get_entry(self.model).task, "detector")

    @property
    def semantic(self) -> bool:
        return self.kind == "semantic"

    @property
    def classifier_resize(self) -> int:
        """The shorter side a classifier's images are resized to before the crop."""
        return self.resize_size or round(self.crop_size * 8 / 7)
