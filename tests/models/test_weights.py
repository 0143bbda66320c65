import pytest
import torch
import torchvision

from pipeline.models.registry import build_model, list_models
from pipeline.models.weights import WeightsError, hub_checkpoint_dir, resolve_weights
from pipeline.stages.detect import DetectSpec


def test_registry_has_the_torchvision_detectors():
    names = list_models()
    for required in ("fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn",
                     "ssdlite320_mobilenet_v3_large", "ssd300_vgg16", "fcos_resnet50_fpn", "maskrcnn_resnet50_fpn"):
        assert required in names


def test_uncached_torchvision_weights_name_file_folder_and_url(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache, whatever this machine has
    with pytest.raises(WeightsError) as info:
        resolve_weights("fasterrcnn_resnet50_fpn", "DEFAULT")
    message = str(info.value)
    assert "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth" in message


def test_cached_weights_resolve_without_download(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub_checkpoint_dir().mkdir(parents=True)
    (hub_checkpoint_dir() / "ssdlite320_mobilenet_v3_large_coco-a79551df.pth").write_bytes(b"x")
    resolved = resolve_weights("ssdlite320_mobilenet_v3_large", "COCO_V1")
    assert resolved.kind == "torchvision" and resolved.categories()[1] == "person"


def test_unknown_weights_name_lists_known():
    with pytest.raises(WeightsError, match="COCO_V1"):
        resolve_weights("fasterrcnn_resnet50_fpn", "IMAGENET_V9")


def test_checkpoint_roundtrip_and_wrong_architecture(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=4)
    good = tmp_path / "good.pth"
    torch.save({"model": model.state_dict(), "model_name": "ssdlite320_mobilenet_v3_large", "num_classes": 4,
                "categories": [{"label": 1, "name": "circle"}]}, good)
    built, categories = build_model("ssdlite320_mobilenet_v3_large", resolve_weights("ssdlite320_mobilenet_v3_large", str(good)))
    assert categories == [{"label": 1, "name": "circle"}]
    for key, value in model.state_dict().items():
        assert torch.equal(built.state_dict()[key], value)

    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)  # a bare state dict of another architecture
    spec = DetectSpec(name="detect", type="detect", model="fasterrcnn_mobilenet_v3_large_320_fpn", weights=str(bare), num_classes=4)
    with pytest.raises(WeightsError, match="does not fit model fasterrcnn_mobilenet_v3_large_320_fpn"):
        spec.preflight()  # fails before any data is read, without building the real model


def test_missing_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(WeightsError, match="not found: .*nothere.pth"):
        resolve_weights("fasterrcnn_resnet50_fpn", str(tmp_path / "nothere.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    spec = DetectSpec(name="detect", type="detect", weights=str(junk))
    with pytest.raises(WeightsError, match="cannot load checkpoint .*junk.pth"):
        spec.preflight()
