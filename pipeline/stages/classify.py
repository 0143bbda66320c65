"""Image classification: the top k classes of each image, from a torchvision classifier.

Models (registry task ``classify``): every classification model of ``torchvision.models`` by name
(ResNet, ResNeXt, Wide ResNet, MobileNet V2/V3, EfficientNet (V2), ConvNeXt, RegNet, ViT, Swin,
MaxViT, DenseNet, VGG, ...). Weights as for detection (:mod:`pipeline.models.weights`): ``none``
(random, seeded), a torchvision weights name looked up in the torch hub cache (``DEFAULT``,
``IMAGENET1K_V1``...; never downloaded), or a ``.pth`` (a bare state dict or the project's
checkpoint format).

Per image, as the weights' ``transforms()`` and a direct torchvision call do it:

1. preprocess with torchvision's ``ImageClassification`` transform: resize the RGB uint8 image so
   its shorter side is ``resize`` (antialiased; the weights' interpolation, bilinear for most),
   center-crop ``crop`` x ``crop``, scale to [0, 1], normalise with ImageNet's mean and std.
   ``auto`` sizes are the weights' own (``ResNet18_Weights.DEFAULT``: 256 / 224); for ``none`` and
   ``.pth`` weights they are what a project checkpoint says (its ``"resize"`` / ``"crop"``),
   else ``ImageClassification``'s defaults (:data:`DEFAULT_RESIZE` / :data:`DEFAULT_CROP`);
2. every image of the batch is then ``(3, crop, crop)``: one model call on the stacked batch gives
   ``(N, C)`` logits;
3. softmax over the classes (float32), then the ``top_k`` best (at most ``C``), best first.

Output per image (see :mod:`pipeline.schema`): ``class_labels`` (list<int32>: the model's class
indices), ``class_scores`` (list<float32>: their probabilities, descending) and
``class_category_ids`` (list<int64>: the dataset's category ids for those labels, ``-1`` where the
mapping has none). The mapping is detect's ``category_map``: ``auto`` maps by name when the
weights name their classes (ImageNet's 1000 for torchvision weights, a checkpoint's
``categories``) and the dataset names its categories, and is the identity (label == category id)
otherwise. A job whose input names no categories writes the model's names into its output's
``dataset.json`` (then ``class_category_ids`` are the labels), so exports and reports show names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, PositiveInt, field_validator, model_validator
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from pipeline import schema
from pipeline.config.paths import path_field
from pipeline.config.spec import StageSpec
from pipeline.models.registry import accepted_kwargs, build_model, get_entry, list_models
from pipeline.models.weights import ResolvedWeights, load_checkpoint, resolve_weights
from pipeline.stages.common import append_columns, batch_images, torch_device
from pipeline.stages.detect import CategoryMap, category_mapping, check_model_kwargs, check_weights

CLASSIFY_COLUMNS: dict[str, pa.DataType] = {
    schema.CLASS_LABELS: schema.CLASS_LABELS_TYPE,
    schema.CLASS_SCORES: schema.CLASS_SCORES_TYPE,
    schema.CLASS_CATEGORY_IDS: schema.CLASS_CATEGORY_IDS_TYPE,
}
DEFAULT_NUM_CLASSES = 1000  # ImageNet-1k: torchvision's classification weights
DEFAULT_RESIZE = 256  # ImageClassification's default resize_size
DEFAULT_CROP = 224  # the crop of torchvision's ImageNet weights (ImageClassification has no default for it)
UNMAPPED = -1  # category id written for labels the category map does not cover
VIT_IMAGE_SIZE = 224  # a ViT built without weights takes (image_size x image_size) inputs only

Size = PositiveInt | Literal["auto"]


class ClassifierKeys(StageSpec):
    """The keys naming a classifier and its input, shared by the stages that run one (``classify``,
    and ``synthesize``, which optimises images against it): a stage given the same values runs the
    same network on the same preprocessed input."""

    model: str = Field("resnet18", description="a torchvision classification model, e.g. resnet18, mobilenet_v3_small, "
                       "efficientnet_b0, convnext_tiny, vit_b_16 (all: pipeline.models.registry.list_models('classify'))")
    weights: str = path_field("none", "'none', a torchvision weights name (DEFAULT, IMAGENET1K_V1...) or a .pth path")
    num_classes: PositiveInt | None = Field(
        None, description=f"classes of the model's head (weights none/bare state dict; default {DEFAULT_NUM_CLASSES}, ImageNet's)"
    )
    resize: Size = Field(
        "auto", description=f"shorter side before the center crop, px; auto: the weights' transforms' (a checkpoint's 'resize', else {DEFAULT_RESIZE})"
    )
    crop: Size = Field(
        "auto", description=f"side of the center crop the model sees, px; auto: the weights' transforms' (a checkpoint's 'crop', else {DEFAULT_CROP})"
    )
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra builder kwargs, e.g. image_size for vit_* at another crop")

    @field_validator("model")
    @classmethod
    def _classification_model(cls, value: str) -> str:
        if get_entry(value).task != "classify":  # get_entry raises listing the known models
            raise ValueError(f"{value} is not a classification model; use one of {', '.join(list_models('classify'))}")
        return value

    @model_validator(mode="after")
    def _known_model_kwargs(self) -> "ClassifierKeys":
        check_model_kwargs(self, self.model, self.model_kwargs)
        if self.weights.lower() == "none" and "image_size" in accepted_kwargs(self.model):
            crop = DEFAULT_CROP if self.crop == "auto" else self.crop
            size = self.model_kwargs.get("image_size", VIT_IMAGE_SIZE)
            if crop != size:  # a ViT's position embeddings fix its input size: it would fail on the first batch
                raise ValueError(f"crop {crop} is not {self.model}'s image_size {size}; set crop and model_kwargs.image_size alike")
        return self

    def preflight(self) -> None:
        check_weights(self.model, self.weights, self.num_classes or DEFAULT_NUM_CLASSES)


class ClassifySpec(ClassifierKeys):
    """Parameters of a ``classify`` stage (see jobs/classify.yaml)."""

    type_name: ClassVar[str] = "classify"

    top_k: PositiveInt = Field(5, description="classes kept per image, best first (at most the model's classes)")
    category_map: CategoryMap = Field("auto", description="model label -> dataset category id; auto: by name when both sides name them")

    @classmethod
    def stage_class(cls) -> type:
        return ClassifyStage

    def input_columns(self) -> dict[str, tuple[str, pa.DataType]]:
        return {}

    def output_columns(self) -> dict[str, pa.DataType]:
        return dict(CLASSIFY_COLUMNS)

    def model_categories(self) -> list[dict] | None:
        return resolve_weights(self.model, self.weights).categories()


DEFAULT = ClassifySpec.defaults()


class ClassifyStage:
    """Run a torchvision classifier on a batch of decoded images.

    Example::

        stage = ClassifyStage(model="resnet18", weights="none", num_classes=4, resize=64, crop=56, top_k=3)
        out = stage(batch)  # batch: pyarrow.Table with pixels/width/height columns; + CLASSIFY_COLUMNS
    """

    def __init__(
        self,
        *,
        model: str = DEFAULT.model,
        weights: str = DEFAULT.weights,
        num_classes: int | None = DEFAULT.num_classes,
        top_k: int = DEFAULT.top_k,
        category_map: CategoryMap = DEFAULT.category_map,
        resize: int | str = DEFAULT.resize,
        crop: int | str = DEFAULT.crop,
        model_kwargs: dict[str, Any] | None = None,
        dataset_categories: Sequence[dict] = (),
        device: str = "cpu",
        threads: int | None = None,
    ):
        self.device = torch_device(device, threads)
        resolved = resolve_weights(model, weights)
        self.model, model_categories = build_model(
            model, resolved, num_classes=num_classes or DEFAULT_NUM_CLASSES, extra=model_kwargs
        )
        self.model.to(self.device)
        self.transform = classification_transform(resolved, resize=resize, crop=crop)
        self.top_k = top_k
        self.label_to_category = category_mapping(category_map, model_categories, list(dataset_categories))

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """RGB uint8 (H, W, 3) -> normalised float (3, crop, crop), as the weights' transforms make it."""
        return self.transform(torch.from_numpy(np.array(image)).permute(2, 0, 1))

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 (H, W, 3) arrays -> (labels (N, k) int64, probabilities (N, k) float32), best first.

        k = min(top_k, classes). The crop gives every image the same size, so the batch is one call.
        """
        x = torch.stack([self.preprocess(img) for img in images]).to(self.device)
        probabilities = torch.softmax(self.model(x).float(), dim=1)
        scores, labels = probabilities.topk(min(self.top_k, probabilities.shape[1]), dim=1)  # sorted, descending
        return labels.cpu().numpy(), scores.cpu().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return append_columns(batch, self.columns(*self.predict(batch_images(batch))))

    def category_ids(self, labels: np.ndarray) -> np.ndarray:
        """Model labels (any shape) -> the dataset's category ids, int64 (``-1`` where the mapping has none)."""
        if self.label_to_category is None:
            return labels.astype(np.int64)
        return np.vectorize(lambda x: self.label_to_category.get(int(x), UNMAPPED), otypes=[np.int64])(labels)

    def columns(self, labels: np.ndarray, scores: np.ndarray) -> dict[str, pa.Array]:
        """The :data:`CLASSIFY_COLUMNS` from (N, k) labels and probabilities."""
        return {
            schema.CLASS_LABELS: pa.array(labels.astype(np.int32).tolist(), schema.CLASS_LABELS_TYPE),
            schema.CLASS_SCORES: pa.array(scores.astype(np.float32).tolist(), schema.CLASS_SCORES_TYPE),
            schema.CLASS_CATEGORY_IDS: pa.array(self.category_ids(labels).tolist(), schema.CLASS_CATEGORY_IDS_TYPE),
        }


def classification_transform(weights: ResolvedWeights, *, resize: int | str = "auto", crop: int | str = "auto") -> ImageClassification:
    """torchvision's ``ImageClassification`` for these weights, with ``resize``/``crop`` where given.

    ``auto`` does what the weights' transforms do: torchvision weights say it themselves (sizes,
    interpolation, mean and std: ``ResNet18_Weights.DEFAULT.transforms()`` is 256 / 224 bilinear);
    a project checkpoint may say it (``"resize"``, ``"crop"``: ints); otherwise
    ``ImageClassification``'s defaults (256, bilinear, ImageNet's mean and std) with a 224 crop.
    """
    if weights.kind == "torchvision":
        base = weights.enum.transforms()
        sizes = {"resize": base.resize_size[0], "crop": base.crop_size[0]}
        style = {"mean": tuple(base.mean), "std": tuple(base.std), "interpolation": base.interpolation}
    else:
        sizes = {"resize": DEFAULT_RESIZE, "crop": DEFAULT_CROP}
        style = {"interpolation": InterpolationMode.BILINEAR}
        if weights.kind == "checkpoint":
            ckpt = load_checkpoint(weights.path)
            sizes.update({k: int(ckpt[k]) for k in ("resize", "crop") if ckpt.get(k) is not None})
    if resize != "auto":
        sizes["resize"] = int(resize)
    if crop != "auto":
        sizes["crop"] = int(crop)
    return ImageClassification(crop_size=sizes["crop"], resize_size=sizes["resize"], **style)
