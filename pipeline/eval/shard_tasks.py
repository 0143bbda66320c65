"""Prediction shards as units of evaluation work, for every IoU type that evaluates shard by shard.

What the COCO types (:mod:`pipeline.eval.evaluation`), semantic segmentation
(:mod:`pipeline.eval.semantic`) and classification (:mod:`pipeline.eval.classification`) share: a
shard is read once as bytes (its sha256 keys the saved state, and the task re-checks it), its image
ids must be in the ground truth, its state lives at ``<shard folder>/eval/<iou_type>/<shard stem>.npz``
(for the self-contained types one integer array + its meta, :func:`save_array_state`), and the
per-shard work runs in this process or as Ray tasks (Ray started here only when needed, and stopped again).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.data.shards import DatasetError, join, list_shards, publish_bytes, resolve
from pipeline.eval.groundtruth import GroundTruth
from pipeline.eval.params import EvalInputError

log = logging.getLogger(__name__)

STATE_DIR = "eval"  # beside the prediction shards: <folder>/eval/<iou_type>/<shard stem>.npz


def is_results_file(path: str) -> bool:
    """A local COCO results JSON (not a prediction dataset)."""
    return path.endswith(".json") and "://" not in path and os.path.isfile(path)


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc


def read_shard_image_ids(shard: str, ground: GroundTruth) -> tuple[bytes, np.ndarray]:
    """``(shard bytes, its unique image ids)``; raises when an id is not in the ground truth."""
    data = read_bytes(shard)
    try:
        ids = pq.read_table(pa.BufferReader(data), columns=[schema.IMAGE_ID])[schema.IMAGE_ID]
    except (pa.ArrowInvalid, KeyError) as exc:
        raise EvalInputError(f"{shard}: not a prediction shard ({exc})") from exc
    ids = np.unique(ids.to_numpy().astype(np.int64))
    unknown = ids[~ground.has_images(ids)]
    if len(unknown):
        raise EvalInputError(
            f"{shard}: image_id {int(unknown[0])} is not in the ground truth {ground.source} "
            f"({len(unknown)} such image(s)); is this the right --gt?"
        )
    return data, ids


def claim_shards(
    pred_paths: Sequence[str], ground: GroundTruth, evaluated: np.ndarray, *, iou_type_name: str, made_by: str
) -> Iterator[tuple[str, str, np.ndarray, int]]:
    """Each prediction shard with the ``evaluated`` image ids it is the first to hold.

    Yields ``(shard, its sha256, claimed ids (sorted), duplicates)``: an image predicted in several
    shards or PRED datasets counts once, for the first (``duplicates``: ids this shard holds that an
    earlier one claimed). ``made_by`` names the stage whose output the type reads, for the error on
    a COCO results file.
    """
    seen = np.zeros(0, np.int64)
    for path in pred_paths:
        if is_results_file(path):
            raise EvalInputError(f"{path}: --iou-type {iou_type_name} reads a prediction dataset ({made_by}), not a results file")
        for shard in list_shards(path):
            data, ids = read_shard_image_ids(shard, ground)
            ids = np.intersect1d(ids, evaluated, assume_unique=True)  # images without ground truth: not evaluated
            claimed = np.setdiff1d(ids, seen, assume_unique=True)
            seen = np.union1d(seen, claimed)
            yield shard, hashlib.sha256(data).hexdigest(), claimed, int(len(ids) - len(claimed))


def read_checked_table(source: str, shard_sha256: str) -> pa.Table:
    """The shard as planned: its bytes must still hash to ``shard_sha256``."""
    data = read_bytes(source)
    if hashlib.sha256(data).hexdigest() != shard_sha256:
        raise EvalInputError(f"{source}: the shard changed while it was being evaluated; run again")
    return pq.read_table(pa.BufferReader(data))


def state_path(shard: str, iou_type_name: str) -> str:
    root = posixpath.dirname(shard) if "://" not in shard else shard.rsplit("/", 1)[0]
    stem = posixpath.basename(shard).rsplit(".", 1)[0]
    return join(join(join(root, STATE_DIR), iou_type_name), f"{stem}.npz")


def want_ray(use_ray: bool | None, images: int, min_images: int) -> bool:
    """``use_ray`` as asked; None (auto): Ray when it is already up here, or for ``min_images`` or more.

    Ray can only be initialised in this process if it was imported: importing it just to ask costs
    ~2 s of a cold command.
    """
    if use_ray is not None:
        return use_ray
    ray = sys.modules.get("ray")
    return (ray is not None and ray.is_initialized()) or images >= min_images


def run_tasks(fn: Callable, jobs: Sequence[tuple], *, use_ray: bool, task_num_cpus: float, **kwargs) -> tuple[list, int]:
    """``[fn(*job, **kwargs) for job in jobs]``, as Ray tasks when ``use_ray`` and more than one job.

    Returns (results in job order, how many Ray tasks ran). A task's :class:`EvalInputError` or
    :class:`DatasetError` is re-raised as itself (the message naming the record), not Ray's wrapper.
    """
    if not use_ray or len(jobs) <= 1:
        return [fn(*job, **kwargs) for job in jobs], 0
    import ray  # late: only evaluations that fan out need Ray, and importing it costs ~2 s

    started = False
    if not ray.is_initialized():
        # address="local": our own instance, never an unrelated cluster found on this machine
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        started = True
    try:
        task = ray.remote(fn).options(num_cpus=task_num_cpus)
        refs = [task.remote(*job, **kwargs) for job in jobs]
        try:
            return ray.get(refs), len(jobs)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, (EvalInputError, DatasetError)):
                raise type(cause)(*cause.args) from None
            raise
    finally:
        if started:
            ray.shutdown()


def fill_units(fn: Callable, pending: Sequence, jobs: Sequence[tuple], *, use_ray: bool | None, min_images: int,
               task_num_cpus: float, **kwargs) -> int:
    """Run ``fn(*job, **kwargs) -> (state, counts, warnings)`` for each pending unit of a self-contained
    type (Ray tasks when :func:`want_ray` says so, else here), set each unit's ``state`` and ``counts``,
    log the warnings; returns how many Ray tasks ran."""
    if not pending:
        return 0
    use_ray = want_ray(use_ray, sum(len(u.image_ids) for u in pending), min_images)
    results, ray_tasks = run_tasks(fn, jobs, use_ray=use_ray, task_num_cpus=task_num_cpus, **kwargs)
    for unit, (state, counts, warnings) in zip(pending, results):
        unit.state, unit.counts = state, counts
        for w in warnings:
            log.warning(w)
    return ray_tasks


def save_array_state(path: str, array: np.ndarray, meta: dict) -> None:
    """Write one shard's state (an int64 array, e.g. a confusion matrix or hit counts) + meta atomically."""
    buf = io.BytesIO()
    np.savez(buf, array=np.asarray(array, np.int64), meta=np.array(json.dumps(meta, sort_keys=True)))
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    publish_bytes(fs, p, buf.getvalue())


def load_array_state(path: str) -> tuple[np.ndarray, dict] | None:
    """(array, meta) saved at ``path`` by :func:`save_array_state`; None if absent or unreadable (then recompute)."""
    fs, p = resolve(path)
    try:
        with fs.open_input_stream(p) as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as npz:
            return np.asarray(npz["array"], np.int64), json.loads(str(npz["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def saved_or_warning(use_state: bool, path: str, array: np.ndarray, meta: dict) -> list[str]:
    """Save the state if asked; a failure to save is a warning (the numbers stand), returned to log."""
    if not use_state:
        return []
    try:
        save_array_state(path, array, meta)
    except OSError as exc:
        return [f"could not save evaluation state {path}: {exc}"]
    return []
