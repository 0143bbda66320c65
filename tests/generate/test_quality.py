"""pipeline eval-generative: the Frechet distance against closed forms, and the measures on datasets whose
answer is known (real images made small as the models learn them: near the ceiling and the floor; flat
noise: far from both), through the shipped classifier."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.data.importers import import_arrays
from pipeline.data.shards import DatasetError
from pipeline.data.synth import synth_dataset
from pipeline.generate.quality import at_size, evaluate_samples, frechet_distance, read_images
from tests.conftest import REPO

CLASSIFIER = str(REPO / "conf" / "models" / "small_cnn_shapes.pth")


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3)) * [1.0, 2.0, 0.5]
    b = rng.normal(size=(4000, 3)) * [3.0, 1.0, 0.5] + [1.0, 0.0, 0.0]
    # diagonal covariances: sum of squared mean differences + sum of (sd_a - sd_b)^2
    mu_a, mu_b, sd_a, sd_b = a.mean(0), b.mean(0), a.std(0, ddof=1), b.std(0, ddof=1)
    assert frechet_distance(a, b) == pytest.approx(((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum(), rel=2e-2)
    # a rotation of both sets changes nothing; a set against itself is 0
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    assert frechet_distance(a @ q, b @ q) == pytest.approx(frechet_distance(a, b), rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalgen")
    synth_dataset(str(root / "real"), images=120, seed=300, classification=True)
    synth_dataset(str(root / "other"), images=60, seed=301, classification=True)
    return root


def test_real_images_at_the_models_size_score_near_the_ceiling_and_the_floor(real):
    small = import_arrays(str(real / "small"), at_size(read_images(str(real / "other")), 32))
    m = evaluate_samples(small, str(real / "real"), classifier=CLASSIFIER)
    assert m["image_size"] == 32 and m["sample_count"] == 60 and m["frechet_count"] == 60
    assert m["real_confident_share"] >= 0.95  # the shipped classifier knows held-out shapes
    assert m["confident_share"] >= 0.8 * m["real_confident_share"]
    assert m["frechet_distance"] < 2 * m["frechet_floor"]
    assert set(m["class_histogram"]) == {"circle", "rectangle", "triangle"}
    assert m["histogram_distance"] < 0.2  # both near a third per class


def test_noise_is_far_from_the_real_images_in_feature_space(real, tmp_path):
    """The Frechet distance tells noise from shapes; the confident share alone does not: the shipped
    classifier puts 0.9 or more on one class for most noise images (a 3-class softmax has no 'none of
    these'), which is why bench/generative.py reports noise beside the models."""
    rng = np.random.default_rng(1)
    noise = import_arrays(str(tmp_path / "noise"), [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(60)])
    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["eval-generative", noise, "--reference", str(real / "real"), "--classifier", CLASSIFIER,
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["frechet_distance"] > 5 * m["frechet_floor"]
    assert Image.open(out / "samples.png").size[0] > 8 * 64  # an 8 x 8 grid of 64 px cells


def test_samples_of_mixed_sizes_are_refused(real, tmp_path):
    mixed = import_arrays(str(tmp_path / "mixed"), [np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)])
    with pytest.raises(DatasetError, match="not squares of one size"):
        evaluate_samples(mixed, str(real / "real"), classifier=CLASSIFIER)


def test_the_floor_does_not_depend_on_the_order_of_the_reference(real, tmp_path):
    """A reference sorted by class (as --class-folders imports one) split in file order would compare
    circles with triangles: a floor many times the real one. The halves are drawn at random (a fixed seed)."""
    from pipeline.data.shards import list_shards, read_shard
    from pipeline.generate.quality import ClassifierView

    labels = [label for s in list_shards(str(real / "real")) for label in read_shard(s, columns=["label"]).column("label").to_pylist()]
    images = read_images(str(real / "real"))
    ordered = [images[k] for k in np.argsort(labels, kind="stable")]
    by_class = import_arrays(str(tmp_path / "sorted"), ordered)
    small = import_arrays(str(tmp_path / "small"), at_size(read_images(str(real / "other")), 32))
    floor = evaluate_samples(small, by_class, classifier=CLASSIFIER)["frechet_floor"]
    features = ClassifierView(CLASSIFIER)(at_size(ordered, 32))[1]
    in_file_order = frechet_distance(features[60:], features[:60])
    assert floor < in_file_order / 3


def test_what_cannot_be_measured_is_refused(real, tmp_path):
    one = import_arrays(str(tmp_path / "one"), [np.zeros((32, 32, 3), np.uint8)])
    with pytest.raises(DatasetError, match="at least 2"):
        evaluate_samples(one, str(real / "real"), classifier=CLASSIFIER)
    detector = str(REPO / "conf" / "models" / "small_maskrcnn_shapes.pth")
    result = CliRunner().invoke(main, ["eval-generative", one, "--reference", str(real / "real"), "--classifier", detector])
    assert result.exit_code != 0 and "not a classifier's" in result.output
