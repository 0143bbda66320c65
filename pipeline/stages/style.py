"""Style transfer: every image of a dataset restyled, written as encoded image bytes.

Two methods:

* ``network`` (default): fast neural style (Johnson et al.). ``model`` is a TransformerNet
  checkpoint in the format pytorch/examples ``fast_neural_style`` writes and publishes, or one
  ``pipeline train-style`` wrote. One forward pass per image; the stage returns what a direct call
  of that network returns (see :mod:`pipeline.models.transformer_net` for the 0..255 convention).
* ``optimize``: the slow method (Gatys et al.). No trained network: each image is itself optimised
  (Adam, ``steps`` steps, starting from the content image; the loop of :mod:`pipeline.optimize`)
  against its own VGG-16 relu2_2 features
  (content) and the Gram matrices of ``style_image`` (style). Minutes per image on a CPU.

Output per image, in column ``column`` (default ``stylized``): the stylized picture as JPEG
(``quality``) or PNG bytes, the same size as the decoded input (EXIF orientation already applied
by the decode step), or the size ``size``/``max_side`` asked for. Pixel values are clamped to
0..255. Images of different sizes in one batch are grouped by size and each group is one forward
pass -- nothing is padded or resized to make a batch. ``pipeline data export-images`` writes the
column out as files with a contact sheet.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from pydantic import Field, PositiveInt, model_validator

from pipeline import schema
from pipeline.config.paths import path_field
from pipeline.config.spec import StageSpec
from pipeline.data.decode import DecodeError, decode_image
from pipeline.models.transformer_net import (
    DEFAULT_VGG,
    PerceptualLoss,
    build_vgg,
    check_vgg_weights,
    load_transformer_net,
    read_transformer_checkpoint,
    stylize_tensor,
)
from pipeline.optimize import LoopSettings, optimize
from pipeline.stages.common import batch_images, torch_device

Method = Literal["network", "optimize"]
Format = Literal["jpeg", "png"]
OPTIMIZE_MIN_SIDE = 8  # VGG-16 max-pools three times before relu4_3


class StyleSpec(StageSpec):
    """Parameters of a ``style`` stage (see jobs/style.yaml)."""

    type_name: ClassVar[str] = "style"

    method: Method = Field("network", description="network: a trained TransformerNet; optimize: Gatys et al., no network")
    model: str | None = path_field(None, "TransformerNet checkpoint (.pth), pytorch/examples format; method network")
    size: PositiveInt | None = Field(None, description="resize so the shorter side is this many px (default: keep the size)")
    max_side: PositiveInt | None = Field(None, description="downscale images whose longer side is over this (default: keep)")
    format: Format = Field("jpeg", description="how the stylized images are encoded")
    quality: int = Field(90, ge=1, le=100, description="JPEG quality")
    column: str = Field(schema.STYLIZED, min_length=1, description="output column of the encoded images")
    style_image: str | None = path_field(None, "method optimize: the picture whose style to copy")
    steps: PositiveInt = Field(100, description="method optimize: Adam steps per image")
    content_weight: float = Field(1e5, gt=0, description="method optimize: weight of the relu2_2 content loss")
    style_weight: float = Field(1e10, gt=0, description="method optimize: weight of the Gram style loss")
    lr: float = Field(5.0, gt=0, description="method optimize: Adam step size, in grey levels (0..255)")
    vgg_weights: str = path_field(DEFAULT_VGG, "method optimize: 'none', a torchvision VGG16 weights name or a .pth")

    @model_validator(mode="after")
    def _method_inputs(self) -> StyleSpec:
        if self.method == "network" and not self.model:
            raise ValueError("method network needs model: a TransformerNet checkpoint .pth (e.g. from pipeline train-style)")
        if self.method == "optimize" and not self.style_image:
            raise ValueError("method optimize needs style_image: the picture whose style to copy")
        if self.size and self.max_side:
            raise ValueError("give size (shorter side) or max_side (cap on the longer side), not both")
        return self

    def input_columns(self) -> dict[str, tuple[str, pa.DataType]]:
        return {}

    def output_columns(self) -> dict[str, pa.DataType]:
        return {self.column: schema.STYLIZED_TYPE}

    @classmethod
    def stage_class(cls) -> type:
        return StyleStage

    def preflight(self) -> None:
        """Checkpoint present and a TransformerNet (checked on the meta device), or VGG weights and
        style image usable: everything fails here, naming the file, before any data is read."""
        if self.method == "network":
            read_transformer_checkpoint(self.model)
        else:
            check_vgg_weights(self.vgg_weights)
            read_style_image(self.style_image)


DEFAULT = StyleSpec.defaults()


class StyleStage:
    """Restyle a batch of decoded images and append their encoded bytes.

    Example::

        stage = StyleStage(model="candy.pth", format="png")
        out = stage(batch)  # batch: pyarrow.Table with pixels/width/height; adds column "stylized"

    ``stylize_float`` gives the unclamped float outputs (what the network computed); ``stylize``
    the uint8 pictures that get encoded. Defaults are :class:`StyleSpec`'s, and so are the checks
    (``model`` for ``network``, ``style_image`` for ``optimize``).
    """

    def __init__(
        self,
        *,
        method: Method = DEFAULT.method,
        model: str | None = DEFAULT.model,
        size: int | None = DEFAULT.size,
        max_side: int | None = DEFAULT.max_side,
        format: Format = DEFAULT.format,
        quality: int = DEFAULT.quality,
        column: str = DEFAULT.column,
        style_image: str | None = DEFAULT.style_image,
        steps: int = DEFAULT.steps,
        content_weight: float = DEFAULT.content_weight,
        style_weight: float = DEFAULT.style_weight,
        lr: float = DEFAULT.lr,
        vgg_weights: str = DEFAULT.vgg_weights,
        device: str = "cpu",
        threads: int | None = None,
    ):
        self.device = torch_device(device, threads)
        self.method, self.size, self.max_side = method, size, max_side
        self.format, self.quality, self.column = format, quality, column
        self.steps, self.lr = steps, lr
        if method == "network":
            self.net = load_transformer_net(model, device=self.device)
        else:
            vgg = build_vgg(vgg_weights, device=self.device)
            self.loss = PerceptualLoss(vgg, content_weight=content_weight, style_weight=style_weight)
            self.style_grams = self.loss.grams(to_tensor(read_style_image(style_image), self.device))

    def __call__(self, batch: pa.Table) -> pa.Table:
        encoded = [encode_image(img, self.format, self.quality) for img in self.stylize(batch_images(batch))]
        return batch.append_column(self.column, pa.array(encoded, schema.STYLIZED_TYPE))

    def stylize(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """RGB uint8 (H, W, 3) -> stylized RGB uint8 (H', W', 3): clamped to 0..255, then truncated."""
        return [to_uint8(out) for out in self.stylize_float(images)]

    def stylize_float(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """RGB uint8 (H, W, 3) -> float32 (H', W', 3) as computed, unclamped; H', W' = the resized size."""
        resized = [resize(img, size=self.size, max_side=self.max_side) for img in images]
        if self.method == "network":
            return self.run_network(resized)
        return [self.run_optimize(img)[0] for img in resized]

    @torch.inference_mode()
    def run_network(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One forward pass per group of equally sized images; outputs in input order."""
        outputs: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            groups[img.shape].append(i)
        for indices in groups.values():
            # NCHW-contiguous like the example's ToTensor: a channels-last view would pick other
            # convolution kernels and differ from a direct call in the last float bits.
            x = torch.from_numpy(np.stack([images[i] for i in indices])).to(self.device).permute(0, 3, 1, 2).float().contiguous()
            y = stylize_tensor(self.net, x).permute(0, 2, 3, 1).cpu().numpy()
            for k, i in enumerate(indices):
                outputs[i] = y[k]
        return outputs

    def run_optimize(self, image: np.ndarray) -> tuple[np.ndarray, list[float]]:
        """Gatys et al. on one image: (float32 (H, W, 3) result, total loss before each step)."""
        return optimize_image(image, self.loss, self.style_grams, steps=self.steps, lr=self.lr, device=self.device)


def optimize_image(
    content: np.ndarray,
    loss: PerceptualLoss,
    style_grams: list[torch.Tensor],
    *,
    steps: int,
    lr: float,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, list[float]]:
    """Optimise the pixels of ``content`` (RGB uint8 (H, W, 3)) towards the style; returns (image, losses).

    :func:`pipeline.optimize.optimize` with Adam: the image starts as the content image, is clamped
    to the pixel range after every step (``lr`` is in grey levels per step, 0..255), and its content
    target is its own relu2_2 features. ``losses[k]`` is the weighted content + style loss before
    step ``k``; the result is float32 (H, W, 3) in 0..255.
    """
    h, w = content.shape[:2]
    if min(h, w) < OPTIMIZE_MIN_SIDE:
        raise ValueError(f"image is {w}x{h} px; method optimize needs at least {OPTIMIZE_MIN_SIDE} px per side")
    x = to_tensor(content, device)
    with torch.no_grad():
        target = loss.vgg(x).relu2_2

    def objective(image: torch.Tensor) -> torch.Tensor:  # (1, 3, H, W) in [0, 1]; the loss takes 0..255
        content_loss, style_loss = loss(image * 255, target, style_grams)
        return (content_loss + style_loss).reshape(1)

    result = optimize(x / 255, objective, LoopSettings(steps=steps, lr=lr / 255))
    return (result.images[0] * 255).permute(1, 2, 0).cpu().numpy(), [float(v[0]) for v in result.history]


def to_tensor(image: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float (1, 3, H, W) in 0..255, the scale TransformerNet and VGG take here."""
    return torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1).unsqueeze(0).float().contiguous()


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float (H, W, 3) -> uint8 clamped to 0..255 and truncated, like the example's ``save_image``."""
    return np.clip(image, 0, 255).astype(np.uint8)


def target_size(width: int, height: int, *, size: int | None = None, max_side: int | None = None) -> tuple[int, int]:
    """(width, height) after the optional resize: ``size`` sets the shorter side (up or down),
    ``max_side`` caps the longer side (down only). Aspect ratio is kept."""
    if size:
        scale = size / min(width, height)
    elif max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
    else:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize(image: np.ndarray, *, size: int | None = None, max_side: int | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) resized per :func:`target_size` (Lanczos); unchanged when nothing asks for it."""
    h, w = image.shape[:2]
    new = target_size(w, h, size=size, max_side=max_side)
    if new == (w, h):
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(new, Image.Resampling.LANCZOS))


def encode_image(image: np.ndarray, fmt: Format, quality: int = 90) -> bytes:
    """RGB uint8 (H, W, 3) -> JPEG (``quality``) or PNG bytes."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def read_style_image(path: str, *, max_side: int | None = None) -> np.ndarray:
    """The style picture as RGB uint8 (H, W, 3), EXIF applied; ValueError naming the file otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"style image not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        image = decode_image(data)
    except DecodeError as exc:
        raise ValueError(f"style image {path}: {exc}") from None
    return resize(image, max_side=max_side)
