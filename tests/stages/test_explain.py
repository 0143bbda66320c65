"""The explain stage: maps that equal the methods' definitions, land on the object, depend on the
trained weights (Adebayo et al.'s sanity check), and a job that refuses to run without predictions."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import schema
from pipeline.config.load import ConfigError
from pipeline.data.decode import decode_batch
from pipeline.data.shards import list_shards, read_shard
from pipeline.data.synth import synth_dataset
from pipeline.engine.jobfile import load_job
from pipeline.stages.classify import ClassifyStage
from pipeline.stages.common import batch_images
from pipeline.stages.explain import ExplainStage, to_image
from tests.conftest import REPO

WEIGHTS = str(REPO / "conf" / "models" / "small_cnn_shapes.pth")  # the shipped classifier (held-out top-1 1.0)
METHODS = ["saliency", "smoothgrad", "guided_backprop", "occlusion", "gradcam", "hirescam"]
FAST = {"stride": 8, "samples": 6}
THRESHOLD = {"saliency": 0.6, "smoothgrad": 0.6, "guided_backprop": 0.85, "occlusion": 0.8, "gradcam": 0.85, "hirescam": 0.85}  # occlusion: 7 x 7 patch positions on the 64 px input; smoothgrad: 6 copies


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """32 one-shape images never seen in training (seed 300, as jobs/classify_shapes.yaml), classified."""
    root = tmp_path_factory.mktemp("explain")
    synth_dataset(str(root), images=32, seed=300, classification=True)
    table = read_shard(list_shards(str(root))[0])
    batch = ClassifyStage(model="small_cnn", weights=WEIGHTS, top_k=3)(decode_batch(table))
    boxes = [row[schema.ANNOTATIONS][0]["bbox"] for row in table.to_pylist()]  # the shape's xywh box
    return batch, boxes


def decode_maps(out) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(maps[0])), np.float64) for maps in out[schema.ATTRIBUTION_MAPS].to_pylist()]


def test_saliency_and_gradcam_are_their_definitions(held_out):
    """Against autograd by hand: |d logit / d input| max over channels; ReLU(sum_k mean(dY/dA_k) A_k) upsampled."""
    batch, _ = held_out
    images = batch_images(batch.slice(0, 4))
    saliency = ExplainStage(method="saliency", model="small_cnn", weights=WEIGHTS)
    x = torch.stack([saliency.classifier.preprocess(im) for im in images])
    target = torch.tensor([labels[0] for labels in batch.slice(0, 4)[schema.CLASS_LABELS].to_pylist()])
    x_grad = x.clone().requires_grad_(True)
    saliency.model(x_grad).gather(1, target[:, None]).sum().backward()
    np.testing.assert_allclose(saliency.attribute(x, target), x_grad.grad.abs().amax(1).numpy(), rtol=1e-5, atol=1e-7)

    gradcam = ExplainStage(method="gradcam", model="small_cnn", weights=WEIGHTS)
    assert gradcam.layer_name == "features"  # the last block with a spatial output (8 x 8 for the 64 px input)
    kept = {}
    handle = gradcam.layer.register_forward_hook(lambda m, i, out: kept.update(a=out))
    logits = gradcam.model(x)
    handle.remove()
    grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), kept["a"])[0]
    cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * kept["a"]).sum(1, keepdim=True))
    expected = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(gradcam.attribute(x, target), expected.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_maps_go_back_to_where_the_model_looked():
    """A map of ones over the 64 px center crop of a 120 x 80 image resized to 73: ones where the crop came from, zeros beside."""
    stage = ClassifyStage(model="small_cnn", num_classes=3, resize=73, crop=64)
    image_map = to_image(np.ones((64, 64), np.float32), (80, 120), stage.transform)
    # resized 73 x 109; the crop starts at row round(9 / 2) = 4, column round(45 / 2) = 22: in the image,
    # rows 4 * 80 / 73 = 4.4 .. 68 * 80 / 73 = 74.5, columns 22 * 120 / 109 = 24.2 .. 86 * 120 / 109 = 94.7
    assert image_map.shape == (80, 120)
    assert image_map[8:70, 30:90].min() == pytest.approx(1.0)
    assert image_map[:, :20].max() == 0 and image_map[:, 100:].max() == 0 and image_map[:2].max() == 0 and image_map[78:].max() == 0


@pytest.mark.parametrize("method", METHODS)
def test_maps_point_at_the_shape(held_out, method):
    """The pointing game on 32 held-out images: the map's maximum inside the shape's box.

    A random point lands in the box about as often as the box's share of the image (~0.2 here).
    On all 200 held-out images (jobs/explain_classify_shapes.yaml's settings, occlusion stride 4): saliency
    0.675, smoothgrad 0.750, guided backprop 0.985, occlusion 0.985, Grad-CAM 0.995; on these 32
    (occlusion stride 8, smoothgrad 6 copies) 0.78, 0.72, 1.0, 0.97, 1.0, HiResCAM 1.0. Inference is deterministic,
    so the thresholds, under those, fail on a regression, not on noise."""
    batch, boxes = held_out
    out = ExplainStage(method=method, model="small_cnn", weights=WEIGHTS, **FAST)(batch)
    hits, shares = [], []
    sizes = zip(batch[schema.HEIGHT].to_pylist(), batch[schema.WIDTH].to_pylist())
    for m, (x, y, w, h), size in zip(decode_maps(out), boxes, sizes):
        assert m.shape == size  # at the image's size
        row, col = np.unravel_index(np.argmax(m), m.shape)
        hits.append(x <= col + 0.5 <= x + w and y <= row + 0.5 <= y + h)
        shares.append(w * h / m.size)
    assert np.mean(hits) >= THRESHOLD[method], (method, np.mean(hits))
    assert np.mean(hits) > 2 * np.mean(shares)  # far better than a random point


@pytest.mark.parametrize("method", METHODS)
def test_maps_depend_on_the_trained_weights(held_out, method):
    """Adebayo et al.: re-initialise every conv and linear layer; the maps over the model's input must change
    (mean Spearman rank correlation < 0.5; measured 0.19 / 0.23 / 0.29 / -0.05 / -0.07 / -0.07 in METHODS order)."""
    batch, _ = held_out
    images = batch_images(batch.slice(0, 12))
    stage = ExplainStage(method=method, model="small_cnn", weights=WEIGHTS, **FAST)
    x = torch.stack([stage.classifier.preprocess(im) for im in images])
    target = torch.tensor([labels[0] for labels in batch.slice(0, 12)[schema.CLASS_LABELS].to_pylist()])
    trained = stage.attribute(x, target)
    torch.manual_seed(0)
    for module in stage.model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.reset_parameters()
    random = stage.attribute(x, target)

    def ranks(a):
        r = np.empty(a.size)
        r[np.argsort(a.ravel(), kind="stable")] = np.arange(a.size)
        return r

    rho = [np.corrcoef(ranks(a), ranks(b))[0, 1] for a, b in zip(trained, random)]
    assert np.nanmean(rho) < 0.5, (method, rho)


def test_a_job_explains_every_row_and_is_refused_without_predictions(ray_local, tmp_path):
    from pipeline.data.render import render_predictions
    from pipeline.engine.runner import run_job

    data = str(tmp_path / "shapes")
    synth_dataset(data, images=10, seed=7, size=64, rows_per_shard=5, classification=True)
    settings = {"stages.classify.pool_size": 1, "stages.classify.num_cpus": 0.5, "stages.explain.pool_size": 1,
                "stages.explain.num_cpus": 0.5}
    job = load_job(REPO / "jobs" / "explain_classify_shapes.yaml", overrides=[f"{k}={json.dumps(v)}" for k, v in settings.items()],
                   input=data, output=str(tmp_path / "out"))
    summary = run_job(job, progress=False)
    assert (summary["rows_in"], summary["rows_out"], summary["error_rows"]) == (10, 10, 0)
    rows = [r for s in list_shards(str(tmp_path / "out")) for r in read_shard(s).to_pylist()]
    for row in rows:
        (png,) = row[schema.ATTRIBUTION_MAPS]
        with Image.open(io.BytesIO(png)) as im:
            assert (im.mode, im.size) == ("L", (row[schema.WIDTH], row[schema.HEIGHT]))
            assert np.asarray(im).max() == 255  # scaled per map
        assert row[schema.ATTRIBUTION_IN_BOX] == [None] and row[schema.ATTRIBUTION_PEAK_IN_BOX] == [None]  # a class has no box
    pictures = render_predictions(str(tmp_path / "out"), str(tmp_path / "pictures"), limit=2)
    assert len(pictures["paths"]) == 2

    with pytest.raises(ConfigError, match="class_labels"):  # no classify stage before it: refused before any work
        load_job(REPO / "jobs" / "explain_classify_shapes.yaml", overrides=['stages=[{"name": "explain", "weights": "none", "num_classes": 3}]'],
                 input=data, output=str(tmp_path / "refused"))
