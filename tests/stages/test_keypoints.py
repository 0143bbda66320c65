"""The keypoints stage returns what torchvision's Keypoint R-CNN returns, as flat COCO triples."""

import numpy as np
import pytest
import torch
import torchvision

from pipeline import schema
from pipeline.stages.keypoints import KeypointsSpec, KeypointsStage, flat_keypoints
from tests.stages.helpers import assert_declared_types, boxes_of, make_batch, with_column

SMALL = {"min_size": 128, "max_size": 160, "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100}
# The keypoint head is the expensive part (8 convs of 512 channels per box): few boxes.
STAGE = {"num_classes": 2, "score_threshold": 0.05, "max_detections": 3, "model_kwargs": SMALL}
NAME = "keypointrcnn_resnet50_fpn"
WRITES = KeypointsSpec(name="k", type="keypoints").output_columns()  # detect's columns + keypoints


@pytest.fixture(scope="module")
def keypointrcnn(tmp_path_factory):
    """Random weights with the keypoint predictor scaled up, as a model and as a checkpoint.

    Random heatmaps are nearly flat, so their argmax (the keypoint) jumps under rounding-level
    changes of the input boxes; scaled-up logits give peaked heatmaps. Both sides use them.
    """
    torch.manual_seed(0)
    model = torchvision.models.get_model(
        NAME, weights=None, weights_backbone=None, num_classes=2, box_score_thresh=0.05, box_detections_per_img=3, **SMALL
    )
    with torch.no_grad():
        for p in model.roi_heads.keypoint_predictor.parameters():
            p.mul_(1000.0)
    path = tmp_path_factory.mktemp("ckpt") / "keypointrcnn.pth"
    torch.save({"model": model.state_dict(), "model_name": NAME, "num_classes": 2}, path)
    return model.eval(), str(path)


@pytest.fixture(scope="module")
def stage(keypointrcnn) -> KeypointsStage:
    return KeypointsStage(model=NAME, weights=keypointrcnn[1], **STAGE)


def keypoints_of(row: dict) -> np.ndarray:
    return np.asarray(row[schema.KEYPOINTS], np.float32).reshape(len(row[schema.KEYPOINTS]), -1)


def test_stage_equals_direct_torchvision_call(keypointrcnn, stage, photos):
    reference, _ = keypointrcnn
    compared = 0
    for images in (photos[:1], photos[1:]):  # equal batching on both sides
        out = stage(make_batch(images))
        assert_declared_types(out, WRITES)
        with torch.inference_mode():
            expected = reference([torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255) for im in images])
        for row, exp in zip(out.to_pylist(), expected):
            boxes = boxes_of(row)
            assert boxes.shape == tuple(exp["boxes"].shape)
            assert np.abs(boxes - exp["boxes"].numpy()).max(initial=0) <= 1e-4
            assert np.abs(np.asarray(row["scores"]) - exp["scores"].numpy()).max(initial=0) <= 1e-4
            assert row["labels"] == exp["labels"].tolist()
            kps = keypoints_of(row)
            assert kps.shape == (len(boxes), 17 * 3)
            # [x1, y1, v1, x2, y2, v2, ...]: torchvision's (N, 17, 3) flattened row by row.
            assert np.abs(kps - exp["keypoints"].numpy().reshape(len(boxes), -1)).max(initial=0) <= 1e-4
            compared += len(kps)
    assert compared > 0


def test_flat_keypoints_layout():
    kps = np.arange(2 * 17 * 3, dtype=np.float32).reshape(2, 17, 3)
    flat = flat_keypoints(kps)
    assert flat.shape == (2, 51) and flat[1, :6].tolist() == [51, 52, 53, 54, 55, 56]  # x1, y1, v1, x2, y2, v2
    assert flat_keypoints(np.zeros((0, 17, 3))).shape == (0, 51)


def test_synthetic_images_give_the_declared_schema(stage, synth_images):
    out = stage(make_batch(synth_images[:2]))
    assert_declared_types(out, WRITES)
    for row in out.to_pylist():
        assert len(row["keypoints"]) == len(row["boxes"]) > 0
        assert all(len(k) == 51 for k in row["keypoints"])


def test_boxes_column_runs_the_head_on_earlier_boxes(keypointrcnn, stage, photos):
    """detect -> keypoints: keypoints for given boxes equal the full model's for its own boxes."""
    full = stage(make_batch(photos[:1]))
    heads = KeypointsStage(model=NAME, weights=keypointrcnn[1], boxes_column="boxes", **STAGE)
    assert KeypointsSpec(name="k", type="keypoints", boxes_column="boxes").output_columns() == {"keypoints": schema.KEYPOINTS_TYPE}
    out = heads(full.drop_columns(["keypoints"]))
    assert out.column_names == full.column_names  # only keypoints added
    row = out.to_pylist()[0]
    expected = keypoints_of(full.to_pylist()[0])
    assert len(expected) > 0
    assert np.abs(keypoints_of(row) - expected).max() <= 1e-3  # up to the box round trip's rounding

    # No boxes -> no keypoints; a box with nothing inside the image -> all zeros (v = 0).
    h, w = photos[0].shape[:2]
    batch = with_column(make_batch(photos[:1] * 2), "boxes", [[[w + 10, 0, w + 40, 30], [5, 5, 60, 90]], []], schema.BOXES_TYPE)
    rows = heads(batch).to_pylist()
    assert rows[1]["keypoints"] == []
    kps = keypoints_of(rows[0])
    assert kps.shape == (2, 51) and not kps[0].any()
    assert (kps[1][2::3] == 1).all()  # torchvision marks every predicted keypoint visible


def test_empty_proposals_give_empty_outputs(keypointrcnn, photos):
    stage = KeypointsStage(model=NAME, weights=keypointrcnn[1], proposals_column="proposals", **STAGE)
    batch = with_column(make_batch(photos[:1]), "proposals", [[]], schema.BOXES_TYPE)
    out = stage(batch)
    assert_declared_types(out, WRITES)
    row = out.to_pylist()[0]
    assert row["boxes"] == row["scores"] == row["labels"] == row["keypoints"] == []


def test_spec_validation():
    spec = KeypointsSpec(name="k", type="keypoints", boxes_column="boxes")
    assert spec.output_columns() == {"keypoints": schema.KEYPOINTS_TYPE}
    assert spec.input_columns() == {"boxes_column": ("boxes", schema.BOXES_TYPE)}
    assert spec.stage_kwargs([])["num_classes"] == 2
    with pytest.raises(ValueError, match="has no keypoint head"):
        KeypointsSpec(name="k", type="keypoints", model="maskrcnn_resnet50_fpn")
