"""Class names survive a job: the model's categories become the output's when the input names none,
and a run whose boxes mostly map to no input category says so (the first hour of a new user)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.data.importers import import_coco, import_images
from pipeline.data.render import label_text
from pipeline.data.shards import list_shards, read_meta, read_shard
from tests.conftest import REPO

pytestmark = pytest.mark.ray
SHAPES = ["circle", "rectangle", "triangle"]


def run_shapes_model(ray_local, input_path: str, out: str):
    args = ["run", str(REPO / "jobs" / "shapes_masks.yaml"), "--input", input_path, "--output", out, "--no-progress"]
    args += ["--set", f"stages.masks.weights={REPO / 'conf' / 'models' / 'small_maskrcnn_shapes.pth'}"]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_unlabelled_photos_get_the_model_class_names(ray_local, tmp_path):
    photos = str(tmp_path / "photos")
    import_images(str(REPO / "tests" / "fixtures" / "images" / "skimage"), photos)
    out = str(tmp_path / "pred")
    result = run_shapes_model(ray_local, photos, out)
    assert result.exit_code == 0, result.output
    categories = read_meta(out).categories
    assert [c["name"] for c in categories] == SHAPES  # was [] before: names lost
    ids = {c["id"] for c in categories}
    rows = [r for s in list_shards(out) for r in read_shard(s).to_pylist()]
    predicted = [cid for r in rows for cid in r["category_ids"] or []]
    assert predicted and set(predicted) <= ids  # every box carries a named category

    exported = tmp_path / "coco.json"
    done = CliRunner().invoke(main, ["data", "export-coco", out, str(exported), "--as-dataset"])
    assert done.exit_code == 0, done.output
    coco = json.loads(exported.read_text())
    assert [c["name"] for c in coco["categories"]] == SHAPES and coco["annotations"]
    names = {c["id"]: c["name"] for c in categories}
    assert label_text(predicted[0], 0.5, names).split()[0] in SHAPES


def test_labelled_input_of_other_classes_warns_with_both_name_lists(ray_local, tmp_path):
    sahi = REPO / "tests" / "fixtures" / "images" / "sahi"
    people = str(tmp_path / "people")
    import_coco(str(sahi), str(sahi / "terrain2_coco.json"), people)
    result = run_shapes_model(ray_local, people, str(tmp_path / "pred"))
    assert result.exit_code == 0, result.output
    warning = next(line for line in result.output.splitlines() if line.startswith("warning:"))
    assert "map to no category of the input" in warning and "circle, rectangle, triangle" in warning
    assert ", ".join(c["name"] for c in read_meta(people).categories) in warning


def test_predictions_record_their_provenance(ray_local, synth_ds, tmp_path):
    """dataset.json says which model, which weights file (sha256), which job and settings made the labels."""
    import hashlib

    checkpoint = REPO / "conf" / "models" / "small_maskrcnn_shapes.pth"
    out = str(tmp_path / "pred")
    result = run_shapes_model(ray_local, synth_ds, out)
    assert result.exit_code == 0, result.output
    info = read_meta(out).info
    record = json.loads((tmp_path / "pred" / "job.json").read_text())
    assert info["job"] == "shapes_masks" and info["source"] == synth_ds and info["finished"]
    assert info["spec_sha256"] == hashlib.sha256(json.dumps(record["spec"], sort_keys=True, default=str).encode()).hexdigest()
    stage = info["stages"][0]
    assert stage["model"] == "small_maskrcnn" and stage["score_threshold"] == 0.05
    assert stage["files"]["weights"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert "batch_size" not in stage  # resources do not decide the labels
