"""The pieces of a torchvision R-CNN (``GeneralizedRCNN``) the stages run one at a time.

A full forward is ``transform -> backbone -> rpn -> roi_heads -> transform.postprocess``. The
stages need three other paths through the same modules, written here in that same order so they
read as the algorithm (see torchvision ``models/detection/generalized_rcnn.py``):

* :func:`rpn_proposals` -- stop after the RPN and keep its objectness scores;
* :func:`detect_from_proposals` -- Fast R-CNN: skip the RPN, run the RoI heads on given boxes;
* :func:`heads_on_boxes` -- skip box classification too: only the mask or keypoint head on given
  boxes (e.g. a detect stage's output), built from :func:`boxes_to_rois` and the two heads
  (:func:`mask_probabilities`, :func:`keypoint_predictions`), which the masks and keypoints stages
  use directly.

All boxes going in and out are **xyxy** float32 in the original image's pixels. Inside, the
model works on a resized image (``transform`` scales the short side to ``min_size``); boxes are
mapped with torchvision's own ``resize_boxes`` both ways, so they match a full forward exactly.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
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


class RoIs(NamedTuple):
    """Given boxes made ready for an RoI head, per image (see :func:`boxes_to_rois`)."""

    features: OrderedDict  # the backbone's feature maps of the batch
    image_sizes: list[tuple[int, int]]  # (h, w) of each image in the model's resized frame
    original: list[tuple[int, int]]  # (h, w) of each image as given
    clipped: list[torch.Tensor]  # (N, 4) the boxes clipped to the image, original pixels
    inside: list[torch.Tensor]  # (N,) bool: the box has area inside the image (only those go to a head)
    rois: list[torch.Tensor]  # (n_inside, 4) those boxes in the model's frame


def boxes_to_rois(model: GeneralizedRCNN, images: list[torch.Tensor], boxes: list[torch.Tensor]) -> RoIs:
    """transform + backbone on ``images``, and ``boxes`` (xyxy, original pixels) as RoIs for a head.

    Boxes are clipped to the image first, as torchvision's own detections are before its mask and
    keypoint heads see them. A box with no area inside the image has nothing to look at: it is
    left out of ``rois`` (``inside`` False) and its caller gives it an empty result.
    """
    image_list, features, original = _features(model, images)
    clipped = [box_ops.clip_boxes_to_image(b, orig) for b, orig in zip(boxes, original)]
    inside = [(c[:, 2] > c[:, 0]) & (c[:, 3] > c[:, 1]) for c in clipped]
    sizes = image_list.image_sizes
    rois = [resize_boxes(c[k], orig, internal) for c, k, orig, internal in zip(clipped, inside, original, sizes)]
    return RoIs(features, sizes, original, clipped, inside, rois)


def mask_probabilities(model: GeneralizedRCNN, r: RoIs, labels: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mask head on ``r.rois``: per image (n_inside, 1, M, M) probabilities of each box's label.

    The mask head is class-specific: ``labels`` (per image, one model label per given box, inside
    or not) pick the channel. The masks are box-sized, not yet pasted into the image.
    """
    heads = model.roi_heads
    if heads.mask_roi_pool is None:
        raise ValueError("this model has no mask head")
    x = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(r.features, r.rois, r.image_sizes)))
    return maskrcnn_inference(x, [lab[k] for lab, k in zip(labels, r.inside)])


def keypoint_predictions(model: GeneralizedRCNN, r: RoIs) -> list[torch.Tensor]:
    """The keypoint head on ``r.rois``: per image (n_inside, K, 3) x, y, visibility in original pixels."""
    heads = model.roi_heads
    if heads.keypoint_roi_pool is None:
        raise ValueError("this model has no keypoint head")
    x = heads.keypoint_predictor(heads.keypoint_head(heads.keypoint_roi_pool(r.features, r.rois, r.image_sizes)))
    kps, _ = keypointrcnn_inference(x, r.rois)
    return [resize_keypoints(kp, internal, orig) for kp, internal, orig in zip(kps, r.image_sizes, r.original)]


def heads_on_boxes(
    model: GeneralizedRCNN,
    images: list[torch.Tensor],
    boxes: list[torch.Tensor],
    *,
    labels: list[torch.Tensor] | None = None,
    task: str,
) -> list[torch.Tensor]:
    """Only the mask head (``task="masks"``) or keypoint head (``"keypoints"``) on given boxes.

    A box with no area inside the image gets an empty mask / all-zero keypoints (COCO's "not
    labelled") instead of a head output (:func:`boxes_to_rois`). The mask head is
    class-specific, so ``masks`` needs each box's model ``labels``.

    Returns per image: ``masks`` -> float probabilities (N, 1, H, W) pasted at the original size;
    ``keypoints`` -> (N, K, 3) x, y, visibility in original pixels.
    """
    if task not in ("masks", "keypoints"):
        raise ValueError(f"unknown head {task!r}")
    r = boxes_to_rois(model, images, boxes)
    out = []
    if task == "masks":
        if labels is None:
            raise ValueError("the mask head is class-specific: heads_on_boxes(task='masks') needs labels")
        for prob, c, k, orig in zip(mask_probabilities(model, r, labels), r.clipped, r.inside, r.original):
            full = prob.new_zeros((len(c), 1, orig[0], orig[1]))
            full[k] = paste_masks_in_image(prob, c[k], orig)  # into the given boxes, as postprocess does
            out.append(full)
    else:
        for kp, c, k in zip(keypoint_predictions(model, r), r.clipped, r.inside):
            full = kp.new_zeros((len(c), kp.shape[1], 3))
            full[k] = kp
            out.append(full)
    return out
