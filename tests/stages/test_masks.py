"""The masks stage returns what torchvision's Mask R-CNN returns, as COCO RLE, in every mode."""

import copy
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torchvision
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn
from torchvision.models.detection.transform import resize_boxes

from pipeline import schema
from pipeline.engine.stage_actor import StageActor
from pipeline.stages.masks import MasksSpec, MasksStage
from tests.stages.helpers import assert_declared_types, boxes_of, make_batch, with_column

REPO_ROOT = Path(__file__).resolve().parents[2]

# Small settings: the R-CNN at ~160 px with few proposals; random RoI-head scores for 5 classes
# are ~0.2, so a 0.05 threshold keeps max_detections boxes to compare.
SMALL = {"min_size": 128, "max_size": 160, "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100}
SETTINGS = {"box_score_thresh": 0.05, "box_detections_per_img": 6}
STAGE = {"num_classes": 5, "score_threshold": 0.05, "max_detections": 6, "model_kwargs": SMALL}
WRITES = MasksSpec(name="m", type="masks").output_columns()  # detect's columns + masks


def reference_and_checkpoint(tmp_path_factory, name: str):
    """A random-weights torchvision model and the same weights as a checkpoint file for the stage.

    The mask predictor is scaled up: random mask logits sit near 0 -- probabilities near the 0.5
    threshold, where the rounding of two equivalent computations (the box round trip of
    boxes_column) could flip a pixel. Both sides use the same scaled weights.
    """
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=5, **SMALL, **SETTINGS)
    with torch.no_grad():
        for p in model.roi_heads.mask_predictor.parameters():
            p.mul_(1000.0)
    path = tmp_path_factory.mktemp("ckpt") / f"{name}.pth"
    torch.save({"model": model.state_dict(), "model_name": name, "num_classes": 5}, path)
    return model.eval(), str(path)


@pytest.fixture(scope="module")
def maskrcnn(tmp_path_factory):
    return reference_and_checkpoint(tmp_path_factory, "maskrcnn_resnet50_fpn")


@pytest.fixture(scope="module")
def full_stage(maskrcnn) -> MasksStage:
    return MasksStage(model="maskrcnn_resnet50_fpn", weights=maskrcnn[1], **STAGE)


@pytest.fixture(scope="module")
def head_stage(maskrcnn) -> MasksStage:
    """The same weights, segmenting the boxes of an earlier stage (``boxes_column``)."""
    return MasksStage(model="maskrcnn_resnet50_fpn", weights=maskrcnn[1], boxes_column="boxes", **STAGE)


def decode(row: dict) -> np.ndarray:
    """A row's masks column -> bool (N, H, W)."""
    if not row[schema.MASKS]:
        return np.zeros((0, row["height"], row["width"]), bool)
    return mask_utils.decode(row[schema.MASKS]).transpose(2, 0, 1).astype(bool)


def direct(model: nn.Module, images: list[np.ndarray]) -> list[dict]:
    with torch.inference_mode():
        return model([torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255) for im in images])


def assert_same_detections(row: dict, expected: dict) -> None:
    boxes = boxes_of(row)
    assert boxes.shape == tuple(expected["boxes"].shape)
    assert np.abs(boxes - expected["boxes"].numpy()).max(initial=0) <= 1e-4
    assert np.abs(np.asarray(row["scores"]) - expected["scores"].numpy()).max(initial=0) <= 1e-4
    assert row["labels"] == expected["labels"].tolist() == row["category_ids"]


def check_fidelity(stage: MasksStage, reference: nn.Module, groups: list[list[np.ndarray]], threshold: float = 0.5) -> int:
    compared = 0
    for images in groups:  # equal batching on both sides (padding changes border features)
        out = stage(make_batch(images))
        assert_declared_types(out, WRITES)
        for row, exp, im in zip(out.to_pylist(), direct(reference, images), images):
            assert_same_detections(row, exp)
            assert all(m["size"] == [im.shape[0], im.shape[1]] and isinstance(m["counts"], str) for m in row["masks"])
            # The RLE decodes to exactly the model's masks, thresholded as probability > threshold.
            np.testing.assert_array_equal(decode(row), (exp["masks"][:, 0] > threshold).numpy())
            compared += len(row["masks"])
    return compared


def test_stage_equals_direct_torchvision_call(maskrcnn, full_stage, photos):
    assert check_fidelity(full_stage, maskrcnn[0], [photos[:1], photos[1:]]) > 0


def test_v2_equals_direct_torchvision_call(tmp_path_factory, photos):
    reference, ckpt = reference_and_checkpoint(tmp_path_factory, "maskrcnn_resnet50_fpn_v2")
    stage = MasksStage(model="maskrcnn_resnet50_fpn_v2", weights=ckpt, **STAGE)
    assert check_fidelity(stage, reference, [photos[2:]]) > 0


def test_threshold_is_configurable(maskrcnn, full_stage, photos):
    stage = copy.copy(full_stage)  # shares the model; the threshold is applied after it
    stage.mask_threshold = 0.999
    assert check_fidelity(stage, maskrcnn[0], [photos[:1]], threshold=0.999) > 0


def test_synthetic_images_give_the_declared_schema(full_stage, synth_images):
    out = full_stage(make_batch(synth_images[:2]))
    assert_declared_types(out, WRITES)
    for row in out.to_pylist():
        assert len(row["masks"]) == len(row["boxes"]) == len(row["scores"]) == len(row["labels"]) > 0
        assert decode(row).shape[1:] == (row["height"], row["width"])


class FixedProposals(nn.Module):
    """Stands in for a model's RPN: returns given boxes (original pixels) in the resized frame."""

    def __init__(self, boxes: list[torch.Tensor], original: list[tuple[int, int]]):
        super().__init__()
        self.boxes, self.original = boxes, original

    def forward(self, images, features, targets=None):
        return [resize_boxes(b, o, s) for b, o, s in zip(self.boxes, self.original, images.image_sizes)], {}


def random_boxes(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    xy = rng.uniform(0, [w - 20, h - 20], size=(n, 2))
    wh = rng.uniform(8, 60, size=(n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1).astype(np.float32)


def test_fast_rcnn_mode_equals_torchvision_with_the_rpn_replaced(maskrcnn, photos):
    """proposals_column: the same as a full torchvision forward whose RPN returned those boxes."""
    reference, ckpt = maskrcnn
    images = photos[1:2] * 2  # the second copy gets no proposals: zero detections, empty lists
    h, w = images[0].shape[:2]
    proposals = [random_boxes(np.random.default_rng(0), 30, h, w), np.zeros((0, 4), np.float32)]
    stage = MasksStage(model="maskrcnn_resnet50_fpn", weights=ckpt, proposals_column="proposals", **STAGE)
    batch = with_column(make_batch(images), "proposals", [p.tolist() for p in proposals], schema.BOXES_TYPE)
    out = stage(batch).to_pylist()
    assert_declared_types(stage(batch.slice(0, 1)), WRITES)
    rpn = reference.rpn
    try:
        reference.rpn = FixedProposals([torch.from_numpy(proposals[0])], [(h, w)])
        expected = direct(reference, images[:1])[0]
    finally:
        reference.rpn = rpn
    assert len(out[0]["boxes"]) > 0
    assert_same_detections(out[0], expected)
    np.testing.assert_array_equal(decode(out[0]), (expected["masks"][:, 0] > 0.5).numpy())
    assert out[1]["boxes"] == out[1]["scores"] == out[1]["labels"] == out[1]["masks"] == []


def test_boxes_column_segments_earlier_boxes(full_stage, head_stage, photos):
    """detect -> masks: the mask head on given boxes/labels reproduces the full model's masks."""
    full = full_stage(make_batch(photos[:1]))
    head_only = head_stage(full.drop_columns(["masks"]))
    assert head_only.column_names == full.column_names  # only masks added: the box columns stay the earlier stage's
    out = head_only.to_pylist()[0]
    expected = decode(full.to_pylist()[0])
    got = decode(out)
    assert got.shape == expected.shape and len(got) > 0 and expected.sum() > 0
    assert (got != expected).mean() < 1e-4  # equal up to the rounding of the box round trip


def test_boxes_outside_the_image_get_empty_masks(head_stage, photos):
    h, w = photos[0].shape[:2]
    boxes = [[-80, -60, -20, -10], [w + 5, 10, w + 50, 40], [10, 10, 60, 70], [-30, -30, 30, 30]]
    batch = make_batch(photos[:1] * 2)
    batch = with_column(batch, "boxes", [boxes, []], schema.BOXES_TYPE)
    batch = with_column(batch, "labels", [[1, 2, 3, 4], []], schema.IDS_TYPE)
    rows = head_stage(batch).to_pylist()
    masks = decode(rows[0])
    assert masks.shape == (4, h, w)
    assert masks[0].sum() == 0 and masks[1].sum() == 0  # entirely outside: nothing to segment
    assert not masks[2][:, 61:].any() and not masks[2][71:, :].any()  # pasted inside its box only
    assert rows[1]["masks"] == []  # no boxes, no masks


def test_bad_boxes_fail_their_row_only(maskrcnn, head_stage, photos):
    """Malformed inputs raise a clear ValueError; in the actor only that row becomes an error row."""
    batch = make_batch(photos)
    cells = [[[10, 10, 50, 50]], [[float("nan"), 0, 5, 5]], [[40, 40, 10, 10]]]
    batch = with_column(batch, "boxes", cells, schema.BOXES_TYPE)
    batch = with_column(batch, "labels", [[1], [1], [1]], schema.IDS_TYPE)
    # What the detect stage before it also wrote (the actor keeps earlier stages' columns).
    batch = with_column(batch, "scores", [[0.9], [0.9], [0.9]], schema.SCORES_TYPE)
    batch = with_column(batch, "category_ids", [[1], [1], [1]], schema.IDS_TYPE)
    kwargs = {"model": "maskrcnn_resnet50_fpn", "weights": maskrcnn[1], "boxes_column": "boxes", **STAGE}
    writes = MasksSpec(name="masks", type="masks", boxes_column="boxes").output_columns()
    actor = StageActor(stage_name="masks", stage_cls=MasksStage, stage_kwargs=kwargs, output_columns=writes)
    rows = actor(batch).to_pylist()
    assert rows[0]["error"] is None and len(rows[0]["masks"]) == 1
    assert "masks: ValueError: boxes: box 0 is not finite" in rows[1]["error"] and rows[1]["masks"] is None
    assert "must be xyxy, not COCO xywh" in rows[2]["error"] and rows[2]["masks"] is None

    one = batch.slice(0, 1)
    with pytest.raises(ValueError, match="labels: label 9 outside the model's classes 0..4"):
        head_stage(with_column(one, "labels", [[9]], schema.IDS_TYPE))
    with pytest.raises(ValueError, match="labels: 2 labels for 1 boxes"):
        head_stage(with_column(one, "labels", [[1, 1]], schema.IDS_TYPE))
    # A flat list<float> column, as another tool might write it: 4 values per box.
    flat = pa.list_(pa.float32())
    assert len(head_stage(with_column(one, "boxes", [[10, 10, 50, 50]], flat)).to_pylist()[0]["masks"]) == 1
    with pytest.raises(ValueError, match="boxes: 7 values is not a multiple of 4"):
        head_stage(with_column(one, "boxes", [[10, 10, 50, 50, 70, 80, 90]], flat))
    with pytest.raises(ValueError, match="boxes: null for this row"):
        head_stage(with_column(one, "boxes", [None], flat))


def test_spec_validation():
    spec = MasksSpec(name="m", type="masks", boxes_column="det_boxes", labels_column="det_labels", output_prefix="seg_")
    assert spec.output_columns() == {"seg_masks": schema.MASKS_TYPE}
    assert set(spec.input_columns()) == {"boxes_column", "labels_column"}
    assert list(MasksSpec(name="m", type="masks").output_columns()) == ["boxes", "scores", "labels", "category_ids", "masks"]
    with pytest.raises(ValueError, match="has no mask head"):
        MasksSpec(name="m", type="masks", model="fasterrcnn_resnet50_fpn")
    with pytest.raises(ValueError, match="exclude each other"):
        MasksSpec(name="m", type="masks", boxes_column="boxes", proposals_column="proposals")


# --- Masks at detection speed: the stage pastes into boxes only; the RLEs stay byte for byte ------
#
# The reference is the stage's path before that change, kept here: torchvision pastes every mask
# at the full image size (its own forward, or rcnn.heads_on_boxes), the (N, H, W) masks are
# thresholded in torch and pycocotools encodes them.

SHIPPED = REPO_ROOT / "conf" / "models" / "small_maskrcnn_shapes.pth"


def full_size_rles(masks: torch.Tensor, threshold: float) -> list[str]:
    """Today's encoding of pasted (N, 1, H, W) probabilities: threshold in torch, pycocotools on all."""
    binary = (masks[:, 0] > threshold).cpu().numpy()
    if len(binary) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    return [r["counts"].decode("ascii") for r in rles]


def reference_rles(stage: MasksStage, images: list[np.ndarray]) -> tuple[list[list[str]], list[np.ndarray]]:
    """RLE counts and boxes per image from the stage's own model run the old way (full forward, full paste)."""
    with torch.inference_mode():
        outputs = stage.model(stage.to_tensors(images))
    return [full_size_rles(o["masks"], stage.mask_threshold) for o in outputs], [o["boxes"].numpy() for o in outputs]


def counts(row: dict) -> list[str]:
    return [m["counts"] for m in row[schema.MASKS]]


def touching_border(boxes: np.ndarray, h: int, w: int) -> int:
    return int(((boxes[:, 0] <= 0.5) | (boxes[:, 1] <= 0.5) | (boxes[:, 2] >= w - 0.5) | (boxes[:, 3] >= h - 0.5)).sum())


def synth_batch(n: int, seed: int, size: int = 128) -> list[np.ndarray]:
    from pipeline.data.synth import synth_image

    return [np.asarray(Image.open(io.BytesIO(synth_image(seed, i, size)[0])).convert("RGB")) for i in range(n)]


def test_shipped_model_rles_identical_to_full_size_paste():
    """The shipped small_maskrcnn on held-out synthetic shapes: every RLE string as before."""
    stage = MasksStage(model="small_maskrcnn", weights=str(SHIPPED), score_threshold=0.05, max_detections=100)
    images = synth_batch(4, seed=300)
    rows = stage(make_batch(images)).to_pylist()
    expected, boxes = reference_rles(stage, images)
    assert sum(len(e) for e in expected) >= 8
    for row, exp, b in zip(rows, expected, boxes):
        assert counts(row) == exp
        np.testing.assert_array_equal(boxes_of(row), b)


def test_low_threshold_random_model_many_border_boxes_identical():
    """Random-init small_maskrcnn, score threshold 0, 100 detections per image: most boxes reach the
    image border, and the random mask logits sit near 0 (probabilities near the 0.5 threshold), so
    any difference in the pasted values would flip pixels. Still byte for byte."""
    torch.manual_seed(1)
    stage = MasksStage(model="small_maskrcnn", weights="none", num_classes=4, score_threshold=0.0, max_detections=100)
    images = synth_batch(2, seed=7, size=112) + [synth_batch(1, seed=8, size=144)[0][:, :100]]  # one not square
    rows = stage(make_batch(images[:2])).to_pylist() + stage(make_batch(images[2:])).to_pylist()
    expected = reference_rles(stage, images[:2])[0] + reference_rles(stage, images[2:])[0]
    boxes = reference_rles(stage, images[:2])[1] + reference_rles(stage, images[2:])[1]
    assert sum(touching_border(b, *im.shape[:2]) for b, im in zip(boxes, images)) >= 50
    mixed = 0
    for row, exp, im in zip(rows, expected, images):
        assert len(exp) == 100 and counts(row) == exp
        decoded = decode(row)
        mixed += int(((decoded.sum(axis=(1, 2)) > 0) & (decoded.sum(axis=(1, 2)) < decoded[0].size)).sum())
    assert mixed > 100  # real masks, not all empty or all full


def test_zero_detections_give_empty_lists():
    stage = MasksStage(model="small_maskrcnn", weights=str(SHIPPED), score_threshold=1.0)
    rows = stage(make_batch(synth_batch(2, seed=300))).to_pylist()
    assert [r["masks"] for r in rows] == [[], []] and [r["boxes"] for r in rows] == [[], []]


def test_boxes_column_rles_identical_to_heads_on_boxes_full_paste(head_stage, photos):
    """Given boxes: partly outside on every side, zero width/height, sub-pixel, the whole image,
    entirely outside; the same RLE strings as rcnn.heads_on_boxes (full-size paste) + encode."""
    from pipeline.stages.rcnn import heads_on_boxes

    h, w = photos[0].shape[:2]
    boxes = [
        [-15, -10, 40, 30], [w - 30, h - 25, w + 20, h + 40], [-5, 20, w + 5, 60], [30, -8, 50, h + 8],
        [10, 10, 10, 40], [12, 30, 70, 30], [5.2, 5.2, 5.7, 5.9], [0, 0, w, h], [0, 0, 1, 1],
        [w - 1, h - 1, w, h], [-80, -60, -20, -10], [w + 5, 10, w + 50, 40], [20.4, 15.6, 90.3, 77.7],
    ]
    labels = [1 + i % 4 for i in range(len(boxes))]
    batch = with_column(make_batch(photos[:1] * 2), "boxes", [boxes, []], schema.BOXES_TYPE)
    batch = with_column(batch, "labels", [labels, []], schema.IDS_TYPE)
    rows = head_stage(batch).to_pylist()
    with torch.inference_mode():
        probs = heads_on_boxes(
            head_stage.model, head_stage.to_tensors(photos[:1]), [torch.tensor(boxes, dtype=torch.float32)],
            labels=[torch.tensor(labels)], task="masks",
        )[0]
    expected = full_size_rles(probs, head_stage.mask_threshold)
    assert counts(rows[0]) == expected
    areas = decode(rows[0]).sum(axis=(1, 2))
    assert areas[[4, 5, 10, 11]].tolist() == [0, 0, 0, 0] and (areas[[0, 1, 2, 3, 7, 12]] > 0).all()
    assert rows[1]["masks"] == []


def test_paste_in_boxes_matches_torchvision_paste_for_any_box():
    """The paste itself, on random probabilities and boxes anywhere (unclipped, inverted-free,
    degenerate, much larger than the image), against torchvision's paste_masks_in_image."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from pipeline.stages.masks import encode_in_boxes

    rng = np.random.default_rng(0)
    compared = 0
    for trial in range(40):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        n = int(rng.integers(1, 12))
        x1y1 = rng.uniform([-30, -30], [w + 10, h + 10], size=(n, 2))
        size = rng.choice([0.0, 0.3, 5.0, 40.0, 150.0], size=(n, 2)) * rng.uniform(0.5, 1.0, size=(n, 2))
        boxes = torch.tensor(np.concatenate([x1y1, x1y1 + size], axis=1), dtype=torch.float32)
        probs = torch.rand(n, 1, 28, 28) if trial % 2 else torch.sigmoid(torch.randn(n, 1, 14, 14) * 0.05)
        threshold = float(rng.choice([0.5, 0.3, 0.0]))
        expected = []
        for i in range(n):  # one by one: torchvision raises for some boxes wholly outside the image
            try:
                expected.append(full_size_rles(paste_masks_in_image(probs[i : i + 1], boxes[i : i + 1], (h, w)), threshold)[0])
            except RuntimeError:
                expected.append(None)
        got = [r["counts"] for r in encode_in_boxes(probs, boxes, (h, w), threshold)]
        for e, g in zip(expected, got):
            if e is not None:
                assert g == e
                compared += 1
    assert compared > 150


def test_encode_column_crops_equals_full_size_encode():
    """Several crops per call (empty ones too), each flattened column by column, against
    pycocotools' encode of the full-size masks: byte-identical RLE strings."""
    from pipeline.stages.common import encode_column_crops, encode_masks

    rng = np.random.default_rng(1)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 14, 2))
        pieces, shapes, offsets, fulls = [], [], [], []
        for _ in range(int(rng.integers(1, 5))):
            y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            ch = int(rng.choice([h - y0, rng.integers(0, h - y0 + 1)]))  # often down to the last row
            cw = int(rng.integers(0, w - x0 + 1))
            if rng.random() < 0.3:
                y0, ch = 0, h  # full columns: runs carry on from one column into the next
            crop = rng.random((ch, cw)) < rng.choice([0.2, 0.6, 1.0])
            full = np.zeros((h, w), bool)
            full[y0 : y0 + ch, x0 : x0 + cw] = crop
            pieces.append(torch.from_numpy(crop.T.reshape(-1).copy()))
            shapes.append((ch, cw))
            offsets.append((y0, x0))
            fulls.append(full)
        got = encode_column_crops(torch.cat(pieces), shapes, offsets, h, w)
        assert got == encode_masks(np.stack(fulls))
    assert encode_column_crops(torch.zeros(0, dtype=torch.bool), [], [], 4, 4) == []
    ones = encode_column_crops(torch.ones(16, dtype=torch.bool), [(4, 4)], [(0, 0)], 4, 4)
    assert ones == encode_masks(np.ones((1, 4, 4), bool))
    with pytest.raises(ValueError, match="not inside"):
        encode_column_crops(torch.ones(9, dtype=torch.bool), [(3, 3)], [(2, 0)], 4, 4)
    with pytest.raises(ValueError, match="add up"):
        encode_column_crops(torch.ones(8, dtype=torch.bool), [(3, 3)], [(0, 0)], 4, 4)
