"""The typed training spec (``pipeline train TRAIN.yaml``); unknown keys are errors, like job specs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from pipeline.config.spec import Strict
from pipeline.models.registry import require_detector


class OptimizerSpec(Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: PositiveFloat = 2e-3
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, description="sgd only")
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
    min_size: PositiveInt = Field(128, description="images are resized so their short side is this")
    max_size: PositiveInt = 160
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
        return require_detector(value)  # pipeline train trains detectors (semantic models: not yet)
