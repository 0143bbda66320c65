"""The whole plan on embedded Ray: real Parquet in, real Parquet out, every row exactly once."""

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from torchvision.transforms.functional import to_tensor

from pipeline.cli import main
from pipeline.config.load import ConfigError
from pipeline.engine.jobfile import load_job
from pipeline.data.importers import import_images
from pipeline.data.shards import list_shards, read_meta, read_shard
from pipeline.engine.runner import run_job
from pipeline.models.registry import get_entry
from tests.badimages import HUGE_LIMIT, write_bad_dataset
from tests.conftest import FAST_DETECT, REPO

pytestmark = pytest.mark.ray


def detect_overrides(**extra) -> list[str]:
    settings = {**FAST_DETECT, **extra}
    return [f"stages.detect.{k}={json.dumps(v)}" for k, v in settings.items()]


def all_rows(path: str) -> list[dict]:
    return [r for shard in list_shards(path) for r in read_shard(shard).to_pylist()]


def test_cli_run_detect_job_on_synthetic_shards(ray_local, synth_ds, tmp_path):
    out = str(tmp_path / "pred")
    args = ["run", str(REPO / "jobs" / "detect.yaml"), "--input", synth_ds, "--output", out, "--no-progress"]
    args += [x for o in detect_overrides(pool_size=2, num_cpus=0.5, batch_size=3) for x in ("--set", o)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "rows_out" in result.output and "images_per_s" in result.output

    # One output shard per input shard, same names, same rows in the same order.
    assert [os.path.basename(p) for p in list_shards(out)] == [os.path.basename(p) for p in list_shards(synth_ds)]
    for src, dst in zip(list_shards(synth_ds), list_shards(out)):
        assert read_shard(dst, columns=["image_id"])["image_id"].to_pylist() == read_shard(src, columns=["image_id"])["image_id"].to_pylist()
    rows = all_rows(out)
    assert len(rows) == 24 and all(r["error"] is None for r in rows)
    assert "image" not in read_shard(list_shards(out)[0]).column_names  # no image bytes, no pixels
    assert sum(len(r["boxes"]) for r in rows) > 0

    record = json.loads((tmp_path / "pred" / "job.json").read_text())
    summary = record["summary"]
    assert (summary["rows_in"], summary["rows_out"], summary["error_rows"], summary["shards"]) == (24, 24, 0, 3)
    assert summary["images_per_s"] > 0 and summary["wall_s"] > 0
    # The input has ground truth, so the job was evaluated at its end (a random model: AP near 0).
    metrics = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert summary["bbox_AP"] == round(metrics["bbox"]["AP"], 4) and 0 <= metrics["bbox"]["AP"] < 0.2
    assert (tmp_path / "pred" / "pr_bbox.png").exists()
    assert record["spec"]["stages"][0]["pool_size"] == 2 and record["spec"]["input"] == synth_ds
    meta = read_meta(out)
    assert meta.kind == "predictions" and [c["name"] for c in meta.categories] == ["circle", "rectangle", "triangle"]

    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "--overwrite" in again.output  # never silently mixes two runs


def test_bad_images_lose_nothing(ray_local, tmp_path):
    src = str(tmp_path / "bad")
    expected = write_bad_dataset(src, rows_per_shard=5)
    job = load_job(
        REPO / "jobs" / "detect.yaml",
        overrides=detect_overrides() + [f"decode.max_pixels={HUGE_LIMIT}"],
        input=src,
        output=str(tmp_path / "out"),
    )
    summary = run_job(job, progress=False)
    rows = all_rows(str(tmp_path / "out"))
    assert Counter(r["image_id"] for r in rows) == Counter(list(expected))  # every id exactly once
    for row in rows:
        name, expectation = expected[row["image_id"]]
        if expectation == "ok":
            assert row["error"] is None and row["boxes"] is not None, name
        else:
            assert row["error"] and row["boxes"] is None, name
    assert summary["error_rows"] == sum(e == "error" for _, e in expected.values())
    assert "bbox_AP" not in summary  # no ground truth, no evaluation
    by_name = {expected[r["image_id"]][0]: r for r in rows}
    assert "decode.max_pixels" in by_name["huge.png"]["error"]
    assert (by_name["rotated.jpg"]["width"], by_name["rotated.jpg"]["height"]) == (60, 80)


def test_pipeline_matches_direct_torchvision_on_real_photos(ray_local, fixtures_dir, tmp_path):
    src = str(tmp_path / "photos")
    import_images(str(fixtures_dir / "images" / "skimage"), src, rows_per_shard=2)
    name = FAST_DETECT["model"]
    torch.manual_seed(1)
    settings = {get_entry(name).score_kwarg: 0.2, get_entry(name).max_dets_kwarg: 100}
    reference = torchvision.models.get_model(
        name, weights=None, weights_backbone=None, num_classes=4, **FAST_DETECT["model_kwargs"], **settings
    ).eval()
    ckpt = tmp_path / "model.pth"
    torch.save({"model": reference.state_dict(), "model_name": name, "num_classes": 4}, ckpt)
    job = load_job(
        REPO / "jobs" / "detect.yaml",
        overrides=detect_overrides(weights=str(ckpt), batch_size=1, max_detections=100),
        input=src,
        output=str(tmp_path / "out"),
    )
    run_job(job, progress=False)
    compared = 0
    for row in all_rows(str(tmp_path / "out")):
        image = np.asarray(Image.open(fixtures_dir / "images" / "skimage" / row["file_name"]).convert("RGB"))
        with torch.inference_mode():
            expected = reference([to_tensor(image)])[0]
        boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)
        assert boxes.shape == tuple(expected["boxes"].shape), row["file_name"]
        if len(boxes):
            assert np.abs(boxes - expected["boxes"].numpy()).max() <= 1e-4
            assert np.abs(np.asarray(row["scores"]) - expected["scores"].numpy()).max() <= 1e-4
        compared += len(boxes)
    assert compared > 0


def test_uncached_weights_fail_before_any_work(ray_local, synth_ds, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    job = load_job(REPO / "jobs" / "detect_coco.yaml", input=synth_ds, output=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"detect_coco.yaml: stages.0 \(detect\): .*fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth"):
        run_job(job, source=str(REPO / "jobs" / "detect_coco.yaml"), progress=False)
    assert not (tmp_path / "out").exists()
