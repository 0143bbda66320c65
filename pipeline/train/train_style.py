"""``pipeline train-style``: train a fast-neural-style TransformerNet for one style image, on Ray.

The recipe is pytorch/examples ``fast_neural_style`` ``train`` (Johnson et al. 2016): content
images resized so the shorter side is ``image_size`` and centre-cropped square, in 0..255; Adam
on the TransformerNet; loss = ``content_weight`` * MSE of VGG-16 relu2_2 features (output vs
content) + ``style_weight`` * sum of Gram MSEs at relu1_2..relu4_3 (output vs style image). The
result is a plain TransformerNet state dict: the ``style`` stage loads it, and so does the
example's ``neural_style.py eval``.

Where it runs::

    driver: checks (content shards, style image, VGG weights, output folder)  -- before Ray starts
            ray.init (embedded, or --address)
    StyleTrainer actor (num_gpus=1 when the cluster has a GPU, else num_cpus)
            streams content images from our shards (pipeline.data.shards.iter_shard, decoded
            with EXIF applied; error rows and undecodable images skipped), forever, in order
    driver: asks the actor for ``log_every`` steps at a time, prints the losses, then fetches the
            weights and writes OUT atomically (on the driver's machine, also with --address)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

import pipeline
from pipeline.config.load import ConfigError
from pipeline.data.decode import DecodeError, decode_image
from pipeline.data.shards import (
    DatasetError,
    iter_shard,
    list_shards,
    shard_rows,
    shard_schema,
)
from pipeline.models.transformer_net import (
    DEFAULT_VGG,
    PerceptualLoss,
    TransformerNet,
    build_vgg,
    check_vgg_weights,
)
from pipeline.stages.style import read_style_image, to_tensor


@dataclass(frozen=True, kw_only=True)
class StyleTrainConfig:
    """Everything a training run needs; defaults are the example's (except steps, and log_every)."""

    style_image: str
    content: str
    out: str
    steps: int = 2000
    batch_size: int = 4
    image_size: int = 256
    style_size: int | None = None  # longer side of the style image (None: as it is, like the example)
    vgg_weights: str = DEFAULT_VGG
    content_weight: float = 1e5
    style_weight: float = 1e10
    lr: float = 1e-3
    seed: int = 42
    log_every: int = 50
    num_cpus: float = 1.0  # of the actor when it runs on CPU (also its torch threads, rounded up)


def preflight(config: StyleTrainConfig) -> tuple[list[str], np.ndarray]:
    """Every check that can fail before Ray starts: returns (content shard paths, style image RGB)."""
    for name in ("steps", "batch_size", "image_size", "log_every"):
        if getattr(config, name) < 1:
            raise ConfigError(f"train-style: {name} must be at least 1 (got {getattr(config, name)})")
    try:
        shards = list_shards(config.content)
    except DatasetError as exc:
        raise ConfigError(f"train-style: content: {exc}") from exc
    if sum(shard_rows(s) for s in shards) == 0:
        raise ConfigError(f"train-style: content: {config.content} has no rows")
    without_images = [s for s in shards if "image" not in shard_schema(s).names]
    if without_images:  # e.g. a prediction dataset, which keeps no image bytes
        raise ConfigError(f"train-style: content: {without_images[0]} has no image column (predictions keep no images)")
    try:
        style = read_style_image(config.style_image, max_side=config.style_size)
    except ValueError as exc:
        raise ConfigError(f"train-style: {exc}") from exc
    check_vgg_weights(config.vgg_weights, setting="--vgg-weights")  # WeightsError names the file to put where
    folder = os.path.dirname(os.path.abspath(config.out))
    os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"train-style: out: cannot write to {folder}")
    return shards, style


def content_batches(shards: list[str], *, image_size: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, int]]:
    """Endless (N, 3, S, S) float 0..255 batches of content crops, and how many rows were skipped so far.

    Shards are read in order, one stream of 64-row tables at a time (never a whole shard), and
    visited again in a new seeded order every pass. Raises ValueError if a whole pass finds no
    usable image.
    """
    rng = np.random.default_rng(seed)
    order = list(range(len(shards)))
    skipped = 0
    pending: list[np.ndarray] = []
    while True:
        used = 0
        for index in order:
            for table in iter_shard(shards[index], 64, columns=["image", "error"]):
                errors = table["error"].to_pylist() if "error" in table.column_names else [None] * table.num_rows
                for data, error in zip(table["image"].to_pylist(), errors):
                    if error is not None:
                        skipped += 1
                        continue
                    try:
                        pending.append(center_crop(decode_image(data), image_size))
                    except DecodeError:
                        skipped += 1
                        continue
                    used += 1
                    if len(pending) == batch_size:
                        yield torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).float().contiguous(), skipped
                        pending = []
        if used == 0:
            raise ValueError(f"no decodable image in the content shards ({skipped} rows skipped)")
        rng.shuffle(order)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> (size, size, 3): shorter side resized to ``size`` (bilinear), centre crop.

    The example's ``Resize(size)`` then ``CenterCrop(size)``.
    """
    from PIL import Image

    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


class StyleTrainer:
    """The training state, held by one Ray actor (or used directly, without Ray, in tests).

    ``train(k)`` runs k optimiser steps and returns their losses; ``state_dict()`` the weights on
    the CPU, ready for ``torch.save``.
    """

    def __init__(self, *, config: dict, shards: list[str], style: np.ndarray, device: str = "cpu"):
        cfg = StyleTrainConfig(**config)
        if device == "cpu":
            torch.set_num_threads(max(1, math.ceil(cfg.num_cpus)))
        self.device = torch.device(device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.net = TransformerNet().to(self.device).train()
        self.optimizer = torch.optim.Adam(self.net.parameters(), cfg.lr)
        vgg = build_vgg(cfg.vgg_weights, device=self.device)
        self.loss = PerceptualLoss(vgg, content_weight=cfg.content_weight, style_weight=cfg.style_weight)
        self.style_grams = self.loss.grams(to_tensor(style, self.device))
        self.batches = content_batches(shards, image_size=cfg.image_size, batch_size=cfg.batch_size, seed=cfg.seed)
        self.step = 0
        self.images = 0
        self.skipped = 0

    def train(self, steps: int) -> list[dict]:
        """Run ``steps`` optimiser steps; one ``{step, content, style, total, images, skipped}`` per step."""
        history = []
        for _ in range(steps):
            x, self.skipped = next(self.batches)
            x = x.to(self.device)
            self.optimizer.zero_grad()
            with torch.no_grad():
                target = self.loss.vgg(x).relu2_2
            content, style = self.loss(self.net(x), target, self.style_grams)
            total = content + style
            total.backward()
            self.optimizer.step()
            self.step += 1
            self.images += len(x)
            history.append({"step": self.step, "content": content.item(), "style": style.item(), "total": total.item(),
                            "images": self.images, "skipped": self.skipped})
        return history

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"


def train_style(
    config: StyleTrainConfig, *, address: str | None = None, echo: Callable[[str], None] = print
) -> dict:
    """Train per ``config`` on Ray and write ``config.out``; returns a summary with the loss history.

    Joins ``address`` (or the Ray already initialised in this process), else starts embedded local
    Ray and shuts it down at the end. The actor asks for one GPU when the cluster has one.
    """
    import ray

    shards, style = preflight(config)
    started_ray = not ray.is_initialized()
    trainer = None
    if started_ray:
        if address:
            ray.init(address=address, runtime_env={"py_modules": [os.path.dirname(pipeline.__file__)]})
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        resources = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": config.num_cpus}
        actor_cls = ray.remote(**resources)(StyleTrainer)
        trainer = actor_cls.remote(config=asdict(config), shards=shards, style=style, device="cuda" if use_gpu else "cpu")
        echo(f"train-style: {config.steps} steps, batch {config.batch_size}, {config.image_size} px crops, "
             f"on {ray.get(trainer.device_name.remote())} (a Ray actor)")
        history: list[dict] = []
        started = time.time()
        while len(history) < config.steps:
            history += ray.get(trainer.train.remote(min(config.log_every, config.steps - len(history))))
            last = history[-1]
            rate = last["images"] / max(time.time() - started, 1e-9)
            echo(f"step {last['step']:>6}/{config.steps}  content {last['content']:.4g}  style {last['style']:.4g}  "
                 f"total {last['total']:.4g}  ({rate:.1f} img/s)")
        state = ray.get(trainer.state_dict.remote())
    finally:
        if trainer is not None:
            ray.kill(trainer)  # its resources go back to a cluster that outlives this call
        if started_ray:
            ray.shutdown()
    save_state_dict(state, config.out)
    wall = time.time() - started
    return {
        "out": config.out,
        "steps": len(history),
        "images": history[-1]["images"],
        "skipped_rows": history[-1]["skipped"],
        "device": "cuda" if use_gpu else "cpu",
        "wall_s": round(wall, 3),
        "history": history,
        "config": asdict(config),
    }


def save_state_dict(state: dict[str, torch.Tensor], path: str) -> None:
    """``torch.save`` the bare state dict (what the example saves) to a temporary name, then rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
