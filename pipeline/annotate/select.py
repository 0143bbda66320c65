"""Which predicted objects an export keeps, and under which class: one place for every export.

Exports (YOLO, Label Studio) and, later, merges must agree on what "the predictions" are, so the
thresholds and the class map live here and nowhere else:

* ``min_score``: objects scoring below it are dropped (``below_threshold``);
* ``min_score_per_class`` (``--min-score-per-class person=0.7``, repeatable): replaces the global
  threshold for one class, named by the **predictions'** category name (before any mapping);
* ``category_map`` (``--categories map.yaml``): ``model_name: dataset_name`` renames a class (two
  model classes may map to one dataset class), ``model_name: null`` drops it (``dropped_by_map``).
  The map is strict: a predicted class the map does not mention is an error listing all of them,
  and so is a map entry for a class the predictions do not have (a typo would otherwise drop a
  class without a word), unless ``allow_unmatched``, which drops the unmentioned classes
  (``unmapped``) and ignores the extra entries.

Output categories: without a map, the predictions' categories in id order; with a map, the
dataset names in the order they first appear in the map file. Exports number them in that order
(YOLO class index 0..K-1). Each dropped object is counted once, under the first reason that
applies, checked in this order: ``no_category`` (category_id -1 or an id that ``dataset.json``
does not list), ``dropped_by_map``, ``unmapped``, ``below_threshold``.

Per class: ``Selector.dropped_by_class`` counts the same drops by ``(reason, class)`` (the output
name for ``below_threshold``, the predictions' name for the map reasons), so a merge can report
per category what it left out.

Provenance: :func:`prediction_source` turns the predictions' ``dataset.json`` (written by the
runner: job, job id, each stage's model and the sha256 of its weights file) into the one line
every exported or merged object carries as its ``source``.

Images: every prediction row comes out once (``duplicate_images``: a repeated image_id is
counted and skipped). Error rows (``error`` set: the image could not be read) come out with
``error`` set and no objects; each export decides what to do with them and counts them.
Boxes are **xyxy** float pixels of the image as displayed; masks stay compressed COCO RLE. A box
that is not finite or has a negative width or height (x2 < x1) is an error naming the image.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from pipeline import schema
from pipeline.annotate import AnnotationError
from pipeline.data.render import known_categories
from pipeline.data.shards import list_shards, read_meta, read_shard, shard_schema

DROP_REASONS = {
    "no_category": "objects with no category (category_id -1, or an id dataset.json does not list)",
    "dropped_by_map": "objects of a class the category map drops (mapped to null)",
    "unmapped": "objects of a class the category map does not mention (--allow-unmatched)",
    "below_threshold": "objects scoring below their threshold",
    "duplicate_images": "repeated rows of an image_id already exported",
}


@dataclass(frozen=True)
class SelectOptions:
    """Thresholds and the class map, as given on the command line (validated by :class:`Selector`)."""

    min_score: float = 0.0
    min_score_per_class: Mapping[str, float] = field(default_factory=dict)
    category_map: Mapping[str, str | None] | None = None
    allow_unmatched: bool = False

    @classmethod
    def from_cli(cls, *, min_score: float = 0.0, per_class: Sequence[str] = (), categories_file: str | None = None,
                 allow_unmatched: bool = False) -> SelectOptions:
        """Parse ``NAME=SCORE`` strings and a YAML map file into options; errors name the bad entry."""
        return cls(min_score=_score(min_score, "--min-score"), min_score_per_class=parse_per_class(per_class),
                   category_map=read_category_map(categories_file) if categories_file else None,
                   allow_unmatched=allow_unmatched)


def parse_per_class(items: Sequence[str]) -> dict[str, float]:
    """``["person=0.7", "car=0.4"]`` -> ``{"person": 0.7, "car": 0.4}``; a class given twice is an error."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise AnnotationError(f"--min-score-per-class {item!r}: expected CLASS=SCORE, e.g. person=0.7")
        try:
            score = float(value)
        except ValueError:
            raise AnnotationError(f"--min-score-per-class {item!r}: {value!r} is not a number") from None
        if name in out:
            raise AnnotationError(f"--min-score-per-class: class {name!r} is given twice")
        out[name] = _score(score, f"--min-score-per-class {item!r}")
    return out


def read_category_map(path: str) -> dict[str, str | None]:
    """Read ``model_name: dataset_name`` (or ``null``) pairs from a YAML mapping, keeping file order."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise AnnotationError(f"--categories {path}: cannot read it ({exc})") from exc
    except yaml.YAMLError as exc:
        raise AnnotationError(f"--categories {path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise AnnotationError(f"--categories {path}: expected a mapping 'model_name: dataset_name' (or null to drop)")
    out: dict[str, str | None] = {}
    for key, value in data.items():
        if value is not None and not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise AnnotationError(f"--categories {path}: {key!r} maps to {value!r}; expected a class name or null")
        out[str(key)] = None if value is None else str(value)
    return out


def _score(value: float, what: str) -> float:
    if not (0.0 <= float(value) <= 1.0):
        raise AnnotationError(f"{what}: a score threshold must be between 0 and 1, got {value}")
    return float(value)


@dataclass
class SelectedObject:
    """One kept object. ``box`` is xyxy float pixels; ``mask`` compressed COCO RLE or None."""

    box: tuple[float, float, float, float]
    score: float
    class_index: int  # 0..K-1 in the order of Selector.output_categories
    category: str  # output (dataset) name
    source_category: str  # the predictions' name, before the map
    mask: dict | None = None
    keypoints: list[float] | None = None
    source_category_id: int | None = None  # the predictions' category_id (the dataset's id, before the map)


@dataclass
class SelectedImage:
    """One prediction row: its image and kept objects (none for an error row, which has ``error``)."""

    image_id: int
    file_name: str | None
    width: int | None
    height: int | None
    error: str | None
    objects: list[SelectedObject]


class Selector:
    """Validate options against one prediction dataset, then stream its images with kept objects.

    >>> sel = Selector("demo-output/shapes-masks", SelectOptions(min_score=0.5))   # doctest: +SKIP
    >>> for image in sel.images(): ...                                              # doctest: +SKIP
    >>> sel.counts   # {"images": ..., "error_rows": ..., "objects_in": ..., "objects_kept": ..., <drop reasons>}
    """

    def __init__(self, pred: str, options: SelectOptions, *, source: str | None = None, name_unknown: bool = False):
        """``source``: the images dataset whose categories name the ids when ``pred`` records none.
        ``name_unknown``: with no category list anywhere, name the ids the predictions use
        ``class <id>`` (as ``pipeline data render`` labels them) instead of failing: the COCO
        results export, whose ids are all an evaluator needs, takes it."""
        self.pred, self.options = pred, options
        self.meta = read_meta(pred)
        categories = known_categories(self.meta, source)
        if not categories and name_unknown:
            categories = [{"id": c, "name": f"class {c}"} for c in used_category_ids(pred)]
        if not categories:
            raise AnnotationError(
                f"{pred}: no category names in its dataset.json nor in its source dataset's; "
                "an export needs class names (run the job on a dataset with categories, or with a model that names its classes)"
            )
        self.source_names: dict[int, str] = {}
        for c in sorted(categories, key=lambda c: int(c["id"])):
            self.source_names[int(c["id"])] = str(c.get("name") or f"class {c['id']}")
        self.output_categories, self._target = self._resolve_map()
        self._thresholds = self._resolve_thresholds()
        self.counts: Counter = Counter()
        self.dropped_by_class: Counter = Counter()

    # --- validation -----------------------------------------------------------------------------

    def _resolve_map(self) -> tuple[list[str], dict[str, str | None]]:
        """Output category names (ordered) and source name -> output name (None: dropped by map)."""
        names = list(dict.fromkeys(self.source_names.values()))
        cmap = self.options.category_map
        if cmap is None:
            return names, {n: n for n in names}
        unmatched = [n for n in names if n not in cmap]
        extra = [k for k in cmap if k not in names]
        if (unmatched or extra) and not self.options.allow_unmatched:
            problems = []
            if unmatched:
                problems.append(f"predicted classes the map does not mention: {', '.join(unmatched)} "
                                "(map each to a dataset class, or to null to drop it)")
            if extra:
                problems.append(f"map entries for classes {self.pred} does not have: {', '.join(extra)} "
                                f"(its classes: {', '.join(names)})")
            raise AnnotationError("--categories: " + "; ".join(problems) + "; or pass --allow-unmatched")
        target = {n: cmap[n] for n in names if n in cmap}
        outputs = list(dict.fromkeys(v for k, v in cmap.items() if v is not None and k in target))
        return outputs, target

    def _resolve_thresholds(self) -> dict[str, float]:
        names = set(self.source_names.values())
        unknown = sorted(set(self.options.min_score_per_class) - names)
        if unknown:
            raise AnnotationError(
                f"--min-score-per-class: unknown class {', '.join(unknown)}; the predictions' classes are "
                f"{', '.join(sorted(names))} (names before --categories mapping)"
            )
        return {n: self.options.min_score_per_class.get(n, self.options.min_score) for n in names}

    # --- streaming ------------------------------------------------------------------------------

    def images(self, *, with_masks: bool = False, with_keypoints: bool = False) -> Iterator[SelectedImage]:
        """Every prediction row once, in shard/row order; ``self.counts`` is filled as it goes."""
        self.counts = Counter(images=0, error_rows=0, objects_in=0, objects_kept=0)
        self.dropped_by_class = Counter()
        class_index = {n: i for i, n in enumerate(self.output_categories)}
        seen: set[int] = set()
        for shard in list_shards(self.pred):
            present = shard_schema(shard).names
            if with_masks and schema.MASKS not in present:
                raise AnnotationError(f"{shard}: no '{schema.MASKS}' column (a masks stage writes it); export boxes only")
            wanted = [schema.IMAGE_ID, schema.FILE_NAME, schema.WIDTH, schema.HEIGHT, schema.ERROR, schema.BOXES,
                      schema.SCORES, schema.CATEGORY_IDS]
            wanted += [schema.MASKS] if with_masks else []
            wanted += [schema.KEYPOINTS] if with_keypoints and schema.KEYPOINTS in present else []
            missing = [c for c in wanted[:2] + wanted[5:8] if c not in present]
            if missing:
                raise AnnotationError(f"{shard}: not a detection output (no {', '.join(missing)} column)")
            for row in read_shard(shard, columns=[c for c in wanted if c in present]).to_pylist():
                image_id = int(row[schema.IMAGE_ID])
                if image_id in seen:
                    self.counts["duplicate_images"] += 1
                    continue
                seen.add(image_id)
                self.counts["images"] += 1
                image = SelectedImage(image_id, row.get(schema.FILE_NAME), row.get(schema.WIDTH),
                                      row.get(schema.HEIGHT), row.get(schema.ERROR), [])
                if image.error is not None:
                    self.counts["error_rows"] += 1
                    yield image
                    continue
                image.objects = self._select_row(row, image, class_index, shard)
                yield image

    def _select_row(self, row: dict, image: SelectedImage, class_index: dict[str, int], shard: str) -> list[SelectedObject]:
        where = f"{shard}: image_id {image.image_id} ({image.file_name})"
        if not image.width or not image.height:
            raise AnnotationError(f"{where}: no width/height, but no error either")
        boxes = row.get(schema.BOXES) or []
        scores = row.get(schema.SCORES) or []
        cats = row.get(schema.CATEGORY_IDS) or []
        masks = row.get(schema.MASKS) if schema.MASKS in row else None
        keypoints = row.get(schema.KEYPOINTS) if schema.KEYPOINTS in row else None
        lengths = {"boxes": len(boxes), "scores": len(scores), "category_ids": len(cats)}
        if masks is not None:
            lengths["masks"] = len(masks)
        if keypoints is not None:
            lengths["keypoints"] = len(keypoints)
        if len(set(lengths.values())) > 1:
            raise AnnotationError(f"{where}: columns disagree on the number of objects ({lengths})")
        kept = []
        for n, (box, score, cat) in enumerate(zip(boxes, scores, cats)):
            self.counts["objects_in"] += 1
            if box is None or len(box) != 4 or not all(math.isfinite(v) for v in box) or score is None or not math.isfinite(score):
                raise AnnotationError(f"{where}: object {n} has no finite box/score ({box}, {score})")
            if box[2] < box[0] or box[3] < box[1]:
                raise AnnotationError(f"{where}: object {n} has a box with negative width or height {list(box)} (xyxy)")
            name = self.source_names.get(int(cat)) if cat is not None else None
            if name is None:
                self.counts["no_category"] += 1
                continue
            if name not in self._target:
                self.counts["unmapped"] += 1
                self.dropped_by_class["unmapped", name] += 1
                continue
            out = self._target[name]
            if out is None:
                self.counts["dropped_by_map"] += 1
                self.dropped_by_class["dropped_by_map", name] += 1
                continue
            if score < self._thresholds[name]:
                self.counts["below_threshold"] += 1
                self.dropped_by_class["below_threshold", out] += 1
                continue
            if masks is not None and masks[n] is None:
                raise AnnotationError(f"{where}: object {n} has no mask")
            self.counts["objects_kept"] += 1
            kept.append(SelectedObject(
                box=tuple(float(v) for v in box), score=float(score), class_index=class_index[out], category=out,
                source_category=name, mask=masks[n] if masks is not None else None,
                keypoints=list(keypoints[n]) if keypoints is not None and keypoints[n] is not None else None,
                source_category_id=int(cat),
            ))
        return kept


def describe_counts(counts: Mapping[str, int]) -> list[str]:
    """Human lines for the non-zero drop counts (the CLI prints them; nothing leaves silently)."""
    return [f"dropped: {counts[k]} {text}" for k, text in DROP_REASONS.items() if counts.get(k)]


def used_category_ids(pred: str) -> list[int]:
    """The category ids a prediction dataset's boxes use (not -1), sorted; reads one column."""
    import pyarrow.compute as pc

    used: set[int] = set()
    for shard in list_shards(pred):
        if schema.CATEGORY_IDS in shard_schema(shard).names:
            flat = pc.list_flatten(read_shard(shard, columns=[schema.CATEGORY_IDS])[schema.CATEGORY_IDS])
            used.update(int(c) for c in pc.unique(flat).to_pylist() if c is not None and c != -1)
    return sorted(used)


def prediction_source(meta, pred: str) -> str:
    """Where a prediction dataset's objects come from, in one line: the ``source`` of each exported object.

    From the ``info`` the runner writes into ``dataset.json`` (:func:`pipeline.engine.job_record.provenance`):
    ``"<job>: <model> <weights file> sha256:<first 12>; job <job id>"``, e.g.
    ``"shapes_masks: small_maskrcnn small_maskrcnn_shapes.pth sha256:1f0c6d2a9b3e; job 7c1e..."``.
    Stages without a model (proposals) are left out; older dataset.json files with less in them
    give less (at least the job name, else the prediction folder's name).
    """
    import posixpath

    info = meta.info or {}
    name = str(info.get("job") or info.get("model") or posixpath.basename(str(pred).rstrip("/")) or "predictions")
    parts = []
    for stage in info.get("stages") or []:
        if not isinstance(stage, dict) or not stage.get("model"):
            continue
        text = str(stage["model"])
        weights = ((stage.get("files") or {}).get("weights")) or {}
        if weights.get("path"):
            text += f" {posixpath.basename(str(weights['path']).replace(chr(92), '/'))}"
        elif stage.get("weights") not in (None, ""):
            text += f" weights={stage['weights']}"
        if weights.get("sha256"):
            text += f" sha256:{str(weights['sha256'])[:12]}"
        parts.append(text)
    if info.get("job_id"):
        parts.append(f"job {info['job_id']}")
    return f"{name}: {'; '.join(parts)}" if parts else name
