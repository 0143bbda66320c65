"""The pieces of a torchvision R-CNN (``GeneralizedRCNN``) the stages run one at a time.

A full forward is ``transform -> backbone -> rpn -> roi_heads -> transform.postprocess``. The
stages need three other paths through the same modules, written here in that same order so they
read as the algorithm (see torchvision ``models/detection/generalized_rcnn.py``):

* :func:`rpn_proposals` -- stop after the RPN and keep its objectness scores;
* :func:`detect_from_proposals` -- Fast R-CNN: skip the RPN, run the RoI heads on given boxes;
* :func:`heads_on_boxes` -- skip box classification too: only the mask or keypoint head on given
  boxes (e.g. a detect stage's output).

All boxes going in and out are **xyxy** float32 in the original image's pixels. Inside, the
model works on a resized image (``transform`` scales the short side to ``min_size``); boxes are
mapped with torchvision's own ``resize_boxes`` both ways, so they match a full forward exactly.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import keypointrcnn_inference, maskrcnn_inference, paste_masks_in_image
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import resize_boxes, resize_keypoints
from torchvision.ops import boxes as box_ops

from pipeline.models.registry import get_entry

RCNN_FAMILIES = ("fasterrcnn", "maskrcnn", "keypointrcnn")
MIN_PROPOSAL_SIZE = 1e-3  # what torchvision's RPN uses to drop degenerate proposals


def is_rcnn(model_name: str) -> bool:
    """True for two-stage models (an RPN and RoI heads): the only ones that take proposals.

    torchvision's R-CNN builders are the ones configured with ``box_*`` keyword arguments.
    """
    entry = get_entry(model_name)
    return entry.score_kwarg == "box_score_thresh" or model_name.startswith(RCNN_FAMILIES)


def require_rcnn(model: nn.Module, model_name: str, why: str) -> None:
    if not isinstance(model, GeneralizedRCNN) or not hasattr(model, "rpn"):
        raise ValueError(f"{why} needs an R-CNN model ({', '.join(f + '_*' for f in RCNN_FAMILIES)}); {model_name} is not one")


def _features(model: GeneralizedRCNN, images: list[torch.Tensor]):
    """transform + backbone: (image_list, features, original (h, w) sizes)."""
    original = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    image_list, _ = model.transform(images)
    features = model.backbone(image_list.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    return image_list, features, original


def rpn_proposals(model: GeneralizedRCNN, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The RPN's proposals and objectness probabilities per image, boxes in original pixels.

    The same steps as ``RegionProposalNetwork.forward`` at inference -- head, anchors, decode,
    ``filter_proposals`` (clip, drop tiny, score threshold, per-level NMS, keep
    ``post_nms_top_n``) -- but keeping the scores, which ``forward`` discards. Sorted by score.
    """
    image_list, features, original = _features(model, images)
    rpn = model.rpn
    levels = list(features.values())
    objectness, deltas = rpn.head(levels)
    anchors = rpn.anchor_generator(image_list, levels)
    num_anchors_per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    boxes, scores = rpn.filter_proposals(proposals, objectness, image_list.image_sizes, num_anchors_per_level)
    return [
        (resize_boxes(b, internal, orig), s) for b, s, internal, orig in zip(boxes, scores, image_list.image_sizes, original)
    ]


def detect_from_proposals(
    model: GeneralizedRCNN, images: list[torch.Tensor], proposals: list[torch.Tensor]
) -> list[dict[str, torch.Tensor]]:
    """Fast R-CNN: backbone once per image, RoI heads on ``proposals`` instead of the RPN's.

    Proposals are scaled into the model's resized frame and, as the RPN does with its own, clipped
    to the image with degenerate ones (side < 1e-3 px) dropped. Returns what a full forward returns
    (``boxes, scores, labels`` and ``masks``/``keypoints`` for those models), in original pixels.
    """
    image_list, features, original = _features(model, images)
    internal_proposals = []
    for p, orig, internal in zip(proposals, original, image_list.image_sizes):
        p = box_ops.clip_boxes_to_image(resize_boxes(p, orig, internal), internal)
        internal_proposals.append(p[box_ops.remove_small_boxes(p, MIN_PROPOSAL_SIZE)])
    detections, _ = model.roi_heads(features, internal_proposals, image_list.image_sizes)
    return model.transform.postprocess(detections, image_list.image_sizes, original)


def heads_on_boxes(
    model: GeneralizedRCNN,
    images: list[torch.Tensor],
    boxes: list[torch.Tensor],
    *,
    labels: list[torch.Tensor] | None = None,
    task: str,
) -> list[torch.Tensor]:
    """Only the mask head (``task="masks"``) or keypoint head (``"keypoints"``) on given boxes.

    Boxes are clipped to the image first, as torchvision's own detections are before these heads
    see them. A box with no area inside the image gets an empty mask / all-zero keypoints
    (COCO's "not labelled") instead of a head output: there is nothing of it to segment.
    The mask head is class-specific, so ``masks`` needs each box's model ``labels``.

    Returns per image: ``masks`` -> float probabilities (N, 1, H, W) pasted at the original size;
    ``keypoints`` -> (N, K, 3) x, y, visibility in original pixels.
    """
    image_list, features, original = _features(model, images)
    heads = model.roi_heads
    clipped = [box_ops.clip_boxes_to_image(b, orig) for b, orig in zip(boxes, original)]
    inside = [(c[:, 2] > c[:, 0]) & (c[:, 3] > c[:, 1]) for c in clipped]
    rois = [resize_boxes(c[k], orig, internal) for c, k, orig, internal in zip(clipped, inside, original, image_list.image_sizes)]
    sizes = image_list.image_sizes
    out = []
    if task == "masks":
        if heads.mask_roi_pool is None:
            raise ValueError("this model has no mask head")
        if labels is None:
            raise ValueError("the mask head is class-specific: heads_on_boxes(task='masks') needs labels")
        x = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, rois, sizes)))
        probs = maskrcnn_inference(x, [lab[k] for lab, k in zip(labels, inside)])
        for prob, c, k, orig in zip(probs, clipped, inside, original):
            full = prob.new_zeros((len(c), 1, orig[0], orig[1]))
            full[k] = paste_masks_in_image(prob, c[k], orig)  # into the given boxes, as postprocess does
            out.append(full)
    elif task == "keypoints":
        if heads.keypoint_roi_pool is None:
            raise ValueError("this model has no keypoint head")
        x = heads.keypoint_predictor(heads.keypoint_head(heads.keypoint_roi_pool(features, rois, sizes)))
        kps, _ = keypointrcnn_inference(x, rois)
        for kp, c, k, orig, internal in zip(kps, clipped, inside, original, sizes):
            full = kp.new_zeros((len(c), x.shape[1], 3))
            full[k] = resize_keypoints(kp, internal, orig)
            out.append(full)
    else:
        raise ValueError(f"unknown head {task!r}")
    return out
