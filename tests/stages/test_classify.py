"""The classify stage gives what a direct torchvision call gives: the weights' preprocessing, the model, softmax, top k."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms._presets import ImageClassification

from pipeline import schema
from pipeline.config.load import ConfigError
from pipeline.data.decode import decode_batch
from pipeline.data.shards import list_shards, read_shard
from pipeline.engine.jobfile import load_job
from pipeline.engine.preflight import preflight
from pipeline.engine.stage_actor import StageActor
from pipeline.models.registry import list_models
from pipeline.models.weights import WeightsError, hub_checkpoint_dir, resolve_weights
from pipeline.stages.classify import CLASSIFY_COLUMNS, ClassifySpec, ClassifyStage, classification_transform
from tests.badimages import HUGE_LIMIT, write_bad_dataset
from tests.conftest import REPO
from tests.stages.helpers import make_batch

ARCHITECTURES = ["resnet18", "mobilenet_v3_small"]
CLASSES = 10
SMALL = {"resize": 72, "crop": 64}  # small inputs: quick on two cores


@pytest.fixture(scope="module")
def images(fixtures_dir) -> list[np.ndarray]:
    """Three photos at <= 90 px (landscape and portrait) and a synthetic shape image: four sizes."""
    from pipeline.data.synth import synth_classification_image

    out = []
    for name in ("astronaut.png", "chelsea.png", "coffee.png"):
        img = Image.open(fixtures_dir / "images" / "skimage" / name).convert("RGB")
        img.thumbnail((90, 90))
        out.append(np.asarray(img))
    out[1] = np.ascontiguousarray(out[1].transpose(1, 0, 2))  # portrait: the crop must take the middle of the long side
    out.append(np.asarray(Image.open(io.BytesIO(synth_classification_image(3, 0, size=80)[0])).convert("RGB")))
    assert len({im.shape for im in out}) == 4
    return out


def direct(model: torch.nn.Module, images: list[np.ndarray], transform) -> np.ndarray:
    """torchvision by hand: ``transform`` on each (3, H, W) uint8 tensor, one batch, softmax: (N, C) probabilities."""
    x = torch.stack([transform(torch.from_numpy(np.array(im)).permute(2, 0, 1)) for im in images])
    with torch.inference_mode():
        return torch.softmax(model(x), dim=1).numpy()


def check_rows(rows: list[dict], probabilities: np.ndarray, k: int, *, exact_order: bool = True) -> None:
    """Each row holds the k best classes of its image, best first, with their probabilities within 1e-4.

    ``exact_order``: the labels are numpy's ranking itself. Without it (a random network whose
    probabilities tie), any k labels do whose probabilities are the k largest within 1e-4.
    """
    for row, p in zip(rows, probabilities):
        order = np.argsort(-p, kind="stable")[:k]  # numpy's ranking, independent of torch.topk
        labels, scores = np.asarray(row[schema.CLASS_LABELS]), np.asarray(row[schema.CLASS_SCORES])
        assert len(labels) == len(set(labels.tolist())) == k
        np.testing.assert_allclose(scores, p[order], atol=1e-4, rtol=0)  # the k largest probabilities, descending
        np.testing.assert_allclose(scores, p[labels], atol=1e-4, rtol=0)  # ... and they belong to these labels
        assert scores.tolist() == sorted(scores.tolist(), reverse=True)
        if exact_order:
            assert labels.tolist() == order.tolist()
        assert row[schema.CLASS_CATEGORY_IDS] == labels.tolist()  # no dataset names: identity


def calibrated(model: torch.nn.Module, images: list[np.ndarray], transform) -> torch.nn.Module:
    """BatchNorm statistics of ``images`` (one pass in train mode) and a head with a wider spread, then eval mode.

    A freshly initialised MobileNetV3 (BatchNorm at mean 0 / var 1, head weights of std 0.01) gives
    nearly the same probability to every class, which would make the comparison weak.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, 0, 0.5)
    model.train()
    with torch.no_grad():
        model(torch.stack([transform(torch.from_numpy(np.array(im)).permute(2, 0, 1)) for im in images]))
    return model.eval()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_random_init_equals_a_direct_torchvision_call(images, name):
    """weights: none builds the model seeded (torch.manual_seed(0)): the same network a direct call seeded alike gets."""
    stage = ClassifyStage(model=name, weights="none", num_classes=CLASSES, top_k=3, **SMALL)
    torch.manual_seed(0)
    reference = torchvision.models.get_model(name, weights=None, num_classes=CLASSES).eval()
    weights_transform = torchvision.models.get_model_weights(name).DEFAULT.transforms(crop_size=SMALL["crop"], resize_size=SMALL["resize"])
    out = stage(make_batch(images))
    assert out.schema.names[-3:] == list(CLASSIFY_COLUMNS)
    check_rows(out.to_pylist(), direct(reference, images, weights_transform), k=3, exact_order=False)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_checkpoint_with_spread_outputs_equals_a_direct_torchvision_call(tmp_path, images, name):
    """A calibrated network (probabilities far from uniform, best class varying by image), loaded as a .pth."""
    transform = ImageClassification(crop_size=SMALL["crop"], resize_size=SMALL["resize"])
    torch.manual_seed(1)
    reference = calibrated(torchvision.models.get_model(name, weights=None, num_classes=CLASSES), images, transform)
    path = tmp_path / "model.pth"
    torch.save(reference.state_dict(), path)  # a bare state dict
    stage = ClassifyStage(model=name, weights=str(path), num_classes=CLASSES, top_k=5, **SMALL)
    probabilities = direct(reference, images, transform)
    rows = stage(make_batch(images)).to_pylist()
    check_rows(rows, probabilities, k=5)
    assert probabilities.max() > 3 / CLASSES, "probabilities too flat to compare much"
    assert len({tuple(r[schema.CLASS_LABELS]) for r in rows}) >= 2, "the ranking should differ between images"


def test_default_sizes_are_image_classifications_defaults(images):
    """resize/crop auto with weights none: ImageClassification's resize 256 and torchvision's 224 crop."""
    stage = ClassifyStage(model="resnet18", num_classes=CLASSES)  # every other setting from ClassifySpec's defaults
    assert (stage.transform.resize_size, stage.transform.crop_size, stage.top_k) == ([256], [224], 5)
    torch.manual_seed(0)
    reference = torchvision.models.get_model("resnet18", weights=None, num_classes=CLASSES).eval()
    check_rows(stage(make_batch(images[:2])).to_pylist(), direct(reference, images[:2], ImageClassification(crop_size=224)), k=5,
               exact_order=False)


def test_top_k_is_capped_at_the_number_of_classes(images):
    stage = ClassifyStage(model="mobilenet_v3_small", num_classes=4, top_k=50, **SMALL)
    rows = stage(make_batch(images)).to_pylist()
    for row in rows:
        assert sorted(row[schema.CLASS_LABELS]) == [0, 1, 2, 3]  # every class once
        assert sum(row[schema.CLASS_SCORES]) == pytest.approx(1.0, abs=1e-5)  # the whole softmax


def test_checkpoint_sizes_categories_and_map_by_name(tmp_path, images):
    """A project checkpoint says its input sizes ("resize", "crop") and class names; auto maps names to category ids."""
    from pipeline.data.synth import CATEGORIES as SHAPES

    torch.manual_seed(2)
    transform = ImageClassification(crop_size=32, resize_size=40)
    model = calibrated(torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=4), images, transform)
    names = [{"label": 0, "name": "triangle"}, {"label": 1, "name": "circle"}, {"label": 2, "name": "rectangle"}, {"label": 3, "name": "star"}]
    path = tmp_path / "shapes.pth"
    torch.save({"model": model.state_dict(), "model_name": "mobilenet_v3_small", "num_classes": 4, "categories": names,
                "resize": 40, "crop": 32}, path)
    spec = ClassifySpec(name="c", type="classify", model="mobilenet_v3_small", weights=str(path))
    spec.preflight()
    assert spec.model_categories() == names
    stage = spec.stage_class()(**spec.stage_kwargs(SHAPES))
    assert (stage.transform.resize_size, stage.transform.crop_size) == ([40], [32])
    assert stage.label_to_category == {0: 3, 1: 1, 2: 2}  # "star" is no category of the dataset: -1
    rows = stage(make_batch(images)).to_pylist()
    lut = {0: 3, 1: 1, 2: 2, 3: -1}
    for row in rows:
        assert row[schema.CLASS_CATEGORY_IDS] == [lut[label] for label in row[schema.CLASS_LABELS]]
    probabilities = direct(model, images, transform)
    check_rows([r | {schema.CLASS_CATEGORY_IDS: r[schema.CLASS_LABELS]} for r in rows], probabilities, k=4, exact_order=False)
    assert [r[schema.CLASS_LABELS][0] for r in rows] == probabilities.argmax(1).tolist()
    assert probabilities.max() > 0.5, "probabilities too flat to compare much"
    # Set explicitly, the sizes win over the checkpoint's.
    assert classification_transform(resolve_weights("mobilenet_v3_small", str(path)), resize=50).resize_size == [50]


def test_torchvision_weights_from_the_hub_cache_bring_their_transforms_and_names(monkeypatch, tmp_path, images):
    """weights: DEFAULT reads the hash-named hub file through the safe loader, with its own transforms and ImageNet's names."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub_checkpoint_dir().mkdir(parents=True)
    torch.manual_seed(4)
    reference = torchvision.models.get_model("resnet18", weights=None).eval()
    tmp = tmp_path / "state.pth"
    torch.save(reference.state_dict(), tmp)
    name = f"resnet18-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    shutil.move(tmp, hub_checkpoint_dir() / name)
    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setattr(enum.value, "url", f"https://download.pytorch.org/models/{name}")  # the published file's hash is in its name

    dataset = [{"id": 7, "name": "tabby"}, {"id": 9, "name": "goldfish"}]
    spec = ClassifySpec(name="c", type="classify", model="resnet18", weights="DEFAULT", top_k=1000)
    spec.preflight()
    categories = spec.model_categories()
    assert len(categories) == 1000 and categories[1] == {"label": 1, "name": "goldfish"} and categories[281]["name"] == "tabby"
    stage = spec.stage_class()(**spec.stage_kwargs(dataset))
    assert repr(stage.transform) == repr(enum.transforms())  # resize 256, crop 224, bilinear, ImageNet's mean/std
    rows = stage(make_batch(images[:2])).to_pylist()
    check = direct(reference, images[:2], enum.transforms())
    lut = {281: 7, 1: 9}
    for row, p in zip(rows, check):
        assert row[schema.CLASS_LABELS] == np.argsort(-p, kind="stable").tolist()
        np.testing.assert_allclose(row[schema.CLASS_SCORES], np.sort(p)[::-1], atol=1e-4, rtol=0)
        assert row[schema.CLASS_CATEGORY_IDS] == [lut.get(label, -1) for label in row[schema.CLASS_LABELS]]


def test_default_weights_offline_fail_before_any_data_naming_the_file(monkeypatch, tmp_path, synth_ds):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache, whatever this machine has
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(WeightsError) as info:
        ClassifySpec(name="classify", type="classify", model="mobilenet_v3_small", weights="DEFAULT").preflight()
    message = str(info.value)
    assert "mobilenet_v3_small-047dcff4.pth" in message and str(hub) in message
    assert "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth" in message

    reads = []
    monkeypatch.setattr("pipeline.data.shards.iter_shard", lambda *a, **k: reads.append(a))
    out = tmp_path / "out"
    job = load_job(REPO / "jobs" / "classify.yaml", overrides=["stages.classify.weights=DEFAULT"], input=synth_ds, output=str(out))
    with pytest.raises(ConfigError, match=r"jobs/classify.yaml: stages.0 \(classify\): weights .* resnet18-f37072fd.pth in "):
        preflight(job, "jobs/classify.yaml")
    assert not out.exists() and not reads


def test_a_checkpoint_of_another_architecture_fails_before_any_data(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=3).state_dict(), path)
    with pytest.raises(WeightsError, match=r"other.pth does not fit model resnet18: .*missing"):
        ClassifySpec(name="c", type="classify", model="resnet18", weights=str(path), num_classes=3).preflight()


def test_error_rows_pass_through_the_actor(tmp_path):
    """Through the engine's decode + StageActor (no Ray): every row out once, bad ones with null outputs."""
    src = str(tmp_path / "bad")
    expected = write_bad_dataset(src, rows_per_shard=100)
    batch = decode_batch(read_shard(list_shards(src)[0]), max_pixels=HUGE_LIMIT)  # huge.png: an error row
    actor = StageActor(stage_name="classify", stage_cls=ClassifyStage,
                       stage_kwargs={"model": "mobilenet_v3_small", "num_classes": 3, "threads": 1, **SMALL},
                       output_columns=ClassifySpec(name="classify", type="classify").output_columns(), drop_columns=(schema.PIXELS,))
    out = actor(batch)
    assert out.schema.names[-3:] == list(CLASSIFY_COLUMNS) and schema.PIXELS not in out.schema.names
    rows = out.to_pylist()
    assert Counter(r["image_id"] for r in rows) == Counter(list(expected))
    for row in rows:
        name, expectation = expected[row["image_id"]]
        if expectation == "error":
            assert row["error"] and all(row[c] is None for c in CLASSIFY_COLUMNS), name
        else:
            assert row["error"] is None, (name, row["error"])
            assert len(row[schema.CLASS_LABELS]) == 3 and len(row[schema.CLASS_SCORES]) == 3


def test_spec_refuses_other_models_unknown_kwargs_and_a_vit_crop_it_cannot_take():
    assert {"resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16"} <= set(list_models("classify"))
    with pytest.raises(ValueError, match="not a classification model; use one of .*resnet18"):
        ClassifySpec(name="c", type="classify", model="fasterrcnn_resnet50_fpn")
    with pytest.raises(ValueError, match=r"model_kwargs.zero_init_residul\n.*did you mean zero_init_residual"):
        ClassifySpec(name="c", type="classify", model="resnet18", model_kwargs={"zero_init_residul": True})
    with pytest.raises(ValueError, match="crop 64 is not vit_b_16's image_size 224"):
        ClassifySpec(name="c", type="classify", model="vit_b_16", crop=64)
    ClassifySpec(name="c", type="classify", model="vit_b_16", crop=64, model_kwargs={"image_size": 64})
    with pytest.raises(ValueError, match="top_k"):
        ClassifySpec(name="c", type="classify", top_k=0)


@pytest.mark.ray
def test_job_on_embedded_ray_is_evaluated_against_the_labels(ray_local, tmp_path):
    """jobs/classify.yaml on a labelled synthetic set: predictions as the stage gives them, metrics.json from the labels."""
    from pipeline.data.synth import synth_dataset
    from pipeline.engine.runner import run_job

    data = str(tmp_path / "shapes")
    synth_dataset(data, images=12, seed=5, size=64, rows_per_shard=6, classification=True)
    settings = {"stages.classify.model": "mobilenet_v3_small", "stages.classify.num_classes": 4, "stages.classify.resize": 64,
                "stages.classify.crop": 64, "stages.classify.num_cpus": 0.5, "stages.classify.pool_size": 1}
    job = load_job(REPO / "jobs" / "classify.yaml", overrides=[f"{k}={json.dumps(v)}" for k, v in settings.items()],
                   input=data, output=str(tmp_path / "out"))
    summary = run_job(job, progress=False)
    assert (summary["rows_in"], summary["rows_out"], summary["error_rows"]) == (12, 12, 0)
    rows = {r["image_id"]: r for s in list_shards(str(tmp_path / "out")) for r in read_shard(s).to_pylist()}
    sources = [r for s in list_shards(data) for r in read_shard(s).to_pylist()]
    stage = ClassifyStage(model="mobilenet_v3_small", num_classes=4, resize=64, crop=64)
    again = stage(make_batch([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in sources])).to_pylist()
    for source, row in zip(sources, again):
        assert rows[source["image_id"]][schema.CLASS_LABELS] == row[schema.CLASS_LABELS]
        np.testing.assert_allclose(rows[source["image_id"]][schema.CLASS_SCORES], row[schema.CLASS_SCORES], atol=1e-5)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["classification"]
    hits = sum(rows[s["image_id"]][schema.CLASS_CATEGORY_IDS][0] == s[schema.LABEL] for s in sources)
    assert metrics["top1"] == pytest.approx(hits / 12) and metrics["top5"] is None  # 3 categories: no top-5
    assert metrics["counts"]["images"] == 12 and summary["classification_top1"] == round(hits / 12, 4)
