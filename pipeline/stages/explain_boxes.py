"""Explaining a detector's boxes (the ``explain`` stage after ``detect`` or ``masks``).

The function explained is :class:`BoxScores`: images (N, 3, H, W) in [0, 1] -> (N, K) scores,
the detector's whole forward pass (its own resize, normalisation and padding included) followed,
for each of the row's K boxes, by the score of the detection that still matches it: same label,
IoU >= :data:`MATCH_IOU`, the highest IoU; 0 when none does. So:

* gradients reach the image's own pixels through torchvision's resize: saliency, SmoothGrad and
  guided backprop maps are at the image's size already, nothing to align;
* occlusion measures a box's score drop when a patch (``patch`` x ``patch`` image pixels, stride
  ``stride``, filled with the detector's normalisation mean, i.e. grey) hides part of the image,
  down to the whole score when the detection vanishes. One forward pass of an occluded copy scores
  every box of the image (captum's ablation takes a forward function with several outputs per
  example), so a row of K boxes costs one pass per patch position, not K. Patches may hang over
  the image's edge, so that every pixel is covered as often (:func:`pipeline.stages.explain.occlusion`);
* Grad-CAM and HiResCAM: a box is pooled from one level of the feature pyramid, chosen by its size
  (torchvision's ``LevelMapper``), so its score has a gradient on that level only. ``layer: auto``
  takes every level (per output resolution of the backbone, the last module that produced it: FPN's
  layer blocks; RetinaNet's p6/p7 too) and sums the levels' maps, each computed as the method says;
  the level the box came from is the one that is not zero. captum's ``LayerGradCam`` takes one
  layer, so the levels are done here, in one backward pass. Each map lives on the model's resized
  and zero-padded batch: upsampled to that padded tensor, cropped to where the image lies in it
  (the transform's ``image_sizes``), then resized to the image. ``layer: NAME`` takes one module.

Only predictions with a score >= ``min_score`` are explained (one backward pass or occlusion sweep
each is not free); the others, and those that no longer match when the stage runs the detector
again (the detect stage ran it on a padded batch of several images; here each image runs alone),
get an empty map (``b""``) and null statistics. The stage logs how many no longer matched.

The mask and keypoint heads are switched off in the copy of the model explained: a box's score
does not depend on them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from pipeline.stages.common import batch_images, parse_boxes, parse_labels
from pipeline.stages.detect import DetectStage
from pipeline.stages.explain import CAM_METHODS, encode_map, occlusion, out_of_place_relus, pyramid_layers, smoothgrad

log = logging.getLogger(__name__)

MATCH_IOU = 0.5  # a detection of the new forward pass stands for a box if it overlaps it this much, same label
COPIES_PER_CALL = 16  # copies of an image (one per explained box, or per noise sample) per model call


class BoxScores(nn.Module):
    """Images (N, 3, H, W) in [0, 1] -> (N, K) scores of the K target boxes (see the module docstring).

    ``targets`` (K, 4) xyxy image pixels and (K,) model labels are set per image before attributing.
    ``frame`` keeps, from the last forward pass, the padded batch size and the image's resized size
    (both (h, w)): Grad-CAM's map lives on that padded tensor.
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector
        self.boxes = torch.zeros(0, 4)
        self.labels = torch.zeros(0, dtype=torch.int64)
        self.frame: tuple[tuple[int, int], tuple[int, int]] | None = None
        detector.transform.register_forward_hook(self._keep_frame)

    def _keep_frame(self, _module, _inputs, output) -> None:
        image_list = output[0]
        self.frame = (tuple(image_list.tensors.shape[-2:]), tuple(image_list.image_sizes[0]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.detector(list(images))
        scores = torch.stack([self.match(out) for out in outputs])
        return scores + images.sum() * 0  # keeps the graph whole when nothing matches (a zero gradient, not an error)

    def match(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """(K,) the score of each target's best-overlapping detection of the same label, 0 below MATCH_IOU."""
        if len(out["boxes"]) == 0:
            return self.boxes.new_zeros(len(self.boxes))
        iou = box_iou(self.boxes, out["boxes"]) * (self.labels[:, None] == out["labels"][None]).float()
        best, index = iou.max(dim=1)
        return torch.where(best >= MATCH_IOU, out["scores"][index], torch.zeros_like(best))


def without_mask_heads(detector: nn.Module) -> nn.Module:
    """Switch off the mask / keypoint heads of a torchvision R-CNN (``roi_heads.has_mask()`` etc. become false)."""
    heads = getattr(detector, "roi_heads", None)
    for attr in ("mask_roi_pool", "mask_head", "mask_predictor", "keypoint_roi_pool", "keypoint_head", "keypoint_predictor"):
        if heads is not None and getattr(heads, attr, None) is not None:
            setattr(heads, attr, None)
    return detector


class BoxExplainer:
    """Attribution maps of a detector's boxes, one row at a time (see the module docstring).

    ``explain(batch)`` -> per row: the maps (8-bit PNG bytes, ``b""`` where not explained), the
    share of each map's positive mass inside its box, and whether its maximum lies in the box.
    """

    def __init__(self, *, detector: nn.Module, to_tensors, method: str, layer: str, patch: int, stride: int,
                 samples: int, noise: float, min_score: float, boxes_column: str, labels_column: str,
                 scores_column: str, num_classes: int, device: torch.device):
        self.detector = out_of_place_relus(without_mask_heads(detector.eval()))
        self.scores = BoxScores(self.detector)
        self.to_tensors, self.device = to_tensors, device
        self.method, self.patch, self.stride, self.samples, self.noise = method, patch, stride, samples, noise
        self.min_score, self.num_classes = min_score, num_classes
        self.boxes_column, self.labels_column, self.scores_column = boxes_column, labels_column, scores_column
        self.unmatched = 0  # predictions that no longer matched, over the stage's life (logged per batch)
        self.layer_names: list[str] = []
        if method in CAM_METHODS:
            size = -(-int(max(self.detector.transform.min_size)) // 32) * 32
            found = pyramid_layers(self.detector.backbone, size, device) if layer == "auto" else None
            self.layer_names = ["backbone." + name for name in found] if found else [layer]
            modules = dict(self.detector.named_modules())
            missing = [name for name in self.layer_names if name not in modules]
            if missing:
                raise ValueError(f"layer {missing[0]!r} is not a module of the detector (e.g. backbone.fpn.layer_blocks.0)")
        self.layers = [dict(self.detector.named_modules())[name] for name in self.layer_names]

    def explain(self, batch) -> tuple[list[list[bytes]], list[list[float | None]], list[list[bool | None]]]:
        images = batch_images(batch)
        all_boxes = batch[self.boxes_column].to_pylist()
        all_labels = batch[self.labels_column].to_pylist()
        all_scores = batch[self.scores_column].to_pylist()
        maps, in_box, peak = [], [], []
        unmatched = wanted_total = 0
        for image, box_cell, label_cell, score_cell in zip(images, all_boxes, all_labels, all_scores):
            boxes = parse_boxes(box_cell, self.boxes_column)
            labels = parse_labels(label_cell, self.labels_column, len(boxes), self.num_classes)
            if score_cell is None:
                raise ValueError(f"{self.scores_column}: null for this row (the stage that writes it did not produce it)")
            scores = np.asarray(score_cell, np.float32)
            if len(scores) != len(boxes):
                raise ValueError(f"{self.scores_column}: {len(scores)} scores for {len(boxes)} boxes")
            row_maps: list[bytes] = [b""] * len(boxes)
            row_in: list[float | None] = [None] * len(boxes)
            row_peak: list[bool | None] = [None] * len(boxes)
            wanted = np.flatnonzero(scores >= self.min_score)
            if len(wanted):
                x = self.to_tensors([image])[0]
                self.scores.boxes = torch.from_numpy(boxes[wanted]).to(self.device)
                self.scores.labels = torch.from_numpy(labels[wanted]).to(self.device)
                with torch.no_grad():
                    matched = (self.scores(x[None])[0] > 0).cpu().numpy()
                wanted_total += len(wanted)
                unmatched += int((~matched).sum())
                self.scores.boxes, self.scores.labels = self.scores.boxes[matched], self.scores.labels[matched]
                kept = wanted[matched]
                if len(kept):
                    for j, a in zip(kept, self.attribute(x)):
                        row_maps[j] = encode_map(a)
                        row_in[j], row_peak[j] = box_statistics(a, boxes[j])
            maps.append(row_maps)
            in_box.append(row_in)
            peak.append(row_peak)
        if unmatched:
            self.unmatched += unmatched
            log.warning("explain: %d of %d predictions with score >= %g no longer match a detection (IoU >= %g, same "
                        "label) when the detector runs again: empty maps", unmatched, wanted_total, self.min_score, MATCH_IOU)
        return maps, in_box, peak

    def attribute(self, x: torch.Tensor) -> np.ndarray:
        """(3, H, W) image in [0, 1], targets set on ``self.scores`` -> (K, H, W) float32 maps (larger = more important)."""
        count = len(self.scores.boxes)
        if self.method == "occlusion":
            return self.occlusion(x)
        parts = [self.attribute_copies(x, list(range(start, min(start + COPIES_PER_CALL, count))))
                 for start in range(0, count, COPIES_PER_CALL)]
        return np.concatenate(parts)

    def attribute_copies(self, x: torch.Tensor, targets: list[int]) -> np.ndarray:
        """One copy of the image per target box (copy k explains box targets[k]) -> (len(targets), H, W)."""
        from captum.attr import GuidedBackprop, Saliency

        copies = x[None].repeat(len(targets), 1, 1, 1).requires_grad_(True)
        if self.method == "saliency":
            a = Saliency(self.scores).attribute(copies, target=targets, abs=True).amax(dim=1)
        elif self.method == "smoothgrad":
            per_call = max(1, COPIES_PER_CALL // len(targets))
            a = smoothgrad(self.scores, copies, targets, samples=self.samples, per_call=min(per_call, self.samples),
                           stdevs=self.noise)  # images are in [0, 1]: the noise's std is a fraction of the range
        elif self.method == "guided_backprop":
            a = GuidedBackprop(self.scores).attribute(copies, target=targets).abs().amax(dim=1)
        else:  # gradcam, hirescam: the pyramid's levels, summed
            cams = pyramid_cams(self.method, self.scores, self.layers, copies, targets)
            a = sum(self.cam_to_image(cam, tuple(x.shape[-2:])) for cam in cams)
        return a.detach().float().cpu().numpy()

    def occlusion(self, x: torch.Tensor) -> np.ndarray:
        """Score drop of every target box under a sliding patch of the detector's mean colour (grey),
        one sweep for all of them -> (K, H, W)."""
        fill = torch.tensor(self.detector.transform.image_mean)
        drop = occlusion(self.scores, x[None], patch=self.patch, stride=self.stride, fill=fill, target=None,
                         per_call=COPIES_PER_CALL)  # full-size detector inputs: fewer per call than a classifier's crops
        return drop.float().cpu().numpy()

    def cam_to_image(self, cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(N, h, w) maps on the layer's grid of the padded batch -> (N, H, W) over the image."""
        (padded_h, padded_w), (resized_h, resized_w) = self.scores.frame
        on_input = F.interpolate(cam[:, None], size=(padded_h, padded_w), mode="bilinear", align_corners=False)
        on_image = on_input[:, :, :resized_h, :resized_w]
        return F.interpolate(on_image, size=size, mode="bilinear", align_corners=False)[:, 0]


def pyramid_cams(method: str, forward: nn.Module, layers: list[nn.Module], inputs: torch.Tensor, targets: list[int]) -> list[torch.Tensor]:
    """Grad-CAM (weights: the gradient's mean per channel) or HiResCAM (the gradient itself) of
    ``forward``'s outputs ``targets`` (one per input row) on each of ``layers`` -> per layer (N, h, w), >= 0.
    One forward and one backward pass for all layers; a layer the score does not reach gives zeros."""
    kept: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, k=k: kept.__setitem__(k, out)) for k, m in enumerate(layers)]
    try:
        scores = forward(inputs)
    finally:
        for h in handles:
            h.remove()
    chosen = scores.gather(1, torch.as_tensor(targets, device=scores.device)[:, None]).sum()
    activations = [kept[k] for k in range(len(layers))]
    grads = torch.autograd.grad(chosen, activations, allow_unused=True)
    cams = []
    for a, g in zip(activations, grads):
        g = torch.zeros_like(a) if g is None else g
        weights = g.mean(dim=(2, 3), keepdim=True) if method == "gradcam" else g
        cams.append(torch.relu((weights * a).sum(dim=1)).detach())
    return cams


def box_statistics(attribution: np.ndarray, box: np.ndarray) -> tuple[float, bool]:
    """(H, W) map, xyxy box -> (share of the map's positive mass on pixels whose centres lie in the
    box, whether the map's maximum does: the pointing game). A map with no positive mass: (0.0, False)."""
    h, w = attribution.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    cols = (np.arange(w) + 0.5 >= x1) & (np.arange(w) + 0.5 <= x2)
    rows = (np.arange(h) + 0.5 >= y1) & (np.arange(h) + 0.5 <= y2)
    positive = np.clip(attribution, 0, None)
    total = float(positive.sum())
    if total <= 0:
        return 0.0, False
    inside = float(positive[np.ix_(rows, cols)].sum())
    r, c = np.unravel_index(int(np.argmax(attribution)), attribution.shape)
    return inside / total, bool(rows[r] and cols[c])


def detector_explainer(settings: dict[str, Any]) -> BoxExplainer:
    """Build the detector, as a ``detect`` stage with the same model and weights would, and its explainer."""
    stage = DetectStage(model=settings["model"], weights=settings["weights"], num_classes=settings["num_classes"],
                        model_kwargs=settings["model_kwargs"], device=settings["device"], threads=settings["threads"])
    num_classes = int(stage.model.roi_heads.box_predictor.cls_score.out_features) if hasattr(stage.model, "roi_heads") else 1 << 30
    return BoxExplainer(
        detector=stage.model, to_tensors=stage.to_tensors, device=stage.device, num_classes=num_classes,
        **{k: settings[k] for k in ("method", "layer", "patch", "stride", "samples", "noise", "min_score",
                                    "boxes_column", "labels_column", "scores_column")},
    )
