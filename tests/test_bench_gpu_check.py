"""bench/gpu_check.py on CPU: the script a GPU session will run works end to end.

The numbers of a CPU run mean nothing. What is checked:

* without CUDA it refuses with a message that says what it needs, unless ``--device cpu``;
* ``--device cpu`` runs data -> loop -> ``pipeline run`` -> table -> results file, and the loop and
  the pipeline write the same boxes and mask RLEs (masks task: the project's small Mask R-CNN on
  4 images of 128x96; one `pipeline run` on embedded Ray, under a minute on two cores);
* the detect side (its overrides of jobs/detect.yaml and the detect loop) and the masks/detect
  column, in process: a second `pipeline run` would double the test's time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
TINY = ["--images", "4", "--quick", "--size", "96", "--min-size", "96", "--max-size", "128",
        "--detect-model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--num-classes", "4",
        "--masks-model", "small_maskrcnn", "--masks-weights", "conf/models/small_maskrcnn_shapes.pth", "--loop-workers", "1"]


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _module():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its multiprocessing pool pickles functions by module name
    spec.loader.exec_module(module)
    return module


def _rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 13 and cells[0] in ("detect", "masks"):
            rows[cells[0]] = cells  # the last table printed wins
    return rows


def test_refuses_without_cuda_unless_device_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    proc = _run(["--images", "1"], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refused: no CUDA device" in proc.stderr
    assert "--device cpu" in proc.stderr
    assert "needs:" in proc.stderr


@pytest.mark.ray
def test_cpu_smoke_masks_end_to_end(tmp_path):
    results = tmp_path / "gpu_check.md"
    proc = _run(["--device", "cpu", "--tasks", "masks", *TINY, "--results", str(results), "--workdir", str(tmp_path / "work")],
                timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]

    rows = _rows(out)
    assert set(rows) == {"masks"}, out[-3000:]
    cells = rows["masks"]
    assert cells[1] == "small_maskrcnn" and cells[2] == "4"
    assert float(cells[4]) > 0 and float(cells[5]) > 0 and float(cells[6]) > 0  # loop, pipeline img/s, their ratio
    assert cells[7] == cells[8] == "n/a"  # no GPU: no utilisation
    assert cells[11] == "4/4", f"loop and pipeline outputs differ: {cells[11]}"
    assert "CPU smoke run: the numbers are not meaningful" in out
    assert re.search(r"masks: pipeline/loop \d+\.\d\d \((meets|misses) >= 0\.9\)", out)
    assert re.search(r"\[\s*[\d.]+ s\] data: 4 JPEGs", out)  # elapsed per phase
    assert re.search(r"\[\s*[\d.]+ s\] masks pipeline", out)

    text = results.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("## gpu_check ") and lines[0].endswith("(cpu)")
    assert "nvidia-smi not found" in text or "GPU " in text
    assert "pipeline/loop" in text and "masks/detect" in text and "phases: data" in text
    assert "python bench/gpu_check.py --device cpu" in text


def test_detect_overrides_loop_and_masks_detect_column(tmp_path):
    from pipeline.engine.jobfile import load_job

    gc = _module()
    args = gc.parse_args(["--device", "cpu", *TINY])
    assert args.tasks == ["detect", "masks"] and args.gpu_decode == []
    # Both jobs accept the overrides, and the loop's settings come from the resolved spec.
    for task in ("detect", "masks"):
        job = load_job(REPO / gc.JOBS[task][0], overrides=gc.overrides(args, task), input="x", output="y")
        stage = job.stages[0]
        assert (stage.num_gpus, stage.batch_size, stage.model_kwargs) == (0, 4, {"min_size": 96, "max_size": 128})
    assert job.stages[0].weights == str(REPO / "conf/models/small_maskrcnn_shapes.pth")
    gpu = gc.parse_args([])
    assert gpu.images == 2000 and gpu.gpu_decode == ["detect"] and "stages.detect.num_gpus=1" in gc.overrides(gpu, "detect")

    # The detect loop, in this process (no DataLoader workers), on 2 generated JPEGs.
    folder = tmp_path / "jpeg"
    folder.mkdir()
    gc.write_jpegs(folder, 2, 96)
    job = load_job(REPO / "jobs/detect.yaml", overrides=gc.overrides(args, "detect"), input="x", output="y")
    stage = {k: v for k, v in job.stages[0].stage_kwargs([]).items()
             if k in ("model", "weights", "num_classes", "score_threshold", "max_detections", "model_kwargs")}
    config = {"task": "detect", "stage": {**stage, "mask_threshold": 0.5}, "folder": str(folder), "device": "cpu",
              "decode": "cpu", "batch_size": 2, "workers": 0, "out": str(tmp_path / "loop.json")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert gc.loop_main(str(tmp_path / "config.json")) == 0
    loop = json.loads((tmp_path / "loop.json").read_text())
    assert loop["images"] == 2 and set(loop["samples"]) == {"000000.jpg", "000001.jpg"}
    # The decode_jpeg path of --gpu-decode, here on the CPU (on a GPU the same call gets device="cuda").
    (tmp_path / "config.json").write_text(json.dumps({**config, "decode": "nvjpeg", "out": str(tmp_path / "nv.json")}))
    assert gc.loop_main(str(tmp_path / "config.json")) == 0
    assert json.loads((tmp_path / "nv.json").read_text())["images"] == 2

    # The masks/detect column and the verdicts.
    base = {"images": 4, "dets_per_img": 1.0, "loop_util": None, "pipe_util": None, "same": (4, 4, 0.0), "loop_cmd_s": 1.0, "pipe_cmd_s": 2.0}
    rows = [{**base, "name": "detect", "model": "d", "loop_ips": 10.0, "pipe_ips": 9.5},
            {**base, "name": "masks", "model": "m", "loop_ips": 6.0, "pipe_ips": 4.0, "masks_detect": "0.60, 0.42", "masks_detect_pipe": 0.42}]
    table = _rows(gc.table_text(rows))
    assert table["detect"][6] == "0.95" and table["masks"][6] == "0.67" and table["masks"][10] == "0.60, 0.42"
    notes = gc.verdicts(rows, "cuda")
    assert notes == ["detect: pipeline/loop 0.95 (meets >= 0.9)", "masks: pipeline/loop 0.67 (misses >= 0.9)",
                     "masks/detect (pipeline) 0.42 (misses >= 0.5)"]


def test_utilisation_window_of_nvidia_smi_lines():
    import datetime as dt

    gc = _module()
    t0 = dt.datetime(2026, 12, 1, 4, 50, 0)
    lines = [f"{(t0 + dt.timedelta(seconds=0.5 * i)):%Y/%m/%d %H:%M:%S}.{(i % 2) * 500:03d}, {u}, {1000 + i}"
             for i, u in enumerate([0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 100])]
    csv = "\n".join(["garbage", *lines, "2026/12/01 04:50:09.000, [N/A], 5"])
    start = t0.timestamp() + 0.5  # samples 1..10 (10..100)
    u = gc.utilisation(csv, start, start + 4.5)
    assert u == {"mean": 55.0, "p90": 90.0, "mem_max_mib": 1010.0, "samples": 10}
    assert gc.utilisation(csv, 0, 1) is None
