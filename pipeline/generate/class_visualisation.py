"""Class visualisation: images a classifier scores as a class, by gradient ascent from noise.

Simonyan et al. (2014) maximise a class's score (the logit, before the softmax) over the pixels
with an L2 penalty; Yosinski et al. (2015) add blurring between steps and jitter, which keeps the
image from filling with high-frequency patterns. Here: :mod:`pipeline.optimize` with Adam from
mid-grey plus noise (drawn from the image's seed), the objective ``-logit[class]`` of the
classifier on the image through the classify stage's own transforms (resize, center crop,
normalise: the network sees what the classify stage would show it), L2 towards mid-grey, a
Gaussian blur every ``blur_every`` steps, jitter of ``jitter`` pixels.

The images are ``size`` px squares (default: the classifier's crop), ``per_class`` per class,
class ``c`` for images ``c * per_class ... (c + 1) * per_class - 1``; each row's ``label`` is the
class's dataset category id (from the checkpoint's categories; else ``c + 1``, named ``class c``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from pipeline.config.paths import is_path, sha256_of
from pipeline.models.registry import get_entry
from pipeline.models.weights import load_checkpoint, resolve_weights
from pipeline.optimize import LoopSettings, grey_noise, optimize
from pipeline.stages.classify import DEFAULT_NUM_CLASSES, ClassifyStage


@dataclass(frozen=True)
class ClassVisualisation:
    """Settings; calling it (``factory(device=...)``) builds the generator on an actor."""

    model: str
    weights: str
    per_class: int
    num_classes: int | None = None
    size: int | None = None
    steps: int = 150
    lr: float = 0.05
    l2: float = 0.05
    blur_every: int = 4
    blur_sigma: float = 0.5
    jitter: int = 2

    def __post_init__(self) -> None:
        if self.per_class < 1:
            raise ValueError(f"--per-class must be >= 1, got {self.per_class}")
        if get_entry(self.model).task != "classify":
            raise ValueError(f"{self.model} is not a classification model: class visualisation needs a classifier")
        LoopSettings(steps=self.steps, lr=self.lr)  # refuses a negative step count before any work

    def __call__(self, device: str = "cpu") -> "ClassVisualiser":
        return ClassVisualiser(self, device)

    def categories(self) -> list[dict]:
        """The dataset categories the labels name, one per class in label order: the checkpoint's (with
        their ids), else the weights' names (id = label + 1), else ``class c`` (id c + 1)."""
        resolved = resolve_weights(self.model, self.weights)
        listed = load_checkpoint(self.weights).get("categories") if resolved.kind == "checkpoint" else None
        if listed:
            ordered = sorted(listed, key=lambda c: int(c["label"]))
            return [{"id": int(c.get("id", int(c["label"]) + 1)), "name": str(c["name"])} for c in ordered]
        named = resolved.categories()
        if named:
            return [{"id": c["label"] + 1, "name": c["name"]} for c in named]
        return [{"id": c + 1, "name": f"class {c}"} for c in range(self.classes())]

    def classes(self) -> int:
        named = resolve_weights(self.model, self.weights).categories()
        return self.num_classes or (max(c["label"] for c in named) + 1 if named else DEFAULT_NUM_CLASSES)

    def provenance(self) -> dict:
        weights = {"weights": self.weights}
        if is_path(self.weights):
            weights["weights_sha256"] = sha256_of(self.weights)
        return {"method": "class-visualisation", "network": self.model, **weights, "settings": asdict(self)}


class ClassVisualiser:
    def __init__(self, settings: ClassVisualisation, device: str = "cpu"):
        self.settings = settings
        self.classifier = ClassifyStage(model=settings.model, weights=settings.weights, num_classes=settings.num_classes,
                                        device=device)
        self.model = self.classifier.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.size = settings.size or self.classifier.transform.crop_size[0]
        self.label_ids = [c["id"] for c in settings.categories()]
        self.loop = LoopSettings(steps=settings.steps, lr=settings.lr, l2=settings.l2, blur_every=settings.blur_every,
                                 blur_sigma=settings.blur_sigma, jitter=settings.jitter)

    def generate(self, indices: list[int], seeds: list[int]) -> list[tuple[np.ndarray, int, dict]]:
        classes = torch.tensor([i // self.settings.per_class for i in indices])
        start = grey_noise(seeds, (3, self.size, self.size)).to(self.classifier.device)
        target = classes.to(self.classifier.device)

        def objective(x: torch.Tensor) -> torch.Tensor:
            return -self.model(self.classifier.transform(x)).gather(1, target[:, None])[:, 0]

        result = optimize(start, objective, self.loop, seeds=seeds)
        pixels = torch.round(result.images * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [(pixels[k], self.label_ids[int(classes[k])], {}) for k in range(len(indices))]
