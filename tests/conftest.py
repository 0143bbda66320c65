"""Shared fixtures: the path of the externally authored fixtures (tests/fixtures/), small synthetic datasets, one local Ray.

Tests that need Ray take the ``ray_local`` fixture (one embedded instance per session, 2 CPUs,
like the machines this runs on); everything else runs without starting Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # copied into the repo: the suite needs nothing beside it

# Small, fast detector settings for tests: a real torchvision model, random weights, small input.
FAST_DETECT = {
    "model": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "weights": "none",
    "num_classes": 4,
    "score_threshold": 0.2,
    "model_kwargs": {"min_size": 128, "max_size": 160, "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50},
}


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"fixtures not found at {FIXTURES} (they are part of the repository)")
    return FIXTURES


@pytest.fixture(scope="session")
def synth_ds(tmp_path_factory) -> str:
    """24 synthetic images in 3 shards of 8."""
    from pipeline.data.synth import synth_dataset

    out = str(tmp_path_factory.mktemp("synth") / "shapes")
    synth_dataset(out, images=24, seed=7, size=96, rows_per_shard=8)
    return out


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        # address="local": a private instance even if another Ray cluster runs on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
