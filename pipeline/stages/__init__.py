"""The registry of stage types. Adding a stage is one module plus one line here.

A stage module holds a spec class and a stage class (see ``detect.py``; ``tests/engine/probe_stage.py``
is the smallest whole example):

* the spec (subclass of :class:`pipeline.config.spec.StageSpec`) declares the stage's settings as
  typed fields, each once, with its default and its rule; the columns it reads
  (``input_columns() -> {config key: (column, arrow type)}``) and writes (``output_columns() ->
  {column: arrow type}``, from a module-level dict of the stage's columns, prefixed by
  :func:`pipeline.stages.common.prefixed`); which class it builds (``stage_class``); and what to
  check before any data is read (``preflight``). The constructor arguments are derived
  (``StageSpec.stage_kwargs``): the settings whose names the stage's ``__init__`` takes, plus
  ``dataset_categories``, ``device`` and ``threads``;
* the stage class: keyword-only, typed ``__init__`` (defaults from ``TheSpec.defaults()``) that
  loads the model once, and ``__call__(batch: pyarrow.Table) -> pyarrow.Table`` that appends
  exactly the spec's ``output_columns()``. It only ever sees rows without errors;
  :mod:`pipeline.engine.stage_actor` handles the rest.

Then one ``register(TheSpec)`` line below. The loader finds the type by name, the chain check reads
its columns, the runner builds its actor pool; nothing else in the package names it. Its docs are a
row in README.md's stage table and a job under ``jobs/`` using it (tests/stages/test_registry.py
fails without them). A sketch of a module ``blur.py``::

    BLUR_COLUMNS = {"blurred": pa.binary()}

    class BlurSpec(StageSpec):
        type_name: ClassVar[str] = "blur"
        radius: float = Field(2.0, gt=0, description="Gaussian radius in pixels")

        @classmethod
        def stage_class(cls) -> type:
            return BlurStage

        def input_columns(self) -> dict[str, tuple[str, pa.DataType]]:
            return {}

        def output_columns(self) -> dict[str, pa.DataType]:
            return dict(BLUR_COLUMNS)

    DEFAULT = BlurSpec.defaults()

    class BlurStage:
        def __init__(self, *, radius: float = DEFAULT.radius, threads: int | None = None): ...
        def __call__(self, batch: pa.Table) -> pa.Table: ...  # appends "blurred" (pa.binary())

plus ``register(BlurSpec)`` here.
"""

from __future__ import annotations

from pipeline.config.spec import StageSpec
from pipeline.stages.classify import ClassifySpec
from pipeline.stages.detect import DetectSpec
from pipeline.stages.explain import ExplainSpec
from pipeline.stages.keypoints import KeypointsSpec
from pipeline.stages.masks import MasksSpec
from pipeline.stages.proposals import ProposalsSpec
from pipeline.stages.segment import SegmentSpec
from pipeline.stages.style import StyleSpec
from pipeline.stages.synthesize import SynthesizeSpec

STAGES: dict[str, type[StageSpec]] = {}


def register(spec_cls: type[StageSpec]) -> type[StageSpec]:
    if spec_cls.type_name in STAGES:
        raise ValueError(f"stage type {spec_cls.type_name!r} is already registered")
    STAGES[spec_cls.type_name] = spec_cls
    return spec_cls


def list_stages() -> list[str]:
    return sorted(STAGES)


def get_stage_spec(type_name: str) -> type[StageSpec] | None:
    return STAGES.get(type_name)


register(DetectSpec)
register(MasksSpec)
register(KeypointsSpec)
register(ProposalsSpec)
register(StyleSpec)
register(SegmentSpec)
register(ClassifySpec)
register(ExplainSpec)
register(SynthesizeSpec)
