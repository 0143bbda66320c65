"""Dataset rows -> (image tensor, target dict) in the format torchvision detection models train on.

* ``boxes``: float32 (N, 4) **xyxy** in pixels, from COCO's xywh ``bbox``;
* ``labels``: int64 (N,), contiguous 1..K (0 is background) in the order of the dataset's
  category ids; :func:`label_categories` gives the mapping stored in checkpoints;
* ``masks``: uint8 (N, H, W), decoded from RLE or polygons (only for mask models);
* ``keypoints``: float32 (N, K, 3) x, y, visibility in COCO order (only for keypoint models).

Crowd annotations and degenerate boxes (w or h < 1 px) are left out of training targets.
"""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils

from pipeline.data.decode import decode_image


def label_categories(categories: list[dict], first: int = 1) -> list[dict]:
    """Dataset categories -> [{"label": first.., "id": category_id, "name": ...}] sorted by id.

    ``first`` is 1 for models with a background class 0 (detectors, semantic models), 0 for classifiers.
    """
    ordered = sorted(categories, key=lambda c: c["id"])
    return [{"label": i, "id": int(c["id"]), "name": c["name"]} for i, c in enumerate(ordered, start=first)]


def annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    seg = ann.get("segmentation") or {}
    if seg.get("rle"):
        rle = {"size": seg["rle"]["size"], "counts": seg["rle"]["counts"].encode("ascii")}
    elif seg.get("polygons"):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg["polygons"], height, width))
    else:  # no segmentation: the box itself
        x, y, w, h = ann["bbox"]
        m = np.zeros((height, width), np.uint8)
        m[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = 1
        return m
    return mask_utils.decode(rle)


def annotation_keypoints(ann: dict, num_keypoints: int) -> np.ndarray:
    """(K, 3) x, y, visibility; an annotation without keypoints has all K invisible (v = 0)."""
    values = ann.get("keypoints")
    if not values:
        return np.zeros((num_keypoints, 3), np.float32)
    if len(values) != 3 * num_keypoints:
        raise ValueError(f"annotation {ann['id']} has {len(values) // 3} keypoints; the model predicts {num_keypoints}")
    return np.asarray(values, np.float32).reshape(num_keypoints, 3)


def row_to_sample(row: dict, label_of: dict[int, int], *, with_masks: bool, num_keypoints: int = 0) -> tuple[torch.Tensor, dict]:
    rgb = decode_image(row["image"])
    height, width = rgb.shape[:2]
    boxes, labels, masks, keypoints = [], [], [], []
    for ann in row.get("annotations") or []:
        x, y, w, h = ann["bbox"]
        if ann.get("iscrowd") or w < 1 or h < 1:
            continue
        if ann["category_id"] not in label_of:
            raise ValueError(f"image {row['image_id']}: annotation {ann['id']} has category {ann['category_id']} not in the dataset's categories")
        boxes.append([x, y, x + w, y + h])
        labels.append(label_of[ann["category_id"]])
        if with_masks:
            masks.append(annotation_mask(ann, height, width))
        if num_keypoints:
            keypoints.append(annotation_keypoints(ann, num_keypoints))
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    if with_masks:
        target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
    if num_keypoints:
        target["keypoints"] = torch.from_numpy(np.stack(keypoints)) if keypoints else torch.zeros((0, num_keypoints, 3))
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(255)
    return image, target


def empty_sample(size: int, *, with_masks: bool, num_keypoints: int = 0) -> tuple[torch.Tensor, dict]:
    """A grey image with no objects: a valid training sample (all background)."""
    target = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    if with_masks:
        target["masks"] = torch.zeros((0, size, size), dtype=torch.uint8)
    if num_keypoints:
        target["keypoints"] = torch.zeros((0, num_keypoints, 3))
    return torch.full((3, size, size), 0.5), target


class DetectionObjective:
    """Samples and loss for a torchvision detection model, which computes its own losses in train mode.

    ``sample(row) -> (image (3, H, W) float in [0, 1], target dict)`` (see the module docstring);
    ``loss(model, samples, device)``: the sum of the model's loss dict.
    """

    def __init__(self, label_of: dict[int, int], *, with_masks: bool, num_keypoints: int, blank_size: int):
        self.label_of, self.with_masks, self.num_keypoints, self.blank_size = label_of, with_masks, num_keypoints, blank_size

    def sample(self, row: dict) -> tuple[torch.Tensor, dict]:
        return row_to_sample(row, self.label_of, with_masks=self.with_masks, num_keypoints=self.num_keypoints)

    def blank(self) -> tuple[torch.Tensor, dict]:
        """Stands in for a batch in which no image could be read: every worker must still step."""
        return empty_sample(self.blank_size, with_masks=self.with_masks, num_keypoints=self.num_keypoints)

    def loss(self, model: torch.nn.Module, samples: list, device: torch.device) -> torch.Tensor:
        images = [img.to(device) for img, _ in samples]
        targets = [{k: v.to(device) for k, v in t.items()} for _, t in samples]
        return sum(model(images, targets).values())
