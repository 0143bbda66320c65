"""Training a classifier: rows -> (image, label), and the loss.

A classifier outputs ``(N, C)`` logits, so, as for semantic models, the loss is written here:
cross-entropy against the row's image-level ``label`` (a category id of the dataset; model label
``i`` is the ``i``-th category by id, no background class).

Samples follow the ``classify`` stage's preprocessing (torchvision's ``ImageClassification``:
shorter side resized to ``resize`` with antialiasing, a ``crop`` x ``crop`` crop, [0, 1], ImageNet
mean and std), except that training takes a random crop instead of the center one and flips half
of them left-right: the augmentation torchvision's classification references use at a fixed scale.
Rows without a label are left out before they reach a worker (:mod:`pipeline.train.reader`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

from pipeline import schema
from pipeline.data.decode import decode_image
from pipeline.train.semantic_objective import normalise

NO_LABEL = -100  # cross_entropy's ignore_index: the stand-in sample of a batch with no readable row


class ClassifierObjective:
    """Samples and loss of a classifier, one per training worker.

    ``sample(row) -> (image (3, crop, crop) float, label () int64)``; ``loss(model, samples,
    device)``: the cross-entropy of the stacked batch.
    """

    def __init__(self, label_of: dict[int, int], *, resize: int, crop: int, hflip: bool, seed: int):
        self.label_of, self.resize, self.crop, self.hflip = label_of, resize, crop, hflip
        self.rng = np.random.default_rng(seed)

    def sample(self, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
        category = row[schema.LABEL]
        if category not in self.label_of:
            raise ValueError(f"image {row['image_id']}: label {category} is not one of the dataset's categories")
        rgb = torch.from_numpy(np.array(decode_image(row[schema.IMAGE]))).permute(2, 0, 1)
        rgb = TF.resize(rgb, [self.resize], antialias=True)  # shorter side, as ImageClassification does
        h, w = rgb.shape[-2:]
        c = self.crop
        if h < c or w < c:  # a very elongated image: pad the short side with black
            rgb = F.pad(rgb, (0, max(0, c - w), 0, max(0, c - h)))
            h, w = rgb.shape[-2:]
        y0, x0 = int(self.rng.integers(0, h - c + 1)), int(self.rng.integers(0, w - c + 1))
        rgb = rgb[:, y0 : y0 + c, x0 : x0 + c]
        if self.hflip and self.rng.random() < 0.5:
            rgb = rgb.flip(-1)
        return normalise(rgb.permute(1, 2, 0).numpy()), torch.tensor(self.label_of[category])

    def blank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A grey image that counts for nothing: stands in for a batch in which no row could be read."""
        return normalise(np.full((self.crop, self.crop, 3), 128, np.uint8)), torch.tensor(NO_LABEL)

    def loss(self, model: torch.nn.Module, samples: list, device: torch.device) -> torch.Tensor:
        x = torch.stack([s[0] for s in samples]).to(device)
        y = torch.stack([s[1] for s in samples]).to(device)
        logits = model(x)
        if not (y != NO_LABEL).any():  # nothing to learn from: a zero loss that still reaches every parameter (DDP)
            return logits.sum() * 0.0
        return F.cross_entropy(logits, y, ignore_index=NO_LABEL)
