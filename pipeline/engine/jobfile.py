"""A job file -> a validated :class:`~pipeline.config.spec.JobSpec`, each stage by its registered type.

:mod:`pipeline.config` holds the typed pieces (the job's fields, the stage base class, the YAML
helpers) and knows no stage type; this module joins them with the registry
(:mod:`pipeline.stages`): each ``stages`` entry is validated by the spec class registered for its
``type``, relative file settings are resolved, and the column flow between stages is checked
(:func:`pipeline.stages.chain.check_columns`), all before any work starts. Every error names the
file and the key.
"""

from __future__ import annotations

import copy
from pathlib import Path

from pydantic import ValidationError

from pipeline.config.load import ConfigError, apply_override, format_errors, read_yaml, resolve_paths
from pipeline.config.spec import JobSpec, StageSpec
from pipeline.stages import get_stage_spec, list_stages
from pipeline.stages.chain import check_columns


def validate_job(data: dict, source: str, base_dir: Path | None = None) -> JobSpec:
    """Validate a merged mapping into a JobSpec; every error names ``source`` and the key.

    ``base_dir``: the job file's folder, where relative file settings are looked up first.
    """
    data = copy.deepcopy(data)
    stages_raw = data.get("stages")
    stages: list[StageSpec] = []
    problems: list[str] = []
    if isinstance(stages_raw, list):
        seen: set[str] = set()
        for i, raw in enumerate(stages_raw):
            where = f"stages.{i}"
            if not isinstance(raw, dict):
                problems.append(f"{where}: must be a mapping, got {type(raw).__name__}")
                continue
            raw = dict(raw)
            raw.setdefault("type", raw.get("name"))
            raw.setdefault("name", raw.get("type"))
            stage_type = raw.get("type")
            if stage_type is None:
                problems.append(f"{where}.type: missing (known types: {', '.join(list_stages())})")
                continue
            spec_cls = get_stage_spec(stage_type)
            if spec_cls is None:
                problems.append(f"{where}.type: unknown stage type {stage_type!r} (known: {', '.join(list_stages())})")
                continue
            resolve_paths(raw, spec_cls, base_dir)
            try:
                spec = spec_cls.model_validate(raw)
            except ValidationError as exc:
                problems.extend(format_errors(exc, prefix=f"{where} ({raw['name']})"))
                continue
            if spec.name in seen:
                problems.append(f"{where}.name: duplicate stage name {spec.name!r}")
            seen.add(spec.name)
            stages.append(spec)
        if not problems:  # what each stage reads must be written by an earlier one, without collisions
            problems.extend(check_columns(stages))
        data["stages"] = stages if not problems else []
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = format_errors(exc, prefix="", skip_stages=bool(problems)) + problems
        job = None
    if problems or job is None:
        raise ConfigError(f"{source}: invalid job spec:\n  " + "\n  ".join(problems))
    return job


def load_job(
    path: str | Path,
    *,
    overrides: list[str] = (),
    input: str | None = None,
    output: str | None = None,
) -> JobSpec:
    data = read_yaml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    if input is not None:
        data["input"] = input
    if output is not None:
        data["output"] = output
    return validate_job(data, str(path), base_dir=Path(path).parent)
