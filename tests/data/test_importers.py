import json

import pytest
from pycocotools import mask as mask_utils

from pipeline.data.importers import DataImportError, import_coco, import_images
from pipeline.data.info import dataset_info
from pipeline.data.shards import list_shards, read_meta, read_shard


def test_import_coco_with_images_and_polygons(fixtures_dir, tmp_path):
    case = fixtures_dir / "coco-eval" / "polygons_3img"
    out = str(tmp_path / "ds")
    result = import_coco(str(case), str(case / "gt.json"), out)
    gt = json.loads((case / "gt.json").read_text())
    assert result["images"] == len(gt["images"]) and result["errors"] == []
    rows = read_shard(list_shards(out)[0]).to_pylist()
    assert [r["image_id"] for r in rows] == sorted(im["id"] for im in gt["images"])
    by_id = {r["image_id"]: r for r in rows}
    for im in gt["images"]:
        assert by_id[im["id"]]["image"] == (case / im["file_name"]).read_bytes()  # bytes kept as found
    n_polys = sum(1 for r in rows for a in r["annotations"] if a["segmentation"] and a["segmentation"]["polygons"])
    assert n_polys == sum(1 for a in gt["annotations"] if isinstance(a.get("segmentation"), list))
    assert read_meta(out).categories == sorted(gt["categories"], key=lambda c: c["id"])


def test_import_coco_crowd_box_and_string_ids(fixtures_dir, tmp_path):
    case = fixtures_dir / "coco-eval" / "crowd_2299"
    out = str(tmp_path / "ds")
    result = import_coco(str(case), str(case / "gt.json"), out, allow_missing_images=True)
    # The fixture has no photo: the row is kept as an error row, with its annotations.
    assert len(result["errors"]) == 1 and "not found" in result["errors"][0]
    row = read_shard(list_shards(out)[0]).to_pylist()[0]
    assert row["image_id"] == 2299 and row["image"] is None and "not found" in row["error"]  # "2299" -> 2299
    crowd = [a for a in row["annotations"] if a["iscrowd"] == 1]
    assert len(crowd) == 1 and crowd[0]["segmentation"] is None and crowd[0]["bbox"] == [0, 18, 499, 263]
    info = dataset_info(out)
    assert info["crowd_annotations"] == 1 and info["error_rows"] == 1 and info["annotations"] == 14


def test_import_coco_uncompressed_crowd_rle(fixtures_dir, tmp_path):
    case = fixtures_dir / "coco-eval" / "val2014_100"
    out = str(tmp_path / "ds")
    import_coco(str(case), str(case / "gt.json"), out, allow_missing_images=True)
    raw = {a["id"]: a for a in json.loads((case / "gt.json").read_text())["annotations"] if a["iscrowd"]}
    rows = read_shard(list_shards(out)[0]).to_pylist()
    ours = {a["id"]: a for r in rows for a in r["annotations"] if a["iscrowd"]}
    assert set(ours) == set(raw) and len(raw) == 9
    for ann_id, ann in ours.items():
        seg = raw[ann_id]["segmentation"]
        assert isinstance(seg["counts"], list)  # the file stores uncompressed RLE
        theirs = mask_utils.decode(mask_utils.frPyObjects(seg, *seg["size"]))
        rle = ann["segmentation"]["rle"]
        assert (mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}) == theirs).all()


def test_missing_image_is_a_per_image_error(fixtures_dir, tmp_path):
    sahi = fixtures_dir / "images" / "sahi"
    out = str(tmp_path / "ds")
    result = import_coco(str(sahi), str(sahi / "terrain_all_coco.json"), out)
    assert result["images"] == 3
    assert len(result["errors"]) == 1 and "terrain3.png" in result["errors"][0]
    rows = read_shard(list_shards(out)[0]).to_pylist()
    assert sum(r["error"] is not None for r in rows) == 1
    assert sum(r["image"] is not None for r in rows) == 2


@pytest.mark.parametrize("file_name", ["../escape.jpg", "sub/../../escape.jpg", "/etc/passwd"])
def test_file_name_escaping_images_dir_is_refused(tmp_path, file_name):
    (tmp_path / "imgs").mkdir()
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": file_name, "width": 2, "height": 2}], "annotations": [], "categories": []}))
    with pytest.raises(DataImportError, match="escapes|absolute"):
        import_coco(str(tmp_path / "imgs"), str(ann), str(tmp_path / "out"))


def test_unreadable_annotations_file_is_named(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(DataImportError, match="broken.json"):
        import_coco(str(tmp_path), str(bad), str(tmp_path / "out"))
    with pytest.raises(DataImportError, match="missing.json"):
        import_coco(str(tmp_path), str(tmp_path / "missing.json"), str(tmp_path / "out"))


def test_annotation_for_unknown_image_is_refused(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [], "annotations": [{"id": 5, "image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1]}], "categories": []}))
    with pytest.raises(DataImportError, match="unknown image_id 9"):
        import_coco(str(tmp_path), str(ann), str(tmp_path / "out"))


def test_import_images_folder(fixtures_dir, tmp_path):
    out = str(tmp_path / "ds")
    result = import_images(str(fixtures_dir / "images" / "skimage"), out, rows_per_shard=2)
    assert result["images"] == 5 and result["shards"] == 3 and result["errors"] == []
    rows = [r for s in list_shards(out) for r in read_shard(s).to_pylist()]
    assert [r["image_id"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["file_name"] == "astronaut.png" and (rows[0]["width"], rows[0]["height"]) == (512, 512)
    assert all(r["annotations"] is None for r in rows)


# --- writing into a folder that already holds a dataset --------------------------------------


def _ids(out: str) -> list[int]:
    return [r["image_id"] for s in list_shards(out) for r in read_shard(s, columns=["image_id"]).to_pylist()]


def test_every_dataset_writer_refuses_a_non_empty_output_unless_overwrite(fixtures_dir, tmp_path):
    """The review's case: import 5 photos in shards of 2, then again in one shard. Without
    --overwrite the second import must fail and leave the first intact; with it, exactly the new
    dataset remains (no old part-00001/00002 beside the new shard)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    photos = fixtures_dir / "images" / "skimage"
    sahi = fixtures_dir / "images" / "sahi"
    runner = CliRunner()
    commands = {
        "import-images": lambda out, *extra: ["data", "import-images", str(photos), out, *extra],
        "import-coco": lambda out, *extra: ["data", "import-coco", "--images", str(sahi), "--annotations", str(sahi / "terrain1_coco.json"), out, *extra],
        "synth": lambda out, *extra: ["data", "synth", out, "--images", "5", "--seed", "1", *extra],
    }
    for name, argv in commands.items():
        out = str(tmp_path / name)
        first = runner.invoke(main, argv(out, "--rows-per-shard", "2"))
        assert first.exit_code == 0, first.output
        before = sorted(list_shards(out))
        again = runner.invoke(main, argv(out))
        assert again.exit_code == 1 and "not empty" in again.output and "--overwrite" in again.output, (name, again.output)
        assert sorted(list_shards(out)) == before  # nothing touched
        replaced = runner.invoke(main, argv(out, "--overwrite"))
        assert replaced.exit_code == 0, replaced.output
        assert len(list_shards(out)) == 1, name  # the old shards are gone
        ids = _ids(out)
        assert len(ids) == len(set(ids)) == dataset_info(out)["rows"], name


def test_overwrite_never_removes_files_that_are_not_a_dataset(fixtures_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="not part of a dataset"):
        import_images(str(fixtures_dir / "images" / "skimage"), str(out), overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me" and not list(out.glob("part-*"))


def test_import_coco_with_none_of_the_images_fails_and_writes_nothing(fixtures_dir, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    sahi = fixtures_dir / "images" / "sahi"
    out = tmp_path / "ds"
    result = CliRunner().invoke(
        main, ["data", "import-coco", "--images", str(tmp_path), "--annotations", str(sahi / "terrain_all_coco.json"), str(out)]
    )
    assert result.exit_code == 1 and "none of the 3 images" in result.output and "terrain1.jpg" in result.output
    assert not out.exists()
    # Ground truth alone (to evaluate against) is still possible, when asked for.
    gt_only = CliRunner().invoke(
        main,
        ["data", "import-coco", "--images", str(tmp_path), "--annotations", str(sahi / "terrain_all_coco.json"), str(out), "--allow-missing-images"],
    )
    assert gt_only.exit_code == 0, gt_only.output
    assert dataset_info(str(out))["error_rows"] == 3 and dataset_info(str(out))["annotations"] > 0


def test_import_coco_finds_images_by_base_name(fixtures_dir, tmp_path):
    """Tools export file_names without the folders (or under their own): a unique base name is found."""
    import shutil

    sahi = fixtures_dir / "images" / "sahi"
    coco = json.loads((sahi / "terrain_all_coco.json").read_text())
    for im in coco["images"]:
        im["file_name"] = "task_1/" + im["file_name"].rsplit("/", 1)[-1]  # the tool's folder
    ann = tmp_path / "export.json"
    ann.write_text(json.dumps(coco))
    photos = tmp_path / "photos" / "2026"
    photos.mkdir(parents=True)
    for name in ("terrain1.jpg", "terrain2.png"):
        shutil.copy(sahi / name, photos / name)
    result = import_coco(str(tmp_path / "photos"), str(ann), str(tmp_path / "ds"))
    rows = read_shard(list_shards(str(tmp_path / "ds"))[0]).to_pylist()
    found = [r for r in rows if r["image"] is not None]
    assert result["relinked"] == len(found) == 2 and len(result["errors"]) == 1  # terrain3.png is not in the fixture
    for r in found:
        assert r["file_name"].startswith("2026/") and r["image"] == (photos / r["file_name"].split("/")[1]).read_bytes()
    # two files with that base name: which one is meant is not guessed
    (tmp_path / "photos" / "2025").mkdir()
    shutil.copy(sahi / "terrain1.jpg", tmp_path / "photos" / "2025")
    with pytest.raises(DataImportError, match="matches several files"):
        import_coco(str(tmp_path / "photos"), str(ann), str(tmp_path / "ds2"))
