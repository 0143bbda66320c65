"""pipeline generate class-visualisation: images the shipped classifier assigns to the class they were
made for, written by Ray actors as a dataset with provenance, each one remade exactly from its seed."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import schema
from pipeline.data.shards import list_shards, read_shard
from pipeline.generate.class_visualisation import ClassVisualisation
from pipeline.generate.distribute import generate_dataset, image_seed
from pipeline.stages.classify import ClassifyStage
from tests.conftest import REPO

WEIGHTS = str(REPO / "conf" / "models" / "small_cnn_shapes.pth")


def test_visualisations_are_their_class_and_can_be_made_again(ray_local, tmp_path):
    settings = ClassVisualisation(model="small_cnn", weights=WEIGHTS, per_class=4, steps=60)
    out = str(tmp_path / "cv")
    summary = generate_dataset(out, settings, images=12, seed=5, prefix="cv", categories=settings.categories(),
                               provenance=settings.provenance(), rows_per_shard=4, actors=2, progress=None)
    assert (summary["images"], summary["shards"], summary["actors"]) == (12, 3, 2)
    rows = sorted((r for s in list_shards(out) for r in read_shard(s).to_pylist()), key=lambda r: r[schema.IMAGE_ID])
    assert [r[schema.SEED] for r in rows] == [image_seed(5, i) for i in range(12)] and len(set(image_seed(6, i) for i in range(12)) & set(r[schema.SEED] for r in rows)) == 0
    assert [r[schema.LABEL] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4  # circle, rectangle, triangle: the checkpoint's ids
    pixels = [np.asarray(Image.open(io.BytesIO(r[schema.IMAGE])).convert("RGB")) for r in rows]
    assert all(p.shape == (64, 64, 3) for p in pixels)  # the classifier's crop

    labels = ClassifyStage(model="small_cnn", weights=WEIGHTS, top_k=1).predict(pixels)[0][:, 0]
    assert np.mean(labels + 1 == np.array([r[schema.LABEL] for r in rows])) >= 0.9  # the classify stage's own path

    meta = json.loads((tmp_path / "cv" / "dataset.json").read_text())
    generated = meta["info"]["generated"]
    assert generated["method"] == "class-visualisation" and generated["network"] == "small_cnn"
    assert len(generated["weights_sha256"]) == 64 and generated["settings"]["steps"] == 60
    assert [c["name"] for c in meta["categories"]] == ["circle", "rectangle", "triangle"]

    generator = settings()
    shard = generator.generate([4, 5, 6, 7], [rows[i][schema.SEED] for i in (4, 5, 6, 7)])  # shard 1 again, from its rows' seeds
    assert all(np.array_equal(made[0], pixels[i]) for made, i in zip(shard, (4, 5, 6, 7)))
    alone = generator.generate([6], [rows[6][schema.SEED]])[0]  # image 7 alone: a batch of one sums in another order
    off = np.abs(alone[0].astype(int) - pixels[6].astype(int))
    assert alone[1] == rows[6][schema.LABEL] and (off == 0).mean() > 0.85 and off.max() <= 16


def test_the_command_refuses_bad_input_before_any_work(tmp_path):
    from pipeline.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["generate", "class-visualisation", WEIGHTS, "--per-class", "0", "--out", str(tmp_path / "a")])
    assert result.exit_code != 0 and "per-class" in result.output
    result = runner.invoke(main, ["generate", "class-visualisation", str(tmp_path / "missing.pth"), "--per-class", "1",
                                  "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and "missing.pth" in result.output
    result = runner.invoke(main, ["generate", "class-visualisation", "fasterrcnn_resnet50_fpn", "--weights", "none",
                                  "--per-class", "1", "--out", str(tmp_path / "c")])
    assert result.exit_code != 0 and "not a classification model" in result.output
    assert not any((tmp_path / d).exists() for d in "abc")
    with pytest.raises(ValueError, match="steps"):
        ClassVisualisation(model="small_cnn", weights=WEIGHTS, per_class=1, steps=-1)
