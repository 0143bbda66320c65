"""Images made by optimisation over a dataset: each image's pixels changed by gradient steps
against a fixed network (:mod:`pipeline.optimize`, the loop every such method shares). The network
is a classifier (``model`` / ``weights`` and the classify stage's other keys: the same network on
the same preprocessed input); ``method`` chooses the objective:

``fool`` (Szegedy et al.; Goodfellow et al.; Kurakin et al.): a *targeted* fooling image of each
input. The target is ``target`` (a class label of the model) or ``next``: each image's second most
likely class. Signed-gradient steps of ``step_size`` on the cross-entropy of the target, inside the
L-infinity ball of radius ``epsilon`` around the image, at most ``steps`` (default 20) of them;
every step lands on the 1/255 grid, so the PNG written is exactly the image that was checked. An
image stops as soon as the classifier, run as the ``classify`` stage runs it (the 8-bit image
through the weights' transforms), puts the target first: success is that check, not the loss.
Gradients flow through the same transforms applied to the float image (resize with antialiasing,
center crop, normalise); pixels outside the crop get no gradient and stay as they were. Columns:
``fool_target``, ``fool_success``, ``fool_linf`` and ``fool_l2`` (the perturbation's norms, pixel
values in [0, 1]: 4/255 = 0.0157), ``fool_steps``.

``invert`` (Mahendran & Vedaldi 2015): which image has these features? The image as the network
sees it (resized and center-cropped, ``crop`` px) gives the target features of ``layer``; a new
image starts from grey noise (seeded by the row's image_id) and Adam (``lr``, ``steps``, default
200) minimises the squared feature distance relative to the target's squared norm plus ``tv``
times the total variation (the natural-image prior). Written at the crop's size. Columns:
``invert_feature_error`` (||f(x) - f(x0)|| / ||f(x0)||) and ``invert_psnr`` (dB, against the
cropped original).

``deepdream`` (Mordvintsev et al. 2015): amplify what ``layer`` sees. Gradient ascent (Adam,
``lr``, ``steps`` per octave, default 10) on the mean squared activation of ``layer``, from the
image itself at its own size, over ``octaves`` scales (each ``octave_scale`` times the last, the
detail carried up), jittered by up to ``jitter`` px. Column ``dream_gain``: the mean squared
activation of the result over that of the input (> 1: amplified).

Output per row (see :mod:`pipeline.schema`): ``column`` (default ``synthesized``), the image as
PNG bytes, plus the method's columns. ``epsilon`` and ``step_size`` may be written as fractions of
255 (``4/255``). An unknown ``layer`` is refused before the job starts, listing the model's layers.
Images are processed in groups of one size (one batch per size), on the stage's device.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_validator

from pipeline import schema
from pipeline.data.decode import encode_png
from pipeline.optimize import LoopSettings, grey_noise, layer_outputs, optimize
from pipeline.models.registry import check_layers
from pipeline.models.weights import resolve_weights
from pipeline.stages.classify import DEFAULT_NUM_CLASSES, ClassifierKeys, ClassifyStage
from pipeline.stages.common import append_columns, batch_images, prefixed

Method = Literal["fool", "invert", "deepdream"]
METHOD_COLUMNS: dict[str, dict[str, pa.DataType]] = {  # what each method writes besides the image column
    "fool": {
        schema.FOOL_TARGET: schema.FOOL_TARGET_TYPE,
        schema.FOOL_SUCCESS: schema.FOOL_SUCCESS_TYPE,
        schema.FOOL_LINF: schema.FOOL_NORM_TYPE,
        schema.FOOL_L2: schema.FOOL_NORM_TYPE,
        schema.FOOL_STEPS: schema.FOOL_STEPS_TYPE,
    },
    "invert": {schema.INVERT_FEATURE_ERROR: schema.SYNTH_METRIC_TYPE, schema.INVERT_PSNR: schema.SYNTH_METRIC_TYPE},
    "deepdream": {schema.DREAM_GAIN: schema.SYNTH_METRIC_TYPE},
}
DEFAULT_STEPS = {"fool": 20, "invert": 200, "deepdream": 10}  # steps: auto
DEFAULT_LR = {"invert": 0.05, "deepdream": 0.01}  # Adam step, pixel values in [0, 1]


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

    method: Method = Field("fool", description="fool: a targeted fooling image; invert: an image from a layer's features; deepdream")
    column: str = Field(schema.SYNTHESIZED, min_length=1, description="output column of the images (PNG bytes)")
    target: NonNegativeInt | Literal["next"] = Field("next", description="fool: a class label of the model, or next: each image's 2nd most likely")
    epsilon: float = Field(4 / 255, gt=0, le=1, description="fool: L-infinity budget, pixel values in [0, 1] (e.g. 4/255)")
    step_size: float = Field(1 / 255, gt=0, le=1, description="fool: signed-gradient step, pixel values in [0, 1]")
    steps: PositiveInt | None = Field(None, description="step budget per image (per octave for deepdream); auto: fool 20, invert 200, deepdream 10")
    layer: str | None = Field(None, description="invert, deepdream: a module name of the model, e.g. features.2 of small_cnn")
    lr: PositiveFloat | None = Field(None, description="invert, deepdream: Adam step, pixel values in [0, 1]; auto: 0.05, 0.01")
    tv: NonNegativeFloat = Field(0.05, description="invert: weight of the total variation prior")
    octaves: PositiveInt = Field(3, description="deepdream: scales, coarse to fine")
    octave_scale: float = Field(1.4, gt=1, description="deepdream: size ratio between octaves")
    jitter: NonNegativeInt = Field(4, description="deepdream: random shift of the image per step, px")
    output_prefix: str = Field("", description="prepended to every column this stage writes (two inversions in one job)")

    @field_validator("steps", "lr", mode="before")
    @classmethod
    def _auto(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() == "auto" else value

    @model_validator(mode="after")
    def _grey_levels(self) -> "SynthesizeSpec":
        if self.method == "fool":  # the fooled image is 8-bit: less than a grey level cannot move it
            for key in ("epsilon", "step_size"):
                if getattr(self, key) < 1 / 255 - 1e-9:
                    raise ValueError(f"{key} {getattr(self, key)}: less than one grey level (1/255) cannot change an 8-bit image")
        return self

    @model_validator(mode="after")
    def _layer_for_features(self) -> "SynthesizeSpec":
        if self.method in ("invert", "deepdream") and not self.layer:
            raise ValueError(f"method {self.method} needs layer: a module name of {self.model} (e.g. features.2 of small_cnn)")
        return self

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
        return prefixed({self.column: schema.SYNTHESIZED_TYPE, **METHOD_COLUMNS[self.method]}, self.output_prefix)

    def preflight(self) -> None:
        super().preflight()
        if self.layer:
            check_layers(self.model, [self.layer], num_classes=self.num_classes or DEFAULT_NUM_CLASSES, extra=self.model_kwargs)
        if self.target != "next":
            named = resolve_weights(self.model, self.weights).categories()
            classes = self.num_classes or (max(c["label"] for c in named) + 1 if named else DEFAULT_NUM_CLASSES)
            if self.target >= classes:
                raise ValueError(f"target {self.target} is not a class of {self.model} with these weights (labels 0..{classes - 1})")


DEFAULT = SynthesizeSpec.defaults()


class SynthesizeStage:
    """Images made by optimisation from a batch of decoded images (see the module docstring).

    Example::

        stage = SynthesizeStage(model="small_cnn", weights="conf/models/small_cnn_shapes.pth", epsilon=4 / 255)
        out = stage(batch)  # batch: pixels/width/height; + synthesized (PNG) and METHOD_COLUMNS["fool"]
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
        steps: int | None = DEFAULT.steps,
        layer: str | None = DEFAULT.layer,
        lr: float | None = DEFAULT.lr,
        tv: float = DEFAULT.tv,
        octaves: int = DEFAULT.octaves,
        octave_scale: float = DEFAULT.octave_scale,
        jitter: int = DEFAULT.jitter,
        output_prefix: str = DEFAULT.output_prefix,
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
        steps = steps or DEFAULT_STEPS[method]
        if method == "fool":
            self.settings = LoopSettings(steps=steps, lr=fraction(step_size), step="sign", epsilon=fraction(epsilon), quantize=True)
        else:
            self.settings = LoopSettings(steps=steps, lr=lr or DEFAULT_LR[method], tv=tv if method == "invert" else 0.0,
                                         jitter=jitter if method == "deepdream" else 0)
            self.layer = dict(self.model.named_modules())[layer]  # the spec's preflight checked the name
        self.octaves, self.octave_scale, self.output_prefix = octaves, octave_scale, output_prefix
        self.run = {"fool": self.fool, "invert": self.invert, "deepdream": self.deepdream}[method]

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = batch_images(batch)
        results: list[dict | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            by_size[image.shape].append(i)
        ids = batch[schema.IMAGE_ID].to_pylist()
        for indices in by_size.values():
            for i, result in zip(indices, self.run(np.stack([images[i] for i in indices]), [ids[i] for i in indices])):
                results[i] = result
        columns = {self.column: pa.array([r["png"] for r in results], schema.SYNTHESIZED_TYPE)}
        for name, dtype in METHOD_COLUMNS[self.method].items():
            columns[name] = pa.array([r[name] for r in results], dtype)
        return append_columns(batch, columns, self.output_prefix)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        t = self.classifier.transform
        return TF.normalize(x, mean=t.mean, std=t.std)

    def as_seen(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> the resized, center-cropped image the network sees, still in [0, 1]."""
        t = self.classifier.transform
        return TF.center_crop(TF.resize(x, t.resize_size, interpolation=t.interpolation, antialias=t.antialias), t.crop_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) in [0, 1] -> ``layer``'s output for the normalised image (the rest of the network not run)."""
        return layer_outputs(self.model, [self.layer], self.normalise(x))[0]

    def logits_float(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, classes), differentiable: the weights' transforms on floats."""
        return self.model(self.classifier.transform(x))

    @torch.no_grad()
    def logits_8bit(self, x: torch.Tensor) -> torch.Tensor:
        """The classify stage's own path: the image as 8-bit pixels through the weights' transforms."""
        pixels = torch.round(x * 255).to(torch.uint8)
        return self.model(torch.stack([self.classifier.transform(p) for p in pixels]))

    def fool(self, images: np.ndarray, _ids: list[int]) -> list[dict]:
        """(N, H, W, 3) uint8 of one size -> per image the PNG and the METHOD_COLUMNS["fool"] values."""
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


    def invert(self, images: np.ndarray, ids: list[int]) -> list[dict]:
        """(N, H, W, 3) uint8 of one size -> per image the reconstruction from ``layer`` and its errors."""
        seen = self.as_seen(torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float().div(255))
        with torch.no_grad():
            target = self.features(seen)
            norm = target.flatten(1).pow(2).sum(dim=1).clamp_min(1e-12)
        start = grey_noise(ids, tuple(seen.shape[1:]), std=0.05).to(self.device)

        def objective(x: torch.Tensor) -> torch.Tensor:
            return (self.features(x) - target).flatten(1).pow(2).sum(dim=1) / norm

        result = optimize(start, objective, self.settings, seeds=ids)
        pixels = torch.round(result.images * 255) / 255  # what the PNG holds
        with torch.no_grad():
            error = objective(pixels).sqrt().cpu().numpy()
        mse = (pixels - seen).pow(2).flatten(1).mean(dim=1).clamp_min(1e-12)
        psnr = (10 * torch.log10(1 / mse)).cpu().numpy()
        return [{"png": encode_png(to_pixels(pixels[k])), schema.INVERT_FEATURE_ERROR: float(error[k]),
                 schema.INVERT_PSNR: float(psnr[k])} for k in range(len(pixels))]

    def deepdream(self, images: np.ndarray, ids: list[int]) -> list[dict]:
        """(N, H, W, 3) uint8 of one size -> per image the dreamed image and its activation gain."""
        original = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float().div(255)
        h, w = original.shape[-2:]

        def energy(x: torch.Tensor) -> torch.Tensor:  # mean squared activation of the layer, per image
            return self.features(x).pow(2).flatten(1).mean(dim=1)

        sizes = [(max(8, round(h / self.octave_scale**k)), max(8, round(w / self.octave_scale**k))) for k in range(self.octaves)]
        detail = torch.zeros_like(original)
        dreamed = original
        for size in reversed(sizes):  # coarse to fine; the detail found so far is carried up
            base = F.interpolate(original, size=size, mode="bilinear", align_corners=False, antialias=True)
            up = F.interpolate(detail, size=size, mode="bilinear", align_corners=False)
            result = optimize((base + up).clamp(0, 1), lambda x: -energy(x), self.settings, seeds=ids)
            detail = result.images - base
            dreamed = result.images
        dreamed = torch.round(dreamed * 255) / 255
        with torch.no_grad():
            gain = (energy(dreamed) / energy(original).clamp_min(1e-12)).cpu().numpy()
        return [{"png": encode_png(to_pixels(dreamed[k])), schema.DREAM_GAIN: float(gain[k])} for k in range(len(dreamed))]


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> RGB uint8 (H, W, 3)."""
    return torch.round(image * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
