"""Images made by optimisation over a dataset: each image's pixels changed by gradient steps
against a fixed network (:mod:`pipeline.optimize`, the loop every such method shares).

``method: fool`` (Szegedy et al.; Goodfellow et al.; Kurakin et al.): a *targeted* fooling image
of each input for the classifier ``model`` / ``weights`` (give the classify stage's keys: the
same network on the same preprocessed input). The target is ``target`` (a class label of the
model) or ``next``: each image's second most likely class. Signed-gradient steps of ``step_size``
on the cross-entropy of the target, inside the L-infinity ball of radius ``epsilon`` around the
image, at most ``steps`` of them; every step lands on the 1/255 grid, so the PNG written is
exactly the image that was checked. An image stops as soon as the classifier, run as the
``classify`` stage runs it (the 8-bit image through the weights' transforms), puts the target
first: success is that check, not the loss. Gradients flow through the same transforms applied to
the float image (resize with antialiasing, center crop, normalise); pixels outside the crop get
no gradient and stay as they were.

Output per row (see :mod:`pipeline.schema`): ``column`` (default ``synthesized``): the image as
PNG bytes at its size; ``fool_target`` (the target label), ``fool_success``, ``fool_linf`` and
``fool_l2`` (the perturbation's norms, pixel values in [0, 1]: 4/255 = 0.0157), ``fool_steps``.
``epsilon`` and ``step_size`` may be written as fractions of 255 (``4/255``).

Images are processed in groups of one size (one batch per size), on the stage's device.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field, NonNegativeInt, PositiveInt, field_validator

from pipeline import schema
from pipeline.optimize import LoopSettings, optimize
from pipeline.models.weights import resolve_weights
from pipeline.stages.classify import DEFAULT_NUM_CLASSES, ClassifierKeys, ClassifyStage
from pipeline.stages.common import append_columns, batch_images

Method = Literal["fool"]
FOOL_COLUMNS: dict[str, pa.DataType] = {  # besides the image column
    schema.FOOL_TARGET: schema.FOOL_TARGET_TYPE,
    schema.FOOL_SUCCESS: schema.FOOL_SUCCESS_TYPE,
    schema.FOOL_LINF: schema.FOOL_NORM_TYPE,
    schema.FOOL_L2: schema.FOOL_NORM_TYPE,
    schema.FOOL_STEPS: schema.FOOL_STEPS_TYPE,
}


def fraction(value: Any) -> Any:
    """``"4/255"`` -> 0.01568...; anything else unchanged (pydantic checks it)."""
    if isinstance(value, str) and "/" in value:
        top, bottom = value.split("/", 1)
        try:
            return float(top) / float(bottom)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{value!r} is not a number or a fraction like 4/255") from None
    return value


class SynthesizeSpec(ClassifierKeys):
    """Parameters of a ``synthesize`` stage (see jobs/fool_shapes.yaml)."""

    type_name: ClassVar[str] = "synthesize"

    method: Method = Field("fool", description="fool: a targeted fooling image of each input")
    column: str = Field(schema.SYNTHESIZED, min_length=1, description="output column of the images (PNG bytes)")
    target: NonNegativeInt | Literal["next"] = Field("next", description="fool: a class label of the model, or next: each image's 2nd most likely")
    epsilon: float = Field(4 / 255, gt=0, le=1, description="fool: L-infinity budget, pixel values in [0, 1] (e.g. 4/255)")
    step_size: float = Field(1 / 255, gt=0, le=1, description="fool: signed-gradient step, pixel values in [0, 1]")
    steps: PositiveInt = Field(20, description="step budget per image")

    @field_validator("epsilon", "step_size", mode="before")
    @classmethod
    def _fractions(cls, value: Any) -> Any:
        return fraction(value)

    @classmethod
    def stage_class(cls) -> type:
        return SynthesizeStage

    def input_columns(self) -> dict[str, tuple[str, pa.DataType]]:
        return {}

    def output_columns(self) -> dict[str, pa.DataType]:
        return {self.column: schema.SYNTHESIZED_TYPE, **FOOL_COLUMNS}

    def preflight(self) -> None:
        super().preflight()
        if self.target != "next":
            named = resolve_weights(self.model, self.weights).categories()
            classes = self.num_classes or (max(c["label"] for c in named) + 1 if named else DEFAULT_NUM_CLASSES)
            if self.target >= classes:
                raise ValueError(f"target {self.target} is not a class of {self.model} with these weights (labels 0..{classes - 1})")


DEFAULT = SynthesizeSpec.defaults()


class SynthesizeStage:
    """Fooling images of a batch of decoded images (see the module docstring).

    Example::

        stage = SynthesizeStage(model="small_cnn", weights="conf/models/small_cnn_shapes.pth", epsilon=4 / 255)
        out = stage(batch)  # batch: pixels/width/height; + synthesized (PNG) and FOOL_COLUMNS
    """

    def __init__(
        self,
        *,
        method: str = DEFAULT.method,
        model: str = DEFAULT.model,
        weights: str = DEFAULT.weights,
        num_classes: int | None = DEFAULT.num_classes,
        resize: int | str = DEFAULT.resize,
        crop: int | str = DEFAULT.crop,
        model_kwargs: dict[str, Any] | None = None,
        column: str = DEFAULT.column,
        target: int | str = DEFAULT.target,
        epsilon: float = DEFAULT.epsilon,
        step_size: float = DEFAULT.step_size,
        steps: int = DEFAULT.steps,
        dataset_categories: Sequence[dict] = (),
        device: str = "cpu",
        threads: int | None = None,
    ):
        self.classifier = ClassifyStage(model=model, weights=weights, num_classes=num_classes, resize=resize, crop=crop,
                                        model_kwargs=model_kwargs, device=device, threads=threads)
        self.model = self.classifier.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = self.classifier.device
        self.method, self.column, self.target = method, column, target
        self.settings = LoopSettings(steps=steps, lr=fraction(step_size), step="sign", epsilon=fraction(epsilon), quantize=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = batch_images(batch)
        results: list[dict | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            by_size[image.shape].append(i)
        for indices in by_size.values():
            for i, result in zip(indices, self.fool(np.stack([images[i] for i in indices]))):
                results[i] = result
        columns = {self.column: pa.array([r["png"] for r in results], schema.SYNTHESIZED_TYPE)}
        for name, dtype in FOOL_COLUMNS.items():
            columns[name] = pa.array([r[name] for r in results], dtype)
        return append_columns(batch, columns)

    def logits_float(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, classes), differentiable: the weights' transforms on floats."""
        return self.model(self.classifier.transform(x))

    @torch.no_grad()
    def logits_8bit(self, x: torch.Tensor) -> torch.Tensor:
        """The classify stage's own path: the image as 8-bit pixels through the weights' transforms."""
        pixels = torch.round(x * 255).to(torch.uint8)
        return self.model(torch.stack([self.classifier.transform(p) for p in pixels]))

    def fool(self, images: np.ndarray) -> list[dict]:
        """(N, H, W, 3) uint8 of one size -> per image the PNG and the FOOL_COLUMNS values."""
        start = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float().div(255)
        if self.target == "next":
            target = self.logits_8bit(start).topk(2, dim=1).indices[:, 1]
        else:
            classes = int(self.logits_8bit(start[:1]).shape[1])
            if self.target >= classes:
                raise ValueError(f"target {self.target} is not a class of the model (labels 0..{classes - 1})")
            target = torch.full((len(start),), int(self.target), device=self.device)

        result = optimize(
            start,
            lambda x: F.cross_entropy(self.logits_float(x), target, reduction="none"),
            self.settings,
            done=lambda x: self.logits_8bit(x).argmax(dim=1) == target,
        )
        success = (self.logits_8bit(result.images).argmax(dim=1) == target).cpu().numpy()
        delta = (result.images - start).flatten(1)
        linf = delta.abs().amax(dim=1).cpu().numpy()
        l2 = delta.norm(dim=1).cpu().numpy()
        pixels = torch.round(result.images * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [
            {
                "png": encode_png(pixels[k]),
                schema.FOOL_TARGET: int(target[k]),
                schema.FOOL_SUCCESS: bool(success[k]),
                schema.FOOL_LINF: float(linf[k]),
                schema.FOOL_L2: float(l2[k]),
                schema.FOOL_STEPS: int(result.steps_used[k]),
            }
            for k in range(len(pixels))
        ]


def encode_png(pixels: np.ndarray) -> bytes:
    """RGB uint8 (H, W, 3) -> PNG bytes (lossless: the pixels the classifier was checked on)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()
