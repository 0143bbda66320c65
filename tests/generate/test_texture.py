"""pipeline generate texture: Gram-matrix matching (Gatys et al.) from noise brings the style loss down by
over 100x, textures are written by Ray actors with their losses, and bad input is refused before any work."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from pipeline import schema
from pipeline.data.shards import list_shards, read_shard
from pipeline.data.synth import synth_image
from pipeline.generate.distribute import generate_dataset
from pipeline.generate.texture import TextureSynthesis, gram
from tests.conftest import REPO

WEIGHTS = str(REPO / "conf" / "models" / "small_cnn_shapes.pth")  # VGG-style; ImageNet VGG-16 is not on this machine


def test_gram_matrix_is_features_times_their_transpose_over_size():
    f = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    flat = f.reshape(2, 3, 20)
    torch.testing.assert_close(gram(f), torch.einsum("nci,ndi->ncd", flat, flat) / 60)


def test_textures_match_the_gram_matrices_and_are_written_with_their_losses(ray_local, tmp_path):
    texture = tmp_path / "texture.png"
    texture.write_bytes(synth_image(3, 0, 96)[0])
    settings = TextureSynthesis(texture=str(texture), model="small_cnn", weights=WEIGHTS, size=48, steps=150)
    out = str(tmp_path / "textures")
    summary = generate_dataset(out, settings, images=2, seed=0, prefix="texture", categories=[],
                               provenance=settings.provenance(), rows_per_shard=1, progress=None)
    assert summary["images"] == 2
    rows = sorted((r for s in list_shards(out) for r in read_shard(s).to_pylist()), key=lambda r: r[schema.IMAGE_ID])
    for row in rows:
        assert (row[schema.WIDTH], row[schema.HEIGHT], row[schema.LABEL]) == (48, 48, None)
        assert row[schema.TEXTURE_LOSS_START] / row[schema.TEXTURE_LOSS_END] >= 100  # measured ~1,000x at 150-200 steps
    assert settings.provenance()["settings"]["layers"] == ["features.0", "features.2", "features.4", "features.6"]


def test_bad_input_is_refused_before_any_work(tmp_path):
    from pipeline.cli import main

    texture = tmp_path / "texture.png"
    texture.write_bytes(synth_image(3, 0, 64)[0])
    runner = CliRunner()

    def run(*args):
        return runner.invoke(main, ["generate", "texture", *args, "--images", "1", "--out", str(tmp_path / "out")])

    result = run(str(texture), "--model", "small_cnn", "--weights", WEIGHTS, "--layers", "features.0,features.9")
    assert result.exit_code != 0 and "features.9" in result.output
    result = run(str(tmp_path / "missing.png"), "--model", "small_cnn", "--weights", WEIGHTS)
    assert result.exit_code != 0 and "missing.png" in result.output
    result = run(str(texture), "--model", "small_unet", "--weights", "none")
    assert result.exit_code != 0 and "not a classification model" in result.output
    result = run(str(texture))  # VGG-16's ImageNet weights are not in this machine's hub cache: the file is named
    assert result.exit_code != 0 and "vgg16" in result.output.lower() and ".pth" in result.output
    assert not (tmp_path / "out").exists()
