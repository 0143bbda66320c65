"""import-images --labels: VOC-style label PNGs become the label_map column, bad ones error rows naming
the file; a segment job over such a dataset is evaluated against them."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import schema
from pipeline.cli import main
from pipeline.data.importers import DataImportError, import_images
from pipeline.data.info import dataset_info
from pipeline.data.label_maps import encode_png_label_map
from pipeline.data.shards import list_shards, read_meta, read_shard
from tests.conftest import REPO
from tests.data.label_folders import write_grey, write_rgb

A_VALUES = [[0, 1, 2, 255, 1, 1]] * 4


@pytest.fixture()
def folders(tmp_path):
    """Six images: a (grey label), sub/b.jpg (palette label), c (none), d (label of the wrong size),
    f (RGB label), g (label that is no PNG); plus a label file without an image and a text file."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    write_rgb(images / "a.png", 4, 6)
    write_rgb(images / "sub" / "b.jpg", 5, 8, seed=1)
    write_rgb(images / "c.png", 5, 5, seed=2)
    write_rgb(images / "d.png", 4, 4, seed=3)
    write_rgb(images / "f.png", 3, 3, seed=4)
    write_rgb(images / "g.png", 3, 3, seed=5)
    write_grey(labels / "a.png", A_VALUES)
    (labels / "sub").mkdir(parents=True)
    b_values = np.zeros((5, 8), np.uint8)
    b_values[1:4, 2:7] = 3
    (labels / "sub" / "b.png").write_bytes(encode_png_label_map(b_values))  # palette: read by index
    write_grey(labels / "d.png", np.zeros((3, 4)))
    write_rgb(labels / "f.png", 3, 3)
    (labels / "g.png").write_bytes(b"this is not a png")
    write_grey(labels / "orphan.png", np.zeros((2, 2)))
    (labels / "notes.txt").write_text("not a label")
    return images, labels, b_values


def rows_by_name(out: str) -> dict[str, dict]:
    return {r["file_name"]: r for shard in list_shards(out) for r in read_shard(shard).to_pylist()}


def test_label_maps_are_stored_as_given_and_bad_ones_are_error_rows_naming_the_file(folders, tmp_path):
    images, labels, b_values = folders
    out = str(tmp_path / "ds")
    result = import_images(str(images), out, labels_dir=str(labels), rows_per_shard=4)
    assert (result["images"], result["label_maps"], result["images_without_label_file"]) == (6, 2, 1)
    assert result["labels_without_image"] == ["orphan.png"]
    assert result["categories"] == [{"id": 1, "name": "class_1"}, {"id": 2, "name": "class_2"}, {"id": 3, "name": "class_3"}]
    rows = rows_by_name(out)
    assert [rows[n]["image_id"] for n in ("a.png", "c.png", "d.png", "f.png", "g.png", "sub/b.jpg")] == [1, 2, 3, 4, 5, 6]

    a = rows["a.png"]
    assert a["label_map"] == (labels / "a.png").read_bytes() and a["error"] is None  # the PNG bytes as given
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(a["label_map"]))), A_VALUES)
    b = rows["sub/b.jpg"]
    assert Image.open(io.BytesIO(b["label_map"])).mode == "P"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(b["label_map"]))), b_values)
    assert rows["c.png"]["label_map"] is None and rows["c.png"]["error"] is None  # kept, marked by a null label map

    assert rows["d.png"]["error"] == f"label map {labels / 'd.png'} is 4x3, its image is 4x4"
    assert rows["f.png"]["error"] == f"label map {labels / 'f.png'}: label map is a RGB image; expected 8-bit grey or palette (values = category ids)"
    assert rows["g.png"]["error"].startswith(f"label map {labels / 'g.png'}: cannot read the label map PNG")
    for name in ("d.png", "f.png", "g.png"):  # the image itself is fine: its bytes stay, its label map does not
        assert rows[name]["label_map"] is None and rows[name]["image"] == (images / name).read_bytes()
    assert result["errors"] == [f"image {rows[n]['image_id']}: {rows[n]['error']}" for n in ("d.png", "f.png", "g.png")]

    meta = read_meta(out)
    assert meta.info[schema.SEMANTIC_GROUND_TRUTH] == schema.LABEL_MAP and meta.categories == result["categories"]
    info = dataset_info(out)
    assert (info["rows"], info["label_maps"], info["error_rows"]) == (6, 2, 3)


def test_categories_file_coco_dicts_or_voc_names(folders, tmp_path):
    images, labels, _ = folders
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps([{"id": 3, "name": "car", "supercategory": "vehicle"}, {"id": 1, "name": "sky"}]))
    out = str(tmp_path / "coco")
    result = import_images(str(images), out, labels_dir=str(labels), categories_file=str(coco))
    assert read_meta(out).categories == [{"id": 1, "name": "sky"}, {"id": 3, "name": "car", "supercategory": "vehicle"}]
    a = rows_by_name(out)["a.png"]
    assert a["error"] == f"label map {labels / 'a.png'} has value(s) [2] that are no category id (nor 0 = background, 255 = ignore)"
    assert a["label_map"] is None and rows_by_name(out)["sub/b.jpg"]["label_map"] is not None
    assert result["label_maps"] == 1 and not result["categories_inferred"]

    voc = tmp_path / "voc.json"
    voc.write_text(json.dumps(["background", "sky", "road", "car"]))  # index = id; 0 is the background
    out = str(tmp_path / "voc")
    result = import_images(str(images), out, labels_dir=str(labels), categories_file=str(voc))
    assert read_meta(out).categories == [{"id": 1, "name": "sky"}, {"id": 2, "name": "road"}, {"id": 3, "name": "car"}]
    assert result["label_maps"] == 2


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read categories file"),
    ('{"id": 1}', "expected a JSON list"),
    ('[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]', "category id 1 is listed twice"),
    ('[{"id": 300, "name": "a"}]', r"id must be an integer 0\.\.254"),
    ('[{"id": 1}]', "has no name"),
    ('["background", {"id": 1, "name": "a"}]', "mixes names and category dicts"),
])
def test_a_bad_categories_file_is_refused_naming_it(folders, tmp_path, content, message):
    images, labels, _ = folders
    cats = tmp_path / "cats.json"
    cats.write_text(content)
    with pytest.raises(DataImportError, match=message) as info:
        import_images(str(images), str(tmp_path / "out"), labels_dir=str(labels), categories_file=str(cats))
    assert "cats.json" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_wrong_label_folders_are_refused_before_writing(folders, tmp_path):
    images, labels, _ = folders
    empty = tmp_path / "empty"
    write_grey(empty / "zzz.png", np.zeros((2, 2)))
    with pytest.raises(DataImportError, match=r"none of the 6 images .* has a label file .* e\.g\. a\.png"):
        import_images(str(images), str(tmp_path / "out"), labels_dir=str(empty))
    with pytest.raises(DataImportError, match="labels: not a folder"):
        import_images(str(images), str(tmp_path / "out"), labels_dir=str(tmp_path / "missing"))
    with pytest.raises(DataImportError, match="give --labels with --categories"):
        import_images(str(images), str(tmp_path / "out"), categories_file=str(tmp_path / "c.json"))
    assert not (tmp_path / "out").exists()


def test_label_pngs_beside_or_under_the_images_are_not_imported_as_images(tmp_path):
    flat = tmp_path / "flat"  # x.jpg and its label x.png in one folder
    write_rgb(flat / "x.jpg", 4, 4)
    write_grey(flat / "x.png", np.ones((4, 4)))
    result = import_images(str(flat), str(tmp_path / "a"), labels_dir=str(flat))
    assert result["images"] == 1 and result["label_maps"] == 1
    nested = tmp_path / "nested"  # labels in a sub-folder of the images
    write_rgb(nested / "y.png", 3, 5)
    write_grey(nested / "labels" / "y.png", np.full((3, 5), 2))
    result = import_images(str(nested), str(tmp_path / "b"), labels_dir=str(nested / "labels"))
    assert result["images"] == 1 and list(rows_by_name(str(tmp_path / "b"))) == ["y.png"]


def test_cli_reports_label_maps_error_rows_and_orphans(folders, tmp_path):
    images, labels, _ = folders
    out = str(tmp_path / "ds")
    result = CliRunner().invoke(main, ["data", "import-images", str(images), out, "--labels", str(labels)])
    assert result.exit_code == 0, result.output
    assert "wrote 6 images" in result.stdout
    assert "label maps: 2 of 6 image(s); 3 categories (from the values found): 1 class_1, 2 class_2, 3 class_3" in result.stdout
    assert "3 image(s) could not be read; kept as error rows" in result.stderr
    assert f"image 3: label map {labels / 'd.png'} is 4x3, its image is 4x4" in result.stderr
    assert "1 image(s) have no label file" in result.stderr and "left out of semantic evaluation" in result.stderr
    assert "warning: 1 label file(s) match no image, not imported: orphan.png" in result.stderr
    info = CliRunner().invoke(main, ["data", "info", out])
    assert any(line.split() == ["label_maps", "2"] for line in info.output.splitlines())
    bad = CliRunner().invoke(main, ["data", "import-images", str(images), str(tmp_path / "o"), "--categories", "c.json"])
    assert bad.exit_code == 1 and "give --labels with --categories" in bad.output and "Traceback" not in bad.output


def test_a_segment_job_over_label_maps_is_evaluated_against_them(tmp_path):
    """Tiny images, small_unet with random weights, run in this process (no Ray) as training's
    validation runs a job; the input has no annotations, only label maps, and one image without."""
    from pipeline.engine.jobfile import load_job
    from pipeline.engine.preflight import preflight
    from pipeline.engine.runner import evaluate_output, execute
    from tests.stages.test_segment import label_map

    images, labels = tmp_path / "images", tmp_path / "labels"
    truth = {}
    for n, (h, w) in enumerate([(24, 32), (20, 20), (16, 24)]):
        write_rgb(images / f"im{n}.png", h, w, seed=n)
        if n < 2:  # im2 has no label file
            values = np.zeros((h, w), np.uint8)
            values[4:12, 3:15] = 1 + n
            values[0, :] = 255
            truth[f"im{n}.png"] = write_grey(labels / f"im{n}.png", values)
    src, out = str(tmp_path / "ds"), str(tmp_path / "pred")
    import_images(str(images), src, labels_dir=str(labels))
    settings = {"model": "small_unet", "num_classes": 3, "resize": "native", "batch_size": 2}
    job = load_job(REPO / "jobs" / "segment.yaml", input=src, output=out,
                   overrides=[f"stages.segment.{k}={json.dumps(v)}" for k, v in settings.items()])
    execute(preflight(job, "jobs/segment.yaml"), progress=False, local=True)

    summary = evaluate_output(job)
    metrics = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert list(metrics) == ["semantic"] and summary == {"semantic_mIoU": round(metrics["semantic"]["mIoU"], 4)}
    counts = metrics["semantic"]["counts"]
    assert (counts["images"], counts["images_without_label_map"], counts["gt_label_maps"]) == (2, 1, 2)
    predicted = {r["file_name"]: label_map(r) for shard in list_shards(out) for r in read_shard(shard).to_pylist()}
    gt = np.concatenate([v.reshape(-1) for v in truth.values()])
    pred = np.concatenate([predicted[name].reshape(-1) for name in truth])
    labelled = gt != 255
    assert counts["pixels"] == labelled.sum()
    assert metrics["semantic"]["pACC"] == pytest.approx(np.mean(gt[labelled] == pred[labelled]), abs=1e-12)
