"""Training a generative model on a dataset's images: rows -> (3, s, s) images, and the loss.

Every model returns ``(N,)`` per-image losses from ``model(x, loss=True)`` (called through
``forward`` so that DDP sees the pass). An explicit-density model (the PixelCNN, the VAE,
``likelihood = True``) returns its ``nll`` in nats, and the loss is their
mean in **bits per dimension** (``nll / (3 s s ln 2)``), so the training log and the validation
number read on the scale the literature uses (8 = a uniform model of 8-bit pixels).

Samples: the image's shorter side resized to ``image_size`` (antialiased), a random square crop
(the center one in validation), rounded back to 8-bit values: the models see what they will be
asked to produce. The DCGAN's loss is its two players' (see :mod:`pipeline.models.dcgan`). Validation: the same bits/dim over every row of the validation dataset, center
crops, a fixed seed for the VAE's one sample of z.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torchvision.transforms import functional as TF

from pipeline import schema
from pipeline.data.decode import DecodeError, decode_image
from pipeline.data.shards import list_shards, read_shard

CACHE_BYTES = 512 * 2**20  # resized uint8 images kept per training worker (3,000 at 32 px: 9 MB)


def shorter_side_to(rgb: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> uint8 (3, H', W') with its shorter side resized to ``size`` (antialiased)."""
    return TF.resize(torch.from_numpy(np.array(rgb)).permute(2, 0, 1), [size], antialias=True)


def square_crop(x: torch.Tensor, size: int, rng: np.random.Generator | None) -> torch.Tensor:
    """uint8 (3, H', W') -> (3, size, size) in [0, 1] on the 8-bit grid: a random crop (``rng``) or the center one (None)."""
    h, w = x.shape[-2:]
    if rng is None:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return x[:, top : top + size, left : left + size].float() / 255


def to_square(rgb: np.ndarray, size: int, rng: np.random.Generator | None) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> (3, size, size) in [0, 1] on the 8-bit grid: shorter side resized, then a
    random crop (``rng``) or the center one (None)."""
    return square_crop(shorter_side_to(rgb, size), size, rng)


def bits_per_dim(nll: torch.Tensor, size: int) -> torch.Tensor:
    return nll / (3 * size * size * math.log(2))


class GenerativeObjective:
    """``sample(row) -> (3, s, s)``; ``loss(model, samples, device)``: mean bits/dim of the batch.

    Resized images are kept in memory (up to ``CACHE_BYTES`` per worker, keyed by a hash of the encoded
    bytes) so that later epochs only crop: decoding a 128 px PNG and resizing it took 0.8 ms, as long as
    half a training step of the VAE at batch 64 on two cores.
    """

    def __init__(self, *, image_size: int, seed: int):
        self.size = image_size
        self.rng = np.random.default_rng(seed)
        self.cache: dict[bytes, torch.Tensor] = {}
        self.cached_bytes = 0

    def sample(self, row: dict) -> torch.Tensor:
        data = row[schema.IMAGE]
        if not data:
            raise DecodeError("no image bytes")
        key = hashlib.blake2b(data, digest_size=16).digest()
        resized = self.cache.get(key)
        if resized is None:
            resized = shorter_side_to(decode_image(data), self.size)
            if self.cached_bytes + resized.numel() <= CACHE_BYTES:
                self.cache[key] = resized
                self.cached_bytes += resized.numel()
        return square_crop(resized, self.size, self.rng)

    def blank(self) -> torch.Tensor:
        """Mid-grey: stands in for a batch in which no row could be read."""
        return torch.full((3, self.size, self.size), 128 / 255)

    def loss(self, model: torch.nn.Module, samples: list, device: torch.device) -> torch.Tensor:
        x = torch.stack(samples).to(device)
        per_image = model(x, loss=True)  # through forward: DDP syncs what forward ran
        core = model.module if hasattr(model, "module") else model
        return bits_per_dim(per_image, self.size).mean() if core.likelihood else per_image.mean()


@torch.no_grad()
def validation_bits_per_dim(model: torch.nn.Module, dataset: str, image_size: int, *, batch_size: int = 32, seed: int = 0) -> float:
    """Mean bits/dim of ``model`` over every readable image of ``dataset`` (center crops)."""
    torch.manual_seed(seed)
    model.eval()
    device = next(model.parameters()).device
    total, count, batch = 0.0, 0, []

    def flush() -> None:
        nonlocal total, count, batch
        if batch:
            x = torch.stack(batch).to(device)
            total += float(bits_per_dim(model.nll(x), image_size).sum())
            count += len(batch)
            batch = []

    for shard in list_shards(dataset):
        for row in read_shard(shard, columns=[schema.IMAGE]).to_pylist():
            if row[schema.IMAGE]:
                batch.append(to_square(decode_image(row[schema.IMAGE]), image_size, None))
            if len(batch) >= batch_size:
                flush()
    flush()
    return total / max(count, 1)
