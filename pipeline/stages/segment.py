"""Semantic segmentation: a category for every pixel, from a fully convolutional network.

Models (registry task ``semantic``): torchvision's ``fcn_resnet50/101``, ``deeplabv3_resnet50/101``,
``deeplabv3_mobilenet_v3_large``, ``lraspp_mobilenet_v3_large`` by name, and the project's
``small_unet`` (:mod:`pipeline.models.small_unet`). Weights: ``none``, a torchvision weights name
from the torch hub cache, or a ``.pth`` (the rules of :mod:`pipeline.models.weights`).

Per image, as the weights' transforms and a direct torchvision call do it:

1. preprocess with torchvision's ``SemanticSegmentation`` transform (what every segmentation
   weights' ``transforms()`` is): resize the RGB uint8 image so its shorter side is ``resize``
   (bilinear, antialiased; skipped for the native size), scale to [0, 1], normalise with
   ImageNet's mean and std;
2. run the model; its ``"out"`` is (N, C, h, w) logits at the resized size (aux heads are not run);
3. upsample the logits bilinearly (``align_corners=False``) to the decoded image's size, *then*
   take the argmax over classes: a label map (H, W) of model labels;
4. map labels to the dataset's category ids (``category_map``; label 0 is background and maps to
   category 0) and write, per category present, one compressed COCO RLE at the image's size.

Output per image (see :mod:`pipeline.schema`): ``semantic_category_ids`` (list<int32>, ascending)
and ``semantic_masks`` (one ``{size: [H, W], counts: str}`` per id, same order). The masks cover
every pixel exactly once. Labels the mapping does not cover are written as category ``-1``
(as detect's ``category_ids`` do), so coverage holds whatever the mapping.

Batching images of different sizes: images are grouped by their *resized* size and each group is
one model call; nothing is padded. Padding would change the result: DeepLabV3's ASPP and LR-ASPP
pool over the whole feature map, so a padded border shifts every pixel's logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
import torchvision
from pydantic import Field, PositiveInt, field_validator, model_validator
from torchvision.transforms._presets import SemanticSegmentation

from pipeline import schema
from pipeline.config.paths import path_field
from pipeline.config.spec import StageSpec
from pipeline.models.registry import build_model, get_entry, list_models
from pipeline.models.weights import ResolvedWeights, load_checkpoint, resolve_weights
from pipeline.stages.common import append_columns, batch_images, encode_masks, torch_device
from pipeline.stages.detect import CategoryMap, category_mapping, check_model_kwargs, check_weights

SEGMENT_COLUMNS: dict[str, pa.DataType] = {
    schema.SEMANTIC_CATEGORY_IDS: schema.SEMANTIC_CATEGORY_IDS_TYPE,
    schema.SEMANTIC_MASKS: schema.SEMANTIC_MASKS_TYPE,
}
DEFAULT_NUM_CLASSES = 21  # VOC's 20 classes + background: torchvision's segmentation weights
TORCHVISION_RESIZE = 520  # the short side of torchvision's segmentation weights' transforms
BACKGROUND = 0  # model label and dataset category id of the background
UNMAPPED = -1  # category id written for labels the category map does not cover

Resize = PositiveInt | Literal["auto", "native"]


class SegmentSpec(StageSpec):
    """Parameters of a ``segment`` stage (see jobs/segment.yaml)."""

    type_name: ClassVar[str] = "segment"

    model: str = Field("lraspp_mobilenet_v3_large", description="a semantic segmentation model: " + ", ".join(list_models("semantic")))
    weights: str = path_field("none", "'none', a torchvision weights name (DEFAULT, COCO_WITH_VOC_LABELS_V1) or a .pth path")
    num_classes: PositiveInt | None = Field(
        None, description=f"classes incl. background (weights none/bare state dict; default {DEFAULT_NUM_CLASSES}, VOC's)"
    )
    category_map: CategoryMap = Field(
        "auto", description="model label -> dataset category id; label 0 (background) -> 0; auto: by name when both sides name them"
    )
    resize: Resize = Field(
        "auto",
        description="shorter side before the model, px; native: the image's size; auto: as the weights' transforms "
        f"({TORCHVISION_RESIZE} for torchvision models, a checkpoint's 'resize', else native)",
    )
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra builder kwargs, e.g. base for small_unet")

    @field_validator("model")
    @classmethod
    def _semantic_model(cls, value: str) -> str:
        if get_entry(value).task != "semantic":  # get_entry raises listing the known models
            raise ValueError(f"{value} is not a semantic segmentation model; use one of {', '.join(list_models('semantic'))}")
        return value

    @model_validator(mode="after")
    def _known_model_kwargs(self) -> "SegmentSpec":
        check_model_kwargs(self, self.model, self.model_kwargs)
        return self

    @classmethod
    def stage_class(cls) -> type:
        return SegmentStage

    def input_columns(self) -> dict[str, tuple[str, pa.DataType]]:
        return {}

    def output_columns(self) -> dict[str, pa.DataType]:
        return dict(SEGMENT_COLUMNS)

    def preflight(self) -> None:
        check_weights(self.model, self.weights, self.num_classes or DEFAULT_NUM_CLASSES)

    def model_categories(self) -> list[dict] | None:
        return resolve_weights(self.model, self.weights).categories()


DEFAULT = SegmentSpec.defaults()


class SegmentStage:
    """Run a semantic segmentation model on a batch of decoded images.

    Example::

        stage = SegmentStage(model="lraspp_mobilenet_v3_large", weights="none", num_classes=4, resize=128)
        out = stage(batch)  # batch: pyarrow.Table with pixels/width/height columns; + SEGMENT_COLUMNS
    """

    def __init__(
        self,
        *,
        model: str = DEFAULT.model,
        weights: str = DEFAULT.weights,
        num_classes: int | None = DEFAULT.num_classes,
        category_map: CategoryMap = DEFAULT.category_map,
        resize: int | str = DEFAULT.resize,
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
        if getattr(self.model, "aux_classifier", None) is not None:
            self.model.aux_classifier = None  # torchvision's weights come with it; inference uses "out" only
        self.model.to(self.device)
        self.resize = resolve_resize(resize, model, resolved)
        self.transform = SemanticSegmentation(resize_size=self.resize)
        mapping = category_mapping(category_map, model_categories, list(dataset_categories))
        self.label_to_category = None if mapping is None else {BACKGROUND: BACKGROUND, **mapping}

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """RGB uint8 (H, W, 3) -> normalised float (3, h, w) on the device, as the weights' transforms make it."""
        return self.transform(torch.from_numpy(np.array(image)).permute(2, 0, 1)).to(self.device)

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """RGB uint8 (H, W, 3) arrays -> label maps (H, W) int64 of model labels, one per image.

        Images of the same resized size go through the model together; the logits of each image
        are upsampled to its own size before the argmax.
        """
        inputs = [self.preprocess(img) for img in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(tuple(x.shape[-2:]), []).append(i)
        labels: list[np.ndarray | None] = [None] * len(images)
        for members in groups.values():
            logits = self.model(torch.stack([inputs[i] for i in members]))["out"]
            for row, i in enumerate(members):
                labels[i] = upsampled_argmax(logits[row : row + 1], images[i].shape[:2])
        return labels

    def __call__(self, batch: pa.Table) -> pa.Table:
        return append_columns(batch, self.columns(self.predict(batch_images(batch))))

    def category_map_of(self, label_map: np.ndarray) -> np.ndarray:
        """Model labels (H, W) -> dataset category ids (H, W) int64 (``-1`` where the mapping has none)."""
        if self.label_to_category is None:
            return label_map
        lut = np.full(int(label_map.max()) + 1, UNMAPPED, np.int64)
        for label, category in self.label_to_category.items():
            if 0 <= label < len(lut):
                lut[label] = category
        return lut[label_map]

    def columns(self, label_maps: list[np.ndarray]) -> dict[str, pa.Array]:
        """The :data:`SEGMENT_COLUMNS`: per image the category ids present (ascending) and one RLE each."""
        ids, masks = [], []
        for label_map in label_maps:
            categories = self.category_map_of(label_map)
            present = np.unique(categories)
            ids.append(present.astype(np.int32).tolist())
            masks.append(encode_masks(categories[None] == present[:, None, None]))
        return {
            schema.SEMANTIC_CATEGORY_IDS: pa.array(ids, schema.SEMANTIC_CATEGORY_IDS_TYPE),
            schema.SEMANTIC_MASKS: pa.array(masks, schema.SEMANTIC_MASKS_TYPE),
        }


def upsampled_argmax(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(1, C, h, w) logits -> (H, W) int64 labels: bilinear upsampling to ``size`` first, then argmax."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits[0].argmax(0).cpu().numpy()


def resolve_resize(resize: int | str, model: str, weights: ResolvedWeights) -> int | None:
    """The shorter side images are resized to before the model; None: their native size.

    ``auto`` does what the weights' transforms do: torchvision weights say it themselves
    (``SemanticSegmentation(resize_size=520)``); a checkpoint may say it (``"resize"``: int, or
    None for native); otherwise torchvision's models get 520 and the project's models the native size.
    """
    if resize == "native":
        return None
    if resize != "auto":
        return int(resize)
    if weights.kind == "torchvision":
        size = weights.enum.transforms().resize_size
        return int(size[0]) if size else None
    if weights.kind == "checkpoint":
        ckpt = load_checkpoint(weights.path)
        if "resize" in ckpt:
            return None if ckpt["resize"] is None else int(ckpt["resize"])
    return TORCHVISION_RESIZE if model in torchvision.models.list_models(module=torchvision.models.segmentation) else None
