"""Visual explanations: where did the model look to make its prediction?

Each prediction of an earlier stage is explained with an attribution map by ``method`` (cs231n's
"visualizing what networks see"), computed by captum on the network that predicted (``model`` /
``weights``: give that stage's):

* after ``classify``: each image's top-1 class (``labels_column``, auto: ``class_labels``), the
  class score being the logit, on the input as the ``classify`` stage builds it
  (``ImageClassification``: resize, center crop, normalise). This module;
* after ``detect`` or ``masks``: each box scoring >= ``min_score`` (``boxes_column``,
  ``labels_column`` auto: ``labels``, ``scores_column``), the score being that of the detection
  that still matches the box when the detector runs again. :mod:`pipeline.stages.explain_boxes`.

The methods:

* ``saliency`` (Simonyan et al. 2014): |d class score / d input|, max over the colour channels;
* ``smoothgrad`` (Smilkov et al. 2017): the same averaged over ``samples`` noisy copies of the
  input (Gaussian, std ``noise`` x the input's value range);
* ``guided_backprop`` (Springenberg et al. 2015): gradients with ReLUs passing only positive
  gradients backwards; |.|, max over channels. captum guides ``nn.ReLU`` modules only: in a
  torchvision detector the backbone's, not the heads' functional ReLUs;
* ``occlusion`` (Zeiler & Fergus 2014): the class score's drop when a ``patch`` x ``patch`` square
  (all channels, set to 0 = the dataset mean after normalisation, i.e. grey) slides over the input
  with ``stride``; each pixel gets the mean drop of the patches covering it, every pixel covered
  by as many as any other (patches may hang over the edge: :func:`occlusion`). The occluded copies
  go through the model in batches (captum's ``perturbations_per_eval``);
* ``gradcam`` (Selvaraju et al. 2017): the ``layer``'s activations weighted by their mean
  gradient, summed over channels, ReLU; upsampled (bilinear) from the layer's grid to the input.
  ``layer: auto`` is the last module of the forward pass with a spatial output (``layer4`` of a
  ResNet, ``features`` of a MobileNet or of ``small_cnn``), found by one dry run;
* ``hirescam`` (Draelos & Carin 2020): the same without the mean: activations times their own
  gradient, position by position, summed over channels, ReLU. Grad-CAM's mean weights every
  position alike, which is right for one object per image but not for one box among several: a
  detection's score reads the features inside its box only, and Grad-CAM lights up every object
  whose features look alike (measured: pointing game 0.27 against HiResCAM's 0.89 on the shipped
  detector's boxes, same layers; see jobs/README.md). When the layer is followed by global average
  pooling and a linear layer (ResNet, ``small_cnn``), the gradient is the same at every position
  and the two are equal.

Class scores are the logits (pre-softmax), as in the papers. captum supplies the algorithms; what
is written here is only what it lacks: the choice of the CAM layer, and mapping a classifier's map from the
model's input (the ``crop`` x ``crop`` center crop of the resized image) back onto the image: it
is pasted at the crop's place in the resized image (zero where the model saw nothing), then
resized to the image's size.

Output per row (see :mod:`pipeline.schema`), one entry per prediction, aligned with the
predictions (the top-1 class: one per image; boxes: one per box): ``attribution_maps`` (8-bit grey
PNG at the image's size, the positive part of the map scaled so its maximum is 255; ``b""`` for a
box not explained), and for boxes ``attribution_in_box`` / ``attribution_peak_in_box`` (the share
of the map's positive mass inside the box, and the pointing game: its maximum inside the box),
null for a class, which has no box.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from pipeline import schema
from pipeline.config.paths import path_field
from pipeline.config.spec import StageSpec
from pipeline.models.registry import DETECTION_TASKS, get_entry, list_models
from pipeline.stages.classify import DEFAULT_NUM_CLASSES, ClassifyStage, Size
from pipeline.stages.common import append_columns, batch_images
from pipeline.stages.detect import check_model_kwargs, check_weights

EXPLAINED = ("classify", *DETECTION_TASKS)  # model tasks whose predictions an explain stage explains
EXPLAIN_COLUMNS: dict[str, pa.DataType] = {
    schema.ATTRIBUTION_MAPS: schema.ATTRIBUTION_MAPS_TYPE,
    schema.ATTRIBUTION_IN_BOX: schema.ATTRIBUTION_IN_BOX_TYPE,
    schema.ATTRIBUTION_PEAK_IN_BOX: schema.ATTRIBUTION_PEAK_IN_BOX_TYPE,
}
Method = Literal["saliency", "smoothgrad", "guided_backprop", "occlusion", "gradcam", "hirescam"]
CAM_METHODS = ("gradcam", "hirescam")  # maps computed on a layer's grid (``layer``), then brought to the input
OCCLUSION_BATCH = 64  # occluded copies per model call
NOISE_SEED = 0  # SmoothGrad's noise generator seed, reset for every image


class ExplainSpec(StageSpec):
    """Parameters of an ``explain`` stage (see jobs/explain_shapes.yaml)."""

    type_name: ClassVar[str] = "explain"

    method: Method = Field("gradcam", description="saliency, smoothgrad, guided_backprop, occlusion, gradcam or hirescam")
    model: str = Field("small_cnn", description="the model whose predictions are explained: the classify, detect or masks stage's")
    weights: str = path_field("none", "that stage's weights: 'none', a torchvision weights name or a .pth path")
    num_classes: PositiveInt | None = Field(None, description="as that stage's")
    resize: Size = Field("auto", description="classifiers: as the classify stage's (auto: the weights' or checkpoint's)")
    crop: Size = Field("auto", description="classifiers: as the classify stage's (auto: the weights' or checkpoint's)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="as that stage's")
    labels_column: str = Field("auto", description="auto: class_labels after classify (its top-1 is explained), labels after detect/masks")
    boxes_column: str = Field(schema.BOXES, description="detectors: the boxes explained (xyxy), an earlier detect/masks stage's")
    scores_column: str = Field(schema.SCORES, description="detectors: their scores")
    min_score: float = Field(0.5, ge=0, le=1, description="detectors: boxes scoring lower get an empty map (not explained)")
    layer: str = Field("auto", description="gradcam, hirescam: a module name of the model (auto: the last one with a spatial output)")
    patch: PositiveInt = Field(16, description="occlusion: side of the square patch, input pixels")
    stride: PositiveInt = Field(8, description="occlusion: step of the patch, input pixels")
    samples: PositiveInt = Field(12, description="smoothgrad: noisy copies averaged")
    noise: PositiveFloat = Field(0.1, description="smoothgrad: noise std as a fraction of the input's value range")

    @field_validator("model")
    @classmethod
    def _explainable(cls, value: str) -> str:
        if get_entry(value).task not in EXPLAINED:  # get_entry raises listing the known models
            raise ValueError(f"{value} is a {get_entry(value).task} model; explain takes a classifier or a detector "
                             f"({', '.join(list_models('classify')[:3] + list_models('detect')[:3])}, ...)")
        return value

    @model_validator(mode="after")
    def _patch_covers(self) -> "ExplainSpec":
        if self.stride > self.patch:  # pixels between two patches would never be occluded
            raise ValueError(f"stride {self.stride} is larger than patch {self.patch}: occlusion would skip pixels")
        if self.patch % self.stride:  # else pixels are covered by different numbers of patches
            raise ValueError(f"patch {self.patch} is not a multiple of stride {self.stride}: pixels would be covered unevenly")
        return self

    @classmethod
    def stage_class(cls) -> type:
        return ExplainStage

    @property
    def explains_boxes(self) -> bool:
        return get_entry(self.model).task != "classify"

    def input_columns(self) -> dict[str, tuple[str, pa.DataType]]:
        if self.explains_boxes:
            return {"boxes_column": (self.boxes_column, schema.BOXES_TYPE),
                    "labels_column": (labels_column_name(self.labels_column, boxes=True), schema.IDS_TYPE),
                    "scores_column": (self.scores_column, schema.SCORES_TYPE)}
        return {"labels_column": (labels_column_name(self.labels_column, boxes=False), schema.CLASS_LABELS_TYPE)}

    def output_columns(self) -> dict[str, pa.DataType]:
        return dict(EXPLAIN_COLUMNS)

    def preflight(self) -> None:
        check_model_kwargs(self, self.model, self.model_kwargs)
        check_weights(self.model, self.weights, self.num_classes if self.explains_boxes else self.num_classes or DEFAULT_NUM_CLASSES)


def labels_column_name(value: str, *, boxes: bool) -> str:
    """``labels_column: auto`` -> the column the stage before wrote: ``labels`` (detectors) or ``class_labels``."""
    return value if value != "auto" else schema.LABELS if boxes else schema.CLASS_LABELS


DEFAULT = ExplainSpec.defaults()


class ExplainStage:
    """Attribution maps of the top-1 class per image (see the module docstring).

    Example::

        stage = ExplainStage(method="gradcam", model="small_cnn", weights="conf/models/small_cnn_shapes.pth")
        out = stage(batch)  # batch: pixels/width/height + class_labels (an earlier classify stage); + EXPLAIN_COLUMNS
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
        labels_column: str = DEFAULT.labels_column,
        boxes_column: str = DEFAULT.boxes_column,
        scores_column: str = DEFAULT.scores_column,
        min_score: float = DEFAULT.min_score,
        layer: str = DEFAULT.layer,
        patch: int = DEFAULT.patch,
        stride: int = DEFAULT.stride,
        samples: int = DEFAULT.samples,
        noise: float = DEFAULT.noise,
        dataset_categories: Sequence[dict] = (),
        device: str = "cpu",
        threads: int | None = None,
    ):
        self.boxes = None
        if get_entry(model).task != "classify":  # a detector: pipeline.stages.explain_boxes
            from pipeline.stages.explain_boxes import detector_explainer  # late: it imports this module's helpers

            self.boxes = detector_explainer(dict(
                model=model, weights=weights, num_classes=num_classes, model_kwargs=model_kwargs, device=device,
                threads=threads, method=method, layer=layer, patch=patch, stride=stride, samples=samples, noise=noise,
                min_score=min_score, boxes_column=boxes_column, labels_column=labels_column_name(labels_column, boxes=True),
                scores_column=scores_column))
            return
        # The classify stage builds the model, its weights and its preprocessing: the network explained
        # is the one that predicted, fed the same input.
        self.classifier = ClassifyStage(model=model, weights=weights, num_classes=num_classes, resize=resize, crop=crop,
                                        model_kwargs=model_kwargs, device=device, threads=threads)
        self.model = out_of_place_relus(self.classifier.model.eval())
        self.device = self.classifier.device
        self.method, self.labels_column = method, labels_column_name(labels_column, boxes=False)
        self.patch, self.stride, self.samples, self.noise = patch, stride, samples, noise
        self.layer_name, self.layer = None, None  # Grad-CAM's layer; the other methods need none (nor the dry run)
        if method in CAM_METHODS:
            crop_size = self.classifier.transform.crop_size[0]
            self.layer_name = gradcam_layer(self.model, crop_size, self.device) if layer == "auto" else layer
            self.layer = dict(self.model.named_modules()).get(self.layer_name)
            if self.layer is None:
                raise ValueError(f"layer {self.layer_name!r} is not a module of {model}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.boxes is not None:
            maps, in_box, peak = self.boxes.explain(batch)
            return append_columns(batch, {
                schema.ATTRIBUTION_MAPS: pa.array(maps, schema.ATTRIBUTION_MAPS_TYPE),
                schema.ATTRIBUTION_IN_BOX: pa.array(in_box, schema.ATTRIBUTION_IN_BOX_TYPE),
                schema.ATTRIBUTION_PEAK_IN_BOX: pa.array(peak, schema.ATTRIBUTION_PEAK_IN_BOX_TYPE),
            })
        images = batch_images(batch)
        targets = [labels[0] if labels else None for labels in batch[self.labels_column].to_pylist()]
        maps: list[list[bytes]] = [[] for _ in images]
        wanted = [i for i, t in enumerate(targets) if t is not None]
        if wanted:
            x = torch.stack([self.classifier.preprocess(images[i]) for i in wanted]).to(self.device)
            attributions = self.attribute(x, torch.tensor([targets[i] for i in wanted], device=self.device))
            for i, a in zip(wanted, attributions):
                maps[i] = [encode_map(to_image(a, images[i].shape[:2], self.classifier.transform))]
        return append_columns(batch, {
            schema.ATTRIBUTION_MAPS: pa.array(maps, schema.ATTRIBUTION_MAPS_TYPE),
            schema.ATTRIBUTION_IN_BOX: pa.array([[None] * len(m) for m in maps], schema.ATTRIBUTION_IN_BOX_TYPE),
            schema.ATTRIBUTION_PEAK_IN_BOX: pa.array([[None] * len(m) for m in maps], schema.ATTRIBUTION_PEAK_IN_BOX_TYPE),
        })

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        """(N, 3, c, c) model inputs, (N,) classes -> (N, c, c) float32 maps (larger = more important)."""
        from captum.attr import GuidedBackprop, LayerAttribution, Saliency

        x = x.clone().requires_grad_(True)
        if self.method == "saliency":
            a = Saliency(self.model).attribute(x, target=target, abs=True).amax(dim=1)
        elif self.method == "smoothgrad":  # image by image: each one's noise then depends on it alone
            a = torch.cat([
                smoothgrad(self.model, x[i : i + 1], target[i : i + 1], samples=self.samples, per_call=self.samples,
                           stdevs=self.noise * float(x[i].detach().max() - x[i].detach().min()))
                for i in range(len(x))
            ])
        elif self.method == "guided_backprop":
            a = GuidedBackprop(self.model).attribute(x, target=target).abs().amax(dim=1)
        elif self.method == "occlusion":  # grey: 0 after normalisation is the dataset's mean colour
            a = occlusion(self.model, x.detach(), patch=self.patch, stride=self.stride, fill=torch.zeros(3), target=target)
        else:  # gradcam, hirescam
            cam = layer_cam(self.method, self.model, self.layer, x, target)
            a = LayerAttribution.interpolate(cam[:, None], tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
        return a.detach().float().cpu().numpy()


class Framed(torch.nn.Module):
    """``forward`` of its input less a frame of ``margin`` pixels on every side (see :func:`occlusion`)."""

    def __init__(self, forward, margin: int):
        super().__init__()
        self.inner, self.margin = forward, margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.margin
        return self.inner(x[..., m : x.shape[-2] - m, m : x.shape[-1] - m])


def occlusion(forward, x: torch.Tensor, *, patch: int, stride: int, fill: torch.Tensor, target, per_call: int = OCCLUSION_BATCH) -> torch.Tensor:
    """captum's Occlusion: (N, 3, H, W) -> (N, H, W) mean score drop of the windows covering each
    pixel, the window filled with ``fill`` (3,); with ``target=None`` and one image whose forward gives
    K outputs (a detector's boxes): (K, H, W), one sweep for all of them.

    captum's windows stay inside the input, so a pixel near the border is covered by fewer windows than
    one inside, and its mean drop is not averaged down like the others': maps peaked at the border beside
    objects that touch it (pointing game 0.67 on the shipped detector's boxes). So the sweep runs over
    the input framed by ``patch - stride`` pixels that the forward pass cuts off again: every pixel is
    covered by as many windows as any other, some of them partly off the image (``patch`` a multiple
    of ``stride``, which the spec checks). ``per_call``: occluded copies per model call.
    """
    from captum.attr import Occlusion

    margin = max(patch - stride, 0)
    framed = F.pad(x, (margin,) * 4)
    baseline = fill.to(x).view(1, 3, 1, 1).expand_as(framed).contiguous()
    drop = Occlusion(Framed(forward, margin)).attribute(
        framed, sliding_window_shapes=(3, patch, patch), strides=(3, stride, stride), baselines=baseline,
        target=target, perturbations_per_eval=per_call,
    )
    drop = drop.reshape(-1, *framed.shape[1:]).mean(dim=1)
    return drop[:, margin : margin + x.shape[-2], margin : margin + x.shape[-1]]


def smoothgrad(forward, x: torch.Tensor, target, *, samples: int, per_call: int, stdevs: float) -> torch.Tensor:
    """captum's SmoothGrad (|gradient| averaged over ``samples`` noisy copies, max over channels) of
    ``x`` (N, 3, H, W), one image or copies of one, -> (N, H, W). The noise is drawn from a fixed seed
    (:data:`NOISE_SEED`), the global generator left as it was: a rerun or a resumed job writes the
    same maps."""
    from captum.attr import NoiseTunnel, Saliency

    with torch.random.fork_rng(devices=[x.device.index or 0] if x.is_cuda else []):
        torch.manual_seed(NOISE_SEED)
        return NoiseTunnel(Saliency(forward)).attribute(
            x, nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=per_call, stdevs=stdevs, target=target, abs=True
        ).amax(dim=1)


def layer_cam(method: str, forward, layer: torch.nn.Module, inputs: torch.Tensor, target) -> torch.Tensor:
    """Grad-CAM or HiResCAM of ``forward``'s ``target`` outputs on ``layer`` -> (N, h, w) on the layer's grid, >= 0."""
    from captum.attr import LayerGradCam, LayerGradientXActivation

    if method == "gradcam":
        return LayerGradCam(forward, layer).attribute(inputs, target=target, relu_attributions=True)[:, 0]
    return torch.relu(LayerGradientXActivation(forward, layer).attribute(inputs, target=target).sum(dim=1))


def out_of_place_relus(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its ReLU modules computing out of place: captum's backward hooks (guided backprop)
    cannot follow in-place ones."""
    for module in model.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    return model


def spatial_modules(model: torch.nn.Module, size: int, device: torch.device) -> list[tuple[str, tuple[int, int]]]:
    """(name, output (h, w)) of the modules that run once in a forward pass of a ``size`` px image and
    leave a 4-D output of more than 1 x 1, in the order they ran (one dry run)."""
    order, calls = [], {}
    names = {module: name for name, module in model.named_modules() if name}

    def hook(module, _inputs, output):
        calls[module] = calls.get(module, 0) + 1
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] > 1 and output.shape[-2] > 1:
            order.append((module, tuple(output.shape[-2:])))

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
    found = [(names[m], hw) for m, hw in order if calls[m] == 1]
    if not found:
        raise ValueError("a CAM needs a layer with a spatial output (a convolutional network); set layer: MODULE_NAME")
    return found


def gradcam_layer(model: torch.nn.Module, crop: int, device: torch.device) -> str:
    """The last module the forward pass leaves with a 4-D output of more than 1 x 1 (called once)."""
    return spatial_modules(model, crop, device)[-1][0]


def pyramid_layers(backbone: torch.nn.Module, size: int, device: torch.device) -> list[str]:
    """Per output resolution of a detector's backbone, the last module that produced it: the feature
    pyramid's levels (FPN's layer blocks, RetinaNet's p6/p7), finest first."""
    with torch.inference_mode():
        out = backbone(torch.zeros(1, 3, size, size, device=device))
    levels = {tuple(v.shape[-2:]) for v in (out.values() if isinstance(out, dict) else [out])}  # what the heads read
    last: dict[tuple[int, int], str] = {}
    for name, hw in spatial_modules(backbone, size, device):
        if hw in levels:
            last[hw] = name
    return [last[hw] for hw in sorted(last, key=lambda hw: -hw[0] * hw[1])]


def to_image(attribution: np.ndarray, size: tuple[int, int], transform) -> np.ndarray:
    """A (c, c) map over the model's input -> (H, W) over the image (``size``): pasted at the center
    crop's place in the resized image (zero elsewhere: the model saw nothing there), then resized."""
    h, w = size
    short = transform.resize_size[0]
    rh, rw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)  # torchvision's resize rounding
    c = attribution.shape[-1]
    top, left = int(round((rh - c) / 2.0)), int(round((rw - c) / 2.0))  # center_crop's offsets (negative: padded)
    canvas = np.zeros((rh, rw), np.float32)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + c, rh), min(left + c, rw)
    canvas[y0:y1, x0:x1] = attribution[y0 - top : y1 - top, x0 - left : x1 - left]
    resized = F.interpolate(torch.from_numpy(canvas)[None, None], size=(h, w), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()


def encode_map(attribution: np.ndarray) -> bytes:
    """The positive part of a map, scaled to 0..255 (its maximum -> 255), as an 8-bit grey PNG."""
    positive = np.clip(attribution, 0, None)
    top = float(positive.max())
    scaled = np.zeros(positive.shape, np.uint8) if top <= 0 else np.round(positive / top * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(scaled, mode="L").save(buf, format="PNG")
    return buf.getvalue()
