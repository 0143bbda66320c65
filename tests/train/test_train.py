"""Training on embedded Ray: two workers lower the loss, write a checkpoint a stage loads, resume."""

import json

import pyarrow as pa
import pytest
import torch

from pipeline.config.load import ConfigError
from pipeline.data.shards import list_shards, read_shard, write_shard
from pipeline.data.synth import synth_dataset
from pipeline.data.decode import decode_batch
from pipeline.engine.stage_actor import StageActor
from pipeline.stages.detect import DetectSpec, DetectStage
from pipeline.stages.masks import MasksSpec, MasksStage
from pipeline.train.train_spec import TrainSpec
from pipeline.train.trainer import preflight, train

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    synth_dataset(str(root / "train"), images=24, seed=21, rows_per_shard=12)
    synth_dataset(str(root / "val"), images=6, seed=22)
    return root


def spec_for(root, **extra) -> TrainSpec:
    base = dict(name="t", train=str(root / "train"), val=str(root / "val"), output=str(root / "out"),
                epochs=3, batch_size=4, workers=2, worker_num_cpus=0.8, seed=0)
    return TrainSpec(**{**base, **extra})


def with_corrupt_image(root, tmp_path) -> str:
    """The training set with one row's image bytes replaced by bytes that are not an image."""
    import shutil

    out = tmp_path / "train-corrupt"
    shutil.copytree(root / "train", out)
    shard = list_shards(str(out))[-1]
    table = read_shard(shard)
    images = table["image"].to_pylist()
    images[0] = b"not an image"
    write_shard(shard, table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())))
    return str(out)


def test_train_two_workers_then_resume(ray_local, shapes, tmp_path):
    """Two workers lower the loss and write a checkpoint a stage loads; a rerun resumes it."""
    train_set = with_corrupt_image(shapes, tmp_path)  # 24 rows: an epoch is 3 steps of 2 x 4, every row
    # A non-default architecture: the checkpoint must carry it for the stage to rebuild the network.
    # steps=5 ends the first run in its second epoch.
    first = train(spec_for(shapes, train=train_set, output=str(tmp_path / "out"), steps=5, model_kwargs={"fpn_channels": 48}))
    epochs = first["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert [e["step"] for e in epochs] == [3, 5]
    # The corrupt row is skipped and counted, never fatal (epoch 1 stops after 2 of its 3 steps,
    # so it may or may not read it again).
    assert epochs[0]["skipped_images"] == 1 and epochs[1]["skipped_images"] in (0, 1)
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert all("val_bbox_AP" in e and "val_segm_AP" in e for e in epochs)
    ckpt = torch.load(first["model"], weights_only=True)
    assert ckpt["build_kwargs"] == {"min_size": 128, "max_size": 160, "fpn_channels": 48}
    assert ckpt["model_name"] == "small_maskrcnn" and [c["name"] for c in ckpt["categories"]] == ["circle", "rectangle", "triangle"]
    assert json.loads((tmp_path / "out" / "train.json").read_text())["model"] == first["model"]

    actor = StageActor(stage_name="masks", stage_cls=MasksStage, drop_columns=("pixels",),
                       output_columns=MasksSpec(name="masks", type="masks").output_columns(),
                       stage_kwargs={"model": "small_maskrcnn", "weights": first["model"], "score_threshold": 0.0})
    out = actor(decode_batch(read_shard(list_shards(str(shapes / "val"))[0]))).to_pylist()
    assert len(out) == 6 and all(r["error"] is None and r["masks"] is not None for r in out)
    # The detection stage takes the same checkpoint (boxes only).
    detect = StageActor(stage_name="detect", stage_cls=DetectStage, drop_columns=("pixels",),
                        output_columns=DetectSpec(name="detect", type="detect").output_columns(),
                        stage_kwargs={"model": "small_maskrcnn", "weights": first["model"], "score_threshold": 0.0})
    boxes = detect(decode_batch(read_shard(list_shards(str(shapes / "val"))[0]))).to_pylist()
    assert len(boxes) == 6 and all(r["error"] is None and r["boxes"] is not None and "masks" not in r for r in boxes)

    # Same output folder, one more epoch: Ray Train restores the run, the loop its state.
    second = train(spec_for(shapes, train=train_set, output=str(tmp_path / "out"), epochs=3, model_kwargs={"fpn_channels": 48}))
    assert [e["epoch"] for e in second["epochs"]] == [0, 1, 2]
    last = second["epochs"][-1]
    assert last["resumed_from_epoch"] == 1
    assert last["step"] == 5 + 3


def test_bad_training_input_fails_before_training(shapes, tmp_path):
    unlabeled = tmp_path / "unlabeled"
    synth_dataset(str(unlabeled), images=2, seed=1)
    table = read_shard(list_shards(str(unlabeled))[0]).drop_columns(["annotations"])
    import pyarrow.parquet as pq

    pq.write_table(table, list_shards(str(unlabeled))[0])
    with pytest.raises(ConfigError, match="no annotations"):
        preflight(spec_for(shapes, train=str(unlabeled)), "t.yaml")
    other = tmp_path / "other.pth"
    torch.save({"model": {"x": torch.zeros(1)}}, other)
    with pytest.raises(ConfigError, match="weights: .*does not fit model small_maskrcnn"):
        preflight(spec_for(shapes, weights=str(other)), "t.yaml")
    with pytest.raises(ConfigError, match="model_kwargs: small_maskrcnn does not accept .*fpn_chanels"):
        preflight(spec_for(shapes, model_kwargs={"fpn_chanels": 64}), "t.yaml")
    empty = tmp_path / "empty"
    synth_dataset(str(empty), images=3, seed=1)
    table = read_shard(list_shards(str(empty))[0])
    images = table["image"].to_pylist()
    images[1] = b""
    write_shard(list_shards(str(empty))[0], table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())))
    with pytest.raises(ConfigError, match=r"has empty images \(image_id 2\)"):
        preflight(spec_for(shapes, train=str(empty)), "t.yaml")
    with pytest.raises(ConfigError, match="val: dataset not found"):
        preflight(spec_for(shapes, val=str(tmp_path / "nope")), "t.yaml")


def test_relative_paths_reach_workers_absolute(tmp_path, monkeypatch):
    # Ray Train workers run in their own directory: a relative val path once failed after epoch 0.
    from pipeline.train.trainer import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    spec = TrainSpec(name="t", train="data/train", val="data/val", output="out", weights="none")
    fixed = with_absolute_paths(spec)
    assert (fixed.train, fixed.val, fixed.output) == (str(tmp_path / "data/train"), str(tmp_path / "data/val"), str(tmp_path / "out"))
    assert fixed.weights == "none"
    remote = with_absolute_paths(spec.model_copy(update={"val": "s3://bucket/val", "weights": "ckpt/model.pth"}))
    assert remote.val == "s3://bucket/val" and remote.weights == str(tmp_path / "ckpt/model.pth")
