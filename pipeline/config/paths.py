"""Which settings name files, and where a relative one is found.

A job file names other files: its ``extends:`` base, and per stage a checkpoint (``weights``,
style ``model``) or a picture (``style_image``). Stage fields that hold such a path are declared
with :func:`path_field`. A relative path is looked up beside the job file first (so a job folder
can be copied anywhere with its models), then in the working directory (how the shipped jobs are
run, from the repository root); when neither has it, the error names the key and both absolute
paths tried.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from pydantic import Field

PATH_MARK = "file_path"


def path_field(default: Any, description: str) -> Any:
    """A stage field whose value may be a file path (see the module docstring)."""
    return Field(default, description=description, json_schema_extra={PATH_MARK: True})


def is_path(value: str) -> bool:
    """Whether a setting that can be a name or a file (``weights: DEFAULT`` vs ``x.pth``) is a file."""
    return os.sep in value or value.endswith((".pth", ".pt")) or value.startswith(".")


def find_relative(value: str, base_dir: Path | None) -> tuple[str | None, list[str]]:
    """``(path to use, places tried)`` for a relative ``value``; None when no place has it.

    Beside the job file wins (returned absolute); the working directory keeps ``value`` as written,
    so the resolved spec (and a resumed run's comparison of it) reads as before. Each place tried
    is described as ``/abs/path (beside the job file)`` or ``/abs/path (in the working directory)``.
    """
    places = []
    if base_dir is not None:
        beside = (base_dir / value).resolve()
        places.append(f"{beside} (beside the job file)")
        if beside.exists():
            return str(beside), places
    here = Path(value).resolve()
    if base_dir is None or here != (base_dir / value).resolve():
        places.append(f"{here} (in the working directory)")
    if here.exists():
        return value, places
    return None, places


_verified: dict[tuple, str] = {}  # (path, inode, size, mtime_ns) -> sha256 already computed in this process


def sha256_of(path: str | os.PathLike) -> str:
    """The file's sha256 (hex), computed once per process for an unchanged file (same inode, size, mtime)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _verified:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _verified[key] = digest.hexdigest()
    return _verified[key]
