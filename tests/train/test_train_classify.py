"""pipeline train for classifiers: samples as the classify stage sees images, labels by category id,
bad labels refused before training, and a checkpoint the classify stage loads with its input sizes."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pipeline import schema
from pipeline.config.load import ConfigError
from pipeline.data.decode import decode_batch, decode_image
from pipeline.data.shards import DatasetMeta, list_shards, read_meta, read_shard, write_meta, write_shard
from pipeline.data.synth import synth_dataset
from pipeline.models.small_cnn import small_cnn
from pipeline.stages.classify import ClassifyStage
from pipeline.train.classifier_objective import NO_LABEL, ClassifierObjective
from pipeline.train.loop import checkpoint_payload
from pipeline.train.reader import read_training_rows
from pipeline.train.train_spec import TrainSpec
from pipeline.train.trainer import preflight, required_column, train, training_categories


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("clstrain")
    synth_dataset(str(root / "train"), images=48, seed=41, size=64, rows_per_shard=16, classification=True)
    synth_dataset(str(root / "val"), images=12, seed=42, size=64, classification=True)
    return root


def spec_for(root, **extra) -> TrainSpec:
    base = dict(name="cls", train=str(root / "train"), val=str(root / "val"), output=str(root / "out"), model="small_cnn",
                model_kwargs={"base": 8}, crop_size=32, epochs=2, batch_size=6, workers=2, worker_num_cpus=0.8,
                optimizer={"lr": 0.01, "warmup_steps": 2})
    return TrainSpec(**{**base, **extra})


def test_labels_start_at_zero_and_samples_are_the_stage_crops(shapes):
    spec = spec_for(shapes)
    categories = training_categories(spec, read_meta(str(shapes / "train")).categories)
    assert [(c["label"], c["name"]) for c in categories] == [(0, "circle"), (1, "rectangle"), (2, "triangle")]
    assert spec.classifier_resize == 37  # 32 * 8 / 7: ImageNet's 256 / 224
    label_of = {c["id"]: c["label"] for c in categories}
    objective = ClassifierObjective(label_of, resize=spec.classifier_resize, crop=32, hflip=False, seed=0)
    row = read_shard(list_shards(str(shapes / "train"))[0]).to_pylist()[0]
    image, label = objective.sample(row)
    assert image.shape == (3, 32, 32) and int(label) == label_of[row[schema.LABEL]]
    windows = {tuple(objective.sample(row)[0][:, 0, 0].tolist()) for _ in range(30)}
    assert len(windows) > 1  # random crops

    class CenterWindow:
        """In place of the objective's generator: the center crop's offsets, no flip."""

        def integers(self, low, high):
            return round((high - 1) / 2)  # high = side - crop + 1; torchvision's center_crop rounds (side - crop) / 2

        def random(self):
            return 1.0

    objective.rng = CenterWindow()
    stage = ClassifyStage(model="small_cnn", num_classes=3, resize=spec.classifier_resize, crop=32)
    expected = stage.preprocess(decode_image(row[schema.IMAGE]))  # the stage's ImageClassification transform
    torch.testing.assert_close(objective.sample(row)[0], expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="label 99 is not one of the dataset's categories"):
        objective.sample({**row, schema.LABEL: 99})


def test_the_loss_ignores_the_stand_in_sample():
    model = small_cnn(num_classes=3, base=4).eval()  # eval: the same logits for a sample alone or in a batch
    objective = ClassifierObjective({1: 0, 2: 1, 3: 2}, resize=37, crop=32, hflip=True, seed=0)
    blank = objective.blank()
    assert int(blank[1]) == NO_LABEL
    zero = objective.loss(model, [blank], torch.device("cpu"))
    assert zero.item() == 0 and zero.requires_grad  # every worker still steps every parameter (DDP)
    x = torch.zeros(3, 32, 32)
    loss = objective.loss(model, [(x, torch.tensor(1)), blank], torch.device("cpu"))
    expected = torch.nn.functional.cross_entropy(model(x[None]), torch.tensor([1]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)  # the stand-in counts for nothing


def test_bad_specs_and_labels_fail_before_training(shapes, tmp_path):
    with pytest.raises(ValueError, match="min_size: not used when training small_cnn"):
        spec_for(shapes, min_size=96)
    with pytest.raises(ValueError, match="class_weights: not used when training small_cnn"):
        spec_for(shapes, class_weights="none")
    with pytest.raises(ValueError, match="resize_size: not used when training small_unet"):
        TrainSpec(name="s", train="x", output="y", model="small_unet", resize_size=64)
    detection = str(tmp_path / "detection")
    synth_dataset(detection, images=4, seed=1, size=48)  # annotations, no image labels
    with pytest.raises(ConfigError, match="has no image labels .* to learn from"):
        preflight(spec_for(shapes, train=detection), "t.yaml")
    bad = str(tmp_path / "bad")
    table = read_shard(list_shards(str(shapes / "val"))[0])
    labels = table[schema.LABEL].to_pylist()
    labels[3] = 7
    write_shard(f"{bad}/part-00000.parquet", table.set_column(table.schema.get_field_index(schema.LABEL), schema.LABEL,
                                                             pa.array(labels, schema.LABEL_TYPE)))
    write_meta(bad, DatasetMeta(categories=read_meta(str(shapes / "val")).categories))
    with pytest.raises(ConfigError, match=r"image_id \d+ has label 7, not a category"):
        preflight(spec_for(shapes, train=bad), "t.yaml")


def test_unlabelled_rows_are_not_read(shapes, tmp_path):
    table = read_shard(list_shards(str(shapes / "val"))[0])
    labels = table[schema.LABEL].to_pylist()
    labels[0] = labels[5] = None
    part = str(tmp_path / "part" / "part-00000.parquet")
    write_shard(part, table.set_column(table.schema.get_field_index(schema.LABEL), schema.LABEL, pa.array(labels, schema.LABEL_TYPE)))
    write_meta(str(tmp_path / "part"), DatasetMeta(categories=read_meta(str(shapes / "val")).categories))
    spec = spec_for(shapes, train=str(tmp_path / "part"))
    assert required_column(spec) == schema.LABEL
    assert preflight(spec, "t.yaml")[2] == 10  # the schedule counts the 10 labelled rows
    read = pa.concat_tables(read_training_rows(pa.table({"shard_index": [0]}), shards=[part], required=schema.LABEL))
    assert read.num_rows == 10 and None not in read[schema.LABEL].to_pylist()


def test_train_small_cnn_then_classify_with_it(ray_local, shapes):
    """Two workers lower the loss; the checkpoint carries its input sizes and names; the stage loads it alone."""
    summary = train(spec_for(shapes))
    epochs = summary["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1] and [e["step"] for e in epochs] == [4, 8]  # 48 rows / (2 x 6)
    assert all(0 <= e["val_classification_top1"] <= 1 for e in epochs)
    ckpt = torch.load(summary["model"], weights_only=True)
    assert (ckpt["model_name"], ckpt["num_classes"], ckpt["resize"], ckpt["crop"]) == ("small_cnn", 3, 37, 32)
    assert ckpt == {**checkpoint_payload(spec_for(shapes), small_cnn(num_classes=3, base=8), ckpt["categories"]), "model": ckpt["model"]}

    val = str(shapes / "val")
    stage = ClassifyStage(model="small_cnn", weights=summary["model"], category_map="by_name", dataset_categories=read_meta(val).categories)
    assert (stage.transform.resize_size, stage.transform.crop_size) == ([37], [32])
    rows = stage(decode_batch(read_shard(list_shards(val)[0]))).to_pylist()
    assert len(rows) == 12
    for row in rows:
        assert sorted(row[schema.CLASS_CATEGORY_IDS]) == [1, 2, 3]  # top 3 of 3 classes, mapped by name
        assert sum(row[schema.CLASS_SCORES]) == pytest.approx(1, abs=1e-5)
