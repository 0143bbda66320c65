"""Training a semantic segmentation model: the ground truth it learns is the one evaluation scores,
the loss and class weights do what they say, and one Ray Train run writes a checkpoint the
``segment`` stage loads at the size it trained on."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config.load import ConfigError
from pipeline.data.decode import decode_batch, decode_image
from pipeline.data.shards import list_shards, read_meta, read_shard
from pipeline.data.synth import synth_dataset
from pipeline.eval.groundtruth import load_ground_truth
from pipeline.eval.semantic import Classes, gt_from_annotations
from pipeline.stages.segment import SegmentStage
from pipeline.train.semantic_objective import IGNORE, SemanticObjective, class_weights, row_label_map
from pipeline.train.targets import label_categories
from pipeline.train.train_spec import TrainSpec
from pipeline.train.trainer import preflight, train

SHAPES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "rectangle"}, {"id": 3, "name": "triangle"}]
LABEL_OF = {c["id"]: c["label"] for c in label_categories(SHAPES)}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("segtrain")
    synth_dataset(str(root / "train"), images=32, seed=31, rows_per_shard=16)
    synth_dataset(str(root / "val"), images=6, seed=32)
    return root


def png(values: np.ndarray, mode: str = "L") -> bytes:
    im = Image.fromarray(values.astype(np.uint8), mode="L")
    if mode == "P":
        im = im.convert("P")  # palette image whose indices are the values
        im.putdata(values.ravel().tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_training_ground_truth_is_what_evaluation_scores(shapes):
    """Instance masks painted per category (crowd ignored) equal eval's semantic ground truth, pixel for pixel."""
    rows = read_shard(list_shards(str(shapes / "train"))[0]).to_pylist()
    rows[0]["annotations"][0]["iscrowd"] = 1  # a crowd region: ignored by both
    ground = load_ground_truth(str(shapes / "train"))
    classes = Classes.from_categories(SHAPES)
    crowd_rows = {rows[0]["image_id"]}
    checked = 0
    for row in rows:
        h, w = decode_image(row["image"]).shape[:2]
        ours = row_label_map(row, LABEL_OF, h, w)
        if row["image_id"] in crowd_rows:
            assert (ours == IGNORE).any()
            continue
        theirs = gt_from_annotations(ground, row["image_id"], h, w, classes, Counter())
        # eval's class index k is category classes.ids[k]; ours are model labels 1..K in id order: the same here
        np.testing.assert_array_equal(ours, np.where(theirs == classes.n, IGNORE, theirs))
        checked += 1
    assert checked == len(rows) - 1


def test_label_map_rows_and_their_errors():
    values = np.array([[0, 1, 2], [3, 255, 0]])
    row = {"image_id": 7, "label_map": png(values)}
    np.testing.assert_array_equal(row_label_map(row, LABEL_OF, 2, 3), values)
    np.testing.assert_array_equal(row_label_map({"image_id": 7, "label_map": png(values, "P")}, LABEL_OF, 2, 3), values)
    with pytest.raises(ValueError, match=r"image 7: label map values \[9\] are no category"):
        row_label_map({"image_id": 7, "label_map": png(np.array([[0, 9]]))}, LABEL_OF, 1, 2)
    with pytest.raises(ValueError, match="label map is 3x2, the image 4x2"):
        row_label_map(row, LABEL_OF, 2, 4)


def test_crops_flips_and_the_loss():
    rgb = np.zeros((50, 40, 3), np.uint8)
    rgb[:, 20:] = 255  # right half white
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    labels = np.zeros((50, 40), np.uint8)
    labels[:, 20:] = 2
    row = {"image_id": 1, "image": buf.getvalue(), "label_map": png(labels)}
    objective = SemanticObjective(LABEL_OF, crop=64, hflip=True, weights=[1.0, 1.0, 1.0, 1.0], seed=0)
    for _ in range(6):
        image, target = objective.sample(row)
        assert image.shape == (3, 64, 64) and target.shape == (64, 64)
        # padded to the crop with ignored pixels; pixels and labels move together under the flip
        assert (target == IGNORE).sum() == 64 * 64 - 50 * 40
        white = image[0] > 0
        assert torch.equal(white, target == 2)
    model = torch.nn.Conv2d(3, 4, 1)
    loss = objective.loss(lambda x: {"out": model(x)}, [objective.sample(row)], torch.device("cpu"))
    assert loss.item() > 0
    all_ignored = (image, torch.full((64, 64), IGNORE))
    zero = objective.loss(lambda x: {"out": model(x)}, [all_ignored], torch.device("cpu"))
    assert zero.item() == 0 and zero.requires_grad  # every worker still steps every parameter


def test_class_weights_are_sqrt_inverse_frequency():
    w = class_weights(np.array([900, 100, 0, 25]))
    expected = np.sqrt(1025 / np.array([900, 100, 25]))
    expected = np.array([expected[0], expected[1], expected[2], expected[2]])  # an absent class: the largest
    np.testing.assert_allclose(w.numpy(), expected / expected.mean(), rtol=1e-6)


def spec_for(root, **extra) -> TrainSpec:
    base = dict(name="seg", train=str(root / "train"), val=str(root / "val"), output=str(root / "out"), model="small_unet",
                model_kwargs={"base": 8}, crop_size=64, epochs=2, batch_size=4, workers=2, worker_num_cpus=0.8,
                optimizer={"lr": 0.01, "warmup_steps": 2})
    return TrainSpec(**{**base, **extra})


def test_keys_of_the_other_kind_are_refused(shapes):
    with pytest.raises(ValueError, match="min_size: not used when training small_unet"):
        spec_for(shapes, min_size=96)
    with pytest.raises(ValueError, match="crop_size: not used when training small_maskrcnn"):
        TrainSpec(name="d", train="x", output="y", model="small_maskrcnn", crop_size=96)
    with pytest.raises(ConfigError, match="model_kwargs: small_unet does not accept .*bse"):
        preflight(spec_for(shapes, model_kwargs={"bse": 8}), "t.yaml")


def test_train_small_unet_then_segment_with_it(ray_local, shapes):
    """Two workers lower the loss; the checkpoint carries native resize, categories and width; the stage loads it."""
    summary = train(spec_for(shapes))
    epochs = summary["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1] and [e["step"] for e in epochs] == [4, 8]
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert all(0 <= e["val_semantic_mIoU"] <= 1 for e in epochs)
    ckpt = torch.load(summary["model"], weights_only=True)
    assert ckpt["model_name"] == "small_unet" and ckpt["resize"] is None and ckpt["build_kwargs"] == {"base": 8}
    assert [c["name"] for c in ckpt["categories"]] == ["circle", "rectangle", "triangle"]

    stage = SegmentStage(model="small_unet", weights=summary["model"], category_map="by_name",
                         dataset_categories=read_meta(str(shapes / "val")).categories)
    assert stage.resize is None  # native, as trained
    batch = decode_batch(read_shard(list_shards(str(shapes / "val"))[0]))
    out = stage(batch).to_pylist()
    assert len(out) == 6
    for row in out:
        assert set(row["semantic_category_ids"]) <= {0, 1, 2, 3}
        assert all(m["size"] == [row["height"], row["width"]] for m in row["semantic_masks"])


def test_a_label_map_dataset_trains_on_its_labelled_rows_only(tmp_path):
    """Imported with --labels: an image without a label file has no ground truth (not all background),
    so training reads, counts and weights only the rows with a label map."""
    import pyarrow as pa

    from pipeline.data.importers import import_images
    from pipeline.train.reader import read_training_rows
    from pipeline import schema
    from pipeline.train.trainer import required_column, semantic_class_weights
    from tests.data.label_folders import write_grey, write_rgb

    images, labels = tmp_path / "images", tmp_path / "labels"
    for i in range(4):
        write_rgb(images / f"{i}.png", 8, 8, seed=i)
    write_grey(labels / "0.png", np.full((8, 8), 1))
    write_grey(labels / "2.png", np.zeros((8, 8)))  # 1.png and 3.png: no label file
    ds = str(tmp_path / "ds")
    import_images(str(images), ds, labels_dir=str(labels), rows_per_shard=2)
    spec = TrainSpec.model_validate({"name": "t", "train": ds, "output": str(tmp_path / "out"), "model": "small_unet",
                                     "model_kwargs": {"base": 8}, "epochs": 1, "workers": 1, "worker_num_cpus": 1})
    assert required_column(spec) == schema.LABEL_MAP
    shards, _, rows = preflight(spec, "t.yaml")
    assert rows == 2  # the schedule counts the rows that train
    index = pa.table({"shard_index": list(range(len(shards)))})
    read = pa.concat_tables(read_training_rows(index, shards=shards, required=schema.LABEL_MAP))
    assert sorted(read["image_id"].to_pylist()) == [1, 3]  # 0.png and 2.png (ids in sorted path order)
    everything = pa.concat_tables(read_training_rows(index, shards=shards))
    assert everything.num_rows == 4
    weights = semantic_class_weights(spec, shards, read_meta(ds).categories)
    assert weights[0] == pytest.approx(weights[1])  # 64 background, 64 class-1 pixels: unlabelled rows not counted as background
