"""Latent walks of a VAE or a GAN (``pipeline generate interpolate MODEL.pth``), as a contact sheet.

Each of ``pairs`` rows walks in ``steps`` equal steps along the straight line between two latent
codes ``z_a`` and ``z_b`` (both ends included) and decodes every point: the VAE's logistic means,
the GAN generator's image. The ends are drawn from the prior N(0, I) with the row's seed
(``SeedSequence([seed, row])``, as ``pipeline generate`` seeds images), or, with ``images``, are the
VAE's posterior means of two real images of that dataset (rows ``2k`` and ``2k + 1``), which are then
shown beside their walks. The PixelCNN has no latent code: refused.

Writes ``interpolation.png`` (rows = walks, columns = steps, see :mod:`pipeline.generate.sheet`) and ``interpolation.json`` (the checkpoint and
its sha256, the ends' seeds or image ids, so that the sheet can be made again).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from pipeline import schema
from pipeline.config.paths import sha256_of
from pipeline.data.decode import DecodeError, decode_image
from pipeline.data.shards import DatasetError, list_shards, read_shard
from pipeline.generate.distribute import image_seed
from pipeline.generate.samples import Sampler, Sampling
from pipeline.generate.sheet import image_grid
from pipeline.train.generative_objective import to_square

CELL = 96  # smallest side of one image on the sheet, px


def latent_decoder(model: torch.nn.Module):
    """(latent size, z (N, latent) -> images (N, 3, s, s) in [0, 1]) of a VAE or a GAN; ValueError otherwise."""
    if hasattr(model, "decode") and hasattr(model, "latent"):
        return model.latent, model.decode
    generator = getattr(model, "generator", None)
    if generator is not None and hasattr(generator, "latent"):
        return generator.latent, generator
    raise ValueError(f"{type(model).__name__} has no latent code to walk (interpolate takes a conv_vae or a dcgan checkpoint)")


def real_pairs(dataset: str, pairs: int, size: int) -> tuple[torch.Tensor, list[int]]:
    """The first ``2 * pairs`` decodable images of ``dataset`` as the model learned them: (2P, 3, s, s), ids."""
    images, ids = [], []
    for shard in list_shards(dataset):
        for row in read_shard(shard, columns=[schema.IMAGE_ID, schema.IMAGE]).to_pylist():
            try:
                images.append(to_square(decode_image(row[schema.IMAGE]), size, None))
            except DecodeError:
                continue
            ids.append(row[schema.IMAGE_ID])
            if len(images) == 2 * pairs:
                return torch.stack(images), ids
    raise DatasetError(f"{dataset}: {len(images)} decodable images, {2 * pairs} needed for {pairs} pairs")


@torch.no_grad()
def interpolate(checkpoint: str, out_dir: str, *, pairs: int, steps: int, seed: int = 0, images: str | None = None) -> dict:
    """Write the sheet and its record (module docstring); returns the record."""
    if pairs < 1 or steps < 2:
        raise ValueError(f"pairs must be >= 1 and steps >= 2 (both ends), not {pairs} and {steps}")
    Sampling(checkpoint)  # refuses what is not a generative checkpoint, naming it
    sampler = Sampler(checkpoint)
    model, size = sampler.model, sampler.size
    latent, decode = latent_decoder(model)
    record: dict = {"checkpoint": checkpoint, "weights_sha256": sha256_of(checkpoint), "pairs": pairs, "steps": steps}
    ends_images = None
    if images is not None:
        if not hasattr(model, "encode"):
            raise ValueError("--images needs an encoder: a conv_vae checkpoint (a GAN cannot encode images)")
        ends_images, ids = real_pairs(images, pairs, size)
        z = model.encode(ends_images)[0]
        record |= {"images": images, "image_ids": [ids[2 * k : 2 * k + 2] for k in range(pairs)]}
    else:
        draws = [torch.Generator().manual_seed(image_seed(seed, k)) for k in range(pairs)]
        z = torch.stack([torch.randn(2, latent, generator=g) for g in draws]).flatten(0, 1)
        record |= {"seed": seed, "ends": "N(0, I), generator seeded with SeedSequence([seed, row])"}
    t = torch.linspace(0, 1, steps)
    walks = (1 - t)[None, :, None] * z[0::2, None, :] + t[None, :, None] * z[1::2, None, :]  # (P, steps, latent)
    decoded = decode(walks.flatten(0, 1)).clamp(0, 1).view(pairs, steps, 3, size, size)

    os.makedirs(out_dir, exist_ok=True)
    if ends_images is None:
        rows = [list(walk) for walk in decoded]
    else:  # the two real images at the ends of their walk, an empty cell apart
        ends = ends_images.view(pairs, 2, 3, size, size)
        rows = [[ends[p, 0], None, *decoded[p], None, ends[p, 1]] for p in range(pairs)]
    image_grid(rows, CELL).save(os.path.join(out_dir, "interpolation.png"))
    with open(os.path.join(out_dir, "interpolation.json"), "w") as f:
        json.dump(record, f, indent=2)
    return record
