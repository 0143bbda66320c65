"""The per-worker training loop (runs inside Ray Train workers) and the checkpoint format.

Each worker reads its split of the training shards (Ray Data, streamed), turns rows into samples
and a loss with the objective of the model's kind (:class:`pipeline.train.targets.DetectionObjective`,
:class:`pipeline.train.semantic_objective.SemanticObjective`,
:class:`pipeline.train.classifier_objective.ClassifierObjective`), steps the model (DDP
over gloo on CPU, NCCL on GPUs, via ``ray.train.torch.prepare_model``), and at each epoch end
rank 0 writes a checkpoint and evaluates on the validation set. A checkpoint folder holds:

* ``model.pth``: ``{"model": state_dict, "model_name", "num_classes", "categories", "build_kwargs"}``,
  the format the inference stages load by path (``weights: OUT/model.pth``); a semantic model's
  also has ``"resize": None``: the ``segment`` stage runs it at native resolution, as it trained;
  a classifier's has ``"resize"`` and ``"crop"``: the ``classify`` stage's input sizes;
* ``train_state.pt``: optimizer state, epoch and step, so a run resumes where it stopped;
* ``history.json``: the metrics of every epoch so far (a resumed run keeps its past).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

from pipeline.models.registry import accepted_kwargs, check_state_dict, get_entry
from pipeline.models.weights import load_checkpoint
from pipeline.train.classifier_objective import ClassifierObjective
from pipeline.train.generative_objective import GenerativeObjective
from pipeline.train.semantic_objective import SemanticObjective
from pipeline.train.train_spec import TrainSpec
from pipeline.train.targets import DetectionObjective
from pipeline.train.validate import validate_checkpoint

MODEL_FILE = "model.pth"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"  # metrics of every epoch so far, carried from checkpoint to checkpoint


def say(message: str) -> None:
    """One progress line to the worker's stdout, which Ray forwards to the driver's console.

    Not ``print``: Ray Train patches it in its workers to log the message *and*, because Ray has
    replaced ``sys.stdout``, print it too, so every line reached the console twice.
    """
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def build_kwargs(spec: TrainSpec) -> dict:
    """The builder's arguments besides weights and classes; checkpoints carry them for the stages."""
    if spec.kind == "generative" and "size" in accepted_kwargs(spec.model):  # the VAE's linear layers fix its size
        return {"size": spec.image_size, **spec.model_kwargs}
    if spec.kind != "detector":  # no resize inside the model
        return dict(spec.model_kwargs)
    return {"min_size": spec.min_size, "max_size": spec.max_size, **spec.model_kwargs}


def model_keypoints(model: torch.nn.Module) -> int:
    """K of a Keypoint R-CNN (the channels of its keypoint logits)."""
    return model.roi_heads.keypoint_predictor.kps_score_lowres.out_channels


def build_train_model(spec: TrainSpec, num_classes: int) -> torch.nn.Module:
    entry = get_entry(spec.model)
    model = entry.builder(weights=None, weights_backbone=None, num_classes=num_classes, **build_kwargs(spec))
    if spec.weights.lower() != "none":
        ckpt = load_checkpoint(spec.weights)
        check_state_dict(model, ckpt["model"], spec.weights, spec.model)
        model.load_state_dict(ckpt["model"])
    return model


def checkpoint_payload(spec: TrainSpec, model: torch.nn.Module, categories: list[dict]) -> dict:
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_name": spec.model,
        "num_classes": num_classes(categories),
        "categories": categories,  # [{"label", "id", "name"}]: label -> dataset category id
        "build_kwargs": build_kwargs(spec),
    } | stage_sizes(spec)


def num_classes(categories: list[dict]) -> int:
    """The model's outputs: labels run 1..K after background 0 (detectors, semantic) or 0..K-1 (classifiers);
    0 without categories (a generative model learns images, not classes)."""
    return max((c["label"] for c in categories), default=-1) + 1


def stage_sizes(spec: TrainSpec) -> dict:
    """What the checkpoint tells the stage about its input size: as the model trained."""
    if spec.kind == "semantic":
        return {"resize": None}  # native resolution
    if spec.kind == "classifier":
        return {"resize": spec.classifier_resize, "crop": spec.crop_size}
    if spec.kind == "generative":
        return {"image_size": spec.image_size}  # pipeline generate samples makes images of this side
    return {}  # detectors resize inside the model (min_size/max_size in build_kwargs)


def make_objective(spec: TrainSpec, model: torch.nn.Module, config: dict, rank: int):
    """The samples-and-loss object of the model's kind (see the module docstring)."""
    label_of = {c["id"]: c["label"] for c in config["categories"]}
    if spec.kind == "semantic":
        return SemanticObjective(label_of, crop=spec.crop_size, hflip=spec.hflip, weights=config.get("class_weights"), seed=spec.seed * 1000 + rank)
    if spec.kind == "generative":
        return GenerativeObjective(image_size=spec.image_size, seed=spec.seed * 1000 + rank)
    if spec.kind == "classifier":
        return ClassifierObjective(label_of, resize=spec.classifier_resize, crop=spec.crop_size, hflip=spec.hflip, seed=spec.seed * 1000 + rank)
    task = get_entry(spec.model).task
    return DetectionObjective(
        label_of, with_masks=task == "masks", num_keypoints=model_keypoints(model) if task == "keypoints" else 0, blank_size=spec.min_size
    )


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay with ``progress`` in [0, 1]."""
    return min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_loop(config: dict) -> None:
    """Ray Train entry point: ``config = {"spec": TrainSpec dict (set keys), "categories": [...], "rows": int,
    "class_weights": [...] or None}``."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint
    from ray.train.torch import prepare_model

    spec = TrainSpec.model_validate(config["spec"])
    categories = config["categories"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.threads or max(1, math.ceil(spec.worker_num_cpus)))
    torch.manual_seed(spec.seed + rank)

    model = build_train_model(spec, num_classes(categories))
    objective = make_objective(spec, model, config, rank)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_spec = spec.optimizer
    if opt_spec.name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=opt_spec.lr, betas=(opt_spec.beta1, 0.999), weight_decay=opt_spec.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=opt_spec.lr, momentum=opt_spec.momentum, weight_decay=opt_spec.weight_decay)

    start_epoch, step, elapsed_before, resumed_from, history = 0, 0, 0.0, None, []
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as folder:
            model.load_state_dict(load_checkpoint(os.path.join(folder, MODEL_FILE))["model"])
            state = torch.load(os.path.join(folder, STATE_FILE), weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, elapsed_before = state["epoch"] + 1, state["step"], state["elapsed_s"]
        resumed_from = state["epoch"]
        with open(os.path.join(folder, HISTORY_FILE), encoding="utf-8") as f:
            history = json.load(f)

    model = prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    device = next(core.parameters()).device
    steps_per_epoch = max(1, config["rows"] // (spec.batch_size * world))
    total_steps = min(steps_per_epoch * spec.epochs, spec.steps or math.inf)
    budget = spec.time_limit_minutes * 60 if spec.time_limit_minutes else None
    started = time.time() - elapsed_before
    shard = ray.train.get_dataset_shard("train")

    for epoch in range(start_epoch, spec.epochs):
        model.train()
        losses: list[float] = []
        stop, skipped = False, 0
        epoch_start = window_start = time.time()
        for batch in shard.iter_batches(
            batch_size=spec.batch_size, batch_format="pyarrow", local_shuffle_buffer_size=4 * spec.batch_size,
            local_shuffle_seed=spec.seed + epoch * 1000 + rank, drop_last=True,
        ):
            # The schedule ends with whichever limit comes first: the time budget or the steps.
            progress = max(step / total_steps, (time.time() - started) / budget if budget else 0.0)
            if world > 1:  # every worker must take the same number of steps, or DDP waits forever
                flag = torch.tensor([1.0 if progress >= 1 else 0.0])
                dist.all_reduce(flag)
                progress = 1.0 if flag.item() > 0 else progress
            if progress >= 1:
                stop = True
                break
            for group in optimizer.param_groups:
                group["lr"] = opt_spec.lr * lr_factor(step, progress, opt_spec.warmup_steps)
            samples = []
            for row in batch.to_pylist():
                try:
                    samples.append(objective.sample(row))
                except Exception as exc:  # noqa: BLE001 - a corrupt image is skipped and counted, not fatal
                    skipped += 1
                    say(f"rank {rank}: skipping image {row['image_id']}: {type(exc).__name__}: {exc}")
            loss = objective.loss(model, samples or [objective.blank()], device)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.item()))
            step += 1
            if rank == 0 and step % spec.log_every_steps == 0:
                window = losses[-spec.log_every_steps :]
                rate = len(window) * spec.batch_size * world / max(1e-9, time.time() - window_start)
                left = f", {max(0.0, budget - (time.time() - started)) / 60:.1f} min left" if budget else ""
                say(
                    f"epoch {epoch} step {step}/{total_steps}: loss {np.mean(window):.3f}, "
                    f"lr {optimizer.param_groups[0]['lr']:.2e}, {rate:.1f} img/s{left}"
                )
                window_start = time.time()
        if world > 1:
            total = torch.tensor([skipped])
            dist.all_reduce(total)
            skipped = int(total.item())
        if stop and not losses:  # the budget ran out right at an epoch boundary: nothing new to report
            break
        metrics = {
            "epoch": epoch,
            "step": step,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "epoch_s": round(time.time() - epoch_start, 2),
            "images_per_s": round(len(losses) * spec.batch_size * world / max(1e-9, time.time() - epoch_start), 2),
            "resumed_from_epoch": resumed_from,
            "skipped_images": skipped,  # rows whose image or annotations could not be read (all workers)
        }
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                torch.save(checkpoint_payload(spec, core, categories), os.path.join(folder, MODEL_FILE))
                torch.save(
                    {"optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "elapsed_s": time.time() - started},
                    os.path.join(folder, STATE_FILE),
                )
                if spec.val:
                    metrics.update(validate_checkpoint(os.path.join(folder, MODEL_FILE), spec))
                history.append(metrics)
                with open(os.path.join(folder, HISTORY_FILE), "w", encoding="utf-8") as f:
                    json.dump(history, f, indent=2)
                say(f"epoch {epoch}: " + ", ".join(f"{k}={v}" for k, v in metrics.items() if k != "epoch"))
                checkpoint = Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)
        if stop:
            break
