"""Inputs for stage tests: real photos (downscaled) and synthetic shapes, as decoded batches.

Stage tests run stage objects directly: they must not start Ray. Tests marked ``ray`` (the
chained job in test_chain.py) are the exception; everywhere else ``ray.init`` raises.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png")


@pytest.fixture(autouse=True)
def _no_ray_in_unit_tests(request, monkeypatch):
    if request.node.get_closest_marker("ray"):
        return
    import ray

    def forbidden(*args, **kwargs):
        raise AssertionError("a stage unit test tried to start Ray; mark it pytest.mark.ray if it must")

    monkeypatch.setattr(ray, "init", forbidden)


@pytest.fixture(scope="session")
def photos(fixtures_dir) -> list[np.ndarray]:
    """Three real photos as RGB arrays, thumbnailed to <= 160 px so R-CNNs stay quick on two cores."""
    out = []
    for name in PHOTOS:
        img = Image.open(fixtures_dir / "images" / "skimage" / name).convert("RGB")
        img.thumbnail((160, 160))
        out.append(np.asarray(img))
    return out


@pytest.fixture(scope="session")
def synth_images() -> list[np.ndarray]:
    """Three synthetic shape images (pipeline.data.synth, seed 3), about 96 px."""
    from pipeline.data.synth import synth_image

    return [np.asarray(Image.open(io.BytesIO(synth_image(3, i, size=96)[0])).convert("RGB")) for i in range(3)]
