"""A small U-Net for semantic segmentation that trains from scratch on two CPU cores in minutes.

The project's own semantic model, for the same reason as :mod:`pipeline.models.small_rcnn`: no
pretrained weights can be downloaded here, so it ships one it can train on its synthetic shapes.
A fully convolutional network that downsamples and then upsamples inside the network:

* encoder: 4 levels of two 3x3 conv + BatchNorm + ReLU, widths ``base`` x (1, 2, 4, 8)
  (16-32-64-128 at ``base=16``), 2x2 max-pool between levels (strides 1, 2, 4, 8);
* decoder: ``ConvTranspose2d(kernel 2, stride 2)`` upsampling (learned, not interpolation), each
  output concatenated with the encoder's feature map of the same stride (skip connection), then
  two 3x3 conv + BN + ReLU;
* head: a 1x1 conv to ``num_classes`` logits at the input's resolution.

Input: ``(N, 3, H, W)`` float, RGB scaled to [0, 1] and then normalised with ImageNet's mean and
std -- the same input as torchvision's segmentation models (their weights' ``SemanticSegmentation``
transform), so the ``segment`` stage preprocesses every model alike. Any ``H, W``: the input is
padded on the bottom and right to a multiple of 8 by replicating the border, and the logits are
cropped back. Output: ``{"out": (N, num_classes, H, W)}`` logits, the key torchvision's models use.

0.48M parameters at ``base=16``, 4 classes. In a one-process prototype (96 px crops, batch 16,
AdamW 3e-3 with a cosine schedule, class-weighted cross-entropy) it reached held-out mIoU 0.94
on the synthetic shapes (background counted).

Checkpoints are the project's format (see :mod:`pipeline.train.loop`): ``{"model": state_dict,
"model_name": "small_unet", "num_classes", "categories": [{"label", "id", "name"}],
"build_kwargs": {"base": 16}}``, plus optionally ``"resize"``: the short side the stage resizes
to before the model (an int), or None for the image's native size (the default for this model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BASE_WIDTH = 16
STRIDE = 8  # three 2x downsamplings: the input is padded to a multiple of this


def double_conv(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU, size-preserving."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallUNet(nn.Module):
    """U-Net with transposed-convolution upsampling; ``forward(x) -> {"out": logits}`` (see module docstring)."""

    def __init__(self, num_classes: int = 4, base: int = BASE_WIDTH):
        super().__init__()
        c = base
        self.e1, self.e2, self.e3, self.e4 = double_conv(3, c), double_conv(c, 2 * c), double_conv(2 * c, 4 * c), double_conv(4 * c, 8 * c)
        self.u3 = nn.ConvTranspose2d(8 * c, 4 * c, 2, stride=2)
        self.u2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.u1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.d3, self.d2, self.d1 = double_conv(8 * c, 4 * c), double_conv(4 * c, 2 * c), double_conv(2 * c, c)
        self.head = nn.Conv2d(c, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % STRIDE, 0, (-h) % STRIDE), mode="replicate")
        e1 = self.e1(x)
        e2 = self.e2(F.max_pool2d(e1, 2))
        e3 = self.e3(F.max_pool2d(e2, 2))
        e4 = self.e4(F.max_pool2d(e3, 2))
        d3 = self.d3(torch.cat([self.u3(e4), e3], 1))
        d2 = self.d2(torch.cat([self.u2(d3), e2], 1))
        d1 = self.d1(torch.cat([self.u1(d2), e1], 1))
        return {"out": self.head(d1)[..., :h, :w]}


def small_unet(*, weights=None, weights_backbone=None, num_classes: int = 4, base: int = BASE_WIDTH) -> SmallUNet:
    """Build the small U-Net (random init). ``weights`` must be None: load checkpoints by path."""
    if weights is not None or weights_backbone is not None:
        raise ValueError("small_unet has no published weights; train it (pipeline train) and load the .pth by path")
    return SmallUNet(num_classes=num_classes, base=base)
