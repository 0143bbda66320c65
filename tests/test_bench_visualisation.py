"""bench/explain.py, bench/fool.py and bench/optimize.py run end to end and print their tables (the full runs: jobs/README.md, README.md)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_explain_bench_smoke():
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "explain.py"), "--images", "2", "--methods", "saliency,occlusion", "--stride", "16"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| saliency") or line.startswith("| occlusion")]
    assert len(rows) == 2 and "| random point |" in done.stdout
    explained = int(rows[0].split("|")[2])
    assert explained >= 1  # the shipped detector finds shapes with score >= 0.5 on two held-out images


def test_fool_bench_smoke():
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fool.py"), "--images", "4", "--epsilons", "8"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("| 8/255")]
    assert float(row.split("|")[2]) >= 0.75  # 1.0 on 200 images


def test_optimize_bench_smoke():
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "optimize.py"), "--images", "2", "--per-class", "1", "--textures", "1",
         "--steps-scale", "0.05"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == ["invert"] * 4 + ["deepdream", "class visualisation", "texture"]
