"""The typed job spec. YAML files are validated into these models before any work starts.

Unknown keys are errors everywhere (``extra="forbid"``): a typo in a job file must fail loudly,
not be ignored. Stage entries are validated by the model registered for their ``type`` (see
:mod:`pipeline.stages`), so each stage owns its parameters while sharing the keys of
:class:`StageSpec`. Resources are only *declared* here (:func:`resource_field`);
:mod:`pipeline.engine.runner` applies them to the Ray plan.
"""

from __future__ import annotations

import inspect
import math
from abc import abstractmethod
from types import SimpleNamespace
from typing import Annotated, Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from pipeline.data.decode import DEFAULT_MAX_PIXELS
from pipeline.eval.iou_types import get_iou_type


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


RESOURCE_MARK = "resource"  # json_schema_extra key of the settings that say how fast a stage runs
RUN_CONTEXT = ("dataset_categories", "device", "threads")  # stage arguments StageSpec.stage_kwargs resolves


def resource_field(default: Any = ..., **kwargs: Any) -> Any:
    """A stage setting that changes how fast a job runs but not what it writes (a resumed run may differ in it)."""
    return Field(default, json_schema_extra={RESOURCE_MARK: True}, **kwargs)


class StageSpec(Strict):
    """Keys every stage has. A stage type subclasses this with its own parameters.

    A subclass declares its settings as fields (each written once, with its default and its rule)
    and says which class it builds (:meth:`stage_class`) and which columns that class reads and
    writes (:meth:`input_columns`, :meth:`output_columns`). The stage's constructor arguments are
    derived (:meth:`stage_kwargs`): every setting of the subclass whose name the stage class's
    ``__init__`` takes, plus the run context (:data:`RUN_CONTEXT`), resolved here and nowhere else.
    """

    type_name: ClassVar[str] = ""

    name: str = Field(description="unique within the job; addressable as --set stages.NAME.KEY=VALUE")
    type: str = Field(description="registered stage type, e.g. 'detect'")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when num_gpus > 0")
    batch_size: PositiveInt = resource_field(4, description="images per model call (bounds memory per actor)")
    num_cpus: Annotated[float, Field(ge=0)] | None = resource_field(
        None,
        description="CPUs reserved per actor; auto/null: the pool's share of the cluster's CPUs, less room for "
        "read/decode tasks (pipeline.engine.resources)",
    )
    num_gpus: float = resource_field(0.0, ge=0, description="GPUs per actor; fractional shares a GPU")
    pool_size: PositiveInt | None = resource_field(
        None,
        description="actors in this stage's pool; auto/null: as many as fit (CPU: one per core, GPU: GPUs / num_gpus)",
    )
    threads: PositiveInt | None = resource_field(
        None, description="torch threads per actor (default: ceil(num_cpus), or the actor's share of the cores when num_cpus is auto)"
    )
    resources: dict[str, float] = resource_field(
        default_factory=dict, description="custom Ray resources per actor, e.g. {gpu_node: 1} to pin a stage to labelled nodes"
    )

    @field_validator("num_cpus", "pool_size", mode="before")
    @classmethod
    def _auto_is_none(cls, value: Any) -> Any:
        """``auto`` (as written in a job file) and null both mean: derived from the cluster at run time."""
        return None if isinstance(value, str) and value.strip().lower() == "auto" else value

    @classmethod
    def resource_keys(cls) -> frozenset[str]:
        """Keys that change how fast a job runs but not what it writes (declared with :func:`resource_field`)."""
        return frozenset(
            key
            for key, info in StageSpec.model_fields.items()
            if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get(RESOURCE_MARK)
        )

    @classmethod
    def defaults(cls) -> SimpleNamespace:
        """Each optional setting's default, as attributes (``DetectSpec.defaults().score_threshold``).

        A stage class takes its ``__init__`` defaults from here, so a stage built without a config
        behaves as one built from a spec that leaves those keys out, and each default is written once.
        """
        return SimpleNamespace(
            **{key: info.get_default(call_default_factory=True) for key, info in cls.model_fields.items() if not info.is_required()}
        )

    @classmethod
    @abstractmethod
    def stage_class(cls) -> type:
        """The class this spec builds: keyword-only ``__init__``, ``__call__(pyarrow.Table) -> pyarrow.Table``."""

    @abstractmethod
    def input_columns(self) -> dict[str, tuple[str, pa.DataType]]:
        """``{config key: (column, Arrow type)}``: the columns an earlier stage must have written."""

    @abstractmethod
    def output_columns(self) -> dict[str, pa.DataType]:
        """``{column: Arrow type}``: exactly the columns the stage appends, in order (prefixes applied)."""

    def stage_kwargs(self, categories: list[dict]) -> dict[str, Any]:
        """Keyword arguments for the stage class; ``categories`` are the input dataset's.

        The settings of this stage type (the subclass's fields) that the stage's ``__init__`` takes,
        plus the run context: ``dataset_categories``, ``device`` (``auto``: cuda when ``num_gpus`` >
        0) and ``threads`` (explicit, else ``ceil(num_cpus)``, else None: the runner derives it from
        the actor's share of the cores), each only if ``__init__`` takes it.
        """
        accepted = inspect.signature(self.stage_class().__init__).parameters
        context = {
            "dataset_categories": categories,
            "device": ("cuda" if self.num_gpus > 0 else "cpu") if self.device == "auto" else self.device,
            "threads": self.threads or (max(1, math.ceil(self.num_cpus)) if self.num_cpus is not None else None),
        }
        settings = {key: getattr(self, key) for key in type(self).model_fields if key not in StageSpec.model_fields}
        return {key: value for key, value in {**settings, **context}.items() if key in accepted}

    def preflight(self) -> None:
        """Cheap checks that must fail before any data is read (e.g. weights files present)."""

    def model_categories(self) -> list[dict] | None:
        """``[{"label", "name"}, ...]``: what the stage's model calls each label, if its weights say.

        Called at preflight. A job whose input names no categories writes these as its output's
        categories (then ``category_ids`` equal the labels), so names survive to exports and pictures.
        """
        return None


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
    metrics: Literal["auto"] | list[str] = Field(
        "auto",
        description="evaluation (IoU types of pipeline.eval.iou_types) at the end when the input has ground truth "
        "(auto: the types for whatever the stages write, e.g. bbox/segm/keypoints/semantic; [] for none)",
    )
    ray: RaySpec = Field(default_factory=RaySpec)
    stage_failure_limit: int = Field(
        32,
        ge=0,
        description="fail the job when a stage raises on this many rows in a row (a broken stage, not a bad image); 0: never",
    )

    @field_validator("metrics")
    @classmethod
    def _known_iou_types(cls, value: Any) -> Any:
        for name in [] if value == "auto" else value:
            get_iou_type(name)  # raises ValueError listing the known types
        return value
