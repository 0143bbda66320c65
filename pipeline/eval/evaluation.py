"""Distributed, resumable COCO evaluation: one Ray task per prediction shard, merge, accumulate once.

The data flow of :func:`evaluate`::

    GT (dataset or COCO file) ──load once──> GroundTruth (column-wise)
    PRED shards ──driver: hash + image ids──> GT subset per shard ──> state on disk still valid?
        yes ─> load PRED/eval/<iou_type>/part-XXXXX.npz
        no  ─> Ray task: read shard, validate, match_images() per IoU type ─> save .npz ─> records
    PRED results JSON ──driver: loadRes semantics──> chunks of images ──> Ray tasks (not saved)
    GT images no prediction covers ──driver──> records (GT only: they count as misses)
    records ──COCOEvaluator.process (dedup by image id)──> evaluate() ──> metrics (+ files)
    self-contained IoU types (proposals; semantic: its own per-shard tasks + state) ──their entry's evaluate()──> metrics

The IoU types asked for are resolved once, to :mod:`~pipeline.eval.iou_types` entries, and
``metrics.json`` is written once, here, for all of them.

Only match records travel back from tasks (a few dozen bytes per detection). A shard's state is
valid while the shard's bytes (sha256), the GT of its images, the categories and the evaluation
parameters are unchanged; so a resumed run or a second ``pipeline eval`` over several runs'
outputs recomputes nothing that is finished. State that cannot be written (a read-only folder)
is reported and skipped; evaluation still completes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from pipeline.data.shards import join, list_shards
from pipeline.eval.detections import Detections, read_prediction_table, results_to_detections
from pipeline.eval.evaluator import COCOEvaluator
from pipeline.eval.groundtruth import GroundTruth, load_ground_truth
from pipeline.eval.iou_types import CocoIoUType, IoUType, get_iou_type, list_iou_types
from pipeline.eval.matching import match_images
from pipeline.eval.params import EvalInputError
from pipeline.eval.records import MatchRecords, load_records, save_records
from pipeline.eval.report import plot_pr_curves, write_metrics
from pipeline.eval.shard_tasks import is_results_file, read_checked_table, read_shard_image_ids, run_tasks, state_path, want_ray

log = logging.getLogger(__name__)

TASK_NUM_CPUS = 0.9  # leaves Ray a sliver of CPU for anything else scheduled beside us
JSON_CHUNK_MIN_IMAGES = 50
RAY_AUTO_MIN_IMAGES = {
    t.name: t.ray_min_images for t in map(get_iou_type, list_iou_types()) if t.per_image_matching
}
"""With ``use_ray=None`` and no Ray running, start one only for at least this many images to match
(the smallest among the IoU types still to compute; each entry's ``ray_min_images``, shown here
by name); below it one process finishes first.

Where the threshold is, and why (measured 2026-12-01 on the 2-core machine, no GPU,
``bench/eval_speed.py`` set: 5,000 images, 92,721 detections, 80 categories): in-process
matching takes 0.31 CPU-s for 4,656 images in bbox (~15,000 images/s) and 2.4 CPU-s in segm
(~1,900 images/s); starting and stopping a local Ray costs ~3-4 s on an idle machine (far more on
a busy one: 38 s measured under load for the same 0.9 s of work). Ray can at best divide matching
by the number of CPUs ``c`` -- and the JSON reading, GT loading and accumulation stay in the
driver -- so it pays off only past ``start * rate * c / (c - 1)`` images: about
3.5 s x 15,000/s x 2 = 105,000 images for bbox and 3.5 s x 1,900/s x 2 = 13,000 for segm on 2
cores (56,000 / 7,000 on 16 cores), rounded up because Ray also ships every GT subset and
detection to its workers. Keypoints (OKS per group in Python) are taken as costly as segm. The old single threshold (20,000 images) made a 20,000-image bbox evaluation wait ~4 s for
a Ray start that saved ~0.7 s.
"""


@dataclass
class Unit:
    """One piece of matching work: a prediction shard, or a chunk of a results file."""

    source: str
    image_ids: np.ndarray
    shard_sha256: str | None = None  # shards only
    state_paths: dict[CocoIoUType, str] = field(default_factory=dict)  # shards only
    keys: dict[CocoIoUType, dict] = field(default_factory=dict)  # {"key", fingerprints} (shards only)
    detections: Detections | None = None  # results chunks only
    skipped: Counter = field(default_factory=Counter)
    records: dict[CocoIoUType, MatchRecords] = field(default_factory=dict)
    cached: set = field(default_factory=set)  # IoU types whose records came from saved state


def evaluate(
    pred_paths: list[str],
    gt: str,
    iou_types: list[str | IoUType],
    out_dir: str | None = None,
    *,
    method: str = "vectorized",
    use_state: bool = True,
    use_ray: bool | None = None,
    task_num_cpus: float = TASK_NUM_CPUS,
) -> dict:
    """Evaluate predictions against ground truth; returns the ``metrics.json`` dict.

    Args:
        pred_paths: prediction datasets (folders of shards with ``dataset.json``) and/or COCO
            results JSON files. Several may be given (e.g. the outputs of several runs); an image
            predicted in more than one is counted once (the first path wins).
        gt: a dataset with ``annotations`` or a COCO annotations JSON file.
        iou_types: names (or entries) of :mod:`~pipeline.eval.iou_types`: ``bbox``, ``segm``,
            ``keypoints``, ``proposals`` (one prediction dataset only), ``semantic``, ``classification``.
        out_dir: if given, ``metrics.json`` (every type) and ``pr_<iou_type>.png`` (types matched
            per image) are written there.
        method: per-image matching, ``vectorized`` or ``pycocotools`` (identical numbers).
        use_state: reuse and write per-shard state under ``PRED/eval/<iou_type>/``.
        use_ray: run matching as Ray tasks, one per shard. ``None`` (default): yes if Ray is
            already running (e.g. after a job, on a cluster), else only for at least
            ``RAY_AUTO_MIN_IMAGES`` images to match (100,000 for bbox, 15,000 for segm or
            keypoints: below that a Ray start costs more than it saves); ``True``: always (a
            private local Ray is started, and stopped after, if none runs); ``False``: in this
            process. A single piece of work runs in-process either way.

    Returns ``{iou_type: {"AP": ..., ..., "per_category": {name: AP}, "counts": {...}}}`` (each
    type's stats are its entry's ``stat_keys``), in the order asked.

    Example::

        metrics = evaluate(["runs/detect"], "data/val", ["bbox"], "runs/detect/metrics")
        metrics["bbox"]["AP"]
    """
    types = list(dict.fromkeys(get_iou_type(t) for t in iou_types))  # the one check of the names
    if not types:
        raise EvalInputError("no IoU type requested")
    if not pred_paths:
        raise EvalInputError("no predictions given")
    for t in types:
        if len(pred_paths) > 1 and not t.merges_predictions:
            raise EvalInputError(f"--iou-type {t.name} takes one prediction dataset")
    ground = load_ground_truth(gt, **_gt_flags(types))
    if len(ground.ann_id) == 0 and not any(t.has_own_ground_truth(ground) for t in types):
        # pycocotools would print a table of -1: say why instead (label maps are ground truth for semantic)
        raise EvalInputError(
            f"ground truth {gt} has no annotations ({len(ground.image_ids)} images): there is nothing to evaluate against; "
            "--gt must be a labelled dataset (e.g. pipeline data import-coco) or a COCO annotations file"
        )
    matched = [t for t in types if t.per_image_matching]
    results = {}
    if matched:
        results = _evaluate_matched(
            pred_paths, ground, matched, out_dir,
            method=method, use_state=use_state, use_ray=use_ray, task_num_cpus=task_num_cpus,
        )
    options = {"use_state": use_state, "use_ray": use_ray, "task_num_cpus": task_num_cpus}
    metrics = {t.name: results[t] if t.per_image_matching else t.evaluate(pred_paths, ground, **options) for t in types}
    if out_dir:
        write_metrics(metrics, join(out_dir, "metrics.json"))
    return metrics


def _gt_flags(types: list[IoUType]) -> dict[str, bool]:
    """The optional ground-truth fields ``types`` read, as :func:`load_ground_truth` takes them."""
    fields = {f for t in types for f in t.gt_fields}
    return {"segm": "segm" in fields, "keypoints": "keypoints" in fields}


def _det_flags(types: list[IoUType]) -> dict[str, bool]:
    """The optional detection fields ``types`` read, as the prediction readers take them."""
    fields = {f for t in types for f in t.det_fields}
    return {"masks": "segm" in fields, "keypoints": "keypoints" in fields}


def _evaluate_matched(
    pred_paths: list[str], ground: GroundTruth, types: list[CocoIoUType], out_dir: str | None,
    *, method: str, use_state: bool, use_ray: bool | None, task_num_cpus: float,
) -> dict[CocoIoUType, dict]:
    """The COCO-style types, matched per image over every shard at once; plots their PR curves."""
    units = _plan_units(pred_paths, ground, types, use_state=use_state)
    _claim_images(units)
    pending = [u for u in units if len(u.image_ids) and any(t not in u.records for t in types)]
    ray_tasks = _run_units(
        pending, ground, types, method=method, use_state=use_state, use_ray=use_ray, task_num_cpus=task_num_cpus
    )

    metrics = {}
    for iou_type in types:
        evaluator = COCOEvaluator(iou_type=iou_type, categories=ground.categories)
        for unit in units:
            if iou_type in unit.records:
                evaluator.process(unit.records[iou_type])
        # GT images no prediction covers still count: their objects are all misses
        uncovered = np.setdiff1d(ground.image_ids, evaluator.images, assume_unique=True)
        if len(uncovered):
            only_gt = match_images(ground.subset(uncovered), Detections.empty(), image_ids=uncovered, iou_type=iou_type)
            evaluator.process(only_gt)
        result = evaluator.evaluate()
        metrics[iou_type] = {
            **result["stats"],
            "per_category": _by_name(result["per_category"], ground.categories),
            "counts": _counts(units, ground, iou_type, evaluator, result, uncovered) | {"ray_tasks": ray_tasks},
        }
        if out_dir:
            plot_pr_curves(result["eval"], iou_type=iou_type.name, path=join(out_dir, f"pr_{iou_type.name}.png"))
    return metrics


# --- planning --------------------------------------------------------------------------------------


def _plan_units(pred_paths: list[str], ground: GroundTruth, iou_types: list[CocoIoUType], *, use_state: bool) -> list[Unit]:
    units: list[Unit] = []
    params = {t: t.params_fingerprint() for t in iou_types}
    for path in pred_paths:
        if is_results_file(path):
            units += _results_units(path, ground, iou_types)
            continue
        for shard in list_shards(path):
            data, ids = read_shard_image_ids(shard, ground)
            unit = Unit(source=shard, image_ids=ids, shard_sha256=hashlib.sha256(data).hexdigest())
            subset = ground.subset(ids)
            for t in iou_types:
                unit.state_paths[t] = state_path(shard, t.name)
                gt_fp = subset.fingerprint(t)
                unit.keys[t] = {
                    "key": hashlib.sha256(f"{unit.shard_sha256}:{gt_fp}:{params[t]}".encode()).hexdigest()[:32],
                    "shard_sha256": unit.shard_sha256,
                    "gt_fingerprint": gt_fp,
                    "params_fingerprint": params[t],
                }
                if use_state:
                    loaded = load_records(unit.state_paths[t])
                    if loaded is not None and loaded[1].get("key") == unit.keys[t]["key"]:
                        unit.records[t] = loaded[0]
                        unit.skipped = Counter(loaded[1].get("skipped", {}))
                        unit.cached.add(t)
            units.append(unit)
    return units


def _results_units(path: str, ground: GroundTruth, iou_types: list[CocoIoUType]) -> list[Unit]:
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalInputError(f"cannot read COCO results file {path}: {exc}") from exc
    dets, skipped = results_to_detections(results, gt=ground, source=path, **_det_flags(iou_types))
    ids = np.unique(dets.image_id)
    n_chunks = max(1, min(2 * (os.cpu_count() or 1), math.ceil(len(ids) / JSON_CHUNK_MIN_IMAGES)))
    units = []
    for n, chunk in enumerate(np.array_split(ids, n_chunks)):
        take = np.flatnonzero(np.isin(dets.image_id, chunk))
        units.append(Unit(source=f"{path}[{n}]", image_ids=chunk, detections=dets.take(take)))
    if units:
        units[0].skipped = skipped
    return units


def _claim_images(units: list[Unit]) -> None:
    """Drop units whose images were all claimed by an earlier unit (a repeated shard): no work."""
    seen = np.zeros(0, np.int64)
    for unit in units:
        fresh = np.setdiff1d(unit.image_ids, seen, assume_unique=True)
        if len(fresh) == 0 and len(unit.image_ids):
            unit.skipped = Counter(duplicate_images=len(unit.image_ids))
            unit.records, unit.cached, unit.image_ids = {}, set(), fresh
        seen = np.union1d(seen, fresh)


# --- running -----------------------------------------------------------------------------------------


def match_unit(
    unit: Unit, gt: GroundTruth, iou_types: list[CocoIoUType], *, method: str, use_state: bool
) -> tuple[dict[CocoIoUType, MatchRecords], Counter, list[str]]:
    """The work of one task: read + validate the shard (or take the chunk), match, save state."""
    warnings: list[str] = []
    if unit.detections is not None:
        dets, image_ids, skipped = unit.detections, unit.image_ids, Counter(unit.skipped)
    else:
        shard = read_prediction_table(
            read_checked_table(unit.source, unit.shard_sha256),
            source=unit.source,
            gt=gt,
            category_ids=set(gt.category_ids.tolist()),
            **_det_flags(iou_types),
        )
        dets, image_ids, skipped = shard.detections, shard.image_ids, shard.skipped
    records = {}
    for t in iou_types:
        records[t] = match_images(gt, dets, image_ids=image_ids, iou_type=t, method=method)
        if use_state and t in unit.state_paths:
            meta = {**unit.keys[t], "shard": unit.source, "iou_type": t.name, "skipped": dict(skipped)}
            try:
                save_records(unit.state_paths[t], records[t], meta)
            except OSError as exc:
                warnings.append(f"could not save evaluation state {unit.state_paths[t]}: {exc}")
    return records, skipped, warnings


def _run_units(pending, ground, iou_types, *, method, use_state, use_ray, task_num_cpus) -> int:
    """Match every pending unit (Ray tasks or in-process); returns how many Ray tasks ran."""
    jobs = []
    for unit in pending:
        todo = [t for t in iou_types if t not in unit.records]
        # what the task needs, not records already loaded from state
        jobs.append((replace(unit, records={}, cached=set()), ground.subset(unit.image_ids), todo))  # match_unit's arguments
    if not jobs:
        return 0
    min_images = min(t.ray_min_images for _, _, todo in jobs for t in todo)
    use_ray = want_ray(use_ray, sum(len(u.image_ids) for u in pending), min_images)
    results, ray_tasks = run_tasks(match_unit, jobs, use_ray=use_ray, task_num_cpus=task_num_cpus, method=method, use_state=use_state)
    for unit, (records, skipped, warnings) in zip(pending, results):
        unit.records.update(records)
        unit.skipped = skipped
        for w in warnings:
            log.warning(w)
    return ray_tasks


def _by_name(per_category: dict[int, float], categories: list[dict]) -> dict[str, float]:
    names = [str(c.get("name", c["id"])) for c in categories]
    dup = {n for n in names if names.count(n) > 1}
    out = {}
    for c, name in zip(categories, names):
        out[f"{name} ({c['id']})" if name in dup else name] = per_category[int(c["id"])]
    return out


def _counts(units, ground, iou_type, evaluator, result, uncovered) -> dict:
    skipped: Counter = Counter()
    for u in units:
        skipped.update(u.skipped)
    skipped["duplicate_images"] += evaluator.duplicate_images
    shards = [u for u in units if u.shard_sha256 is not None]
    return {
        "images": int(len(ground.image_ids)),
        "images_without_predictions": int(len(uncovered)),
        "detections": int(result["detections"]),
        "gt_annotations": int(ground.stats.get("gt_annotations", len(ground.ann_id))),
        "skipped": {k: int(v) for k, v in sorted(skipped.items()) if v},
        "shards": len(shards),
        "shards_from_state": sum(1 for u in shards if iou_type in u.cached),
        "gt_annotations_unknown_category": int(ground.stats.get("gt_annotations_unknown_category", 0)),
    }
