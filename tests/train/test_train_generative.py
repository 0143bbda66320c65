"""pipeline train for generative models (a first step of the generative-models issue): the VAE and the
PixelCNN train on a dataset's images and report held-out bits/dim, the DCGAN trains both players with one
optimiser, checkpoints carry their image size, and pipeline generate samples makes datasets from them."""

from __future__ import annotations

import pytest
import torch

from pipeline import schema
from pipeline.config.load import ConfigError
from pipeline.data.shards import list_shards, read_shard
from pipeline.data.synth import synth_dataset
from pipeline.generate.distribute import generate_dataset
from pipeline.generate.samples import Sampling
from pipeline.models.weights import WeightsError
from pipeline.train.train_spec import TrainSpec
from pipeline.train.trainer import preflight, train
from tests.conftest import REPO


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("gentrain")
    synth_dataset(str(root / "train"), images=32, seed=51, size=48, rows_per_shard=16)
    synth_dataset(str(root / "val"), images=8, seed=52, size=48)
    return root


def spec_for(root, model: str, **extra) -> TrainSpec:
    base = dict(name=model, train=str(root / "train"), val=str(root / "val"), output=str(root / model), model=model,
                image_size=16, epochs=1, batch_size=8, worker_num_cpus=0.8, optimizer={"lr": 0.003, "warmup_steps": 1})
    return TrainSpec(**{**base, **extra})


def test_a_likelihood_model_trains_and_reports_bits_per_dim_then_samples(ray_local, shapes):
    """The VAE through Ray Train (the PixelCNN takes the same path: model(x, loss=True) in nats; measured
    here once, 52 s for the two: one is enough for the suite)."""
    model = "conv_vae"
    summary = train(spec_for(shapes, model, model_kwargs={"latent": 8}))
    (epoch,) = summary["epochs"]
    # 4 steps: the means are still wrong and the scale at most ~10 grey levels (vae.MAX_LOG_SCALE), so above
    # a uniform model's 8; the recipe reaches 4.43 (jobs/README.md)
    assert epoch["step"] == 4 and 8 < epoch["val_bits_per_dim"] < 20
    ckpt = torch.load(summary["model"], weights_only=True)
    assert (ckpt["model_name"], ckpt["image_size"]) == (model, 16)

    settings = Sampling(summary["model"])
    out = str(shapes / f"{model}-samples")
    generate_dataset(out, settings, images=3, seed=0, prefix="samples", categories=[], provenance=settings.provenance(),
                     progress=None)
    rows = [r for s in list_shards(out) for r in read_shard(s).to_pylist()]
    assert len(rows) == 3 and all((r[schema.WIDTH], r[schema.HEIGHT]) == (16, 16) for r in rows)


def test_the_gan_trains_both_players_and_has_no_likelihood_to_validate(ray_local, shapes):
    with pytest.raises(ConfigError, match="no likelihood"):
        preflight(spec_for(shapes, "dcgan", image_size=32, model_kwargs={"width": 8}), "<spec>")
    summary = train(spec_for(shapes, "dcgan", image_size=32, val=None, model_kwargs={"width": 8, "latent": 16},
                             optimizer={"lr": 0.0002, "beta1": 0.5, "warmup_steps": 1}))
    (epoch,) = summary["epochs"]
    assert epoch["step"] == 4 and epoch["loss"] > 0 and "val_bits_per_dim" not in epoch
    with pytest.raises(WeightsError, match="not a generative model"):
        Sampling(str(REPO / "conf" / "models" / "small_cnn_shapes.pth"))


@pytest.mark.parametrize("recipe, model", [("train_vae_shapes.yaml", "conv_vae"), ("train_gan_shapes.yaml", "dcgan"),
                                           ("train_pixelcnn_shapes.yaml", "pixelcnn")])
def test_the_recipes_are_valid_specs_within_the_15_minute_budget(recipe, model):
    from pipeline.config.load import read_yaml

    spec = TrainSpec.model_validate(read_yaml(str(REPO / "jobs" / recipe)))
    assert spec.model == model and spec.kind == "generative" and spec.image_size == 32
    assert spec.time_limit_minutes <= 15
    assert (spec.val is None) == (model == "dcgan")  # a GAN has no likelihood to validate
