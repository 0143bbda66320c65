"""YAML job files -> a validated :class:`JobSpec`, with ``extends:`` and ``--set`` overrides.

Order of precedence (later wins): the ``extends:`` chain (paths relative to the file that names
them, then to the working directory), the job file itself, ``--set KEY=VALUE`` overrides, then ``--input``/``--output``.

Every error names the file and the dotted key, e.g.
``jobs/detect.yaml: stages.detect.score_threshold: Input should be a valid number``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config.paths import PATH_MARK, find_relative, is_path
from pipeline.config.spec import JobSpec, StageSpec


class ConfigError(ValueError):
    """A job spec that cannot run; the message names the file and the key."""


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping, resolving ``extends:`` (a path or list of paths) recursively."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: extends: cycle through {' -> '.join(str(p) for p in _seen)}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read job file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job file must be a mapping of keys, got {type(data).__name__}")
    bases = data.pop("extends", None)
    if bases is None:
        return data
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        found, tried = find_relative(str(base), path.parent)
        if found is None:
            raise ConfigError(f"{path}: extends: {base} not found (tried {_tried(tried)})")
        merged = deep_merge(merged, read_yaml(found, _seen + (path.resolve(),)))
    return deep_merge(merged, data)


def _tried(places: list[str]) -> str:
    return " and ".join(places)


def path_settings(spec_cls: type[StageSpec]) -> list[str]:
    """The stage fields that hold file paths (declared with ``path_field``)."""
    return [
        key
        for key, info in spec_cls.model_fields.items()
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get(PATH_MARK)
    ]


def resolve_paths(raw: dict, spec_cls: type[StageSpec], base_dir: Path | None) -> None:
    """Point the stage's relative file settings at the file beside the job file, if it is there.

    In place. A file found nowhere is left as written: whether it must exist is a preflight
    question (a spec may be validated before its model is trained), answered by
    :func:`missing_files`.
    """
    for key in path_settings(spec_cls):
        value = raw.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value):
            found, _ = find_relative(value, base_dir)
            if found is not None:
                raw[key] = found


def missing_files(stage: StageSpec, base_dir: Path | None) -> list[str]:
    """``KEY: file X not found (tried ...)`` for each file setting of ``stage`` that names no file.

    A value that may be a name rather than a path (``DEFAULT``, ``none``) is the stage's to judge.
    """
    problems = []
    for key in path_settings(type(stage)):
        value = getattr(stage, key)
        if isinstance(value, str) and is_path(value) and not os.path.exists(value):
            tried = [value] if os.path.isabs(value) else find_relative(value, base_dir)[1]
            problems.append(f"{key}: file {value} not found (tried {_tried(tried)})")
    return problems


def deep_merge(base: dict, top: dict) -> dict:
    """Mappings merge key by key; anything else (lists included) is replaced by ``top``."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(data: dict, assignment: str, source: str = "--set") -> None:
    """Apply ``a.b.c=value`` in place. Stages can be addressed by index or by name.

    The value is parsed as YAML, so ``0.3`` is a float, ``true`` a bool, ``[1, 2]`` a list.
    """
    if "=" not in assignment:
        raise ConfigError(f"{source} {assignment!r}: expected KEY=VALUE")
    dotted, raw = assignment.split("=", 1)
    keys = [k for k in dotted.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"{source} {assignment!r}: empty key in {dotted!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} {assignment!r}: value is not valid YAML: {exc}") from exc
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            index = _list_index(node, key, where, source)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{source} {assignment!r}: {'.'.join(keys[:i])} is not a mapping")
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})


def _list_index(items: list, key: str, where: str, source: str) -> int:
    if key.lstrip("-").isdigit():
        index = int(key)
        if not -len(items) <= index < len(items):
            raise ConfigError(f"{source}: {where}: index out of range (there are {len(items)})")
        return index
    names = [item.get("name") if isinstance(item, dict) else None for item in items]
    if key not in names:
        raise ConfigError(f"{source}: {where}: no stage named {key!r} (stages: {', '.join(map(str, names))})")
    return names.index(key)


def format_errors(exc: ValidationError, prefix: str, skip_stages: bool = False) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if skip_stages and loc.startswith("stages"):
            continue
        key = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        got = f" (got {err['input']!r})" if err["type"] not in ("missing", "extra_forbidden") else ""
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{key}: {msg}{got}")
    return lines


def dump(job: JobSpec) -> dict:
    """The resolved spec as plain data (stage subclasses included), for job.json."""
    return job.model_dump(mode="json", serialize_as_any=True)
