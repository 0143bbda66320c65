"""A small CNN classifier that trains from scratch on two CPU cores in minutes.

The project's own classifier, for the reason :mod:`pipeline.models.small_unet` exists: no
pretrained weights can be downloaded here, and the ``classify`` stage, its evaluation and what
later work builds on a classifier (fooling images, class visualisation, sample quality) need one
that knows the synthetic shapes. A VGG-style stack, the architecture of the cs231n notes:

* 4 stages of two 3x3 conv + BatchNorm + ReLU, widths ``base`` x (1, 2, 4, 8) (16-32-64-128 at
  ``base=16``), a 2x2 max-pool after each of the first three (strides 1, 2, 4, 8);
* global average pooling, dropout ``dropout``, one linear layer to ``num_classes`` logits.

Input: ``(N, 3, H, W)`` float, RGB scaled to [0, 1] and normalised with ImageNet's mean and std
(torchvision's ``ImageClassification`` transform, what the ``classify`` stage applies to every
model); any ``H, W`` (global pooling), trained at 64 x 64. Output: ``(N, num_classes)`` logits,
as torchvision's classifiers return them. No background class: label ``i`` is the ``i``-th
category by id.

0.29M parameters at ``base=16`` (1.1 MB as float32). Checkpoints are the project's format (see
:mod:`pipeline.train.loop`) with the stage's input sizes: ``"resize"`` (shorter side before the
center crop) and ``"crop"``.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.small_unet import double_conv

BASE_WIDTH = 16


class SmallCNN(nn.Module):
    """VGG-style classifier; ``forward(x (N, 3, H, W)) -> logits (N, num_classes)``."""

    def __init__(self, num_classes: int = 3, base: int = BASE_WIDTH, dropout: float = 0.2):
        super().__init__()
        c = base
        self.features = nn.Sequential(
            double_conv(3, c), nn.MaxPool2d(2),
            double_conv(c, 2 * c), nn.MaxPool2d(2),
            double_conv(2 * c, 4 * c), nn.MaxPool2d(2),
            double_conv(4 * c, 8 * c),
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(8 * c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def small_cnn(*, weights=None, weights_backbone=None, num_classes: int = 3, base: int = BASE_WIDTH, dropout: float = 0.2) -> SmallCNN:
    """Build the small CNN (random init). ``weights`` must be None: load checkpoints by path."""
    if weights is not None or weights_backbone is not None:
        raise ValueError("small_cnn has no published weights; train one (pipeline train) and load it by path")
    return SmallCNN(num_classes=num_classes, base=base, dropout=dropout)
