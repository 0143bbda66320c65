"""Samples of a trained generative model (``pipeline generate samples MODEL.pth``).

The checkpoint ``pipeline train`` wrote names its model (``conv_vae``, ``pixelcnn``, ``dcgan``) and
the side of the images it learned (``image_size``); each actor builds the model once and makes one
image per seed (the VAE and the DCGAN decode z ~ N(0, I) drawn from it, the PixelCNN draws every
sub-pixel from it, batched over the shard's images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config.paths import sha256_of
from pipeline.models.registry import build_model, get_entry
from pipeline.models.weights import WeightsError, checkpoint_model_name, load_checkpoint, resolve_weights


@dataclass(frozen=True)
class Sampling:
    """Settings; calling it (``factory(device=...)``) builds the sampler on an actor."""

    checkpoint: str
    size: int | None = None  # the side asked for; None: the one the model learned (any other is refused)

    def __post_init__(self) -> None:
        name = checkpoint_model_name(self.checkpoint)
        if get_entry(name).task != "generative":
            raise WeightsError(f"{self.checkpoint} is a {name} checkpoint ({get_entry(name).task}), not a generative model's "
                               "(conv_vae, pixelcnn, dcgan: pipeline train jobs/train_vae_shapes.yaml ...)")
        if not load_checkpoint(self.checkpoint).get("image_size"):
            raise WeightsError(f"{self.checkpoint} does not say which image size its model learned (no 'image_size')")
        if self.size is not None and self.size != self.image_size():
            raise ValueError(f"{self.checkpoint}'s {name} learned {self.image_size()} x {self.image_size()} images; "
                             f"it cannot make {self.size} x {self.size} ones (train one at that image_size)")

    def __call__(self, device: str = "cpu") -> "Sampler":
        return Sampler(self.checkpoint, device)

    def model_name(self) -> str:
        return checkpoint_model_name(self.checkpoint)

    def image_size(self) -> int:
        return int(load_checkpoint(self.checkpoint)["image_size"])

    def provenance(self) -> dict:
        return {"method": "samples", "network": self.model_name(), "weights": self.checkpoint,
                "weights_sha256": sha256_of(self.checkpoint), "settings": {"image_size": self.image_size()}}


class Sampler:
    def __init__(self, checkpoint: str, device: str = "cpu"):
        name = checkpoint_model_name(checkpoint)
        self.model, _ = build_model(name, resolve_weights(name, checkpoint))
        self.model.to(torch.device(device)).eval()
        self.size = int(load_checkpoint(checkpoint)["image_size"])

    def generate(self, indices: list[int], seeds: list[int]) -> list[tuple[np.ndarray, None, dict]]:
        images = self.model.sample([torch.Generator().manual_seed(int(s)) for s in seeds], self.size)
        pixels = torch.round(images.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [(pixels[k], None, {}) for k in range(len(indices))]
