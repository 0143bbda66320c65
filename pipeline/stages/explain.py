"""Visual explanations: where did the model look to make its prediction?

For each image, the top-1 class an earlier ``classify`` stage wrote (``labels_column``, default
``class_labels``) is explained with an attribution map by ``method`` (cs231n's "visualizing what
networks see"), computed by captum on the same classifier (``model``/``weights``: give the classify
stage's) and its input as the ``classify`` stage builds it (``ImageClassification``: resize,
center crop, normalise):

* ``saliency`` (Simonyan et al. 2014): |d class score / d input|, max over the colour channels;
* ``smoothgrad`` (Smilkov et al. 2017): the same averaged over ``samples`` noisy copies of the
  input (Gaussian, std ``noise`` x the input's value range);
* ``guided_backprop`` (Springenberg et al. 2015): gradients with ReLUs passing only positive
  gradients backwards; |.|, max over channels;
* ``occlusion`` (Zeiler & Fergus 2014): the class score's drop when a ``patch`` x ``patch`` square
  (all channels, set to 0 = the dataset mean after normalisation, i.e. grey) slides over the input
  with ``stride``; each pixel gets the mean drop of the patches covering it. The occluded copies go
  through the model in batches (captum's ``perturbations_per_eval``);
* ``gradcam`` (Selvaraju et al. 2017): the ``layer``'s activations weighted by their mean
  gradient, summed over channels, ReLU; upsampled (bilinear) from the layer's grid to the input.
  ``layer: auto`` is the last module of the forward pass with a spatial output (``layer4`` of a
  ResNet, ``features`` of a MobileNet or of ``small_cnn``), found by one dry run.

Class scores are the logits (pre-softmax), as in the papers. captum supplies the algorithms; what
is written here is only what it lacks: the choice of Grad-CAM layer, and mapping a map from the
model's input (the ``crop`` x ``crop`` center crop of the resized image) back onto the image: it
is pasted at the crop's place in the resized image (zero where the model saw nothing), then
resized to the image's size.

Output per image (see :mod:`pipeline.schema`), one entry per explained prediction (the top-1
class: one per image): ``attribution_maps`` (8-bit grey PNG at the image's size, the positive
part of the map scaled so its maximum is 255), and ``attribution_in_box`` / ``attribution_peak_in_box``
(the in-box mass share and the pointing game), null here: a class has no box. Explaining a
detector's boxes, where they are filled, is not done yet.
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
from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from pipeline import schema
from pipeline.config.paths import path_field
from pipeline.config.spec import StageSpec
from pipeline.models.registry import get_entry, list_models
from pipeline.stages.classify import DEFAULT_NUM_CLASSES, ClassifyStage, Size
from pipeline.stages.common import append_columns, batch_images
from pipeline.stages.detect import check_model_kwargs, check_weights

EXPLAIN_COLUMNS: dict[str, pa.DataType] = {
    schema.ATTRIBUTION_MAPS: schema.ATTRIBUTION_MAPS_TYPE,
    schema.ATTRIBUTION_IN_BOX: schema.ATTRIBUTION_IN_BOX_TYPE,
    schema.ATTRIBUTION_PEAK_IN_BOX: schema.ATTRIBUTION_PEAK_IN_BOX_TYPE,
}
Method = Literal["saliency", "smoothgrad", "guided_backprop", "occlusion", "gradcam"]
OCCLUSION_BATCH = 64  # occluded copies per model call


class ExplainSpec(StageSpec):
    """Parameters of an ``explain`` stage (see jobs/explain_shapes.yaml)."""

    type_name: ClassVar[str] = "explain"

    method: Method = Field("gradcam", description="saliency, smoothgrad, guided_backprop, occlusion or gradcam")
    model: str = Field("small_cnn", description="the classifier whose predictions are explained: the classify stage's model")
    weights: str = path_field("none", "the classify stage's weights: 'none', a torchvision weights name or a .pth path")
    num_classes: PositiveInt | None = Field(None, description="as the classify stage's")
    resize: Size = Field("auto", description="as the classify stage's (auto: the weights' or checkpoint's)")
    crop: Size = Field("auto", description="as the classify stage's (auto: the weights' or checkpoint's)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="as the classify stage's")
    labels_column: str = Field(schema.CLASS_LABELS, description="an earlier classify stage's class_labels: its top-1 is explained")
    layer: str = Field("auto", description="gradcam: a module name of the model (auto: the last one with a spatial output)")
    patch: PositiveInt = Field(16, description="occlusion: side of the square patch, input pixels")
    stride: PositiveInt = Field(8, description="occlusion: step of the patch, input pixels")
    samples: PositiveInt = Field(12, description="smoothgrad: noisy copies averaged")
    noise: PositiveFloat = Field(0.1, description="smoothgrad: noise std as a fraction of the input's value range")

    @field_validator("model")
    @classmethod
    def _classifier(cls, value: str) -> str:
        if get_entry(value).task != "classify":  # get_entry raises listing the known models
            raise ValueError(f"{value} is not a classifier; explain takes the classify stage's model "
                             f"({', '.join(list_models('classify')[:6])}, ...): explaining detectors is not done yet")
        return value

    @classmethod
    def stage_class(cls) -> type:
        return ExplainStage

    def input_columns(self) -> dict[str, tuple[str, pa.DataType]]:
        return {"labels_column": (self.labels_column, schema.CLASS_LABELS_TYPE)}

    def output_columns(self) -> dict[str, pa.DataType]:
        return dict(EXPLAIN_COLUMNS)

    def preflight(self) -> None:
        check_model_kwargs(self, self.model, self.model_kwargs)
        check_weights(self.model, self.weights, self.num_classes or DEFAULT_NUM_CLASSES)


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
        layer: str = DEFAULT.layer,
        patch: int = DEFAULT.patch,
        stride: int = DEFAULT.stride,
        samples: int = DEFAULT.samples,
        noise: float = DEFAULT.noise,
        dataset_categories: Sequence[dict] = (),
        device: str = "cpu",
        threads: int | None = None,
    ):
        # The classify stage builds the model, its weights and its preprocessing: the network explained
        # is the one that predicted, fed the same input.
        self.classifier = ClassifyStage(model=model, weights=weights, num_classes=num_classes, resize=resize, crop=crop,
                                        model_kwargs=model_kwargs, device=device, threads=threads)
        self.model = self.classifier.model.eval()
        for module in self.model.modules():  # captum's backward hooks (guided backprop) cannot follow in-place ReLUs
            if isinstance(module, torch.nn.ReLU):
                module.inplace = False
        self.device = self.classifier.device
        self.method, self.labels_column = method, labels_column
        self.patch, self.stride, self.samples, self.noise = patch, stride, samples, noise
        self.layer_name, self.layer = None, None  # Grad-CAM's layer; the other methods need none (nor the dry run)
        if method == "gradcam":
            crop_size = self.classifier.transform.crop_size[0]
            self.layer_name = gradcam_layer(self.model, crop_size, self.device) if layer == "auto" else layer
            self.layer = dict(self.model.named_modules()).get(self.layer_name)
            if self.layer is None:
                raise ValueError(f"layer {self.layer_name!r} is not a module of {model}")

    def __call__(self, batch: pa.Table) -> pa.Table:
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
        from captum.attr import GuidedBackprop, LayerAttribution, LayerGradCam, NoiseTunnel, Occlusion, Saliency

        spread = float(x.max() - x.min())
        x = x.clone().requires_grad_(True)
        if self.method == "saliency":
            a = Saliency(self.model).attribute(x, target=target, abs=True).amax(dim=1)
        elif self.method == "smoothgrad":
            stdevs = self.noise * spread
            a = NoiseTunnel(Saliency(self.model)).attribute(
                x, nt_type="smoothgrad", nt_samples=self.samples, nt_samples_batch_size=self.samples, stdevs=stdevs,
                target=target, abs=True,
            ).amax(dim=1)
        elif self.method == "guided_backprop":
            a = GuidedBackprop(self.model).attribute(x, target=target).abs().amax(dim=1)
        elif self.method == "occlusion":
            a = Occlusion(self.model).attribute(
                x.detach(), sliding_window_shapes=(3, self.patch, self.patch), strides=(3, self.stride, self.stride),
                baselines=0.0, target=target, perturbations_per_eval=OCCLUSION_BATCH,
            ).mean(dim=1)
        else:  # gradcam
            cam = LayerGradCam(self.model, self.layer).attribute(x, target=target, relu_attributions=True)
            a = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
        return a.detach().float().cpu().numpy()


def gradcam_layer(model: torch.nn.Module, crop: int, device: torch.device) -> str:
    """The last module the forward pass leaves with a 4-D output of more than 1 x 1 (called once)."""
    order, calls = [], {}
    names = {module: name for name, module in model.named_modules() if name}

    def hook(module, _inputs, output):
        calls[module] = calls.get(module, 0) + 1
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] > 1 and output.shape[-2] > 1:
            order.append(module)

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, crop, crop, device=device))
    finally:
        for h in handles:
            h.remove()
    candidates = [m for m in order if calls[m] == 1]
    if not candidates:
        raise ValueError("gradcam needs a layer with a spatial output (a convolutional network); set layer: MODULE_NAME")
    return names[candidates[-1]]


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
