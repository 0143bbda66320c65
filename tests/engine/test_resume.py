"""Resume: a driver killed with SIGKILL mid-job, then --resume, gives exactly the uninterrupted rows.

The kill test runs the shipped small Mask R-CNN (jobs/shapes_masks.yaml) on synthetic shapes, so
the rows compared hold real boxes and masks, not the empty lists of a random-init detector.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config.load import ConfigError
from pipeline.engine.jobfile import load_job
from pipeline.data.shards import list_shards, read_shard
from pipeline.data.synth import synth_dataset
from pipeline.engine.preflight import preflight
from pipeline.engine.job_record import read_record
from pipeline.engine.runner import run_job
from tests.conftest import FAST_DETECT, REPO

pytestmark = pytest.mark.ray
SHARDS = 12


SHIPPED = REPO / "conf" / "models" / "small_maskrcnn_shapes.pth"


def masks_args() -> list[str]:
    settings = {"weights": str(SHIPPED), "batch_size": 2, "num_cpus": 0.5, "score_threshold": 0.5}
    return [x for k, v in settings.items() for x in ("--set", f"stages.masks.{k}={json.dumps(v)}")]


def detect_args(**extra) -> list[str]:
    settings = {**FAST_DETECT, "batch_size": 2, "num_cpus": 0.5, **extra}
    return [x for k, v in settings.items() for x in ("--set", f"stages.detect.{k}={json.dumps(v)}")]


def tables(out: str) -> dict[str, list[dict]]:
    return {os.path.basename(p): read_shard(p).to_pylist() for p in list_shards(out)}


@pytest.fixture(scope="module")
def twelve_shards(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("resume") / "shapes")
    synth_dataset(out, images=4 * SHARDS, seed=5, size=96, rows_per_shard=4)
    return out


def test_sigkilled_driver_resumes_to_the_same_rows(ray_local, twelve_shards, tmp_path):
    spec = str(REPO / "jobs" / "shapes_masks.yaml")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    job = load_job(spec, input=twelve_shards, output=full, overrides=[a for a in masks_args() if a != "--set"])
    run_job(job, progress=False)
    rows = [r for t in tables(full).values() for r in t]
    assert sum(len(r["boxes"]) for r in rows) >= len(rows)  # the model finds the shapes (2-3 per image)
    assert all(len(r["masks"]) == len(r["boxes"]) for r in rows)

    # The same job as a separate driver process (its own embedded Ray), killed once some shards are out.
    cmd = [sys.executable, "-m", "pipeline", "run", spec, "--input", twelve_shards, "--output", part, "--no-progress"]
    proc = subprocess.Popen(cmd + masks_args(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    done = 0
    deadline = time.time() + 240
    try:
        while proc.poll() is None and time.time() < deadline:
            done = len([p for p in os.listdir(part) if p.endswith(".parquet")]) if os.path.isdir(part) else 0
            if done >= 2:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    assert 2 <= done < SHARDS, f"kill came at {done} shards; the test needs a job cut in the middle"
    assert read_record(part)["state"] == "running"  # what a killed driver leaves behind
    before = {p: os.stat(p).st_mtime_ns for p in list_shards(part)}

    # Without --resume the output is refused; with it, finished shards are kept as they are.
    job_part = load_job(spec, input=twelve_shards, output=part, overrides=[a for a in masks_args() if a != "--set"])
    with pytest.raises(ConfigError, match="--resume"):
        preflight(job_part, "shapes_masks.yaml")
    summary = run_job(job_part, resume=True, progress=False)
    assert summary["shards_skipped"] == len(before) and summary["rows_out"] == 4 * SHARDS
    assert {p: os.stat(p).st_mtime_ns for p in before} == before  # not rewritten
    assert tables(part) == tables(full)  # exactly the rows of the uninterrupted run
    assert read_record(part)["state"] == "succeeded"

    # Resuming a finished job is a no-op that still reports the whole output.
    again = run_job(job_part, resume=True, progress=False)
    assert again["shards_skipped"] == SHARDS and again["rows_out"] == 4 * SHARDS


def test_resume_refuses_an_output_written_by_other_settings(ray_local, synth_ds, tmp_path):
    spec = str(REPO / "jobs" / "detect.yaml")
    out = str(tmp_path / "out")
    args = ["run", spec, "--input", synth_ds, "--output", out, "--no-progress"] + detect_args()
    assert CliRunner().invoke(main, args, catch_exceptions=False).exit_code == 0
    # Resources may change between runs; what decides the rows may not.
    ok = CliRunner().invoke(main, args + ["--resume", "--set", "stages.detect.batch_size=3"])
    assert ok.exit_code == 0, ok.output
    refused = CliRunner().invoke(main, args + ["--resume", "--set", "stages.detect.score_threshold=0.6"])
    assert refused.exit_code != 0
    assert "stages.0.score_threshold: 0.2 then, 0.6 now" in refused.output
