"""Keypoint R-CNN trains on our shards too: keypoint targets, checks before training, a stage loads it.

The synthetic shapes get three keypoints each (their box's top-left and bottom-right corners and
its centre), enough to drive every part of torchvision's keypoint loss.
"""

import pyarrow as pa
import pytest
import torch

from pipeline import schema
from pipeline.config.load import ConfigError
from pipeline.data.decode import decode_batch
from pipeline.data.shards import list_shards, read_shard, write_shard
from pipeline.data.synth import synth_dataset
from pipeline.engine.stage_actor import StageActor
from pipeline.stages.keypoints import KeypointsSpec, KeypointsStage
from pipeline.train.train_spec import TrainSpec
from pipeline.train.targets import row_to_sample
from pipeline.train.trainer import preflight, train

pytestmark = pytest.mark.ray

NAME = "keypointrcnn_resnet50_fpn"
# Small images and few RoIs: the keypoint head (8 convs of 512 channels per box) is the cost.
SMALL = {"num_keypoints": 3, "box_batch_size_per_image": 8, "rpn_batch_size_per_image": 32,
         "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
         "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50}


def corners_and_centre(ann: dict, k: int = 3) -> list[float]:
    x, y, w, h = ann["bbox"]
    return [x, y, 2.0, x + w - 1, y + h - 1, 2.0, x + w / 2, y + h / 2, 2.0][: 3 * k]


def with_keypoints(folder: str, k: int = 3) -> str:
    for shard in list_shards(folder):
        table = read_shard(shard)
        anns = [[a | {"keypoints": corners_and_centre(a, k), "num_keypoints": k} for a in row] for row in table[schema.ANNOTATIONS].to_pylist()]
        column = pa.array(anns, table.schema.field(schema.ANNOTATIONS).type)
        write_shard(shard, table.set_column(table.schema.get_field_index(schema.ANNOTATIONS), schema.ANNOTATIONS, column))
    return folder


@pytest.fixture(scope="module")
def keypoint_shapes(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("kp") / "train")
    synth_dataset(folder, images=4, seed=5)
    return with_keypoints(folder)


def spec_for(train_set: str, out: str, **extra) -> TrainSpec:
    return TrainSpec(**{"name": "kp", "train": train_set, "output": out, "model": NAME, "model_kwargs": SMALL,
                        "min_size": 64, "max_size": 80, "batch_size": 2, "workers": 1, "worker_num_cpus": 1, **extra})


def test_keypoint_targets(keypoint_shapes):
    row = read_shard(list_shards(keypoint_shapes)[0]).slice(0, 1).to_pylist()[0]
    _, target = row_to_sample(row, {1: 1, 2: 2, 3: 3}, with_masks=False, num_keypoints=3)
    n = len(row[schema.ANNOTATIONS])
    assert target["keypoints"].shape == (n, 3, 3)
    x, y, w, h = row[schema.ANNOTATIONS][0]["bbox"]
    assert target["keypoints"][0, 2].tolist() == [x + w / 2, y + h / 2, 2.0]
    # Boxes in xyxy, corners of the same annotation.
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h]


def test_keypoint_data_the_model_cannot_learn_fails_before_training(keypoint_shapes, tmp_path):
    plain = str(tmp_path / "plain")
    synth_dataset(plain, images=2, seed=5)
    with pytest.raises(ConfigError, match="has no keypoints for keypointrcnn_resnet50_fpn to learn from"):
        preflight(spec_for(plain, str(tmp_path / "o")), "kp.yaml")
    with pytest.raises(ConfigError, match="val: keypoint AP uses COCO's OKS sigmas .* a model with 3 cannot be validated"):
        preflight(spec_for(keypoint_shapes, str(tmp_path / "o"), val=keypoint_shapes), "kp.yaml")
    two = str(tmp_path / "two")
    synth_dataset(two, images=2, seed=5)
    with_keypoints(two, k=2)
    with pytest.raises(ConfigError, match=r"annotations with \[2\] keypoints; the model predicts 3"):
        preflight(spec_for(two, str(tmp_path / "o")), "kp.yaml")


def test_train_keypoint_rcnn_and_run_it(ray_local, keypoint_shapes, tmp_path):
    result = train(spec_for(keypoint_shapes, str(tmp_path / "out"), steps=2))
    assert [e["step"] for e in result["epochs"]] == [2]
    assert result["epochs"][0]["loss"] > 0
    ckpt = torch.load(result["model"], weights_only=True)
    assert ckpt["model_name"] == NAME and ckpt["build_kwargs"]["num_keypoints"] == 3

    actor = StageActor(stage_name="keypoints", stage_cls=KeypointsStage, drop_columns=("pixels",),
                       output_columns=KeypointsSpec(name="keypoints", type="keypoints").output_columns(),
                       stage_kwargs={"model": NAME, "weights": result["model"], "score_threshold": 0.0, "max_detections": 2})
    out = actor(decode_batch(read_shard(list_shards(keypoint_shapes)[0]))).to_pylist()
    assert len(out) == 4 and all(r["error"] is None for r in out)
    for row in out:  # K = 3 triples per box, as the checkpoint says
        assert all(len(kps) == 9 for kps in row[schema.KEYPOINTS])
