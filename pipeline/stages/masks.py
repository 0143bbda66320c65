"""Instance segmentation with torchvision Mask R-CNN (``maskrcnn_resnet50_fpn``, ``_v2``).

Output per image: the detect stage's columns (``boxes`` xyxy float32, ``scores``, ``labels``,
``category_ids``; see :mod:`pipeline.stages.detect`) plus ``masks``: one compressed COCO RLE
``{"size": [height, width], "counts": str}`` per box, in the same order. A mask is the model's
mask probability pasted into its box at the decoded image's size and thresholded as
``probability > mask_threshold`` -- the rule of torchvision's COCO reference evaluation. The
output holds RLE strings, which is what COCO tools read and what keeps a shard small.

Masks at detection speed: torchvision's ``paste_masks_in_image`` makes an (N, 1, H, W) float
mask for every kept detection (up to ``max_detections``; ``score_threshold`` is applied before the
mask head), and pasting plus encoding N full-size masks made a GPU run ~10x slower than the same
backbone's boxes alone. The stage keeps the model's box-sized mask probabilities instead
(:func:`masks_unpasted`) and pastes each into its box only -- the same padding, box expansion,
integer rounding and bilinear resize as torchvision's ``paste_mask_in_image``, so the same float
values (:func:`paste_in_boxes`) -- thresholds those regions and finds the runs of the full-size
RLE in them, on the model's device (:func:`pipeline.stages.common.encode_column_crops`). The RLE
strings are byte for byte those of pasting at full size and encoding (tests/stages/test_masks.py
keeps that path as the reference; bench/masks.py measures both).

Modes (shared with keypoints, see :mod:`pipeline.stages.heads`):

* default: the model detects, then segments its own detections;
* ``proposals_column``: Fast R-CNN on an earlier stage's proposals, then segments;
* ``boxes_column``: segment boxes an earlier stage found (e.g. ``detect``): only the mask head
  runs, and the stage writes only ``masks``, aligned with those boxes. The mask head is
  class-specific, so it also reads each box's label from ``labels_column`` (the mask model's label
  space). Boxes are clipped to the image; a box with nothing inside the image gets an empty mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

from pipeline import schema
from pipeline.models.registry import list_models
from pipeline.stages.common import encode_column_crops, parse_labels
from pipeline.stages.detect import CategoryMap
from pipeline.stages.heads import HeadSpec, HeadStage
from pipeline.stages.rcnn import boxes_to_rois, detect_from_proposals, mask_probabilities

MASK_COLUMNS: dict[str, pa.DataType] = {schema.MASKS: schema.MASKS_TYPE}  # what the mask head adds
MASK_PROBS = "mask_probs"  # the key under which masks_unpasted leaves roi_heads' (N, 1, M, M) probabilities


@contextlib.contextmanager
def masks_unpasted(model: GeneralizedRCNN) -> Iterator[None]:
    """Within: the model's outputs carry ``mask_probs`` (N, 1, M, M) in place of pasted ``masks``.

    torchvision pastes every detection's mask at the full image size in
    ``transform.postprocess``, which pastes whatever is under ``masks``. A forward hook on
    ``roi_heads`` renames that key on its way out, so postprocess only rescales the boxes, and the
    M x M probabilities reach the caller next to boxes in the original image's pixels. The same
    full forward (or :func:`pipeline.stages.rcnn.detect_from_proposals`) runs; nothing else changes.
    """

    def hold_back(module, args, output):
        for detections in output[0]:
            if "masks" in detections:
                detections[MASK_PROBS] = detections.pop("masks")

    handle = model.roi_heads.register_forward_hook(hold_back)
    try:
        yield
    finally:
        handle.remove()


def paste_in_boxes(
    probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], padding: int = 1
) -> tuple[torch.Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
    """Box-sized masks ``probs`` (N, 1, M, M) pasted into ``boxes`` (N, 4 xyxy, image pixels), as crops.

    Returns ``(flat, shapes, offsets)``: per box the (h, w) region of the ``image_size`` (H, W)
    image its pasted mask covers and that region's top-left pixel (y0, x0), and ``flat``: those
    regions' probabilities, each flattened column by column (Fortran order), one after the other,
    on ``probs``' device. Region i holds exactly the values of torchvision's
    ``paste_masks_in_image(probs, boxes, image_size)[i, 0]`` there, which is zero elsewhere; a box
    with no pixel in the image has a (0, 0) region. The steps are torchvision's
    (``expand_masks``/``expand_boxes`` on the whole tensors, int64 boxes, a bilinear resize of the
    padded mask to the expanded box, the box's overlap with the image), one resize per box, so the
    float values are the same ones.
    """
    if len(probs) == 0:
        return probs.new_zeros(0), [], []
    im_h, im_w = image_size
    padded, scale = expand_masks(probs, padding=padding)
    expanded = expand_boxes(boxes, scale).to(dtype=torch.int64).tolist()
    pieces, shapes, offsets = [], [], []
    for mask, (bx0, by0, bx1, by1) in zip(padded, expanded):
        x0, x1 = max(bx0, 0), min(bx1 + 1, im_w)
        y0, y1 = max(by0, 0), min(by1 + 1, im_h)
        if x1 <= x0 or y1 <= y0:  # no pixel of the box in the image: an empty mask
            shapes.append((0, 0))
            offsets.append((0, 0))
            continue
        size = (max(by1 - by0 + 1, 1), max(bx1 - bx0 + 1, 1))
        resized = F.interpolate(mask[0].expand((1, 1, -1, -1)), size=size, mode="bilinear", align_corners=False)[0, 0]
        pieces.append(resized[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0].t().reshape(-1))
        shapes.append((y1 - y0, x1 - x0))
        offsets.append((y0, x0))
    flat = torch.cat(pieces) if pieces else probs.new_zeros(0)
    return flat, shapes, offsets


def encode_in_boxes(probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], threshold: float) -> list[dict]:
    """COCO RLEs of ``probs`` (N, 1, M, M) pasted into ``boxes`` (N, 4 xyxy) at ``image_size`` (H, W), ``> threshold``.

    Byte for byte the RLEs of torchvision's full-size paste thresholded and encoded
    (:func:`pipeline.stages.common.encode_masks`), from the boxes' regions only
    (:func:`paste_in_boxes`, :func:`pipeline.stages.common.encode_column_crops`): on a GPU, the
    paste, threshold and run search stay there, and only run positions come to the CPU.
    """
    flat, shapes, offsets = paste_in_boxes(probs, boxes, image_size)
    return encode_column_crops(flat > threshold, shapes, offsets, *image_size)


class MasksSpec(HeadSpec):
    """Parameters of a ``masks`` stage (see jobs/maskrcnn.yaml); detect's keys plus the ones below."""

    type_name: ClassVar[str] = "masks"
    task: ClassVar[str] = "masks"
    head: ClassVar[str] = "mask"
    head_columns: ClassVar[dict[str, pa.DataType]] = MASK_COLUMNS

    model: str = Field("maskrcnn_resnet50_fpn", description="a Mask R-CNN: " + ", ".join(list_models("masks")))
    mask_threshold: float = Field(0.5, ge=0, le=1, description="a pixel is in the mask when probability > this")
    labels_column: str = Field(schema.LABELS, description="with boxes_column: each box's label in this model's classes")

    @classmethod
    def stage_class(cls) -> type:
        return MasksStage

    def input_columns(self) -> dict[str, tuple[str, pa.DataType]]:
        if self.boxes_column:
            return {**super().input_columns(), "labels_column": (self.labels_column, schema.IDS_TYPE)}
        return super().input_columns()


DEFAULT = MasksSpec.defaults()


class MasksStage(HeadStage):
    """Mask R-CNN on a batch of decoded images; masks as COCO RLE aligned with the boxes.

    Example::

        stage = MasksStage(model="maskrcnn_resnet50_fpn", weights="none", num_classes=4)
        out = stage(batch)  # + boxes, scores, labels, category_ids, masks
    """

    def __init__(
        self,
        *,
        model: str = DEFAULT.model,
        weights: str = DEFAULT.weights,
        num_classes: int | None = DEFAULT.num_classes,
        score_threshold: float = DEFAULT.score_threshold,
        max_detections: int = DEFAULT.max_detections,
        mask_threshold: float = DEFAULT.mask_threshold,
        category_map: CategoryMap = DEFAULT.category_map,
        model_kwargs: dict[str, Any] | None = None,
        proposals_column: str | None = DEFAULT.proposals_column,
        boxes_column: str | None = DEFAULT.boxes_column,
        labels_column: str = DEFAULT.labels_column,
        output_prefix: str = DEFAULT.output_prefix,
        dataset_categories: Sequence[dict] = (),
        device: str = "cpu",
        threads: int | None = None,
    ):
        super().__init__(
            model=model,
            weights=weights,
            num_classes=num_classes,
            score_threshold=score_threshold,
            max_detections=max_detections,
            category_map=category_map,
            model_kwargs=model_kwargs,
            proposals_column=proposals_column,
            output_prefix=output_prefix,
            dataset_categories=dataset_categories,
            device=device,
            threads=threads,
        )
        self.use_boxes_column(boxes_column)
        self.mask_threshold = mask_threshold
        self.labels_column = labels_column

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray], proposals: list[np.ndarray] | None = None) -> list[dict]:
        """As :meth:`DetectStage.predict`, plus ``masks``: a list of COCO RLE dicts per image.

        The model runs without torchvision's full-size paste (:func:`masks_unpasted`); each kept
        detection's mask is pasted into its box only and encoded from that crop.
        """
        tensors = self.to_tensors(images)
        with masks_unpasted(self.model):
            if proposals is None:
                outputs = self.model(tensors)
            else:
                outputs = detect_from_proposals(self.model, tensors, [torch.from_numpy(p).to(self.device) for p in proposals])
        results = []
        for output, image in zip(outputs, images):
            probs = output.pop(MASK_PROBS)
            out = self.to_numpy(output)
            out["masks"] = encode_in_boxes(probs, output["boxes"], image.shape[:2], self.mask_threshold)
            results.append(out)
        return results

    def head_outputs(self, outputs: list[dict]) -> dict[str, pa.Array]:
        return {schema.MASKS: pa.array([o["masks"] for o in outputs], schema.MASKS_TYPE)}

    def head_on_boxes(self, batch: pa.Table, images: list[np.ndarray], boxes: list[np.ndarray]) -> dict[str, pa.Array]:
        num_classes = self.model.roi_heads.mask_predictor.mask_fcn_logits.out_channels
        labels = [
            parse_labels(cell, self.labels_column, len(b), num_classes)
            for cell, b in zip(batch[self.labels_column].to_pylist(), boxes)
        ]
        return {schema.MASKS: pa.array(self.segment(images, boxes, labels), schema.MASKS_TYPE)}

    @torch.inference_mode()
    def segment(self, images: list[np.ndarray], boxes: list[np.ndarray], labels: list[np.ndarray]) -> list[list[dict]]:
        """COCO RLEs for given xyxy boxes and their model labels; only the mask head runs.

        :func:`pipeline.stages.rcnn.heads_on_boxes` (``task="masks"``) without its full-size
        paste: boxes are clipped to the image, the head runs on those with pixels inside, and their
        masks are pasted into the clipped boxes; a box with nothing inside gets an empty mask.
        """
        r = boxes_to_rois(self.model, self.to_tensors(images), [torch.from_numpy(b).to(self.device) for b in boxes])
        probs = mask_probabilities(self.model, r, [torch.from_numpy(lab).to(self.device) for lab in labels])
        out = []
        for prob, c, k, orig in zip(probs, r.clipped, r.inside, r.original):
            inside = iter(encode_in_boxes(prob, c[k], orig, self.mask_threshold))
            keeps = k.tolist()
            empty = None if all(keeps) else encode_column_crops(torch.zeros(0, dtype=torch.bool), [(0, 0)], [(0, 0)], *orig)[0]
            out.append([next(inside) if keep else empty for keep in keeps])
        return out
