"""Image classification evaluation: the computation behind the ``classification`` IoU type.

Ground truth is image-level: the ``label`` column of the ground-truth dataset (:data:`LABEL`,
int64, a category id of its ``dataset.json``; null = unlabelled). Reach it through
``evaluate([pred], gt, ["classification"])``; the entry is
:class:`pipeline.eval.iou_types.Classification`.

Predictions are a classify stage's columns: per image, ``class_category_ids`` (the dataset's
category ids of the model's top k classes; ``-1`` where a class maps to none) ranked by
``class_scores`` (descending; the stage writes them so, and ties keep the written order).

Per image with a label ``y``:

* **top-1 hit**: the best-scored category is ``y``; **top-5 hit**: ``y`` is among the five best;
* an image whose prediction row is an **error row** (not processed), has null prediction columns,
  or that **no prediction shard holds**, is wrong for both (as semantic evaluation counts the
  pixels of such images as misses); a class mapped to ``-1`` never matches;
* an image **without a label** (null) is left out, neither right nor wrong, and counted.

The state is three integer vectors over the ground truth's categories (in id order): images,
top-1 hits and top-5 hits per category, so shards (and runs) merge exactly by addition and the
numbers are made only at the end:

* ``top1 = sum(top1 hits) / sum(images)``, ``top5`` likewise -- ``null`` (not a number) when the
  ground truth has fewer than 5 categories, or some prediction ranks fewer than 5 classes
  (``top_k`` below 5, or a model with fewer classes): a top-5 over fewer would read as one;
* ``per_category[name] = {"top1": hits / images, "images": images}``: the top-1 recall of each
  ground-truth category (``top1`` null for a category without labelled images).

Fractions 0..1. An image predicted twice (two shards, two PRED datasets) counts once: the first wins.

State: each prediction shard's vectors are saved as ``PRED/eval/classification/part-XXXXX.npz`` with
the key they were computed against (the shard's sha256, the labels of its images, the categories,
the images it was given) and reused while the key matches (:mod:`pipeline.eval.shard_tasks`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipeline import schema
from pipeline.data.shards import list_shards, read_shard, shard_schema
from pipeline.eval.groundtruth import GroundTruth
from pipeline.eval.params import EvalInputError
from pipeline.eval.shard_tasks import (
    claim_shards,
    fill_units,
    is_results_file,
    load_array_state,
    read_checked_table,
    saved_or_warning,
    state_path,
)

LABEL = schema.LABEL
STATE_VERSION = 1  # bump when the state's layout or meaning changes (invalidates saved state)
TOP5 = 5
PRED_COLUMNS = (schema.CLASS_CATEGORY_IDS, schema.CLASS_SCORES)
_SKIP_KEYS = ("duplicate_images", "duplicate_image_rows")


@dataclass(frozen=True)
class Categories:
    """The ground truth's categories in id order; names made unique (``"name (id)"``) where two share one."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @staticmethod
    def from_categories(categories: list[dict]) -> Categories:
        by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
        ids = tuple(sorted(by_id))
        names = [by_id[i] for i in ids]
        dup = {n for n in names if names.count(n) > 1}
        return Categories(ids=ids, names=tuple(f"{n} ({i})" if n in dup else n for i, n in zip(ids, names)))

    @property
    def n(self) -> int:
        return len(self.ids)

    def index_of(self, labels: np.ndarray) -> np.ndarray:
        """Category ids (all of them categories) -> their positions in :attr:`ids`."""
        return np.searchsorted(np.asarray(self.ids, np.int64), labels)


# --- one shard's counts ---------------------------------------------------------------------------


def empty_state(n: int) -> np.ndarray:
    """(3, n) int64: rows images, top-1 hits, top-5 hits; column = category index."""
    return np.zeros((3, n), np.int64)


def shard_state(table, image_ids: np.ndarray, labels: np.ndarray, categories: Categories, *, where: str) -> tuple[np.ndarray, Counter]:
    """The state of ``image_ids`` (sorted, each once; their ``labels``) from prediction ``table`` rows.

    ``table`` None: no predictions (every image wrong). Returns ((3, C) int64, counts).
    """
    state = empty_state(categories.n)
    counts: Counter = Counter()
    rows: dict[int, int] = {}
    cols: dict[str, list] = {}
    if table is not None:
        wanted = set(image_ids.tolist())
        cols = {c: table[c].to_pylist() if c in table.column_names else [None] * table.num_rows
                for c in (schema.IMAGE_ID, schema.ERROR, *PRED_COLUMNS)}
        for r, i in enumerate(cols[schema.IMAGE_ID]):
            if i not in wanted:
                continue  # claimed by an earlier shard (counted by the planner), or not labelled
            if i in rows:
                counts["duplicate_image_rows"] += 1
                continue
            rows[i] = r
    index = categories.index_of(labels)
    np.add.at(state[0], index, 1)
    for image_id, label, k in zip(image_ids.tolist(), labels.tolist(), index.tolist()):
        r = rows.get(image_id)
        if r is None:
            continue  # no prediction: wrong
        if cols[schema.ERROR][r] is not None:
            counts["error_rows"] += 1
            continue
        ranked = ranked_categories(cols[schema.CLASS_CATEGORY_IDS][r], cols[schema.CLASS_SCORES][r],
                                   where=f"{where}: image_id {image_id}")
        if ranked is None:
            counts["null_prediction_rows"] += 1
            continue
        if len(ranked) < TOP5:
            counts["predictions_with_fewer_than_5_classes"] += 1
        if len(ranked) and ranked[0] == -1:
            counts["top1_unmapped"] += 1
        state[1, k] += int(len(ranked) > 0 and int(ranked[0]) == label)
        state[2, k] += int(label in ranked[:TOP5].tolist())
    return state, counts


def ranked_categories(category_ids, scores, *, where: str) -> np.ndarray | None:
    """One row's category ids, best score first (a stable sort: ties keep the written order); None if null."""
    if category_ids is None:
        return None
    ids = np.asarray([-1 if c is None else c for c in category_ids], np.int64)
    if scores is None:
        return ids  # written best first by the classify stage
    s = np.asarray([np.nan if v is None else v for v in scores], np.float64)
    if len(s) != len(ids):
        raise EvalInputError(f"{where}: {len(ids)} {schema.CLASS_CATEGORY_IDS} but {len(s)} {schema.CLASS_SCORES}")
    return ids[np.argsort(-s, kind="stable")]


# --- the metrics ----------------------------------------------------------------------------------


def classification_metrics(state: np.ndarray, categories: Categories, *, top5_ranked: bool = True) -> dict:
    """``{"top1", "top5", "per_category": {name: {"top1", "images"}}}`` from a summed (3, C) state.

    ``top5_ranked``: every prediction ranked at least 5 classes (else top5 is None, as it is for
    fewer than 5 categories or no labelled image).
    """
    images, top1, top5 = (np.asarray(v, np.int64) for v in state)
    total = int(images.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        per_top1 = top1 / images
    return {
        "top1": float(top1.sum() / total) if total else None,
        "top5": float(top5.sum() / total) if total and categories.n >= TOP5 and top5_ranked else None,
        "per_category": {
            name: {"top1": float(per_top1[k]) if images[k] else None, "images": int(images[k])}
            for k, name in enumerate(categories.names)
        },
    }


# --- ground truth ---------------------------------------------------------------------------------


def read_labels(ground: GroundTruth) -> dict[int, int]:
    """``image_id -> category id`` from the ground-truth dataset's :data:`LABEL` column (non-null rows only).

    Empty for a COCO file or a dataset without the column. A label that is not one of the ground
    truth's categories is an error naming the image.
    """
    if is_results_file(ground.source):  # a COCO annotations file: no image-level labels
        return {}
    known = {int(c["id"]) for c in ground.categories}
    out: dict[int, int] = {}
    for shard in list_shards(ground.source):
        if LABEL not in shard_schema(shard).names:
            continue
        table = read_shard(shard, columns=[schema.IMAGE_ID, LABEL])
        for image_id, label in zip(table[schema.IMAGE_ID].to_pylist(), table[LABEL].to_pylist()):
            if label is None:
                continue
            if int(label) not in known:
                raise EvalInputError(
                    f"{shard}: image_id {image_id}: label {label} is not a category of the ground truth ({', '.join(map(str, sorted(known)))})"
                )
            out[int(image_id)] = int(label)
    return out


# --- per shard: plan, compute (in a Ray task or here), save ------------------------------------------


@dataclass
class ClsUnit:
    """One prediction shard and the labelled images it is counted for (its first claim on each)."""

    source: str
    image_ids: np.ndarray  # claimed ids, sorted
    labels: np.ndarray  # their labels (category ids), same order
    shard_sha256: str
    state_path: str
    key: str
    state: np.ndarray | None = None
    counts: Counter = field(default_factory=Counter)
    cached: bool = False


def evaluate_classification(
    pred_paths: list[str], ground: GroundTruth, iou_type, *,
    use_state: bool = True, use_ray: bool | None = None, task_num_cpus: float = 0.9,
) -> dict:
    """The ``classification`` entry of ``metrics.json`` for ``pred_paths`` (prediction datasets) against ``ground``."""
    categories = Categories.from_categories(ground.categories)
    labels = read_labels(ground)
    if not labels:  # a detection dataset or a COCO file given as --gt: say so rather than report null accuracy
        raise EvalInputError(
            f"ground truth {ground.source} has no image labels (a non-null {LABEL!r} column): nothing to score a "
            "classification against; e.g. pipeline data synth OUT --classification"
        )
    labelled = np.intersect1d(np.fromiter(labels, np.int64, len(labels)), ground.image_ids)  # sorted
    units = _plan(pred_paths, ground, labels, labelled, categories, iou_type, use_state=use_state)
    pending = [u for u in units if u.state is None]
    ray_tasks = fill_units(classification_unit, pending, [(u,) for u in pending], use_ray=use_ray,
                           min_images=iou_type.ray_min_images, task_num_cpus=task_num_cpus, categories=categories, use_state=use_state)
    total = empty_state(categories.n)
    counts: Counter = Counter()
    for u in units:
        total += u.state
        counts.update(u.counts)
    claimed = np.concatenate([u.image_ids for u in units]) if units else np.zeros(0, np.int64)
    uncovered = np.setdiff1d(labelled, claimed)
    if len(uncovered):  # labelled images no prediction holds: wrong
        state, _ = shard_state(None, uncovered, _labels_of(labels, uncovered), categories, where="")
        total += state
    result = classification_metrics(total, categories, top5_ranked=counts["predictions_with_fewer_than_5_classes"] == 0)
    result["counts"] = {
        "images": int(total[0].sum()),
        "images_without_label": int(len(ground.image_ids) - len(labelled)),
        "images_without_predictions": int(len(uncovered)),
        "error_rows": int(counts["error_rows"]),
        "null_prediction_rows": int(counts["null_prediction_rows"]),
        "top1_hits": int(total[1].sum()),
        "top5_hits": int(total[2].sum()),
        "top1_unmapped": int(counts["top1_unmapped"]),
        "predictions_with_fewer_than_5_classes": int(counts["predictions_with_fewer_than_5_classes"]),
        "skipped": {k: int(counts[k]) for k in _SKIP_KEYS if counts[k]},
        "shards": len(units),
        "shards_from_state": sum(1 for u in units if u.cached),
        "ray_tasks": ray_tasks,
    }
    return result


def _labels_of(labels: dict[int, int], ids: np.ndarray) -> np.ndarray:
    return np.array([labels[int(i)] for i in ids], np.int64)


def _plan(pred_paths, ground, labels, labelled, categories, iou_type, *, use_state) -> list[ClsUnit]:
    units = []
    claims = claim_shards(pred_paths, ground, labelled, iou_type_name=iou_type.name, made_by="a classify stage's output")
    for shard, sha, claimed, duplicates in claims:
        claimed_labels = _labels_of(labels, claimed)
        payload = {
            "version": STATE_VERSION, "shard_sha256": sha, "categories": list(categories.ids),
            "labels": hashlib.sha256(claimed.tobytes() + claimed_labels.tobytes()).hexdigest(),
        }
        key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
        unit = ClsUnit(source=shard, image_ids=claimed, labels=claimed_labels, shard_sha256=sha, key=key,
                       state_path=state_path(shard, iou_type.name))
        if duplicates:
            unit.counts["duplicate_images"] = duplicates
        if use_state:
            loaded = load_array_state(unit.state_path)
            if loaded is not None and loaded[1].get("key") == key and loaded[0].shape == (3, categories.n):
                unit.state, unit.cached = loaded[0], True
                unit.counts = Counter(loaded[1].get("counts", {}))  # its duplicates included: they are in the key
        units.append(unit)
    return units


def classification_unit(unit: ClsUnit, categories: Categories, *, use_state: bool):
    """The work of one task: read and check the shard, count its images, save state. Returns (state, counts, warnings)."""
    table = read_checked_table(unit.source, unit.shard_sha256)
    if schema.CLASS_CATEGORY_IDS not in table.column_names:
        raise EvalInputError(f"{unit.source}: no {schema.CLASS_CATEGORY_IDS!r} column; run a classify stage first")
    state, counts = shard_state(table, unit.image_ids, unit.labels, categories, where=unit.source)
    counts.update(unit.counts)  # duplicate images found by the planner
    warnings = saved_or_warning(use_state, unit.state_path, state, {"key": unit.key, "shard": unit.source, "counts": dict(counts)})
    return state, counts, warnings


