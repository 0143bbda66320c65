"""import-images --class-folders: an ImageFolder layout (DIR/<class>/**/<image>) becomes an image
classification set: categories 1..K = the sorted folder names, as torchvision's ImageFolder numbers
them (index + 1), a `label` per row, and classification evaluation against it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline import schema
from pipeline.cli import main
from pipeline.data.importers import DataImportError, import_images
from pipeline.data.shards import DatasetMeta, list_shards, read_meta, read_shard, write_meta, write_shard
from tests.data.label_folders import write_grey, write_rgb

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "zebra"}]
# file_name -> (image_id, label): sorted relative paths, label = the top-level folder's id
EXPECTED = {
    "cat/a/nested.jpg": (1, 1),
    "cat/b.png": (2, 1),
    "dog/broken.png": (3, 2),
    "dog/d.png": (4, 2),
    "zebra/z.png": (5, 3),
}


@pytest.fixture()
def classes(tmp_path):
    """zebra, cat, dog created in that order; cat has a nested folder (a JPEG), dog a corrupt PNG, and a
    text file that is no image."""
    root = tmp_path / "classes"
    write_rgb(root / "zebra" / "z.png", 4, 6, seed=1)
    write_rgb(root / "cat" / "b.png", 5, 3, seed=2)
    write_rgb(root / "cat" / "a" / "nested.jpg", 8, 10, seed=3)
    write_grey(root / "dog" / "d.png", np.full((2, 7), 9))
    (root / "dog" / "broken.png").write_bytes(b"not a png at all")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def rows_by_name(out: str) -> dict[str, dict]:
    return {r["file_name"]: r for shard in list_shards(out) for r in read_shard(shard).to_pylist()}


def test_folders_become_sorted_categories_and_each_row_gets_its_folders_label(classes, tmp_path):
    out = str(tmp_path / "ds")
    result = import_images(str(classes), out, class_folders=True, rows_per_shard=2)
    assert (result["images"], result["shards"]) == (5, 3)
    assert result["categories"] == CATEGORIES
    assert result["images_per_category"] == {"cat": 2, "dog": 2, "zebra": 1}

    rows = rows_by_name(out)
    assert {name: (r["image_id"], r["label"]) for name, r in rows.items()} == EXPECTED
    assert (rows["cat/a/nested.jpg"]["width"], rows["cat/a/nested.jpg"]["height"]) == (10, 8)
    assert rows["cat/a/nested.jpg"]["image"] == (classes / "cat" / "a" / "nested.jpg").read_bytes()
    assert all(r["error"] is None for name, r in rows.items() if name != "dog/broken.png")

    broken = rows["dog/broken.png"]  # an error row, bytes kept, still labelled dog
    assert broken["error"].startswith(f"cannot read image header of {classes / 'dog' / 'broken.png'}")
    assert broken["image"] == b"not a png at all" and broken["label"] == 2 and broken["width"] is None
    assert result["errors"] == [f"image 3: {broken['error']}"]
    assert read_shard(list_shards(out)[0]).schema.field(schema.LABEL).type == pa.int64()

    meta = read_meta(out)
    assert meta.categories == CATEGORIES
    assert meta.info == {"source": str(classes.resolve()), "labels_from": "class folders", "classification": True}


def test_labels_agree_with_torchvision_image_folder(classes, tmp_path):
    from torchvision.datasets import ImageFolder

    out = str(tmp_path / "ds")
    import_images(str(classes), out, class_folders=True)
    rows = rows_by_name(out)
    folder = ImageFolder(str(classes))
    assert folder.classes == [c["name"] for c in read_meta(out).categories]
    theirs = {Path(path).relative_to(classes).as_posix(): index for path, index in folder.samples}
    assert sorted(theirs) == sorted(rows)  # the same files (ImageFolder lists the corrupt one too)
    readable = [name for name, r in rows.items() if r["error"] is None]
    assert len(readable) == 4
    for name in readable:
        assert rows[name]["label"] == theirs[name] + 1, name
    image, index = folder[folder.samples.index((str(classes / "zebra" / "z.png"), 2))]  # it decodes what we kept
    assert image.size == (6, 4) and index + 1 == rows["zebra/z.png"]["label"]


def test_loose_images_empty_class_folders_and_label_maps_are_refused_before_writing(tmp_path):
    from torchvision.datasets import ImageFolder

    out = tmp_path / "out"
    loose = tmp_path / "loose"
    write_rgb(loose / "cat" / "a.png", 3, 3)
    write_rgb(loose / "x.png", 3, 3)
    write_rgb(loose / "y.jpg", 3, 3)
    with pytest.raises(DataImportError, match=r"2 image\(s\) lie directly in .*loose, in no class folder \(e\.g\. x\.png, y\.jpg\)"):
        import_images(str(loose), str(out), class_folders=True)
    assert not out.exists()

    empty = tmp_path / "empty"
    write_rgb(empty / "cat" / "a.png", 3, 3)
    (empty / "dog").mkdir()
    (empty / "owl").mkdir()
    (empty / "owl" / "notes.txt").write_text("no image here")
    with pytest.raises(DataImportError, match=r"2 class folder\(s\) of .*empty hold no image files \(.*\): dog, owl;"):
        import_images(str(empty), str(out), class_folders=True)
    with pytest.raises(FileNotFoundError, match="dog"):  # torchvision refuses the same folder
        ImageFolder(str(empty))
    assert not out.exists()

    with pytest.raises(DataImportError, match="--class-folders .* does not go with --labels or --categories"):
        import_images(str(empty), str(out), class_folders=True, labels_dir=str(empty))
    cli = CliRunner().invoke(main, ["data", "import-images", str(empty), str(out), "--class-folders", "--labels", str(empty)])
    assert cli.exit_code == 1 and "does not go with --labels" in cli.output and "Traceback" not in cli.output
    assert not out.exists()


def test_cli_reports_categories_error_rows_and_images_per_category(classes, tmp_path):
    out = str(tmp_path / "ds")
    result = CliRunner().invoke(main, ["data", "import-images", str(classes), out, "--class-folders"])
    assert result.exit_code == 0, result.output
    assert f"wrote 5 images, 0 annotations in 1 shard(s) to {out}" in result.stdout
    assert "class folders: 3 categories: 1 cat, 2 dog, 3 zebra" in result.stdout
    assert "images per category: cat 2, dog 2, zebra 1" in result.stdout
    assert "1 image(s) could not be read; kept as error rows" in result.stderr
    assert read_meta(out).categories == CATEGORIES


def test_classification_evaluation_against_the_imported_set(classes, tmp_path):
    from pipeline.eval import evaluate

    gt, pred = str(tmp_path / "gt"), str(tmp_path / "pred")
    import_images(str(classes), gt, class_folders=True)
    pred_schema = pa.schema([*schema.PREDICTION_BASE_SCHEMA,
                             pa.field(schema.CLASS_SCORES, schema.CLASS_SCORES_TYPE),
                             pa.field(schema.CLASS_CATEGORY_IDS, schema.CLASS_CATEGORY_IDS_TYPE)])
    predicted = {1: [1, 3], 2: [2, 1], 4: [2, 1], 5: [3, 2]}  # image_id -> ids, best first: 1, 4, 5 right, 2 wrong
    rows = [{schema.IMAGE_ID: i, schema.CLASS_CATEGORY_IDS: ids, schema.CLASS_SCORES: [0.7, 0.3]} for i, ids in predicted.items()]
    rows.append({schema.IMAGE_ID: 3, schema.ERROR: "cannot decode"})  # the corrupt image: wrong, counted
    write_shard(f"{pred}/part-00000.parquet", pa.Table.from_pylist(rows, schema=pred_schema))
    write_meta(pred, DatasetMeta(categories=CATEGORIES, kind="predictions"))

    m = evaluate([pred], gt, ["classification"], use_ray=False, use_state=False)["classification"]
    assert m["top1"] == pytest.approx(3 / 5) and m["top5"] is None  # fewer than 5 categories
    assert m["per_category"] == {"cat": {"top1": 0.5, "images": 2}, "dog": {"top1": 0.5, "images": 2},
                                 "zebra": {"top1": 1.0, "images": 1}}
    assert (m["counts"]["images"], m["counts"]["error_rows"], m["counts"]["top1_hits"]) == (5, 1, 3)
