"""What decides a job's output rows, and the stamp that says which job wrote a shard.

Two runs write the same rows when their specs agree on everything but the resource keys
(``batch_size``, ``num_cpus``, ``pool_size``...: speed, not rows). :func:`row_affecting` is that
part of a dumped spec; its hash (:func:`job_fingerprint`) is stamped into every output shard's
Parquet metadata, and a resumed run keeps only shards carrying its own stamp.
"""

from __future__ import annotations

import hashlib
import json

from pipeline.config.load import dump
from pipeline.config.spec import JobSpec, StageSpec

# Spec keys that change how fast a job runs but not what it writes: a resumed run may differ in them.
RESOURCE_KEYS = StageSpec.resource_keys()


def row_affecting(spec: dict) -> dict:
    """The parts of a dumped spec that decide the output rows (what resume compares)."""
    stages = [{k: v for k, v in stage.items() if k not in RESOURCE_KEYS} for stage in spec.get("stages", [])]
    return {"input": spec.get("input"), "decode": {k: v for k, v in spec.get("decode", {}).items() if k not in ("batch_size", "num_cpus")}, "stages": stages}


def diff(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in diff(a.get(k), b.get(k), f"{where}.{k}".lstrip("."))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{where}.{i}")]
    return [] if a == b else [f"{where}: {a!r} then, {b!r} now"]


def job_fingerprint(job: JobSpec) -> str:
    """Hash of the row-affecting settings (``row_affecting``): equal for runs that write the same rows."""
    text = json.dumps(row_affecting(dump(job)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def shard_stamp(fingerprint: str, name: str) -> dict:
    """What an output shard carries in its Parquet metadata: which job wrote it, for which input shard."""
    return {"job": fingerprint, "shard": name}
