"""bench/generative.py runs end to end and prints its table (the full run, on the recipes' checkpoints: README.md)."""

from __future__ import annotations

import subprocess
import sys

import torch

from pipeline.train.loop import build_train_model, checkpoint_payload
from pipeline.train.train_spec import TrainSpec
from tests.conftest import REPO


def test_generative_bench_smoke(tmp_path):
    spec = TrainSpec(name="vae", train="unused", output="unused", model="conv_vae", image_size=32, model_kwargs={"latent": 4})
    torch.manual_seed(0)
    torch.save(checkpoint_payload(spec, build_train_model(spec, 0), []), tmp_path / "vae.pth")
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "generative.py"), "--vae", str(tmp_path / "vae.pth"), "--images", "6",
         "--reference-images", "12", "--sheet", str(tmp_path / "sheet.png")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in done.stdout.splitlines() if line.startswith("| ")}
    assert {"real at 32 px", "conv_vae", "uniform noise"} <= set(rows)
    assert 8.0 < float(rows["conv_vae"][0]) < 20.0  # untrained: wrong means at a scale of at most ~10 grey levels, worse than uniform
    assert (tmp_path / "sheet.png").stat().st_size > 0
