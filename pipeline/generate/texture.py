"""Texture synthesis (Gatys et al. 2015): new images with the texture of one picture.

A texture is summarised by the Gram matrices of a network's features at several layers (which
features occur together, wherever they are); a new image starts from grey noise (drawn from its
seed) and :mod:`pipeline.optimize` (Adam) makes its Gram matrices match the texture's:
``loss = sum over layers of mean((G_l(x) - G_l(texture))^2)``, ``G = F F^T / (C H W)``. Gatys style
transfer (the ``style`` stage's ``method: optimize``) is the same loss plus a content term.

The network is any classifier by name (the classify stage's models; ``weights`` as there: none,
a torchvision name read from the hub cache, a ``.pth``) and ``layers`` its module names; ``auto``
knows VGG-16/19 (the blocks' last ReLUs before pooling, as Gatys) and the project's ``small_cnn``
(its four convolution blocks). Each row records ``texture_loss_start`` and ``texture_loss_end``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from pipeline import schema
from pipeline.config.paths import is_path, sha256_of
from pipeline.models.registry import check_layers, get_entry
from pipeline.optimize import LoopSettings, grey_noise, layer_outputs, optimize
from pipeline.models.transformer_net import gram_matrix as gram
from pipeline.stages.classify import ClassifyStage

AUTO_LAYERS = {
    "vgg16": ("features.3", "features.8", "features.15", "features.22", "features.29"),
    "vgg19": ("features.3", "features.8", "features.17", "features.26", "features.35"),
    "small_cnn": ("features.0", "features.2", "features.4", "features.6"),
}
EXTRA_COLUMNS = {schema.TEXTURE_LOSS_START: schema.SYNTH_METRIC_TYPE, schema.TEXTURE_LOSS_END: schema.SYNTH_METRIC_TYPE}


def read_texture(path: str, max_side: int | None = None) -> np.ndarray:
    """The texture picture as RGB uint8 (H, W, 3), downscaled to ``max_side`` if larger."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if max_side and max(im.size) > max_side:
                im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            return np.asarray(im)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the texture image {path}: {exc}") from None


@dataclass(frozen=True)
class TextureSynthesis:
    """Settings; calling it (``factory(device=...)``) builds the generator on an actor."""

    texture: str
    model: str = "vgg16"
    weights: str = "DEFAULT"
    layers: tuple[str, ...] | None = None
    size: int = 128
    max_side: int = 256
    steps: int = 300
    lr: float = 0.02

    def __post_init__(self) -> None:
        if get_entry(self.model).task != "classify":
            raise ValueError(f"{self.model} is not a classification model: texture synthesis takes a classifier's features")
        if self.layers is None and self.model not in AUTO_LAYERS:
            raise ValueError(f"give --layers for {self.model} (auto knows {', '.join(AUTO_LAYERS)})")
        LoopSettings(steps=self.steps, lr=self.lr)  # a negative step count: refused here
        read_texture(self.texture, self.max_side)
        check_layers(self.model, self.chosen_layers())

    def __call__(self, device: str = "cpu") -> "TextureSynthesiser":
        return TextureSynthesiser(self, device)

    def chosen_layers(self) -> tuple[str, ...]:
        return tuple(self.layers) if self.layers else AUTO_LAYERS[self.model]

    def provenance(self) -> dict:
        files = {"texture": self.texture, "texture_sha256": sha256_of(self.texture), "weights": self.weights}
        if is_path(self.weights):
            files["weights_sha256"] = sha256_of(self.weights)
        return {"method": "texture", "network": self.model, **files, "settings": {**asdict(self), "layers": list(self.chosen_layers())}}


class TextureSynthesiser:
    extra_columns = EXTRA_COLUMNS

    def __init__(self, settings: TextureSynthesis, device: str = "cpu"):
        self.settings = settings
        stage = ClassifyStage(model=settings.model, weights=settings.weights, device=device)
        self.model, self.device = stage.model.eval(), stage.device
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.mean = torch.tensor(stage.transform.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(stage.transform.std, device=self.device).view(1, 3, 1, 1)
        modules = dict(self.model.named_modules())
        self.layers = [modules[name] for name in settings.chosen_layers()]  # names checked with the settings
        texture = read_texture(settings.texture, settings.max_side)
        with torch.no_grad():
            x = torch.from_numpy(np.array(texture)).to(self.device).permute(2, 0, 1)[None].float().div(255)
            self.targets = [gram(f) for f in self.features(x)]
        self.loop = LoopSettings(steps=settings.steps, lr=settings.lr)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return layer_outputs(self.model, self.layers, (x - self.mean) / self.std)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N,) the Gram loss summed over the layers."""
        return sum(((gram(f) - t) ** 2).mean(dim=(1, 2)) for f, t in zip(self.features(x), self.targets))

    def generate(self, indices: list[int], seeds: list[int]) -> list[tuple[np.ndarray, None, dict]]:
        size = self.settings.size
        start = grey_noise(seeds, (3, size, size)).to(self.device)
        result = optimize(start, self.loss, self.loop, seeds=seeds)
        written = torch.round(result.images * 255) / 255  # the 8-bit image the dataset holds
        with torch.no_grad():
            end = self.loss(written)
        pixels = (written * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [
            (pixels[k], None, {schema.TEXTURE_LOSS_START: float(result.first_loss[k]), schema.TEXTURE_LOSS_END: float(end[k])})
            for k in range(len(indices))
        ]

