"""Training a semantic segmentation model: rows -> (image crop, label crop), class weights, the loss.

The detection models compute their own losses from target dicts (:mod:`pipeline.train.targets`);
a semantic model only outputs logits, so the loss is written here: per-pixel cross-entropy over
``model(x)["out"]`` (N, C, h, w) against a label map (N, h, w) of model labels, pixels labelled
:data:`IGNORE` left out, optionally weighted per class.

Ground truth per row, as evaluation reads it (:mod:`pipeline.eval.semantic`), in model labels
(0 = background, 1..K = the dataset's categories in id order, :func:`label_categories`):

* the row's ``label_map`` PNG (category ids, 255 = ignore) where it has one;
* else its instance annotations painted in order (a later annotation wins where masks overlap),
  an annotation without a segmentation painted ignore over its box, crowd regions painted ignore
  over everything.

Samples are random ``crop`` x ``crop`` windows at the image's native resolution (the stage runs
small models at native size, so training and inference see objects at the same scale), flipped
left-right half of the time; an image smaller than the crop is padded with ignored pixels.
Images are normalised with ImageNet's mean and std, as the ``segment`` stage's
``SemanticSegmentation`` transform does.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms._presets import SemanticSegmentation

from pipeline import schema
from pipeline.data.decode import decode_image
from pipeline.data.label_maps import decode_png_label_map
from pipeline.train.targets import annotation_mask

IGNORE = schema.SEMANTIC_IGNORE
BACKGROUND = 0
_NORMALISE = SemanticSegmentation(resize_size=None)  # the stage's transform: its mean and std
MEAN = torch.tensor(_NORMALISE.mean).view(3, 1, 1)
STD = torch.tensor(_NORMALISE.std).view(3, 1, 1)


def label_lut(label_of: dict[int, int]) -> np.ndarray:
    """uint8 label-map value (category id; 255 ignore) -> model label; -1 where the value is no category."""
    lut = np.full(256, -1, np.int64)
    lut[BACKGROUND] = BACKGROUND
    for category_id, label in label_of.items():
        if 0 <= category_id < IGNORE:
            lut[category_id] = label
    lut[IGNORE] = IGNORE
    return lut


def row_label_map(row: dict, label_of: dict[int, int], height: int, width: int) -> np.ndarray:
    """(height, width) int64 model labels of one row (see the module docstring); raises ValueError on bad input."""
    data = row.get(schema.LABEL_MAP)
    if data is not None:
        values = decode_png_label_map(data, where=f"image {row['image_id']}", error=ValueError)
        if values.shape != (height, width):
            raise ValueError(f"image {row['image_id']}: label map is {values.shape[1]}x{values.shape[0]}, the image {width}x{height}")
        labels = label_lut(label_of)[values]
        if (labels < 0).any():
            raise ValueError(f"image {row['image_id']}: label map values {sorted(set(values[labels < 0].tolist()))[:5]} are no category")
        return labels
    out = np.full((height, width), BACKGROUND, np.int64)
    crowd = []
    for ann in row.get(schema.ANNOTATIONS) or []:
        if ann["category_id"] not in label_of:
            raise ValueError(f"image {row['image_id']}: annotation {ann['id']} has category {ann['category_id']} not in the dataset's categories")
        segmentation = ann.get("segmentation") or {}
        if not (segmentation.get("rle") or segmentation.get("polygons")):
            x, y, w, h = ann["bbox"]
            out[max(int(np.floor(y)), 0) : max(int(np.ceil(y + h)), 0), max(int(np.floor(x)), 0) : max(int(np.ceil(x + w)), 0)] = IGNORE
            continue
        mask = annotation_mask(ann, height, width).astype(bool)
        if ann.get("iscrowd"):
            crowd.append(mask)
        else:
            out[mask] = label_of[ann["category_id"]]  # later annotations win where masks overlap
    for mask in crowd:
        out[mask] = IGNORE
    return out


def normalise(rgb: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float (3, H, W), scaled to [0, 1] and normalised with ImageNet's mean and std."""
    return (torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().div(255) - MEAN) / STD  # a copy: decoded arrays are read-only


def class_weights(counts: np.ndarray) -> torch.Tensor:
    """Per-class loss weights from pixel counts: sqrt(total / count), scaled to mean 1.

    The square root softens plain inverse frequency: on the shapes, background is ~80% of the
    pixels, and full inverse weighting made the model paint object classes over background edges.
    A class absent from the counted rows gets the largest weight of the others.
    """
    counts = np.asarray(counts, np.float64)
    weights = np.zeros_like(counts)
    present = counts > 0
    weights[present] = np.sqrt(counts[present].sum() / counts[present])
    weights[~present] = weights[present].max() if present.any() else 1.0
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


class SemanticObjective:
    """Samples and loss for a semantic model (``model(x)["out"]`` logits), one per training worker.

    ``sample(row) -> (image (3, crop, crop) float, labels (crop, crop) int64)``; ``loss(model,
    samples, device)``: the class-weighted cross-entropy of the stacked batch.
    """

    def __init__(self, label_of: dict[int, int], *, crop: int, hflip: bool, weights: list[float] | None, seed: int):
        self.label_of, self.crop, self.hflip = label_of, crop, hflip
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        self.rng = np.random.default_rng(seed)

    def sample(self, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
        rgb = decode_image(row[schema.IMAGE])
        height, width = rgb.shape[:2]
        labels = row_label_map(row, self.label_of, height, width)
        c = self.crop
        if height < c or width < c:  # pad: ignored pixels, black image
            pad_h, pad_w = max(0, c - height), max(0, c - width)
            rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)))
            labels = np.pad(labels, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
            height, width = labels.shape
        y0, x0 = self.rng.integers(0, height - c + 1), self.rng.integers(0, width - c + 1)
        rgb, labels = rgb[y0 : y0 + c, x0 : x0 + c], labels[y0 : y0 + c, x0 : x0 + c]
        if self.hflip and self.rng.random() < 0.5:
            rgb, labels = rgb[:, ::-1], labels[:, ::-1]
        return normalise(rgb), torch.from_numpy(np.ascontiguousarray(labels))

    def blank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A grey image, all background: stands in for a batch in which no row could be read."""
        return normalise(np.full((self.crop, self.crop, 3), 128, np.uint8)), torch.zeros((self.crop, self.crop), dtype=torch.int64)

    def loss(self, model: torch.nn.Module, samples: list, device: torch.device) -> torch.Tensor:
        x = torch.stack([s[0] for s in samples]).to(device)
        y = torch.stack([s[1] for s in samples]).to(device)
        logits = model(x)["out"]
        if not (y != IGNORE).any():  # every pixel ignored: a zero loss that still reaches every parameter (DDP)
            return logits.sum() * 0.0
        weight = None if self.weights is None else self.weights.to(device)
        return F.cross_entropy(logits, y, weight=weight, ignore_index=IGNORE)


def pixel_counts(rows: list[dict], label_of: dict[int, int], num_classes: int) -> np.ndarray:
    """Pixels per model label over ``rows`` (ignored pixels and unreadable rows left out)."""
    counts = np.zeros(num_classes, np.int64)
    for row in rows:
        try:
            height, width = decode_image(row[schema.IMAGE]).shape[:2]
            labels = row_label_map(row, label_of, height, width)
        except Exception:  # noqa: BLE001 - unreadable rows are skipped (and counted) by the training loop
            continue
        counts += np.bincount(labels[labels != IGNORE].ravel(), minlength=num_classes)[:num_classes]
    return counts
