"""Docs are part of the interface: fail when a command, job or setting is missing from them."""

import re

from tests.conftest import REPO
from tests.test_cli import all_commands
from pipeline.cli import main


def test_readme_starts_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    first_block = re.search(r"```\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]
    assert text.index("make demo") < 200


def test_readme_mentions_every_command():
    text = (REPO / "README.md").read_text()
    for name, cmd in all_commands(main).items():
        if not hasattr(cmd, "commands"):
            assert f"pipeline {name}" in text, f"README does not show `pipeline {name}`"


def test_jobs_readme_lists_every_job_with_its_command():
    text = (REPO / "jobs" / "README.md").read_text()
    for job in sorted((REPO / "jobs").glob("*.yaml")):
        assert f"`{job.name}`" in text, f"jobs/README.md does not list {job.name}"
        assert f"jobs/{job.name}" in text, f"jobs/README.md has no command running {job.name}"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


def test_quoted_accuracy_of_the_shipped_model_is_the_measured_one():
    """Every "bbox AP X, segm AP Y" in the docs is the shipped checkpoint's held-out AP, read from the
    one file that holds it (a stale 0.671 once survived a retraining in jobs/README.md)."""
    import json

    expected = json.loads((REPO / "conf" / "models" / "small_maskrcnn_shapes.json").read_text())["AP"]
    found = 0
    for doc in ("README.md", "jobs/README.md", "conf/models/README.md"):
        for bbox, segm in re.findall(r"bbox AP (\d\.\d+),? segm AP (\d\.\d+)", (REPO / doc).read_text()):
            found += 1
            for quoted, iou_type in ((bbox, "bbox"), (segm, "segm")):
                digits = len(quoted.split(".")[1])
                assert float(quoted) == round(expected[iou_type], digits), f"{doc} quotes {iou_type} AP {quoted}, measured {expected[iou_type]}"
    assert found >= 3  # README, jobs/README and conf/models/README all quote it
    demo = re.search(r"bbox_AP\s+(\S+)\nsegm_AP\s+(\S+)", (REPO / "README.md").read_text())
    assert demo and (float(demo.group(1)), float(demo.group(2))) == (expected["bbox"], expected["segm"])


def test_quoted_miou_of_the_shipped_semantic_model_is_the_measured_one():
    """Every "held-out ... mIoU X" in the docs is conf/models/small_unet_shapes.json's held-out mIoU."""
    import json

    expected = json.loads((REPO / "conf" / "models" / "small_unet_shapes.json").read_text())["semantic"]["mIoU"]
    found = 0
    for doc in ("README.md", "jobs/README.md", "conf/models/README.md"):
        for quoted in re.findall(r"held-out[^|]{0,80}?mIoU (\d\.\d+)", (REPO / doc).read_text(), re.S):
            found += 1
            assert float(quoted) == round(expected, len(quoted.split(".")[1])), f"{doc} quotes held-out mIoU {quoted}, measured {expected}"
    assert found >= 3  # README, jobs/README and conf/models/README all quote it


def test_quoted_top1_of_the_shipped_classifier_is_the_measured_one():
    """Every "held-out top-1 X" in the docs is conf/models/small_cnn_shapes.json's held-out top-1."""
    import json

    expected = json.loads((REPO / "conf" / "models" / "small_cnn_shapes.json").read_text())["classification"]["top1"]
    found = 0
    for doc in ("README.md", "jobs/README.md", "conf/models/README.md"):
        for quoted in re.findall(r"held-out top-1 (\d\.\d+)", (REPO / doc).read_text()):
            found += 1
            assert float(quoted) == round(expected, len(quoted.split(".")[1])), f"{doc} quotes held-out top-1 {quoted}, measured {expected}"
    assert found >= 3
