"""train-style on embedded Ray: the loss goes down and the checkpoint is what the style stage loads."""

import io
import re

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline import schema
from pipeline.cli import main
from pipeline.config.load import ConfigError
from pipeline.data.shards import list_shards, write_shard
from pipeline.data.synth import synth_dataset
from pipeline.models.transformer_net import TransformerNet
from pipeline.models.weights import WeightsError
from pipeline.stages.style import StyleStage
from pipeline.train.train_style import (
    StyleTrainConfig,
    center_crop,
    content_batches,
    preflight,
    train_style,
)
from tests.badimages import write_bad_dataset
from tests.stages.helpers import make_batch


@pytest.fixture(scope="module")
def content(tmp_path_factory):
    root = tmp_path_factory.mktemp("style-train")
    synth_dataset(str(root / "content"), images=8, seed=5, size=48, rows_per_shard=4)
    style = root / "style.png"
    rng = np.random.default_rng(0)  # a striped "style": strong, simple texture statistics
    stripes = np.zeros((48, 64, 3), np.uint8)
    stripes[:, ::8] = (230, 40, 20)
    stripes[::6] = (20, 60, 220)
    Image.fromarray(np.clip(stripes + rng.integers(0, 30, stripes.shape), 0, 255).astype(np.uint8)).save(style)
    return root


def config(root, **extra) -> StyleTrainConfig:
    base = {"style_image": str(root / "style.png"), "content": str(root / "content"), "out": str(root / "style.pth"),
            "steps": 12, "batch_size": 2, "image_size": 32, "vgg_weights": "none", "lr": 1e-2, "seed": 0, "log_every": 6}
    return StyleTrainConfig(**{**base, **extra})


@pytest.mark.ray
def test_train_style_lowers_the_loss_and_writes_a_checkpoint_the_stage_loads(ray_local, content):
    lines = []
    summary = train_style(config(content), echo=lines.append)
    totals = [h["total"] for h in summary["history"]]
    assert len(totals) == 12 and summary["images"] == 24 and summary["skipped_rows"] == 0
    assert np.mean(totals[-3:]) < 0.8 * np.mean(totals[:3])
    assert [line.split()[1] for line in lines if line.startswith("step")] == ["6/12", "12/12"]  # progress printed

    state = torch.load(summary["out"], weights_only=True)
    net = TransformerNet()
    net.load_state_dict(state)  # a plain TransformerNet state dict: strict load, as pytorch/examples does
    assert not any(re.search(r"running_(mean|var)", k) for k in state)

    stage = StyleStage(model=summary["out"], format="png")
    image = np.asarray(Image.open(content / "style.png").convert("RGB"))[:40, :44]
    row = stage(make_batch([image])).to_pylist()[0]
    out = np.asarray(Image.open(io.BytesIO(row[schema.STYLIZED])).convert("RGB"))
    assert out.shape == image.shape
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float())[0].permute(1, 2, 0).numpy()
    assert np.abs(out.astype(int) - np.clip(expected, 0, 255).astype(np.uint8)).max() <= 1


def test_content_batches_skip_error_rows_and_crop_square(tmp_path):
    src = str(tmp_path / "bad")
    expected = write_bad_dataset(src, rows_per_shard=5)
    usable = [name for name, e in expected.values() if e == "ok"] + ["huge.png"]  # no max_pixels here: it decodes
    assert len(usable) == 9
    batches = content_batches(list_shards(src), image_size=16, batch_size=9, seed=0)
    x, skipped = next(batches)  # the whole first pass: 8 good rows, 4 bad ones, huge.png
    assert x.shape == (9, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 255
    assert skipped == 4
    x, skipped = next(batches)  # it cycles: a second pass, shards in a new order
    bad = len(expected) - len(usable)
    assert x.shape == (9, 3, 16, 16) and bad <= skipped <= 2 * bad  # all of pass 1's bad rows, some of pass 2's
    assert center_crop(np.zeros((30, 50, 3), np.uint8), 20).shape == (20, 20, 3)


def test_bad_inputs_fail_before_ray_starts(content, tmp_path, monkeypatch):
    import ray

    def forbidden(*args, **kwargs):
        raise AssertionError("preflight must fail before Ray starts")

    monkeypatch.setattr(ray, "init", forbidden)
    with pytest.raises(ConfigError, match="content: dataset not found: .*nothing"):
        train_style(config(content, content=str(tmp_path / "nothing")))
    predictions = tmp_path / "pred"
    write_shard(str(predictions / "part-00000.parquet"), pa.table({"image_id": [1], "error": pa.nulls(1, pa.string())}))
    with pytest.raises(ConfigError, match="part-00000.parquet has no image column"):
        preflight(config(content, content=str(predictions)))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a picture")
    with pytest.raises(ConfigError, match=r"style image .*broken.jpg: cannot decode image"):
        preflight(config(content, style_image=str(broken)))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    with pytest.raises(WeightsError, match=r"vgg16-397923af.pth in .*torch/hub/checkpoints.*or set --vgg-weights to a local"):
        preflight(config(content, vgg_weights="VGG16_Weights.IMAGENET1K_V1"))  # the option's name, not the stage key

    result = CliRunner().invoke(main, ["train-style", str(tmp_path / "missing.png"), "--content", str(content / "content"),
                                       "--out", str(tmp_path / "o.pth"), "--vgg-weights", "none"])
    assert result.exit_code == 1 and "style image not found" in result.output and "Traceback" not in result.output
