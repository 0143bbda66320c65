"""The segment stage labels every pixel as a direct torchvision call does, and writes masks that tile the image."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.transforms._presets import SemanticSegmentation

from pipeline import schema
from pipeline.config.load import ConfigError
from pipeline.engine.jobfile import load_job
from pipeline.data.decode import decode_batch
from pipeline.data.shards import list_shards, read_shard
from pipeline.engine.preflight import preflight
from pipeline.engine.stage_actor import StageActor
from pipeline.models.registry import build_model, list_models
from pipeline.models.small_unet import SmallUNet, small_unet
from pipeline.models.weights import WeightsError, resolve_weights
from pipeline.stages.segment import SEGMENT_COLUMNS, SegmentSpec, SegmentStage, resolve_resize
from tests.badimages import HUGE_LIMIT, write_bad_dataset
from tests.conftest import REPO
from tests.stages.helpers import make_batch

ARCHITECTURES = ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50"]
RESIZE = 64
CLASSES = 5


@pytest.fixture(scope="module")
def images(fixtures_dir) -> list[np.ndarray]:
    """Three photos at 90 px (90x90, 90x60, 90x60: two resized sizes) and a 96 px synthetic image."""
    from pipeline.data.synth import synth_image
    import io

    out = []
    for name in ("astronaut.png", "chelsea.png", "coffee.png"):
        img = Image.open(fixtures_dir / "images" / "skimage" / name).convert("RGB")
        img.thumbnail((90, 90))
        out.append(np.asarray(img))
    out.append(np.asarray(Image.open(io.BytesIO(synth_image(3, 0, size=96)[0])).convert("RGB")))
    return out


def calibrated(model: torch.nn.Module, images: list[np.ndarray]) -> torch.nn.Module:
    """BatchNorm statistics measured on ``images`` (one pass in train mode), then eval mode.

    A freshly initialised net with BatchNorm's initial statistics (mean 0, var 1) loses the spatial
    variation of its input: the MobileNet models label every pixel alike, which would make a
    pixel-for-pixel comparison weak. With statistics of real activations the label maps vary.
    """
    x = torch.stack([SemanticSegmentation(resize_size=None)(torch.from_numpy(np.array(im[:60, :60])).permute(2, 0, 1)) for im in images])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the pass
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def label_map(row: dict) -> np.ndarray:
    """Decode a row's masks into one (H, W) map of category ids; asserts they tile the image."""
    h, w = row["height"], row["width"]
    ids, rles = row[schema.SEMANTIC_CATEGORY_IDS], row[schema.SEMANTIC_MASKS]
    assert ids == sorted(set(ids)) and len(ids) == len(rles) > 0  # ascending, unique, one mask each
    masks = [mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()}) for r in rles]
    assert all(r["size"] == [h, w] for r in rles) and all(m.any() for m in masks)
    stack = np.stack(masks)
    assert (stack.sum(0) == 1).all(), "every pixel in exactly one mask"
    return np.asarray(ids)[stack.argmax(0)]


def direct(model: torch.nn.Module, name: str, images: list[np.ndarray], resize: int | None, *, argmax_first: bool = False) -> list[np.ndarray]:
    """torchvision by hand: the weights' own transforms (resize_size overridden), the model's "out",
    bilinear upsampling to the image size, argmax. Same-size inputs go through together, as in the stage.
    ``argmax_first``: the shortcut the stage must not take (argmax at the model's size, nearest upsampling)."""
    transform = torchvision.models.get_model_weights(name).DEFAULT.transforms(resize_size=resize)
    inputs = [transform(torch.from_numpy(np.array(im)).permute(2, 0, 1)) for im in images]
    out = [None] * len(images)
    with torch.inference_mode():
        for size in dict.fromkeys(tuple(x.shape[-2:]) for x in inputs):
            members = [i for i, x in enumerate(inputs) if tuple(x.shape[-2:]) == size]
            logits = model(torch.stack([inputs[i] for i in members]))["out"]
            for row, i in enumerate(members):
                if argmax_first:
                    small = logits[row : row + 1].argmax(1, keepdim=True).float()
                    out[i] = F.interpolate(small, size=images[i].shape[:2], mode="nearest")[0, 0].long().numpy()
                    continue
                up = F.interpolate(logits[row : row + 1], size=images[i].shape[:2], mode="bilinear", align_corners=False)
                out[i] = up[0].argmax(0).numpy()
    return out


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_stage_equals_direct_torchvision_call(tmp_path, images, name):
    torch.manual_seed(0)
    reference = calibrated(torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=CLASSES), images)
    checkpoint = tmp_path / "w.pth"
    torch.save(reference.state_dict(), checkpoint)
    stage = SegmentStage(model=name, weights=str(checkpoint), num_classes=CLASSES, resize=RESIZE)
    rows = stage(make_batch(images)).to_pylist()
    expected = direct(reference, name, images, RESIZE)
    labels_seen = set()
    for row, image, exp in zip(rows, images, expected):
        got = label_map(row)
        assert got.shape == image.shape[:2]
        assert np.array_equal(got, exp), f"{name}: {(got != exp).sum()} of {got.size} pixels differ"
        labels_seen |= set(np.unique(got).tolist())
    assert len(labels_seen) >= 3, f"{name}: labels {labels_seen}: too few to compare much"
    # The comparison can tell the order apart: argmax at the model's size, then nearest upsampling, differs.
    shortcut = direct(reference, name, images, RESIZE, argmax_first=True)
    assert any(not np.array_equal(s, e) for s, e in zip(shortcut, expected))


def test_masks_tile_every_image_under_a_category_map(images):
    torch.manual_seed(0)
    stage = SegmentStage(model="lraspp_mobilenet_v3_large", num_classes=CLASSES, resize=RESIZE)
    calibrated(stage.model, images)
    labels = stage.predict(images)
    stage.label_to_category = {0: 0, 1: 10, 2: 10, 3: 30}  # two labels onto one category, label 4 unmapped
    rows = stage(make_batch(images)).to_pylist()
    seen = set()
    for row, lab in zip(rows, labels):
        got = label_map(row)
        expected = np.select([lab == 0, (lab == 1) | (lab == 2), lab == 3], [0, 10, 30], -1)
        assert np.array_equal(got, expected)
        seen |= set(row[schema.SEMANTIC_CATEGORY_IDS])
    assert seen == {-1, 0, 10, 30}


def test_category_map_auto_by_name_keeps_background(tmp_path):
    model = small_unet(num_classes=3)
    path = tmp_path / "unet.pth"
    cats = [{"label": 1, "id": 1, "name": "circle"}, {"label": 2, "id": 2, "name": "square"}]
    torch.save({"model": model.state_dict(), "model_name": "small_unet", "num_classes": 3, "categories": cats}, path)
    dataset = [{"id": 7, "name": "square"}, {"id": 9, "name": "circle"}]
    stage = SegmentStage(model="small_unet", weights=str(path), dataset_categories=dataset)
    assert stage.label_to_category == {0: 0, 1: 9, 2: 7}
    assert SegmentStage(model="small_unet", weights=str(path)).label_to_category is None  # no dataset names: identity


def test_error_rows_pass_through_the_actor(tmp_path):
    """Through the engine's decode + StageActor (no Ray): every row out once, bad ones with null outputs."""
    src = str(tmp_path / "bad")
    expected = write_bad_dataset(src, rows_per_shard=100)
    batch = decode_batch(read_shard(list_shards(src)[0]), max_pixels=HUGE_LIMIT)  # huge.png: an error row
    actor = StageActor(stage_name="segment", stage_cls=SegmentStage,
                       stage_kwargs={"model": "small_unet", "num_classes": 3, "threads": 1},
                       output_columns=SegmentSpec(name="segment", type="segment").output_columns(), drop_columns=(schema.PIXELS,))
    out = actor(batch)
    assert out.schema.names[-2:] == list(SEGMENT_COLUMNS) and schema.PIXELS not in out.schema.names
    rows = out.to_pylist()
    assert Counter(r["image_id"] for r in rows) == Counter(list(expected))
    for row in rows:
        name, expectation = expected[row["image_id"]]
        if expectation == "error":
            assert row["error"] and row[schema.SEMANTIC_MASKS] is None and row[schema.SEMANTIC_CATEGORY_IDS] is None, name
        else:
            assert row["error"] is None, (name, row["error"])
            label_map(row)


def test_small_unet_builds_runs_and_round_trips_a_checkpoint(tmp_path, images):
    assert "small_unet" in list_models("semantic")
    torch.manual_seed(0)
    model = calibrated(small_unet(num_classes=4), images)
    assert 470_000 < sum(p.numel() for p in model.parameters()) < 490_000  # 0.48M at base 16
    assert isinstance(model, SmallUNet) and model.u1.__class__ is torch.nn.ConvTranspose2d
    with pytest.raises(ValueError, match="no published weights"):
        small_unet(weights="DEFAULT")

    # Saved as pipeline.train.loop saves checkpoints (+ the stage's optional "resize").
    path = tmp_path / "model.pth"
    cats = [{"label": i, "id": i, "name": n} for i, n in enumerate(("circle", "rectangle", "triangle"), 1)]
    torch.save({"model": model.state_dict(), "model_name": "small_unet", "num_classes": 4, "categories": cats,
                "build_kwargs": {"base": 16}}, path)
    built, categories = build_model("small_unet", resolve_weights("small_unet", str(path)))
    assert categories == [{"label": c["label"], "name": c["name"]} for c in cats]
    assert all(torch.equal(built.state_dict()[k], v) for k, v in model.state_dict().items())
    SegmentSpec(name="s", type="segment", model="small_unet", weights=str(path)).preflight()

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (61, 83, 3), np.uint8), rng.integers(0, 256, (40, 40, 3), np.uint8)]  # not multiples of 8
    stage = SegmentStage(model="small_unet", weights=str(path))
    assert stage.resize is None  # a project checkpoint runs at the native size unless it says otherwise
    rows = stage(make_batch(images)).to_pylist()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.inference_mode():
        for row, im in zip(rows, images):
            x = (torch.from_numpy(im).permute(2, 0, 1).float() / 255 - mean) / std
            out = model(x[None])["out"]
            assert out.shape == (1, 4, *im.shape[:2])
            assert np.array_equal(label_map(row), out[0].argmax(0).numpy())

    torch.save({"model": model.state_dict(), "model_name": "small_unet", "num_classes": 4, "resize": 32}, path)
    assert resolve_resize("auto", "small_unet", resolve_weights("small_unet", str(path))) == 32
    torch.save({"model": small_unet(num_classes=4, base=8).state_dict(), "model_name": "small_unet", "num_classes": 4}, path)
    with pytest.raises(WeightsError, match=r"model.pth does not fit model small_unet: .*wrong shape"):
        SegmentSpec(name="s", type="segment", model="small_unet", weights=str(path)).preflight()


def test_resize_follows_the_weights(tmp_path):
    none = resolve_weights("fcn_resnet50", "none")
    assert resolve_resize("auto", "fcn_resnet50", none) == 520  # what SemanticSegmentation(resize_size=520) does
    assert resolve_resize("auto", "small_unet", none) is None
    assert resolve_resize("native", "fcn_resnet50", none) is None and resolve_resize(96, "small_unet", none) == 96


def test_spec_refuses_other_models_and_unknown_kwargs():
    with pytest.raises(ValueError, match="not a semantic segmentation model; use one of .*lraspp_mobilenet_v3_large"):
        SegmentSpec(name="s", type="segment", model="fasterrcnn_resnet50_fpn")
    with pytest.raises(ValueError, match=r"model_kwargs.aux_los\n.*did you mean aux_loss"):
        SegmentSpec(name="s", type="segment", model="fcn_resnet50", model_kwargs={"aux_los": True})
    with pytest.raises(ValueError, match=r"model_kwargs.min_size"):  # a detector's transform keyword: ignored here
        SegmentSpec(name="s", type="segment", model="fcn_resnet50", model_kwargs={"min_size": 64})
    with pytest.raises(ValueError, match="resize"):
        SegmentSpec(name="s", type="segment", resize="half")


def test_default_weights_offline_fail_before_any_data_naming_the_file(monkeypatch, tmp_path, synth_ds):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache, whatever this machine has
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(WeightsError) as info:
        SegmentSpec(name="segment", type="segment", model="deeplabv3_mobilenet_v3_large", weights="DEFAULT").preflight()
    message = str(info.value)
    assert "deeplabv3_mobilenet_v3_large-fc3c493d.pth" in message and str(hub) in message
    assert "https://download.pytorch.org/models/deeplabv3_mobilenet_v3_large-fc3c493d.pth" in message

    reads = []
    monkeypatch.setattr("pipeline.data.shards.iter_shard", lambda *a, **k: reads.append(a))
    out = tmp_path / "out"
    job = load_job(REPO / "jobs" / "segment.yaml", overrides=["stages.segment.weights=DEFAULT"], input=synth_ds, output=str(out))
    with pytest.raises(ConfigError, match=r"jobs/segment.yaml: stages.0 \(segment\): weights .* lraspp_mobilenet_v3_large-d234d4ea.pth in "):
        preflight(job, "jobs/segment.yaml")
    assert not out.exists() and not reads
