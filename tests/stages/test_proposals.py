"""Region proposals: the RPN's own boxes and scores, and OpenCV selective search, reproducibly."""

import ctypes

import cv2
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pydantic import ValidationError
from torchvision.models.detection.transform import resize_boxes

from pipeline import schema
from pipeline.stages.proposals import ProposalsSpec, ProposalsStage, rank_scores
from tests.stages.helpers import assert_declared_types, boxes_of, make_batch

NAME = "fasterrcnn_mobilenet_v3_large_320_fpn"
SMALL = {"min_size": 128, "max_size": 160, "rpn_pre_nms_top_n_test": 200}
WRITES = ProposalsSpec(name="p", type="proposals", method="rpn").output_columns()  # proposals, proposal_scores


@pytest.fixture(scope="module")
def rpn_model(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.get_model(
        NAME, weights=None, weights_backbone=None, num_classes=4, rpn_post_nms_top_n_test=60, **SMALL
    ).eval()
    path = tmp_path_factory.mktemp("ckpt") / "rpn.pth"
    torch.save({"model": model.state_dict(), "model_name": NAME, "num_classes": 4}, path)
    return model, str(path)


@pytest.fixture(scope="module")
def rpn_stage(rpn_model) -> ProposalsStage:
    return ProposalsStage(method="rpn", top_k=60, model=NAME, weights=rpn_model[1], model_kwargs=SMALL)


def direct_rpn(model, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's own RPN forward; the scores it computes and drops are caught on the way out."""
    caught = {}
    filter_proposals = model.rpn.filter_proposals

    def catch(*args, **kwargs):
        caught["boxes"], caught["scores"] = filter_proposals(*args, **kwargs)
        return caught["boxes"], caught["scores"]

    x = [torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)]
    model.rpn.filter_proposals = catch
    try:
        with torch.inference_mode():
            images, _ = model.transform(x)
            boxes, _ = model.rpn(images, model.backbone(images.tensors))
    finally:
        del model.rpn.filter_proposals
    assert torch.equal(boxes[0], caught["boxes"][0])
    # The RPN works in the resized frame; torchvision maps boxes back with resize_boxes.
    return resize_boxes(boxes[0], images.image_sizes[0], image.shape[:2]).numpy(), caught["scores"][0].numpy()


def test_rpn_equals_torchvisions_rpn(rpn_model, rpn_stage, photos):
    model, _ = rpn_model
    big = np.asarray(Image.fromarray(photos[0]).resize((400, 300)))  # original frame != model frame
    for image in (photos[1], big):
        row = rpn_stage(make_batch([image])).to_pylist()[0]
        boxes, scores = boxes_of(row, "proposals"), np.asarray(row["proposal_scores"], np.float32)
        expected_boxes, expected_scores = direct_rpn(model, image)
        assert boxes.shape == expected_boxes.shape and 0 < len(boxes) <= 60
        assert np.abs(boxes - expected_boxes).max() <= 1e-4
        assert np.abs(scores - expected_scores).max() <= 1e-4
        assert (np.diff(scores) <= 0).all() and ((scores > 0) & (scores < 1)).all()  # objectness probabilities
    h, w = big.shape[:2]
    assert boxes[:, [0, 2]].max() <= w and boxes[:, [1, 3]].max() <= h and boxes[:, 2].max() > 160


def test_rpn_on_synthetic_images(rpn_stage, synth_images):
    out = rpn_stage(make_batch(synth_images))
    assert_declared_types(out, WRITES)
    for row in out.to_pylist():
        assert 0 < len(row["proposals"]) == len(row["proposal_scores"]) <= 60


def test_selective_search_equals_opencv_and_is_reproducible(photos):
    stage = ProposalsStage(method="selective_search", mode="fast", top_k=200, seed=5)
    image = photos[0]
    out = stage(make_batch([image, image]))
    assert_declared_types(out, WRITES)
    first, second = out.to_pylist()
    assert first["proposals"] == second["proposals"]  # seeded: the same ranking every time

    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(image[:, :, ::-1]))  # OpenCV wants BGR
    search.switchToSelectiveSearchFast()
    ctypes.CDLL(None).srand(5)
    rects = search.process()[:200].astype(np.float32)  # x, y, w, h
    expected = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)  # -> x1, y1, x2, y2
    np.testing.assert_array_equal(boxes_of(first, "proposals"), expected)
    assert first["proposal_scores"] == rank_scores(200).tolist()
    assert first["proposal_scores"][:3] == pytest.approx([1.0, 0.5, 1 / 3])


def test_selective_search_modes_caps_and_downscaling(photos, synth_images):
    image = photos[1]
    fast = ProposalsStage(method="selective_search", mode="fast", top_k=5000).selective_search(image)[0]
    quality = ProposalsStage(method="selective_search", mode="quality", top_k=5000).selective_search(image)[0]
    assert len(quality) > len(fast) > 50  # quality: more strategies and segmentations, more boxes
    capped = ProposalsStage(method="selective_search", top_k=20).selective_search(image)[0]
    np.testing.assert_array_equal(capped, fast[:20])

    h, w = image.shape[:2]
    small = ProposalsStage(method="selective_search", top_k=5000, max_side=64).selective_search(image)[0]
    assert 0 < len(small) < len(fast)
    assert small[:, [0, 2]].max() <= w and small[:, [1, 3]].max() <= h and small[:, 2].max() > 64  # original pixels

    out = ProposalsStage(method="selective_search", top_k=100)(make_batch(synth_images))
    for row in out.to_pylist():
        boxes = boxes_of(row, "proposals")
        assert 0 < len(boxes) <= 100 and (boxes[:, 2:] >= boxes[:, :2]).all()
        assert (boxes[:, [0, 2]] <= row["width"]).all() and (boxes[:, [1, 3]] <= row["height"]).all()


def test_selective_search_helper_process_restarts(photos):
    stage = ProposalsStage(method="selective_search", top_k=50)
    first = stage.selective_search(photos[0])[0]
    stage.search._proc.kill()  # e.g. killed for memory
    stage.search._proc.wait()
    np.testing.assert_array_equal(stage.selective_search(photos[0])[0], first)  # a fresh helper, same output
    stage.search.close()


def test_selective_search_on_tiny_images():
    stage = ProposalsStage(method="selective_search", top_k=10)
    for shape in [(1, 1, 3), (1, 40, 3), (3, 5, 3)]:
        boxes, scores = stage.selective_search(np.full(shape, 128, np.uint8))
        assert boxes.tolist() == [[0, 0, shape[1], shape[0]]] and scores.tolist() == [1.0]


def test_spec_validation():
    spec = ProposalsSpec(name="p", type="proposals", method="selective_search", mode="quality", output_prefix="ss_")
    assert spec.output_columns() == {"ss_proposals": schema.BOXES_TYPE, "ss_proposal_scores": schema.SCORES_TYPE}
    kwargs = spec.stage_kwargs([])
    assert kwargs["mode"] == "quality" and kwargs["output_prefix"] == "ss_" and kwargs["threads"] is None
    assert ProposalsSpec(name="p", type="proposals", method="rpn", num_gpus=1).stage_kwargs([])["device"] == "cuda"
    with pytest.raises(ValidationError, match="mode: not used by method rpn"):
        ProposalsSpec(name="p", type="proposals", method="rpn", mode="fast")
    with pytest.raises(ValidationError, match="model, weights: not used by method selective_search"):
        ProposalsSpec(name="p", type="proposals", method="selective_search", model=NAME, weights="none")
    with pytest.raises(ValidationError, match="has no region proposal network"):
        ProposalsSpec(name="p", type="proposals", method="rpn", model="ssdlite320_mobilenet_v3_large")
    with pytest.raises(ValidationError, match="method"):
        ProposalsSpec(name="p", type="proposals")
