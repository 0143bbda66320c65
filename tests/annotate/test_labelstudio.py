"""export-labelstudio and import-labelstudio: checked with Label Studio's own brush codec and a round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from pycocotools import mask as mask_utils

from pipeline import schema
from pipeline.annotate import AnnotationError
from pipeline.annotate.labelstudio import brush_codec, import_labelstudio
from pipeline.annotate.yolo import mask_outline
from pipeline.cli import main
from pipeline.data.shards import list_shards, read_meta, read_shard


def _export(pred, out, *extra):
    result = CliRunner().invoke(main, ["data", "export-labelstudio", pred, str(out), "--image-root", "http://host/images/", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def _decode(rle):
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_boxes_in_percent_and_config(shapes, tmp_path):
    _, pred, truth = shapes
    tasks = _export(pred, tmp_path / "tasks.json")
    config = (tmp_path / "tasks.xml").read_text()
    assert '<Image name="image" value="$image"/>' in config and '<RectangleLabels name="label" toName="image">' in config
    assert '<Label value="circle"/>' in config
    by_url = {t["data"]["image"]: t for t in tasks}
    assert len(tasks) == len(truth) - 1  # the error row has no task
    ids = [r["id"] for t in tasks for r in t["predictions"][0]["result"]]
    assert len(ids) == len(set(ids)) > 10
    for row in truth.values():
        if row["error"] is not None:
            assert f"http://host/images/{row['file_name']}" not in by_url
            continue
        pred_ = by_url[f"http://host/images/{row['file_name']}"]["predictions"][0]
        assert pred_["model_version"] == "shapes_test"
        result = pred_["result"]
        assert len(result) == len(row["boxes"])
        if result:
            assert pred_["score"] == pytest.approx(min(row["scores"]), abs=1e-6)
        for r, box, score in zip(result, row["boxes"], row["scores"]):
            v, w, h = r["value"], r["original_width"], r["original_height"]
            assert (w, h) == (row["width"], row["height"]) and v["rotation"] == 0 and r["type"] == "rectanglelabels"
            back = [v["x"] * w / 100, v["y"] * h / 100, (v["x"] + v["width"]) * w / 100, (v["y"] + v["height"]) * h / 100]
            np.testing.assert_allclose(back, box, atol=0.01)
            assert r["score"] == pytest.approx(score, abs=1e-6)


def test_brush_masks_decode_with_label_studio_codec(shapes, tmp_path):
    _, pred, truth = shapes
    tasks = _export(pred, tmp_path / "b.json", "--masks", "brush")
    assert "<BrushLabels" in (tmp_path / "b.xml").read_text()
    brush = brush_codec()
    by_name = {t["data"]["image"].rsplit("/", 1)[1]: t for t in tasks}
    checked = 0
    for row in truth.values():
        if row["error"] is not None:
            continue
        result = by_name[row["file_name"]]["predictions"][0]["result"]
        for r, rle in zip(result, row["masks"]):
            assert r["type"] == "brushlabels" and r["value"]["format"] == "rle"
            layers = brush.decode_from_annotation("label", [{**r, "rle": r["value"]["rle"]}])  # LS's own decoder
            (got,) = layers.values()
            assert (got > 0).tolist() == _decode(rle).tolist()
            checked += 1
    assert checked > 10


def _accept(tasks):
    """What a person accepting every pre-annotation exports: predictions become annotations."""
    return [{"id": 100 + n, "data": t["data"], "annotations": [{"id": n, "result": t["predictions"][0]["result"]}],
             "predictions": []} for n, t in enumerate(tasks)]


def _imported(out):
    rows = [r for s in list_shards(out) for r in read_shard(s).to_pylist()]
    names = {c["id"]: c["name"] for c in read_meta(out).categories}
    return {r[schema.FILE_NAME]: r for r in rows}, names


@pytest.mark.parametrize("masks", [None, "brush", "polygons"])
def test_round_trip_export_accept_import(shapes, tmp_path, masks):
    images, pred, truth = shapes
    tasks = _export(pred, tmp_path / "t.json", *(["--masks", masks] if masks else []))
    (tmp_path / "export.json").write_text(json.dumps(_accept(tasks)))
    folder = tmp_path / "files"
    folder.mkdir()
    for s in list_shards(images):
        for r in read_shard(s).to_pylist():
            if r["image_id"] != 5:  # one file the importer will not find
                (folder / r["file_name"]).write_bytes(r["image"])
    result = CliRunner().invoke(main, ["data", "import-labelstudio", str(tmp_path / "export.json"), str(tmp_path / "ds"), "--images", str(folder)])
    assert result.exit_code == 0, result.output
    assert "1 image(s) could not be read" in result.output and truth[5]["file_name"] in result.output
    rows, names = _imported(str(tmp_path / "ds"))
    assert sorted(names.values()) == list(names.values()) == ["circle", "rectangle", "triangle"]
    assert len(rows) == len(truth) - 1
    assert rows[truth[5]["file_name"]]["error"] is not None and rows[truth[5]["file_name"]]["annotations"]
    n = partial = 0
    for row in truth.values():
        if row["error"] is not None:
            continue
        got = rows[row["file_name"]]
        assert (got["width"], got["height"]) == (row["width"], row["height"])
        anns = got["annotations"]
        assert [names[a["category_id"]] for a in anns] == [["circle", "rectangle", "triangle"][c - 1] for c in row["category_ids"]]
        for a, box, rle in zip(anns, row["boxes"], row["masks"]):
            x, y, w, h = a["bbox"]
            want = _decode(rle)
            if masks == "polygons":
                pieces, holes = mask_outline(want)
                if len(pieces) > 1 or holes:  # the largest piece, holes filled: counted at export, checked there
                    partial += 1
                    continue
                # one piece: the outline's extent lies 1/8 px inside the mask's pixel edges
                np.testing.assert_allclose([x, y, x + w, y + h], box, atol=0.125 + 1e-6)
                drawn = mask_utils.decode(mask_utils.frPyObjects(a["segmentation"]["polygons"], *want.shape))[:, :, 0].astype(bool)
                assert (drawn & want).sum() / (drawn | want).sum() >= 0.95
            else:
                np.testing.assert_allclose([x, y, x + w, y + h], box, atol=0.01)
            if masks == "brush":
                assert (_decode(a["segmentation"]["rle"]) == want).all()
            n += 1
    assert n > 10 and partial <= 2


def test_import_refuses_unknown_region_types(tmp_path):
    export = tmp_path / "e.json"
    export.write_text(json.dumps([{"id": 42, "data": {"image": "http://h/a.png"},
                                   "annotations": [{"result": [{"id": "r1", "type": "choices", "value": {"choices": ["x"]}}]}]}]))
    with pytest.raises(AnnotationError, match="task 42: region 'r1' has type 'choices'"):
        import_labelstudio(str(export), str(tmp_path / "o"), images_dir=str(tmp_path))
    result = CliRunner().invoke(main, ["data", "import-labelstudio", str(export), str(tmp_path / "o"), "--images", str(tmp_path)])
    assert result.exit_code == 1 and "task 42" in result.output and "Traceback" not in result.output
