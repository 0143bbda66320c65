"""Small images on one picture: rows of (3, s, s) images in [0, 1], each upscaled (nearest neighbour,
the pixels the model made, only bigger) by the integer factor that makes it at least ``min_cell`` px.

Used for latent walks (``pipeline generate interpolate``) and for the samples ``pipeline
eval-generative`` measures (``samples.png``).
"""

from __future__ import annotations

import torch
from PIL import Image

GAP = 4  # px around and between images
BACKGROUND = (32, 32, 32)


def to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    """(3, s, s) in [0, 1] -> an RGB picture ``scale`` times bigger."""
    pixels = torch.round(image.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)


def image_grid(rows: list[list[torch.Tensor | None]], min_cell: int = 96) -> Image.Image:
    """One picture of ``rows`` (None: an empty cell, e.g. to set real images apart from a walk)."""
    size = max(img.shape[-1] for row in rows for img in row if img is not None)
    scale = max(1, -(-min_cell // size))
    cell = size * scale
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (columns * (cell + GAP) + GAP, len(rows) * (cell + GAP) + GAP), BACKGROUND)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            if image is not None:
                sheet.paste(to_pil(image, scale), (GAP + c * (cell + GAP), GAP + r * (cell + GAP)))
    return sheet
