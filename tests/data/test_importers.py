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
    result = import_coco(str(case), str(case / "gt.json"), out)
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
    import_coco(str(case), str(case / "gt.json"), out)
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
