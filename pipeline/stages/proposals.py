"""Class-agnostic region proposals: the RPN of a torchvision Faster R-CNN, or selective search.

Output per image, capped at ``top_k``, best first:

* ``proposals``: list of [x1, y1, x2, y2] float32 (**xyxy**, decoded image pixels; same Arrow type
  as ``boxes``), clipped to the image;
* ``proposal_scores``: float32, non-increasing.

``method: rpn`` runs backbone + RPN of an R-CNN (``model`` + ``weights`` as in detect) and keeps
the RPN's own proposals *with* their objectness probabilities (sigmoid of the RPN logit), after
its clip / small-box / per-level NMS filtering (:func:`pipeline.stages.rcnn.rpn_proposals`).
``top_k`` becomes the RPN's ``post_nms_top_n``; how many candidates each feature level keeps
before NMS is the model's ``rpn_pre_nms_top_n_test`` (settable in ``model_kwargs``).

``method: selective_search`` runs OpenCV's selective search (``cv2.ximgproc``, CPU only; ``mode:
fast`` or ``quality``). It has no scores: its output order is its ranking (OpenCV ranks each region
by a random number times its level in the merge hierarchy, as in Uijlings et al.). The score
written is therefore rank-based, ``1 / (1 + rank)`` (1, 0.5, 0.33, ...): it orders proposals and
means nothing else. That random number comes from C ``rand()``: the stage seeds it with ``seed``
before each image, in a helper process of its own (see :mod:`pipeline.stages.selective_search`),
so a run is reproducible. ``max_side`` optionally downscales large images first (selective
search time grows quickly with pixels); boxes come back in original pixels.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, PositiveInt, field_validator, model_validator

from pipeline import schema
from pipeline.config.paths import path_field
from pipeline.config.spec import StageSpec
from pipeline.models.registry import build_model
from pipeline.models.weights import resolve_weights
from pipeline.stages.detect import check_model_kwargs, check_weights
from pipeline.stages.columns import ragged, ragged_boxes
from pipeline.stages.common import append_columns, batch_images, prefixed, torch_device
from pipeline.stages.rcnn import is_rcnn, rpn_proposals
from pipeline.stages.selective_search import SelectiveSearchProcess

Method = Literal["rpn", "selective_search"]
RPN_ONLY = ("model", "weights", "num_classes", "model_kwargs", "device")
SELECTIVE_SEARCH_ONLY = ("mode", "seed", "max_side")
PROPOSAL_COLUMNS: dict[str, pa.DataType] = {  # what a proposals stage writes, before its output_prefix
    schema.PROPOSALS: schema.BOXES_TYPE,
    schema.PROPOSAL_SCORES: schema.SCORES_TYPE,
}


class ProposalsSpec(StageSpec):
    """Parameters of a ``proposals`` stage (see jobs/rcnn_chain.yaml); ``device`` is rpn-only."""

    type_name: ClassVar[str] = "proposals"

    method: Method = Field(description="rpn (a Faster R-CNN's region proposal network) or selective_search (OpenCV)")
    top_k: PositiveInt = Field(1000, description="at most this many proposals per image, best first")
    model: str = Field("fasterrcnn_resnet50_fpn", description="rpn: the R-CNN whose RPN proposes")
    weights: str = path_field("none", "rpn: 'none', a torchvision weights name or a .pth path")
    num_classes: PositiveInt | None = Field(None, description="rpn: classes of the checkpoint's box head (to load it)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="rpn: builder kwargs, e.g. min_size")
    mode: Literal["fast", "quality"] = Field("fast", description="selective_search: OpenCV's fast or quality strategy set")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="selective_search: seed of its random ranking (reproducible runs)")
    max_side: PositiveInt | None = Field(None, description="selective_search: downscale so the longer side is at most this")
    output_prefix: str = Field("", description="prepended to the columns this stage writes, e.g. 'ss_'")

    @field_validator("model")
    @classmethod
    def _rcnn_model(cls, value: str) -> str:
        if not is_rcnn(value):
            raise ValueError(f"{value} has no region proposal network; use an R-CNN (fasterrcnn_*, maskrcnn_*, keypointrcnn_*)")
        return value

    @model_validator(mode="after")
    def _keys_of_the_method(self) -> "ProposalsSpec":
        foreign = SELECTIVE_SEARCH_ONLY if self.method == "rpn" else RPN_ONLY
        wrong = [k for k in foreign if k in self.model_fields_set]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: not used by method {self.method}")
        return self

    @model_validator(mode="after")
    def _known_model_kwargs(self) -> "ProposalsSpec":
        if self.method == "rpn":
            check_model_kwargs(self, self.model, self.model_kwargs)
        return self

    @classmethod
    def stage_class(cls) -> type:
        return ProposalsStage

    def preflight(self) -> None:
        if self.method == "rpn":
            check_weights(self.model, self.weights, self.num_classes)
        else:
            import cv2

            if not hasattr(cv2, "ximgproc"):
                raise RuntimeError("method selective_search needs cv2.ximgproc: install opencv-contrib-python-headless")

    def input_columns(self) -> dict[str, tuple[str, pa.DataType]]:
        return {}

    def output_columns(self) -> dict[str, pa.DataType]:
        return prefixed(PROPOSAL_COLUMNS, self.output_prefix)


DEFAULT = ProposalsSpec.defaults()


class ProposalsStage:
    """Region proposals for a batch of decoded images.

    Example::

        stage = ProposalsStage(method="selective_search", mode="fast", top_k=500)
        out = stage(batch)  # + proposals (xyxy), proposal_scores

    Settings of the other method are ignored (the spec refuses them). Defaults are :class:`ProposalsSpec`'s.
    """

    def __init__(
        self,
        *,
        method: Method,
        top_k: int = DEFAULT.top_k,
        model: str = DEFAULT.model,
        weights: str = DEFAULT.weights,
        num_classes: int | None = DEFAULT.num_classes,
        model_kwargs: dict[str, Any] | None = None,
        mode: Literal["fast", "quality"] = DEFAULT.mode,
        seed: int = DEFAULT.seed,
        max_side: int | None = DEFAULT.max_side,
        output_prefix: str = DEFAULT.output_prefix,
        device: str = "cpu",
        threads: int | None = None,
    ):
        self.method = method
        self.top_k = top_k
        self.output_prefix = output_prefix
        if method == "rpn":
            self.device = torch_device(device, threads)
            kwargs = {"rpn_post_nms_top_n_test": top_k, **(model_kwargs or {})}
            self.model, _ = build_model(model, resolve_weights(model, weights), num_classes=num_classes, extra=kwargs)
            self.model.roi_heads = None  # never run: the boxes head is not needed in memory
            self.model.to(self.device)
        elif method == "selective_search":
            import cv2  # opencv-contrib-python-headless: only this method needs it

            if not hasattr(cv2, "ximgproc"):
                raise RuntimeError("selective search needs cv2.ximgproc: install opencv-contrib-python-headless")
            self.mode, self.seed, self.max_side = mode, seed, max_side
            self.search = SelectiveSearchProcess(threads=threads)
        else:  # kept beside the spec's check: any other value would quietly run selective search
            raise ValueError(f"unknown proposal method {method!r} (rpn | selective_search)")

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = batch_images(batch)
        results = self.propose_rpn(images) if self.method == "rpn" else [self.selective_search(im) for im in images]
        columns = {
            schema.PROPOSALS: ragged_boxes([b for b, _ in results]),
            schema.PROPOSAL_SCORES: ragged([s for _, s in results], pa.float32()),
        }
        return append_columns(batch, columns, self.output_prefix)

    @torch.inference_mode()
    def propose_rpn(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """RGB uint8 (H, W, 3) -> per image (boxes (N, 4) xyxy float32, objectness (N,) float32)."""
        tensors = [torch.from_numpy(np.array(im)).to(self.device).permute(2, 0, 1).float().div(255) for im in images]
        return [
            (b[: self.top_k].cpu().numpy().astype(np.float32), s[: self.top_k].cpu().numpy().astype(np.float32))
            for b, s in rpn_proposals(self.model, tensors)
        ]

    def selective_search(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 (H, W, 3) -> (boxes (N, 4) xyxy float32, rank scores 1 / (1 + rank))."""
        import cv2

        h, w = image.shape[:2]
        bgr = np.ascontiguousarray(image[:, :, ::-1])  # OpenCV's channel order
        if self.max_side and max(h, w) > self.max_side:
            scale = self.max_side / max(h, w)
            bgr = cv2.resize(bgr, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        rects = self.search.search(bgr, mode=self.mode, seed=self.seed)[: self.top_k].astype(np.float64)  # x, y, w, h
        sy, sx = h / bgr.shape[0], w / bgr.shape[1]  # back to original pixels (1, 1 when not downscaled)
        boxes = np.stack(
            [rects[:, 0] * sx, rects[:, 1] * sy, (rects[:, 0] + rects[:, 2]) * sx, (rects[:, 1] + rects[:, 3]) * sy], axis=1
        )
        boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
        return boxes, rank_scores(len(boxes))


def rank_scores(n: int) -> np.ndarray:
    """The score of a proposal known only by its rank r (0 = first): ``1 / (1 + r)``, float32."""
    return (1.0 / (1.0 + np.arange(n, dtype=np.float64))).astype(np.float32)
