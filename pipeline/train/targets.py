"""Dataset rows -> (image tensor, target dict) in the format torchvision detection models train on.

* ``boxes``: float32 (N, 4) **xyxy** in pixels, from COCO's xywh ``bbox``;
* ``labels``: int64 (N,), contiguous 1..K (0 is background) in the order of the dataset's
  category ids; :func:`label_categories` gives the mapping stored in checkpoints;
* ``masks``: uint8 (N, H, W), decoded from RLE or polygons (only for mask models).

Crowd annotations and degenerate boxes (w or h < 1 px) are left out of training targets.
"""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils

from pipeline.data.decode import decode_image


def label_categories(categories: list[dict]) -> list[dict]:
    """Dataset categories -> [{"label": 1.., "id": category_id, "name": ...}] sorted by id."""
    return [{"label": i, "id": int(c["id"]), "name": c["name"]} for i, c in enumerate(sorted(categories, key=lambda c: c["id"]), start=1)]


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


def row_to_sample(row: dict, label_of: dict[int, int], *, with_masks: bool) -> tuple[torch.Tensor, dict]:
    rgb = decode_image(row["image"])
    height, width = rgb.shape[:2]
    boxes, labels, masks = [], [], []
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
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    if with_masks:
        target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(255)
    return image, target
