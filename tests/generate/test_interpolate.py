"""pipeline generate interpolate: each cell of the sheet is the decoder's image at its point of the walk,
the ends are the prior draws (or the encoded real images, shown beside them), and what has no latent code,
or asks for another image size, is refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.data.synth import synth_dataset
from pipeline.generate.distribute import image_seed
from pipeline.generate.interpolate import CELL, interpolate, real_pairs
from pipeline.generate.samples import Sampling
from pipeline.generate.sheet import GAP, to_pil
from pipeline.models.registry import build_model
from pipeline.models.weights import resolve_weights
from pipeline.train.loop import build_train_model, checkpoint_payload
from pipeline.train.train_spec import TrainSpec

SIZE = 16


def checkpoint(tmp_path, model: str, **kwargs) -> str:
    """A random-init checkpoint in the format pipeline train writes (no training needed to test the walk)."""
    spec = TrainSpec(name=model, train="unused", output="unused", model=model, image_size=SIZE if model != "dcgan" else 32,
                     model_kwargs=kwargs)
    torch.manual_seed(0)
    path = str(tmp_path / f"{model}.pth")
    torch.save(checkpoint_payload(spec, build_train_model(spec, 0), []), path)
    return path


def cell(sheet: Image.Image, row: int, column: int, size: int) -> np.ndarray:
    scale = -(-CELL // size)
    left, top = GAP + column * (size * scale + GAP), GAP + row * (size * scale + GAP)
    return np.asarray(sheet)[top : top + size * scale, left : left + size * scale]


def decoded(model, z: torch.Tensor) -> np.ndarray:
    return np.asarray(to_pil(model.decode(z[None])[0].clamp(0, 1), -(-CELL // SIZE)))


def test_a_walk_from_the_prior_decodes_each_point_of_the_line(tmp_path):
    path = checkpoint(tmp_path, "conv_vae", latent=4)
    record = interpolate(path, str(tmp_path / "walk"), pairs=2, steps=3, seed=5)
    sheet = Image.open(tmp_path / "walk" / "interpolation.png")
    model, _ = build_model("conv_vae", resolve_weights("conv_vae", path))
    model.eval()
    for row in range(2):
        z = torch.randn(2, 4, generator=torch.Generator().manual_seed(image_seed(5, row)))
        with torch.no_grad():
            for column, point in enumerate([z[0], (z[0] + z[1]) / 2, z[1]]):
                assert np.array_equal(cell(sheet, row, column, SIZE), decoded(model, point))
    assert json.loads((tmp_path / "walk" / "interpolation.json").read_text())["seed"] == record["seed"] == 5


def test_a_walk_between_real_images_shows_them_at_its_ends(tmp_path):
    synth_dataset(str(tmp_path / "real"), images=4, seed=3, size=24, classification=True)
    path = checkpoint(tmp_path, "conv_vae", latent=4)
    record = interpolate(path, str(tmp_path / "walk"), pairs=2, steps=4, images=str(tmp_path / "real"))
    assert record["image_ids"] == [[1, 2], [3, 4]]
    sheet = Image.open(tmp_path / "walk" / "interpolation.png")
    images, _ = real_pairs(str(tmp_path / "real"), 2, SIZE)
    model, _ = build_model("conv_vae", resolve_weights("conv_vae", path))
    model.eval()
    with torch.no_grad():
        codes = model.encode(images)[0]
        for row in range(2):  # real image, gap, 4 steps, gap, real image
            assert np.array_equal(cell(sheet, row, 0, SIZE), np.asarray(to_pil(images[2 * row], -(-CELL // SIZE))))
            assert np.array_equal(cell(sheet, row, 2, SIZE), decoded(model, codes[2 * row]))
            assert np.array_equal(cell(sheet, row, 5, SIZE), decoded(model, codes[2 * row + 1]))
            assert np.array_equal(cell(sheet, row, 7, SIZE), np.asarray(to_pil(images[2 * row + 1], -(-CELL // SIZE))))


def test_a_gan_walks_in_its_generators_latent_space(tmp_path):
    path = checkpoint(tmp_path, "dcgan", latent=8, width=8)
    interpolate(path, str(tmp_path / "walk"), pairs=1, steps=2)
    assert Image.open(tmp_path / "walk" / "interpolation.png").size == (2 * (96 + GAP) + GAP, 96 + 2 * GAP)


def test_bad_requests_are_refused_before_any_work(tmp_path):
    pixelcnn = checkpoint(tmp_path, "pixelcnn", channels=6, layers=1)
    runner = CliRunner()
    result = runner.invoke(main, ["generate", "interpolate", pixelcnn, "--out", str(tmp_path / "p")])
    assert result.exit_code != 0 and "no latent code" in result.output
    gan = checkpoint(tmp_path, "dcgan", latent=8, width=8)
    result = runner.invoke(main, ["generate", "interpolate", gan, "--images", str(tmp_path), "--out", str(tmp_path / "g")])
    assert result.exit_code != 0 and "needs an encoder" in result.output
    vae = checkpoint(tmp_path, "conv_vae", latent=4)
    result = runner.invoke(main, ["generate", "samples", vae, "--images", "0", "--out", str(tmp_path / "s")])
    assert result.exit_code != 0 and "0 is not in the range x>=1" in result.output
    result = runner.invoke(main, ["generate", "samples", vae, "--images", "4", "--size", "32", "--out", str(tmp_path / "s")])
    assert result.exit_code != 0 and "learned 16 x 16 images" in result.output
    with pytest.raises(ValueError, match="learned 16 x 16"):
        Sampling(vae, 32)
    assert not (tmp_path / "s").exists() and not (tmp_path / "p").exists() and not (tmp_path / "g").exists()
