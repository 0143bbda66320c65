import hashlib
import shutil

import pytest
import torch
import torchvision

from pipeline.models.registry import build_model, list_models
from pipeline.models.weights import (
    WeightsError,
    hash_prefix,
    hub_checkpoint_dir,
    load_checkpoint,
    load_hub_file,
    load_weights_file,
    resolve_weights,
    torchvision_loads_safely,
)
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
    payload = b"stand-in for the published file"
    name = f"ssdlite320_mobilenet_v3_large_coco-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    (hub_checkpoint_dir() / name).write_bytes(payload)
    enum = torchvision.models.get_weight("SSDLite320_MobileNet_V3_Large_Weights.COCO_V1")
    monkeypatch.setattr(enum.value, "url", f"https://download.pytorch.org/models/{name}")  # see _point_enum_at
    resolved = resolve_weights("ssdlite320_mobilenet_v3_large", "COCO_V1")
    assert resolved.kind == "torchvision" and resolved.categories()[0] == {"label": 1, "name": "person"}


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


# --- named torchvision weights are hash-checked and never unpickled -------------------------------

SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"
SMALL_FILE = "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"  # fixed by torchvision


class _WritesMarker:
    """Unpickling this runs code: it writes ``path`` (what a crafted .pth in the hub cache could do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def _malicious_file(folder, stem, marker):
    """A torch.save'd pickle that writes ``marker`` when unpickled, named ``stem-<its own sha256 prefix>.pth``."""
    tmp = folder / "payload.tmp"
    torch.save({"model": _WritesMarker(marker)}, tmp)
    path = folder / f"{stem}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(path)
    return path


def test_hash_prefix_of_hub_names():
    assert hash_prefix(SMALL_FILE) == "907ea3f9"
    assert hash_prefix("https://download.pytorch.org/models/vgg16_features-amdegroot-88682ab5.pth") == "88682ab5"
    assert hash_prefix("model.pth") is None and hash_prefix("run-final.pth") is None


def test_load_function_refuses_a_malicious_pickle_with_a_correct_hash(tmp_path):
    marker = tmp_path / "marker"
    path = _malicious_file(tmp_path, "evil", marker)  # the hash check passes: weights_only is what refuses
    for call in (lambda: load_weights_file(path, sha256_prefix=hash_prefix(path.name)),
                 lambda: load_hub_file(f"https://download.pytorch.org/models/{path.name}", model_dir=tmp_path),
                 lambda: load_checkpoint(str(path))):
        with pytest.raises(WeightsError, match=r"refused to load .*evil-[0-9a-f]{8}\.pth: it needs exec to be unpickled"):
            call()
        assert not marker.exists()
    # The payload is real: an unsafe load runs it. (Proves the test above could fail.)
    assert torch.load(path, weights_only=False) == {"model": None}  # exec ran and returned None
    assert marker.read_text() == "pwned"


def test_malicious_file_under_the_expected_hub_name_is_refused_before_loading(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub_checkpoint_dir().mkdir(parents=True)
    marker = tmp_path / "marker"
    crafted = _malicious_file(tmp_path, "crafted", marker)
    shutil.copy(crafted, hub_checkpoint_dir() / SMALL_FILE)
    actual = hashlib.sha256(crafted.read_bytes()).hexdigest()

    with pytest.raises(WeightsError) as info:
        resolve_weights(SMALL, "DEFAULT")  # what preflight calls: no data read yet
    message = str(info.value)
    assert str(hub_checkpoint_dir() / SMALL_FILE) in message and "hash check" in message
    assert "starts with 907ea3f9" in message and actual in message
    assert "https://download.pytorch.org/models/" + SMALL_FILE in message

    enum = torchvision.models.get_weight("FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1")
    from pipeline.models.weights import ResolvedWeights

    with pytest.raises(WeightsError, match="907ea3f9"):  # the load itself checks too, whoever resolved
        build_model(SMALL, ResolvedWeights("torchvision", enum=enum))
    with pytest.raises(WeightsError, match="failed its hash check"):  # and so does torchvision's own builder call
        with torchvision_loads_safely():
            torchvision.models.get_model(SMALL, weights="DEFAULT")
    assert torchvision.models._api.load_state_dict_from_url is torch.hub.load_state_dict_from_url  # restored
    assert torch.hub.load_state_dict_from_url.__module__ == "torch.hub"

    spec = DetectSpec(name="detect", type="detect", model=SMALL, weights="DEFAULT")
    with pytest.raises(WeightsError, match="failed its hash check"):
        spec.preflight()
    assert not marker.exists()


def _point_enum_at(monkeypatch, enum, file_name):
    """Make ``enum`` name ``file_name`` instead of the published file.

    Unavoidable for a happy-path test: the published file's sha256 is fixed by its name, and that
    file cannot be downloaded here (nor forged). monkeypatch restores the URL after the test.
    """
    monkeypatch.setattr(enum.value, "url", f"https://download.pytorch.org/models/{file_name}")


def test_correct_hub_file_builds_through_the_safe_loader(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub_checkpoint_dir().mkdir(parents=True)
    torch.manual_seed(3)
    reference = torchvision.models.get_model(SMALL, weights=None, weights_backbone=None, num_classes=91)
    tmp = tmp_path / "state.pth"
    torch.save(reference.state_dict(), tmp)  # BatchNorm keys; FrozenBatchNorm2d drops num_batches_tracked on load
    name = f"{SMALL}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    shutil.move(tmp, hub_checkpoint_dir() / name)
    enum = torchvision.models.get_weight("FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1")
    _point_enum_at(monkeypatch, enum, name)

    resolved = resolve_weights(SMALL, "COCO_V1")
    built, categories = build_model(SMALL, resolved, score_threshold=0.3)
    assert categories[0] == {"label": 1, "name": "person"}  # __background__ and N/A left out
    assert any(isinstance(m, torchvision.ops.FrozenBatchNorm2d) for m in built.modules())  # the builder's pretrained path
    assert built.roi_heads.box_predictor.cls_score.out_features == 91 and built.roi_heads.score_thresh == 0.3
    state = built.state_dict()
    for key, value in reference.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(state[key], value), key

    # One byte changed after resolving: the load refuses it (the hash is checked again when read).
    path = hub_checkpoint_dir() / name
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=f"{name} failed its hash check"):
        build_model(SMALL, resolved)


def test_vgg_of_the_style_loss_reads_the_hub_file_through_the_safe_loader(monkeypatch, tmp_path):
    from pipeline.models.transformer_net import DEFAULT_VGG, Vgg16Features, build_vgg, check_vgg_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub_checkpoint_dir().mkdir(parents=True)
    marker = tmp_path / "marker"
    shutil.copy(_malicious_file(tmp_path, "crafted", marker), hub_checkpoint_dir() / "vgg16-397923af.pth")
    with pytest.raises(WeightsError, match="vgg16-397923af.pth failed its hash check: .*starts with 397923af"):
        check_vgg_weights(DEFAULT_VGG)
    assert not marker.exists()

    torch.manual_seed(0)
    reference = Vgg16Features()
    tmp = tmp_path / "vgg.pth"
    torch.save(reference.state_dict(), tmp)  # features.N.* keys only (the classifier is ignored anyway)
    name = f"vgg16-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    shutil.move(tmp, hub_checkpoint_dir() / name)
    _point_enum_at(monkeypatch, torchvision.models.get_weight(DEFAULT_VGG), name)
    vgg = build_vgg(DEFAULT_VGG)
    assert torch.equal(vgg.features[0].weight, reference.features[0].weight)
