"""The detect stage must return what a direct torchvision call returns (max abs diff <= 1e-4)."""

import numpy as np
import pyarrow as pa
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms.functional import to_tensor

from pipeline import schema
from pipeline.data.decode import decode_batch
from pipeline.models.registry import get_entry
from pipeline.stages.detect import DetectSpec, DetectStage, category_mapping
from tests.conftest import FAST_DETECT

MODELS = ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large", "retinanet_resnet50_fpn", "fcos_resnet50_fpn"]


@pytest.fixture(scope="module")
def photos(fixtures_dir):
    """Three real photos, downscaled so the heavier models stay quick on two cores."""
    out = []
    for name in ("astronaut.png", "chelsea.png", "coffee.png"):
        img = Image.open(fixtures_dir / "images" / "skimage" / name).convert("RGB")
        img.thumbnail((160, 160))
        out.append(np.asarray(img))
    return out


def _batch(images: list[np.ndarray]) -> pa.Table:
    rows = [
        {"image_id": i, "file_name": f"{i}.png", "width": im.shape[1], "height": im.shape[0], "image": _png(im)}
        for i, im in enumerate(images)
    ]
    return decode_batch(schema.image_table(rows))


def _png(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("model_name", MODELS)
def test_stage_equals_direct_torchvision_call(tmp_path, photos, model_name):
    torch.manual_seed(0)
    kwargs = {"min_size": 160, "max_size": 160} if not model_name.startswith("ssd") else {}
    entry = get_entry(model_name)  # the same settings the stage passes into the model
    settings = {entry.score_kwarg: 0.005, entry.max_dets_kwarg: 100}  # random RetinaNet scores ~0.01
    reference = torchvision.models.get_model(
        model_name, weights=None, weights_backbone=None, num_classes=5, **kwargs, **settings
    ).eval()
    checkpoint = tmp_path / "w.pth"
    torch.save(reference.state_dict(), checkpoint)
    stage = DetectStage(model=model_name, weights=str(checkpoint), num_classes=5, score_threshold=0.005, max_detections=100, model_kwargs=kwargs)
    # One image per call, then one call with the two same-sized photos: a batch of mixed sizes is
    # zero-padded to a common size inside torchvision, which changes border features for a direct
    # call just the same, so the comparison is made at equal batching.
    groups = [[0], [1], [2], [1, 2]]
    total = 0
    for group in groups:
        images = [photos[i] for i in group]
        out = stage(_batch(images)).to_pylist()
        with torch.inference_mode():
            expected = reference([to_tensor(np.array(im)) for im in images])
        for row, exp in zip(out, expected):
            boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)
            assert boxes.shape == tuple(exp["boxes"].shape)
            if len(boxes):
                assert np.abs(boxes - exp["boxes"].numpy()).max() <= 1e-4
                assert np.abs(np.asarray(row["scores"]) - exp["scores"].numpy()).max() <= 1e-4
                assert row["labels"] == exp["labels"].tolist() == row["category_ids"]
            total += len(boxes)
    assert total > 0, "random weights at threshold 0.005 should still produce some boxes to compare"


def test_boxes_are_in_original_pixels(photos):
    stage = DetectStage(**{k: v for k, v in FAST_DETECT.items()}, max_detections=20)
    big = np.asarray(Image.fromarray(photos[0]).resize((400, 300)))
    row = stage(_batch([big])).to_pylist()[0]
    boxes = np.asarray(row["boxes"]).reshape(-1, 4)
    assert len(boxes) > 0
    assert boxes[:, [0, 2]].max() <= 400 and boxes[:, [1, 3]].max() <= 300
    assert boxes[:, 2].max() > 160  # not left in the model's internal 128-160 px frame


def test_category_mapping_by_name_and_explicit():
    model = [{"label": 1, "name": "person"}, {"label": 3, "name": "car"}, {"label": 4, "name": "bus"}]
    dataset = [{"id": 10, "name": "car"}, {"id": 20, "name": "person"}]
    assert category_mapping("auto", model, dataset) == {1: 20, 3: 10}
    assert category_mapping("identity", model, dataset) is None
    assert category_mapping("auto", None, dataset) is None
    assert category_mapping({1: 7}, model, dataset) == {1: 7}
    with pytest.raises(ValueError, match="by_name needs weights"):
        category_mapping("by_name", None, dataset)


def test_spec_device_follows_gpus():
    assert DetectSpec(name="d", type="detect", num_gpus=0.5).stage_kwargs([])["device"] == "cuda"
    assert DetectSpec(name="d", type="detect").stage_kwargs([])["device"] == "cpu"
    assert DetectSpec(name="d", type="detect", num_cpus=1.5).stage_kwargs([])["threads"] == 2


def test_fast_rcnn_mode_equals_torchvision_with_the_rpn_replaced(tmp_path, photos):
    """proposals_column: RoI heads on given boxes == a torchvision forward whose RPN returned them."""
    from torchvision.models.detection.transform import resize_boxes

    name = FAST_DETECT["model"]
    torch.manual_seed(3)
    reference = torchvision.models.get_model(
        name, weights=None, weights_backbone=None, num_classes=4, box_score_thresh=0.2, box_detections_per_img=100,
        **FAST_DETECT["model_kwargs"],
    ).eval()
    checkpoint = tmp_path / "w.pth"
    torch.save(reference.state_dict(), checkpoint)
    stage = DetectStage(**{**FAST_DETECT, "weights": str(checkpoint)}, proposals_column="proposals")
    image = photos[2]
    h, w = image.shape[:2]
    xy = np.random.default_rng(1).uniform(0, [w - 30, h - 30], size=(25, 2))
    proposals = np.concatenate([xy, xy + 25], axis=1).astype(np.float32)
    batch = _batch([image]).append_column("proposals", pa.array([proposals.tolist()], schema.BOXES_TYPE))
    row = stage(batch).to_pylist()[0]

    class FixedRPN(torch.nn.Module):
        def forward(self, images, features, targets=None):
            return [resize_boxes(torch.from_numpy(proposals), (h, w), images.image_sizes[0])], {}

    reference.rpn = FixedRPN()
    with torch.inference_mode():
        expected = reference([to_tensor(np.array(image))])[0]
    boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)
    assert boxes.shape == tuple(expected["boxes"].shape) and len(boxes) > 0
    assert np.abs(boxes - expected["boxes"].numpy()).max() <= 1e-4
    assert np.abs(np.asarray(row["scores"]) - expected["scores"].numpy()).max() <= 1e-4

    # Malformed proposals raise a ValueError naming the column; an empty list detects nothing.
    for cells, message in (([[[5, 5, 1, 1]]], "not COCO xywh"), ([[[0, 0, float("inf"), 9]]], "not finite")):
        with pytest.raises(ValueError, match=f"proposals: box 0 .*{message}"):
            stage(batch.set_column(batch.column_names.index("proposals"), "proposals", pa.array(cells, schema.BOXES_TYPE)))
    empty = batch.set_column(batch.column_names.index("proposals"), "proposals", pa.array([[]], schema.BOXES_TYPE))
    assert stage(empty).to_pylist()[0]["boxes"] == []


def test_output_prefix_and_rcnn_only_proposals(photos):
    stage = DetectStage(**FAST_DETECT, output_prefix="det_")
    out = stage(_batch(photos[:1]))
    declared = DetectSpec(name="d", type="detect", output_prefix="det_").output_columns()
    assert list(declared) == ["det_boxes", "det_scores", "det_labels", "det_category_ids"] == out.column_names[-4:]
    assert all(out.schema.field(name).type == dtype for name, dtype in declared.items())
    with pytest.raises(ValueError, match="proposals_column needs an R-CNN model"):
        DetectSpec(name="d", type="detect", model="ssdlite320_mobilenet_v3_large", proposals_column="proposals")
