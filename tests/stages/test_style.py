"""The style stage returns what a direct TransformerNet call returns, for every size, on every row."""

import io
import json
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline import schema
from pipeline.cli import main
from pipeline.config.load import ConfigError
from pipeline.engine.jobfile import load_job, validate_job
from pipeline.data.decode import decode_batch
from pipeline.data.shards import list_shards, read_shard
from pipeline.engine.stage_actor import StageActor
from pipeline.engine.preflight import preflight
from pipeline.models.transformer_net import (
    LEGACY_KEY,
    TransformerNet,
    Vgg16Features,
    build_vgg,
    clean_state_dict,
)
from pipeline.models.weights import WeightsError
from pipeline.stages.style import StyleSpec, StyleStage, target_size
from tests.badimages import HUGE_LIMIT, bad_images, write_bad_dataset
from tests.conftest import REPO
from tests.stages.helpers import make_batch, png


def vivid_net(seed: int = 0) -> TransformerNet:
    """A random TransformerNet whose outputs span 0..255 and beyond (a fresh one gives values near 0)."""
    torch.manual_seed(seed)
    net = TransformerNet().eval()
    with torch.no_grad():
        net.deconv3.conv2d.weight.mul_(200)
        net.deconv3.conv2d.bias.fill_(127)
        for name, param in net.named_parameters():  # non-trivial InstanceNorm affine parameters
            if re.search(r"in\d+\.(weight|bias)$", name):
                param.copy_(torch.rand_like(param) + 0.5 if name.endswith("weight") else torch.randn_like(param) * 0.1)
    return net


def with_legacy_keys(state: dict) -> dict:
    """The state dict as PyTorch < 0.4 saved it: InstanceNorm running stats beside the affine params."""
    legacy = dict(state)
    for key, value in state.items():
        if re.search(r"in\d+\.weight$", key):
            legacy[key[: -len("weight")] + "running_mean"] = torch.zeros_like(value)
            legacy[key[: -len("weight")] + "running_var"] = torch.ones_like(value)
    return legacy


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(net, path of its bare state dict, path of the same with legacy InstanceNorm keys)."""
    folder = tmp_path_factory.mktemp("style")
    net = vivid_net()
    plain, legacy = folder / "plain.pth", folder / "legacy.pth"
    torch.save(net.state_dict(), plain)
    # and in the pre-1.6 (non-zip) file format the published example checkpoints use
    torch.save(with_legacy_keys(net.state_dict()), legacy, _use_new_zipfile_serialization=False)
    return net, str(plain), str(legacy)


@pytest.fixture(scope="module")
def pictures(photos) -> list[np.ndarray]:
    """The three photos, small: 96x96 (sides multiples of 4), 90x60 and 101x67 (not)."""
    sizes = [(96, 96), (90, 60), (101, 67)]
    return [np.asarray(Image.fromarray(p).resize(size, Image.Resampling.BILINEAR)) for p, size in zip(photos, sizes)]


def direct(net: TransformerNet, image: np.ndarray) -> np.ndarray:
    """What pytorch/examples' stylize computes: ToTensor * 255, unsqueeze, forward -> (H', W', 3) float."""
    with torch.no_grad():
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().unsqueeze(0)
        return net(x)[0].permute(1, 2, 0).numpy()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("which", ["plain", "legacy"])
def test_stage_equals_direct_transformer_net_call(checkpoints, pictures, which):
    net, plain, legacy = checkpoints
    path = plain if which == "plain" else legacy
    state = torch.load(path, weights_only=True)
    if which == "legacy":  # these files really do not load into today's TransformerNet as they are
        assert sum(bool(LEGACY_KEY.search(k)) for k in state) == 2 * 15
        with pytest.raises(RuntimeError, match="running_mean"):
            TransformerNet().load_state_dict(state)
        assert set(clean_state_dict(state)) == set(net.state_dict())
    stage = StyleStage(model=path, format="png")
    out = stage(make_batch(pictures)).to_pylist()
    for image, row, got in zip(pictures, out, stage.stylize_float(pictures)):
        expected = direct(net, image)
        h, w = image.shape[:2]
        if h % 4 == 0 and w % 4 == 0:
            assert expected.shape == got.shape  # nothing cropped: exactly the direct call
        assert np.abs(got - expected[:h, :w]).max() <= 1e-3
        picture = decoded(row[schema.STYLIZED])
        assert picture.shape == image.shape  # output size == input size
        reference = np.clip(expected[:h, :w], 0, 255).astype(np.uint8)  # the example's save_image
        assert np.abs(picture.astype(int) - reference).max() <= 1
        assert (picture == reference).mean() > 0.999


def test_values_are_clamped_to_0_255(checkpoints, pictures):
    _, plain, _ = checkpoints
    stage = StyleStage(model=plain, format="png")
    raw = stage.stylize_float([pictures[0]])[0]
    assert raw.min() < -50 and raw.max() > 300  # the network's own output leaves the range...
    picture = decoded(stage(make_batch([pictures[0]])).column(schema.STYLIZED)[0].as_py())
    assert picture.min() == 0 and picture.max() == 255  # ...the picture is clamped, not wrapped
    assert np.array_equal(picture, np.clip(raw, 0, 255).astype(np.uint8))


def test_mixed_sizes_in_one_batch_keep_their_size_and_values(checkpoints, pictures):
    _, plain, _ = checkpoints
    stage = StyleStage(model=plain, format="png")
    rng = np.random.default_rng(1)
    # two 32x40 crops (one group), then other sizes, interleaved
    images = [pictures[0][:32, :40], pictures[1][:29, :33], rng.integers(0, 256, (21, 26, 3), dtype=np.uint8),
              pictures[2][:32, :40], pictures[2][:45, :30]]
    together = stage.stylize_float(images)
    for image, got in zip(images, together):
        alone = stage.stylize_float([image])[0]
        assert got.shape == image.shape
        # grouping by size changes nothing but float rounding (batch of 2 vs 1 in one conv call)
        np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-3)
    rows = stage(make_batch(images)).to_pylist()
    assert [decoded(r[schema.STYLIZED]).shape for r in rows] == [im.shape for im in images]
    assert [r["image_id"] for r in rows] == list(range(len(images)))


def test_requested_size_and_max_side(checkpoints, pictures):
    _, plain, _ = checkpoints
    image = pictures[1]  # 90 x 60
    h, w = image.shape[:2]
    by_size = decoded(StyleStage(model=plain, size=64, format="png")(make_batch([image])).column(schema.STYLIZED)[0].as_py())
    assert min(by_size.shape[:2]) == 64 and by_size.shape[:2] == target_size(w, h, size=64)[::-1]
    capped = StyleStage(model=plain, max_side=80, format="jpeg", quality=80)
    rows = capped(make_batch([pictures[0], pictures[2][:50, :60]])).to_pylist()
    first, second = decoded(rows[0][schema.STYLIZED]), decoded(rows[1][schema.STYLIZED])
    assert first.shape == (80, 80, 3) and rows[0][schema.STYLIZED][:3] == b"\xff\xd8\xff"  # JPEG
    assert second.shape == (50, 60, 3)  # max_side never enlarges


def test_bad_images_and_tiny_images_become_error_rows(checkpoints, tmp_path):
    """Through the engine's decode + StageActor (no Ray): every row out once, errors named."""
    _, plain, _ = checkpoints
    src = str(tmp_path / "bad")
    expected = write_bad_dataset(src, rows_per_shard=100)
    table = read_shard(list_shards(src)[0])
    tiny = schema.image_table([{"image_id": 99, "file_name": "tiny.png", "width": 3, "height": 3,
                                "image": png(np.zeros((3, 3, 3), np.uint8))}])
    batch = decode_batch(pa.concat_tables([table, tiny.cast(table.schema)]), max_pixels=HUGE_LIMIT)
    actor = StageActor(stage_name="style", stage_cls=StyleStage, stage_kwargs={"model": plain, "format": "png"},
                       output_columns={schema.STYLIZED: schema.STYLIZED_TYPE}, drop_columns=(schema.PIXELS,))
    rows = actor(batch).to_pylist()
    assert Counter(r["image_id"] for r in rows) == Counter([*expected, 99])
    by_id = {r["image_id"]: r for r in rows}
    for image_id, (name, expectation) in expected.items():
        row = by_id[image_id]
        if expectation == "error":
            assert row["error"] and row[schema.STYLIZED] is None, name
        else:
            assert row["error"] is None, (name, row["error"])
            assert decoded(row[schema.STYLIZED]).shape == (row["height"], row["width"], 3), name
    rotated = next(by_id[i] for i, (name, _) in expected.items() if name == "rotated.jpg")
    assert (rotated["width"], rotated["height"]) == (60, 80)  # EXIF orientation 6 honoured
    assert "at least 5 px" in by_id[99]["error"] and by_id[99][schema.STYLIZED] is None
    assert bad_images()["ok.png"][1] == "ok"


def test_wrong_architecture_and_missing_checkpoint_fail_before_any_data(tmp_path, synth_ds):
    other = tmp_path / "other.pth"
    torch.save(Vgg16Features().state_dict(), other)
    spec = StyleSpec(name="style", type="style", model=str(other))
    with pytest.raises(WeightsError, match=r"other\.pth does not fit model TransformerNet .*missing"):
        spec.preflight()
    with pytest.raises(WeightsError, match=r"style checkpoint file not found: .*nothere\.pth"):
        StyleSpec(name="style", type="style", model=str(tmp_path / "nothere.pth")).preflight()
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot load checkpoint .*garbage.pth"):
        StyleSpec(name="style", type="style", model=str(garbage)).preflight()
    job = load_job(REPO / "jobs" / "style.yaml", overrides=[f"stages.style.model={other}"], input=synth_ds,
                   output=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"jobs/style.yaml: stages.0 \(style\): checkpoint .*other.pth does not fit"):
        preflight(job, "jobs/style.yaml")
    assert not (tmp_path / "out").exists()


def test_spec_is_validated_before_anything_runs():
    def error(**stage) -> str:
        with pytest.raises(ConfigError) as info:
            validate_job({"name": "t", "input": "in", "output": "out", "stages": [{"name": "style", **stage}]}, "job.yaml")
        return str(info.value)

    assert "method network needs model" in error()
    assert "method optimize needs style_image" in error(method="optimize")
    assert "not both" in error(model="x.pth", size=256, max_side=512)
    assert "stages.0 (style).qualty: unknown key" in error(model="x.pth", qualty=80)
    assert "stages.0 (style).format" in error(model="x.pth", format="gif")
    assert "would overwrite the image column 'image'" in error(model="x.pth", column="image")
    job = validate_job({"name": "t", "input": "in", "output": "out", "stages": [{"name": "style", "model": "x.pth", "num_gpus": 0.5}]}, "j")
    assert job.stages[0].stage_kwargs([])["device"] == "cuda" and job.stages[0].output_columns() == {"stylized": pa.binary()}


def test_optimize_method_lowers_its_loss_and_keeps_the_size(tmp_path, pictures):
    style = tmp_path / "style.png"
    style.write_bytes(png(pictures[2]))
    torch.manual_seed(0)
    stage = StyleStage(method="optimize", style_image=str(style), steps=8, lr=2.0, vgg_weights="none", format="png")
    content = np.asarray(Image.fromarray(pictures[1]).resize((50, 34)))
    result, losses = stage.run_optimize(content)
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0]
    assert result.shape == content.shape and result.min() >= 0 and result.max() <= 255
    assert np.abs(result - content).mean() > 0.5  # the pixels moved
    row = stage(make_batch([content])).to_pylist()[0]
    assert decoded(row[schema.STYLIZED]).shape == content.shape


def test_vgg_weights_offline_error_and_local_path(monkeypatch, tmp_path, pictures):
    style = tmp_path / "style.png"
    style.write_bytes(png(pictures[0]))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    spec = StyleSpec(name="style", type="style", method="optimize", style_image=str(style))
    with pytest.raises(WeightsError) as info:
        spec.preflight()
    assert "vgg16-397923af.pth" in str(info.value) and str(tmp_path / "torch" / "hub" / "checkpoints") in str(info.value)
    assert "never downloaded" in str(info.value) and "set vgg_weights to a local .pth" in str(info.value)
    torch.manual_seed(1)
    saved = Vgg16Features()
    torch.save(saved.state_dict(), tmp_path / "vgg.pth")  # torchvision key names: features.N.weight
    loaded = build_vgg(str(tmp_path / "vgg.pth"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.state_dict().items())
    torch.save(TransformerNet().state_dict(), tmp_path / "not_vgg.pth")
    with pytest.raises(WeightsError, match="not_vgg.pth does not fit model vgg16"):
        StyleSpec(name="style", type="style", method="optimize", style_image=str(style),
                  vgg_weights=str(tmp_path / "not_vgg.pth")).preflight()
    with pytest.raises(ValueError, match="style image not found: .*nope.png"):
        StyleSpec(name="style", type="style", method="optimize", style_image=str(tmp_path / "nope.png"),
                  vgg_weights="none").preflight()


@pytest.mark.ray
def test_style_job_on_ray_then_export(ray_local, checkpoints, tmp_path):
    """jobs/style.yaml end to end: bad images included, every row once, then export-images."""
    _, _, legacy = checkpoints
    src = str(tmp_path / "bad")
    expected = write_bad_dataset(src, rows_per_shard=5)
    out = str(tmp_path / "pred")
    args = ["run", str(REPO / "jobs" / "style.yaml"), "--input", src, "--output", out, "--no-progress",
            "--set", f"stages.style.model={legacy}", "--set", "stages.style.format=png",
            "--set", "stages.style.num_cpus=0.5", "--set", f"decode.max_pixels={HUGE_LIMIT}"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [r for shard in list_shards(out) for r in read_shard(shard).to_pylist()]
    assert Counter(r["image_id"] for r in rows) == Counter(list(expected))
    ok = [r for r in rows if expected[r["image_id"]][1] == "ok"]
    assert all(r["error"] is None and decoded(r["stylized"]).shape == (r["height"], r["width"], 3) for r in ok)
    assert all(r["error"] and r["stylized"] is None for r in rows if expected[r["image_id"]][1] == "error")
    summary = json.loads((tmp_path / "pred" / "job.json").read_text())["summary"]
    assert (summary["rows_in"], summary["rows_out"], summary["error_rows"]) == (len(expected), len(expected), len(expected) - len(ok))

    exported = CliRunner().invoke(main, ["data", "export-images", out, str(tmp_path / "pics")])
    assert exported.exit_code == 0, exported.output
    assert f"wrote {len(ok)} image(s)" in exported.output and "contact_sheet.png" in exported.output
    assert len(list((tmp_path / "pics").glob("*.png"))) == len(ok) + 1  # + the contact sheet
