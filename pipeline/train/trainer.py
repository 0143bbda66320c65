"""``pipeline train``: data-parallel training on our shards with Ray Train's TorchTrainer.

    preflight (datasets, categories, checkpoint architecture)     -- fails before any worker starts
    Ray Data: shard paths -> rows (image bytes + annotations), streamed and split across workers
    TorchTrainer(train_loop, workers x resources)                 -- gloo on CPU, NCCL on GPUs
    OUTPUT/ray-train/checkpoint_*/{model.pth, train_state.pt}     -- every epoch (last 2 kept)
    OUTPUT/model.pth, OUTPUT/train.json                           -- the final model and the history

Running the same command again with the same ``output`` resumes from the last checkpoint there
(Ray Train restores the run; :func:`pipeline.train.loop.train_loop` restores model, optimizer,
epoch, step and elapsed time).
"""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import schema
from pipeline.config.load import ConfigError
from pipeline.data.label_maps import is_label_map_dataset
from pipeline.data.shards import (
    DatasetError,
    list_shards,
    read_meta,
    read_shard,
    resolve,
    shard_rows,
    shard_schema,
)
from pipeline.eval.iou_types import NUM_KEYPOINTS
from pipeline.models.registry import check_state_dict, get_entry, unknown_kwargs
from pipeline.models.weights import load_checkpoint
from pipeline.train.loop import HISTORY_FILE, MODEL_FILE, build_kwargs, model_keypoints, num_classes, train_loop
from pipeline.train.reader import read_training_rows
from pipeline.train.semantic_objective import class_weights, pixel_counts
from pipeline.train.train_spec import TrainSpec
from pipeline.train.targets import label_categories

RUN_NAME = "ray-train"


def _empty_images(table: pa.Table) -> list:
    """Image ids of rows with no image bytes (rows that carry an import error are skipped anyway)."""
    names = table.column_names
    empty = pc.fill_null(pc.equal(pc.binary_length(table[schema.IMAGE]), 0), True)
    if schema.ERROR in names:
        empty = pc.and_(empty, pc.is_null(table[schema.ERROR]))
    return table.filter(empty)[schema.IMAGE_ID].to_pylist()


def training_categories(spec: TrainSpec, categories: list[dict]) -> list[dict]:
    """The label of each dataset category in the model: 1..K after background (detectors, semantic), 0..K-1 (classifiers)."""
    return label_categories(categories, first=0 if spec.kind == "classifier" else 1)


def _build_on_meta(spec: TrainSpec, categories: list[dict], source: str) -> torch.nn.Module:
    """The network on the meta device: checks the builder's arguments without allocating it."""
    try:
        with torch.device("meta"):
            model = get_entry(spec.model).builder(
                weights=None, weights_backbone=None, num_classes=num_classes(training_categories(spec, categories)), **build_kwargs(spec)
            )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: model_kwargs: {spec.model} does not accept {spec.model_kwargs}: {exc}") from exc
    unknown = unknown_kwargs(spec.model, model, spec.model_kwargs)
    if unknown:
        raise ConfigError(f"{source}: model_kwargs: {spec.model} does not accept {', '.join(unknown)}")
    return model


def _check_annotations(flat, known: set[int], num_keypoints: int, shard: str, source: str) -> int:
    """Raise on unknown categories or keypoint counts the model cannot learn; returns usable keypoints."""
    if not len(flat):
        return 0
    unknown = set(pc.unique(pc.struct_field(flat, "category_id")).to_pylist()) - known
    if unknown:
        raise ConfigError(f"{source}: train: {shard} has annotations of unknown category ids {sorted(unknown)}")
    if not num_keypoints:
        return 0
    lengths = pc.fill_null(pc.list_value_length(pc.struct_field(flat, "keypoints")), 0)
    wrong = set(pc.unique(lengths).to_pylist()) - {0, 3 * num_keypoints}
    if wrong:
        raise ConfigError(
            f"{source}: train: {shard} has annotations with {sorted(n // 3 for n in wrong)} keypoints; "
            f"the model predicts {num_keypoints} (model_kwargs: {{num_keypoints: N}} changes it)"
        )
    return int(pc.sum(pc.greater(lengths, 0)).as_py() or 0)


def preflight(spec: TrainSpec, source: str) -> tuple[list[str], list[dict], int]:
    """Check everything that can be checked before training; returns (shards, categories, rows)."""
    try:
        shards = list_shards(spec.train)
    except DatasetError as exc:
        raise ConfigError(f"{source}: train: {exc}") from exc
    categories = read_meta(spec.train).categories
    if not categories and spec.kind != "generative":  # a generative model learns images, not classes
        raise ConfigError(f"{source}: train: {spec.train} has no categories in dataset.json; nothing to learn to recognise")
    model = _build_on_meta(spec, categories, source)
    num_keypoints = model_keypoints(model) if get_entry(spec.model).task == "keypoints" else 0
    known = {int(c["id"]) for c in categories}
    annotations = with_keypoints = label_maps = labels = 0
    for shard in shards:
        names = shard_schema(shard).names
        if schema.IMAGE not in names or schema.IMAGE_ID not in names:
            raise ConfigError(f"{source}: train: {shard} has no {schema.IMAGE!r} or {schema.IMAGE_ID!r} column; is it an image dataset?")
        wanted = (schema.IMAGE_ID, schema.IMAGE, schema.ERROR, schema.ANNOTATIONS, schema.LABEL_MAP, schema.LABEL)
        table = read_shard(shard, columns=[c for c in wanted if c in names])
        empty = _empty_images(table)
        if empty:
            more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
            raise ConfigError(
                f"{source}: train: {shard} has empty images (image_id {', '.join(map(str, empty[:5]))}{more}); "
                "drop those rows or re-import the dataset"
            )
        if spec.kind == "classifier":
            if schema.LABEL in names:
                labels += _check_labels(table, known, shard, source)
            continue
        if spec.kind == "generative":  # the images are all it learns from
            continue
        if spec.semantic and schema.LABEL_MAP in names:
            label_maps += table[schema.LABEL_MAP].length() - table[schema.LABEL_MAP].null_count
        if schema.ANNOTATIONS not in names:
            continue
        flat = pc.list_flatten(table[schema.ANNOTATIONS])
        annotations += len(flat)
        with_keypoints += _check_annotations(flat, known, num_keypoints, shard, source)
    if spec.kind == "classifier" and labels == 0:
        raise ConfigError(
            f"{source}: train: {spec.train} has no image labels (a non-null {schema.LABEL!r} column) to learn from; "
            "e.g. pipeline data synth OUT --classification"
        )
    if spec.kind in ("detector", "semantic") and annotations == 0 and label_maps == 0:
        what = "annotations or label maps" if spec.semantic else "annotations"
        raise ConfigError(f"{source}: train: {spec.train} has no {what} to learn from")
    if num_keypoints and with_keypoints == 0:
        raise ConfigError(f"{source}: train: {spec.train} has no keypoints for {spec.model} to learn from")
    if spec.val and num_keypoints and num_keypoints != NUM_KEYPOINTS:
        raise ConfigError(
            f"{source}: val: keypoint AP uses COCO's OKS sigmas for its {NUM_KEYPOINTS} person keypoints, "
            f"so a model with {num_keypoints} cannot be validated; leave val out"
        )
    if spec.val and spec.kind == "generative" and not getattr(model, "likelihood", True):
        raise ConfigError(f"{source}: val: {spec.model} has no likelihood to validate (it is measured by its samples); leave val out")
    if spec.val:
        try:
            list_shards(spec.val)
        except DatasetError as exc:
            raise ConfigError(f"{source}: val: {exc}") from exc
        missing = {c["name"] for c in read_meta(spec.val).categories} - {c["name"] for c in categories}
        if missing:
            raise ConfigError(f"{source}: val: categories {sorted(missing)} are not in the training set")
    if spec.weights.lower() != "none":
        ckpt = load_checkpoint(spec.weights)
        try:
            check_state_dict(model, ckpt["model"], spec.weights, spec.model)
        except Exception as exc:  # noqa: BLE001 - report as a spec error naming the key
            raise ConfigError(f"{source}: weights: {exc}") from exc
    required = required_column(spec)
    rows = {schema.LABEL_MAP: label_maps, schema.LABEL: labels}.get(required) or sum(shard_rows(s) for s in shards)
    return shards, categories, rows


def required_column(spec: TrainSpec) -> str | None:
    """The column a row must have (non-null) to train on, if any: a classifier's ``label``; a
    semantic model's ``label_map`` in a label-map dataset (``import-images --labels``), where a row
    without one has no ground truth, not all background."""
    if spec.kind == "classifier":
        return schema.LABEL
    if spec.semantic and is_label_map_dataset(read_meta(spec.train)):
        return schema.LABEL_MAP
    return None


def _check_labels(table: pa.Table, known: set[int], shard: str, source: str) -> int:
    """Raise on image labels that are no category; returns how many rows have one."""
    present = table.filter(pc.is_valid(table[schema.LABEL]))
    bad = [(i, y) for i, y in zip(present[schema.IMAGE_ID].to_pylist(), present[schema.LABEL].to_pylist()) if y not in known]
    if bad:
        raise ConfigError(f"{source}: train: {shard}: image_id {bad[0][0]} has label {bad[0][1]}, not a category of dataset.json")
    return present.num_rows


CLASS_WEIGHT_ROWS = 512  # rows whose pixels are counted for the class weights (enough for stable frequencies)


def semantic_class_weights(spec: TrainSpec, shards: list[str], categories: list[dict]) -> list[float] | None:
    """A semantic model's per-class loss weights (model label order), from the first rows' pixels; None: unweighted."""
    if not spec.semantic or spec.class_weights == "none":
        return None
    labelled = label_categories(categories)
    label_of = {c["id"]: c["label"] for c in labelled}
    required = required_column(spec)  # reads dataset.json: once, not per shard
    rows: list[dict] = []
    for shard in shards:
        names = shard_schema(shard).names
        columns = [c for c in (schema.IMAGE_ID, schema.IMAGE, schema.ANNOTATIONS, schema.LABEL_MAP) if c in names]
        table = read_shard(shard, columns=columns)
        if required:
            table = table.filter(pc.is_valid(table[required]))
        rows += table.slice(0, CLASS_WEIGHT_ROWS - len(rows)).to_pylist()
        if len(rows) >= CLASS_WEIGHT_ROWS:
            break
    return class_weights(pixel_counts(rows, label_of, len(labelled) + 1)).tolist()


MATERIALIZE_BYTES = 2 * 1024**3  # training sets up to this size (encoded) are cached in the object store


def _bytes_of(shards: list[str]) -> int:
    total = 0
    for shard in shards:
        fs, path = resolve(shard)
        total += fs.get_file_info(path).size or 0
    return total


def with_absolute_paths(spec: TrainSpec) -> TrainSpec:
    """The spec with local dataset, output and checkpoint paths made absolute (URIs untouched)."""

    def absolute(path: str | None) -> str | None:
        if path is None or "://" in path or (path.lower() == "none"):
            return path
        return os.path.abspath(path)

    return spec.model_copy(
        update={"train": absolute(spec.train), "val": absolute(spec.val), "output": absolute(spec.output), "weights": absolute(spec.weights)}
    )


def train(spec: TrainSpec, *, source: str = "<spec>", address: str | None = None) -> dict:
    """Train per ``spec``; returns ``{"model": path, "epochs": [...metrics per epoch...]}``."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    shards, categories, rows = preflight(spec, source)
    spec = with_absolute_paths(spec)  # workers run in another directory (Ray Train's artifacts dir)
    output = spec.output
    os.makedirs(output, exist_ok=True)
    started_ray = not ray.is_initialized()
    if started_ray:
        if address:
            ray.init(address=address, runtime_env={"py_modules": [os.path.dirname(os.path.dirname(__file__))]})
        else:
            # The dashboard serves the State API that Ray Train's placement-group cleaner polls.
            ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")
    try:
        # The dataset's executor runs in Ray Train's SplitCoordinator actor; its progress bars
        # would interleave with the epoch lines. (They were suspected of the coordinator's CPU
        # use, but turning them off did not change it: re-running the read plan each epoch did,
        # which the materialize below removes.)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ds = ray.data.from_items([{"shard_index": i} for i in range(len(shards))], override_num_blocks=len(shards))
        ds = ds.map_batches(read_training_rows, fn_kwargs={"shards": shards, "required": required_column(spec)}, batch_size=1, batch_format="pyarrow", num_cpus=0.2)
        if _bytes_of(shards) <= MATERIALIZE_BYTES:
            # Small enough to keep in the object store: read once, not once per epoch. It also
            # spares the split coordinator from running the read plan every epoch, which on
            # 2 CPU cores cost training throughput.
            ds = ds.materialize()
        resources = {"CPU": spec.worker_num_cpus} | ({"GPU": spec.worker_num_gpus} if spec.worker_num_gpus else {})
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                # the keys set: the worker re-validates it, and keys of the other model kind are refused when set
                "spec": spec.model_dump(mode="json", exclude_unset=True),
                "categories": training_categories(spec, categories),
                "rows": rows,
                "class_weights": semantic_class_weights(spec, shards, categories),
            },
            scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.worker_num_gpus > 0, resources_per_worker=resources),
            datasets={"train": ds},
            run_config=RunConfig(name=RUN_NAME, storage_path=output, checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        result = trainer.fit()
    finally:
        if started_ray:
            ray.shutdown()
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as folder:
        shutil.copy(os.path.join(folder, MODEL_FILE), os.path.join(output, MODEL_FILE))
        with open(os.path.join(folder, HISTORY_FILE), encoding="utf-8") as f:
            history = json.load(f)
    summary = {"model": os.path.join(output, MODEL_FILE), "epochs": history, "spec": spec.model_dump(mode="json")}
    with open(os.path.join(output, "train.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary
