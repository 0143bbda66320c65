"""The typed job spec. YAML files are validated into these models before any work starts.

Unknown keys are errors everywhere (``extra="forbid"``): a typo in a job file must fail loudly,
not be ignored. Stage entries are validated by the model registered for their ``type`` (see
:mod:`pipeline.stages`), so each stage owns its parameters while sharing the resource keys below.
Resources are only *declared* here; :mod:`pipeline.engine.runner` applies them to the Ray plan.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from pipeline.data.decode import DEFAULT_MAX_PIXELS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageSpec(Strict):
    """Keys every stage has. A stage type subclasses this with its own parameters."""

    type_name: ClassVar[str] = ""

    name: str = Field(description="unique within the job; addressable as --set stages.NAME.KEY=VALUE")
    type: str = Field(description="registered stage type, e.g. 'detect'")
    batch_size: PositiveInt = Field(4, description="images per model call (bounds memory per actor)")
    num_cpus: Annotated[float, Field(ge=0)] | None = Field(
        None,
        description="CPUs reserved per actor; auto/null: the pool's share of the cluster's CPUs, less room for "
        "read/decode tasks (pipeline.engine.resources)",
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; fractional shares a GPU")
    pool_size: PositiveInt | None = Field(
        None,
        description="actors in this stage's pool; auto/null: as many as fit (CPU: one per core, GPU: GPUs / num_gpus)",
    )
    threads: PositiveInt | None = Field(
        None, description="torch threads per actor (default: ceil(num_cpus), or the actor's share of the cores when num_cpus is auto)"
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per actor, e.g. {gpu_node: 1} to pin a stage to labelled nodes"
    )

    @field_validator("num_cpus", "pool_size", mode="before")
    @classmethod
    def _auto_is_none(cls, value: Any) -> Any:
        """``auto`` (as written in a job file) and null both mean: derived from the cluster at run time."""
        return None if isinstance(value, str) and value.strip().lower() == "auto" else value

    def stage_kwargs(self, categories: list[dict]) -> dict[str, Any]:
        """Keyword arguments for the stage class; ``categories`` are the input dataset's."""
        raise NotImplementedError

    def preflight(self) -> None:
        """Cheap checks that must fail before any data is read (e.g. weights files present)."""

    def model_categories(self) -> list[dict] | None:
        """``[{"label", "name"}, ...]``: what the stage's model calls each label, if its weights say.

        Called at preflight. A job whose input names no categories writes these as its output's
        categories (then ``category_ids`` equal the labels), so names survive to exports and pictures.
        """
        return None

    @classmethod
    def stage_class(cls) -> type:
        raise NotImplementedError


class DecodeSpec(Strict):
    max_pixels: PositiveInt = Field(DEFAULT_MAX_PIXELS, description="larger images become error rows")
    exif_transpose: bool = Field(True, description="apply EXIF orientation before the stages")
    batch_size: PositiveInt = 16
    num_cpus: float = Field(0.5, gt=0, description="CPUs per decode task (leave room for the actors)")


class RaySpec(Strict):
    address: str | None = Field(None, description="join this cluster instead of starting local Ray")
    num_cpus: PositiveInt | None = Field(None, description="CPUs of an embedded local Ray (default: all)")


class JobSpec(Strict):
    name: str
    input: str = Field(description="dataset folder or URI (overridden by --input)")
    output: str = Field(description="prediction dataset folder or URI (overridden by --output)")
    read_batch_rows: PositiveInt = Field(64, description="rows per block read from a shard")
    read_num_cpus: float = Field(0.25, gt=0, description="CPUs per shard-reading task")
    decode: DecodeSpec = Field(default_factory=DecodeSpec)
    stages: list[StageSpec] = Field(min_length=1)
    metrics: Literal["auto"] | list[Literal["bbox", "segm", "keypoints"]] = Field(
        "auto",
        description="COCO metrics computed at the end when the input has ground truth "
        "(auto: bbox/segm/keypoints for whatever the stages write; [] for none)",
    )
    ray: RaySpec = Field(default_factory=RaySpec)
    stage_failure_limit: int = Field(
        32,
        ge=0,
        description="fail the job when a stage raises on this many rows in a row (a broken stage, not a bad image); 0: never",
    )
