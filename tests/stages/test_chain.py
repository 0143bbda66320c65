"""Stages chained through columns: what must be rejected before a run, and a chained run on Ray."""

import io
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline import schema
from pipeline.config.load import ConfigError
from pipeline.engine.jobfile import load_job, validate_job
from pipeline.data.shards import list_shards, read_shard
from pipeline.engine.runner import run_job
from pipeline.stages.chain import check_columns
from pipeline.stages.detect import DetectStage
from pipeline.stages.proposals import ProposalsStage
from tests.conftest import REPO
from tests.stages.helpers import boxes_of, make_batch

NEW_JOBS = ("maskrcnn.yaml", "keypoints.yaml", "rcnn_chain.yaml")


def problems(*stages: dict) -> list[str]:
    """The loader's column-flow problems for these stages (it raises; we collect its lines)."""
    try:
        job = validate_job({"name": "t", "input": "in", "output": "out", "stages": list(stages)}, "job.yaml")
    except ConfigError as exc:
        return [line.strip() for line in str(exc).splitlines()[1:]]
    assert check_columns(job.stages) == []
    return []


def test_selective_search_then_fast_rcnn_is_a_valid_chain():
    assert problems(
        {"name": "proposals", "method": "selective_search"}, {"name": "detect", "proposals_column": "proposals"}
    ) == []


def test_heads_on_earlier_boxes_are_a_valid_chain():
    assert problems(
        {"name": "detect"},
        {"name": "masks", "boxes_column": "boxes"},
        {"name": "keypoints", "boxes_column": "boxes", "output_prefix": "person_"},
    ) == []


def test_reading_a_column_nobody_wrote_is_rejected():
    (line,) = problems({"name": "detect", "proposals_column": "proposals"})
    assert line.startswith("stages.0 (detect).proposals_column: column 'proposals' is not written by an earlier stage")
    (line,) = problems({"name": "detect", "output_prefix": "det_"}, {"name": "keypoints", "boxes_column": "boxes"})
    assert "stages.1 (keypoints).boxes_column: column 'boxes' is not written" in line and "det_boxes" in line


def test_two_stages_writing_one_column_are_rejected():
    lines = problems({"name": "detect"}, {"name": "masks"})
    assert lines[0] == (
        "stages.1 (masks): writes column 'boxes', which stages.0 (detect) already writes; set output_prefix on "
        "one of them (or, for masks/keypoints on earlier boxes, boxes_column)"
    )
    assert len(lines) == 4  # boxes, scores, labels, category_ids; masks itself is new
    assert problems({"name": "detect"}, {"name": "masks", "output_prefix": "seg_"}) == []


def test_a_column_of_the_wrong_type_is_rejected():
    (line,) = problems({"name": "detect"}, {"name": "keypoints", "boxes_column": "scores"})
    assert line.startswith("stages.1 (keypoints).boxes_column: column 'scores' is list<item: float>, this stage needs")


def test_proposals_need_an_rcnn_named_at_the_key(tmp_path):
    path = tmp_path / "job.yaml"
    stage = "  - name: detect\n    model: ssdlite320_mobilenet_v3_large\n    proposals_column: proposals\n"
    path.write_text("name: t\ninput: in\noutput: out\nstages:\n" + stage)
    with pytest.raises(ConfigError, match=r"stages.0 \(detect\).proposals_column: .*needs an R-CNN model"):
        load_job(path)


@pytest.mark.parametrize("job_file", NEW_JOBS)
def test_job_files_validate_with_sane_resources(job_file):
    job = load_job(REPO / "jobs" / job_file)
    assert check_columns(job.stages) == []
    assert all(stage.num_cpus <= 1 and stage.pool_size == 1 for stage in job.stages)
    assert all(stage.weights == "none" for stage in job.stages if hasattr(stage, "weights"))
    assert sum(stage.num_cpus * stage.pool_size for stage in job.stages) < 2  # room for read/decode on 2 CPUs
    assert job_file != "maskrcnn.yaml" or [s.name for s in job.stages] == ["masks"]


@pytest.mark.ray
def test_selective_search_then_detect_job_on_embedded_ray(ray_local, synth_ds, tmp_path):
    """jobs/rcnn_chain.yaml end to end; the detections equal the detect stage run on the same proposals."""
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    torch.manual_seed(2)
    small = {"min_size": 128, "max_size": 160}
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=4, **small)
    ckpt = tmp_path / "detector.pth"
    torch.save({"model": model.state_dict(), "model_name": name, "num_classes": 4}, ckpt)
    settings = {
        "stages.proposals.top_k": 100,
        "stages.proposals.num_cpus": 0.25,  # leave CPUs for read/decode tasks and the detector
        "stages.detect.num_cpus": 0.5,
        "stages.detect.weights": str(ckpt),
        "stages.detect.num_classes": 4,
        "stages.detect.score_threshold": 0.2,
        "stages.detect.max_detections": 20,
        "stages.detect.model_kwargs": small,
        "stages.detect.batch_size": 1,  # batches of one: no padding between images of different sizes
    }
    job = load_job(
        REPO / "jobs" / "rcnn_chain.yaml",
        overrides=[f"{k}={json.dumps(v)}" for k, v in settings.items()],
        input=synth_ds,
        output=str(tmp_path / "out"),
    )
    summary = run_job(job, progress=False)
    assert (summary["rows_in"], summary["rows_out"], summary["error_rows"]) == (24, 24, 0)
    rows = [r for shard in list_shards(str(tmp_path / "out")) for r in read_shard(shard).to_pylist()]
    assert all(0 < len(r["proposals"]) <= 100 for r in rows)
    assert sum(len(r["boxes"]) for r in rows) > 0

    # Two rows again, without Ray: the same proposals, then the same detections.
    sources = {r["image_id"]: r for shard in list_shards(synth_ds) for r in read_shard(shard).to_pylist()}
    proposer = ProposalsStage(method="selective_search", top_k=100, max_side=500)
    detector = DetectStage(
        model=name, weights=str(ckpt), num_classes=4, score_threshold=0.2, max_detections=20,
        model_kwargs=small, proposals_column=schema.PROPOSALS,
    )
    for row in rows[:2]:
        image = np.asarray(Image.open(io.BytesIO(sources[row["image_id"]]["image"])).convert("RGB"))
        again = detector(proposer(make_batch([image]))).to_pylist()[0]
        np.testing.assert_array_equal(boxes_of(again, "proposals"), boxes_of(row, "proposals"))
        assert boxes_of(again).shape == boxes_of(row).shape
        assert np.abs(boxes_of(again) - boxes_of(row)).max(initial=0) <= 1e-4
