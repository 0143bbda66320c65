"""Reading COCO JSON files as real ones are written: one place for both importing and evaluating.

Each caller passes the error type its users see (``DataImportError`` when importing,
``EvalInputError`` when evaluating); the messages are the same.
"""

from __future__ import annotations

import json

import numpy as np


def int_id(value, what: str, error: type[Exception] = ValueError) -> int:
    """COCO ids are ints; some real files write them as numeric strings ("2299")."""
    if isinstance(value, (bool, np.bool_)):
        raise error(f"{what} {value!r} is not an integer id")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise error(f"{what} {value!r} is not an integer id")


def read_coco_file(path: str, error: type[Exception] = ValueError) -> dict:
    """Load a COCO annotations file; a file that cannot be read or is not COCO raises ``error`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read COCO annotations file {path}: {exc}") from exc
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise error(f"{path}: not a COCO annotations file (no 'images' list)")
    return coco
