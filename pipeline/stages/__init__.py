"""The registry of stage types. Adding a stage is one module plus one line here.

A stage module defines two things (see ``detect.py``):

* a spec class (subclass of :class:`pipeline.config.spec.StageSpec`) with the stage's parameters,
  which knows how to turn itself into constructor keyword arguments (``stage_kwargs``), what
  to check before any data is read (``preflight``), and which class to build (``stage_class``);
* the stage class itself: keyword-only ``__init__`` that loads the model once, and
  ``__call__(batch: pyarrow.Table) -> pyarrow.Table`` that appends the columns it declares in
  ``writes``. It only ever sees rows without errors; :mod:`pipeline.engine.actor` handles the rest.
"""

from __future__ import annotations

from pipeline.config.spec import StageSpec
from pipeline.stages.detect import DetectSpec
from pipeline.stages.keypoints import KeypointsSpec
from pipeline.stages.masks import MasksSpec
from pipeline.stages.proposals import ProposalsSpec
from pipeline.stages.style import StyleSpec

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
