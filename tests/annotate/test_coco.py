"""export-coco: COCO results and COCO datasets that pycocotools and datumaro (CVAT's library) load back.

Moved from tests/eval/test_export.py (the results list's exactness against ``pipeline eval``),
plus thresholds and class maps, provenance, polygons, datumaro, and the way back through import-coco.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline import schema
from pipeline.annotate import AnnotationError
from pipeline.annotate.coco import export_coco, mask_polygons
from pipeline.cli import main
from pipeline.data.shards import DatasetMeta, list_shards, read_meta, read_shard, write_meta
from pipeline.eval import evaluate

from tests.eval.helpers import EXACT, stats_of


def _load(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _decode(rle) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def _cli(*args):
    return CliRunner().invoke(main, ["data", *map(str, args)])


# --- the results list and the dataset, as before (tests/eval/test_export.py) -------------------------


def test_results_hold_dataset_category_ids_and_xywh_boxes(synthetic, tmp_path):
    out = tmp_path / "results.json"
    report = export_coco(synthetic["pred"], str(out))
    results = json.loads(out.read_text())
    known = {c["id"] for c in synthetic["coco"]["categories"]}
    expected = [
        (row[schema.IMAGE_ID], c, box, s, m)
        for row in synthetic["rows"] if row[schema.ERROR] is None
        for box, c, s, m in zip(row[schema.BOXES] or [], row[schema.CATEGORY_IDS] or [], row[schema.SCORES] or [],
                                row[schema.MASKS] or [])
        if c in known
    ]
    assert report["detections"] == len(results) == len(expected)
    no_category = sum(1 for r in synthetic["rows"] if r[schema.ERROR] is None for c in r[schema.CATEGORY_IDS] or [] if c not in known)
    assert no_category > 0 and report["no_category"] == report["skipped"]["no_category"] == no_category
    for rec, (image_id, c, box, score, mask) in zip(results, expected):
        x1, y1, x2, y2 = (float(np.float32(v)) for v in box)
        assert rec["image_id"] == image_id and rec["category_id"] == c
        assert rec["bbox"] == [x1, y1, x2 - x1, y2 - y1]  # xyxy float32 -> xywh, exactly
        assert rec["score"] == float(np.float32(score))
        assert rec["segmentation"] == mask and isinstance(rec["segmentation"]["counts"], str)
        assert len(rec["keypoints"]) == 51
        assert "attributes" not in rec  # the results list is what evaluators read: nothing else
    gt = _load(synthetic["gt_json"])
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = gt.loadRes(str(out))
    assert len(loaded.anns) == len(results)


def test_dataset_round_trip(synthetic, tmp_path):
    out = tmp_path / "dataset.json"
    report = export_coco(synthetic["pred"], str(out), as_dataset=True)
    written = json.loads(out.read_text())
    coco = _load(out)
    assert coco.dataset == written  # loads back unchanged
    fine = [r for r in synthetic["rows"] if r[schema.ERROR] is None]
    assert 0 < report["error_rows"] == len(synthetic["rows"]) - len(fine)  # the case has error rows: left out
    assert report["images"] == len(written["images"]) == len(fine)
    assert [i["id"] for i in written["images"]] == [r[schema.IMAGE_ID] for r in fine]
    assert [c["id"] for c in written["categories"]] == [c["id"] for c in synthetic["coco"]["categories"]]
    anns = written["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    assert all(a["iscrowd"] == 0 and a["area"] > 0 and a["category_id"] != -1 for a in anns)
    assert all(a["attributes"] == {"source": "pred"} and 0 <= a["score"] <= 1 for a in anns)  # no job recorded: the folder's name
    assert set(coco.getCatIds()) >= {a["category_id"] for a in anns}
    # the exported dataset as ground truth for its own predictions: every box finds itself
    results = tmp_path / "results.json"
    export_coco(synthetic["pred"], str(results))
    metrics = evaluate([str(results)], str(out), ["bbox"], use_ray=False, use_state=False)
    assert metrics["bbox"]["AP50"] == 1.0 and metrics["bbox"]["AR100"] == 1.0


def test_results_round_trip_through_eval(synthetic, tmp_path):
    """The exported results file and the shards it came from give the same numbers."""
    out = tmp_path / "results.json"
    export_coco(synthetic["pred"], str(out))
    from_file = evaluate([str(out)], synthetic["gt"], ["bbox", "segm"], use_ray=False)
    from_shards = evaluate([synthetic["pred"]], synthetic["gt"], ["bbox", "segm"], use_ray=False, use_state=False)
    for t in ("bbox", "segm"):
        np.testing.assert_allclose(stats_of(from_file, t), stats_of(from_shards, t), rtol=0, atol=EXACT)


def _with_error_rows(tmp_path, *, categories, source="synthetic", info=None):
    """A small prediction dataset in which 2 rows are error rows with no size (as the decode step writes them)."""
    from pipeline.eval.synthetic_cases import synthetic_case, write_predictions

    coco, rows = synthetic_case(images=12, seed=5, detections_per_image=4, categories=3)
    rows = [r for r in rows if r[schema.ERROR] is None][:10]
    for r in rows[3:5]:
        r.update({schema.ERROR: "cannot decode image: truncated file", schema.WIDTH: None, schema.HEIGHT: None,
                  schema.BOXES: None, schema.SCORES: None, schema.LABELS: None, schema.CATEGORY_IDS: None,
                  schema.MASKS: None})
    pred = str(tmp_path / "pred")
    write_predictions(rows, pred, categories=coco["categories"], rows_per_shard=4)
    write_meta(pred, DatasetMeta(categories=categories(coco) if callable(categories) else categories,
                                 info=info or {"source": source}, kind="predictions"))
    return pred, rows, coco


def test_error_rows_are_left_out_and_counted(tmp_path):
    pred, rows, coco = _with_error_rows(tmp_path, categories=lambda coco: coco["categories"])
    bad = {r[schema.IMAGE_ID] for r in rows if r[schema.ERROR]}
    out = tmp_path / "dataset.json"
    result = _cli("export-coco", pred, out, "--as-dataset")
    assert result.exit_code == 0, result.output
    assert "for 8 images" in result.output and "left out 2 error row(s)" in result.output
    written = json.loads(out.read_text())
    assert len(written["images"]) == 8 and not bad & {i["id"] for i in written["images"]}
    assert all(isinstance(i["width"], int) and isinstance(i["height"], int) for i in written["images"])
    assert _load(out).dataset == written  # pycocotools takes it
    assert [c["name"] for c in written["categories"]] == [c["name"] for c in coco["categories"]]
    again = _cli("export-coco", pred, out, "--as-dataset")
    assert again.exit_code == 1 and "exists; pass --overwrite" in again.output
    assert _cli("export-coco", pred, out, "--as-dataset", "--overwrite").exit_code == 0

    results_out = tmp_path / "results.json"
    report = export_coco(pred, str(results_out))
    assert report["error_rows"] == 2 and report["images"] == 8
    records = json.loads(results_out.read_text())
    assert records and not bad & {r["image_id"] for r in records}


def test_categories_always_have_names(tmp_path):
    # no categories in dataset.json and no readable source: named as render names them
    pred, rows, _ = _with_error_rows(tmp_path, categories=[])
    out = tmp_path / "dataset.json"
    export_coco(pred, str(out), as_dataset=True)
    written = json.loads(out.read_text())
    used = sorted({c for r in rows for c in r[schema.CATEGORY_IDS] or [] if c != -1})
    assert written["categories"] == [{"id": c, "name": f"class {c}"} for c in used]
    assert _load(out).loadCats(used[0])[0]["name"] == f"class {used[0]}"
    # categories recorded without names get the same fallback
    pred, _, _ = _with_error_rows(tmp_path / "b", categories=[{"id": 1}, {"id": 2, "name": "dog"}, {"id": 3}])
    export_coco(pred, str(out), as_dataset=True)
    assert [c["name"] for c in json.loads(out.read_text())["categories"]] == ["class 1", "dog", "class 3"]


# --- thresholds, class maps, provenance -------------------------------------------------------------


def test_thresholds_and_class_map_in_both_forms(synthetic, tmp_path):
    cats = {c["id"]: c["name"] for c in synthetic["coco"]["categories"]}  # class1..class8
    cmap = {n: ("even" if i % 2 == 0 else "odd") for i, n in cats.items()}
    cmap["class1"] = None  # dropped
    (tmp_path / "map.yaml").write_text(yaml.safe_dump(cmap, sort_keys=False))
    args = ["--min-score", "0.3", "--min-score-per-class", "class2=0.8", "--categories", tmp_path / "map.yaml"]
    want = Counter()
    for row in synthetic["rows"]:
        if row[schema.ERROR] is not None:
            continue
        for c, s in zip(row[schema.CATEGORY_IDS], row[schema.SCORES]):
            if c not in cats or cmap[cats[c]] is None:
                continue
            if float(np.float32(s)) >= (0.8 if cats[c] == "class2" else 0.3):
                want[cmap[cats[c]]] += 1
    for form in ([], ["--as-dataset"]):
        out = tmp_path / f"out{len(form)}.json"
        result = _cli("export-coco", synthetic["pred"], out, *args, *form)
        assert result.exit_code == 0, result.output
        assert "dropped:" in result.output and "objects scoring below their threshold" in result.output
        written = json.loads(out.read_text())
        records = written["annotations"] if form else written
        # ids 1..K in the order the map first names each dataset class
        order = list(dict.fromkeys(v for v in cmap.values() if v is not None))
        ids = {n: i for i, n in enumerate(order, start=1)}
        got = Counter(r["category_id"] for r in records)
        assert got == Counter({ids[n]: k for n, k in want.items()})
        if form:
            assert written["categories"] == [{"id": i, "name": n} for n, i in ids.items()]
            assert written["info"]["selection"]["min_score_per_class"] == {"class2": 0.8}


def test_provenance_on_every_annotation(tmp_path):
    info = {"source": "synthetic", "job": "shapes_masks", "job_id": "20260101-abc", "spec_sha256": "f" * 64,
            "stages": [{"name": "masks", "type": "masks", "model": "small_maskrcnn", "weights": "conf/models/x.pth",
                        "score_threshold": 0.05,
                        "files": {"weights": {"path": "/repo/conf/models/small_maskrcnn_shapes.pth", "sha256": "0123456789abcdef" * 4}}}]}
    pred, _, _ = _with_error_rows(tmp_path, categories=lambda coco: coco["categories"], info=info)
    out = tmp_path / "d.json"
    report = export_coco(pred, str(out), as_dataset=True)
    written = json.loads(out.read_text())
    source = "shapes_masks: small_maskrcnn small_maskrcnn_shapes.pth sha256:0123456789ab; job 20260101-abc"
    assert report["source"] == written["info"]["source"] == source
    assert written["info"]["provenance"] == info
    assert written["annotations"] and all(a["attributes"] == {"source": source} and isinstance(a["score"], float)
                                          for a in written["annotations"])


def test_bad_input_names_the_item(synthetic, tmp_path):
    out = tmp_path / "x.json"
    (tmp_path / "map.yaml").write_text("class1: a\nclass99: b\n")
    result = _cli("export-coco", synthetic["pred"], out, "--categories", tmp_path / "map.yaml")
    assert result.exit_code == 1 and "class99" in result.output and "class2" in result.output and "Traceback" not in result.output
    result = _cli("export-coco", synthetic["pred"], out, "--min-score-per-class", "nosuch=0.5")
    assert result.exit_code == 1 and "unknown class nosuch" in result.output
    result = _cli("export-coco", synthetic["pred"], out, "--polygons")
    assert result.exit_code == 1 and "--polygons needs --as-dataset" in result.output
    with pytest.raises(AnnotationError, match="no 'masks' column"):
        pred, _, _ = _with_error_rows(tmp_path, categories=lambda coco: coco["categories"])
        import pyarrow.parquet as pq

        for shard in list_shards(pred):
            pq.write_table(read_shard(shard).drop_columns([schema.MASKS]), shard)
        export_coco(pred, str(out), as_dataset=True, polygons=True)
    # a malformed mask is named, never written
    bad = tmp_path / "bad"
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(synthetic["pred"], bad)
    shard = list_shards(str(bad))[0]
    table = read_shard(shard)
    rows = table.to_pylist()
    row = next(r for r in rows if r[schema.MASKS])
    row[schema.MASKS][0] = {"size": row[schema.MASKS][0]["size"], "counts": "00"}
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    with pytest.raises(AnnotationError, match=f"image_id {row[schema.IMAGE_ID]}.*malformed RLE"):
        export_coco(str(bad), str(out))


# --- polygons ---------------------------------------------------------------------------------------


def _ring_mask() -> np.ndarray:
    m = np.zeros((40, 50), np.uint8)
    m[5:30, 5:35] = 1
    m[10:20, 10:20] = 0  # a hole
    m[12:15, 12:15] = 1  # an island inside it: a part of its own
    m[22:26, 25:30] = 0  # a second hole
    m[33:38, 40:48] = 1  # a separate part
    return m


def test_polygons_keep_parts_and_holes():
    m = _ring_mask()
    counts = Counter()
    polygons = mask_polygons(m, tolerance=0, counts=counts)
    assert len(polygons) == 3 and counts == {"mask_holes": 2, "multipart_masks": 1}
    assert all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
    drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, *m.shape)))
    assert (drawn == m).all()  # tolerance 0: exactly the mask, holes included
    simple = mask_polygons(m, tolerance=2.0)
    assert sum(map(len, simple)) < sum(map(len, polygons))
    drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(simple, *m.shape))).astype(bool)
    assert (drawn & (m > 0)).sum() / (drawn | (m > 0)).sum() > 0.9
    assert mask_polygons(np.zeros((4, 4), np.uint8)) == []


# --- datumaro, CVAT's dataset library ---------------------------------------------------------------


def _coco_folder(tmp_path, images_ds: str, *export_args) -> tuple:
    """DIR/annotations/instances_default.json (our export) + DIR/images/default/<files>: what datumaro reads."""
    root = tmp_path / "coco"
    (root / "images" / "default").mkdir(parents=True)
    for s in list_shards(images_ds):
        for r in read_shard(s, columns=["file_name", "image"]).to_pylist():
            (root / "images" / "default" / r["file_name"]).write_bytes(r["image"])
    out = root / "annotations" / "instances_default.json"
    result = _cli("export-coco", *export_args, out, "--as-dataset")
    assert result.exit_code == 0, result.output
    return root, json.loads(out.read_text()), result.output


def _datumaro():
    """datumaro, installed by `make` (without its dependencies: see the Makefile); CI must have it."""
    if os.environ.get("CI"):
        import datumaro

        return datumaro
    return pytest.importorskip("datumaro", reason="datumaro (CVAT's dataset library): installed by `make`, see the Makefile")


def test_datumaro_imports_the_polygon_export(shapes, tmp_path):
    dm = _datumaro()
    images, pred, truth = shapes
    root, written, output = _coco_folder(tmp_path, images, pred, "--polygons", "--polygon-tolerance", "0.5")
    source = written["info"]["source"]
    ds = dm.Dataset.import_from(str(root), "coco_instances")
    merged = dm.Dataset.import_from(str(root), "coco_instances", merge_instance_polygons=True)
    labels = ds.categories()[dm.AnnotationType.label]
    by_name = {r["file_name"]: r for r in truth.values()}
    items = {item.id: item for item in ds}
    masks = {item.id: item for item in merged}
    fine = [r for r in truth.values() if r["error"] is None]
    assert sorted(items) == sorted(r["file_name"].rsplit(".", 1)[0] for r in fine)  # same images, error row left out
    ious, checked = [], 0
    for stem, item in items.items():
        row = by_name[stem + ".png"]
        assert item.media.size == (row["height"], row["width"])
        boxes = sorted((a for a in item.annotations if a.type == dm.AnnotationType.bbox), key=lambda a: a.id)
        assert len(boxes) == len(row["boxes"])
        for a, box, cat, score in zip(boxes, row["boxes"], row["category_ids"], row["scores"]):
            assert labels[a.label].name == ["circle", "rectangle", "triangle"][cat - 1]
            np.testing.assert_allclose([a.x, a.y, a.x + a.w, a.y + a.h], box, atol=1e-4)
            assert a.attributes["score"] == pytest.approx(score, abs=1e-6) and a.attributes["source"] == source
            polygons = [p for p in item.annotations if p.type == dm.AnnotationType.polygon and p.group == a.group]
            assert polygons and all(labels[p.label].name == labels[a.label].name for p in polygons)
        rles = sorted((a for a in masks[stem].annotations if a.type == dm.AnnotationType.mask), key=lambda a: a.id)
        assert len(rles) == len(row["masks"])
        for a, rle in zip(rles, row["masks"]):
            got, want = a.image.astype(bool), _decode(rle)
            ious.append((got & want).sum() / (got | want).sum())
            checked += 1
    assert checked > 10 and min(ious) >= 0.95, sorted(ious)[:5]


def test_datumaro_imports_the_rle_export_exactly(shapes, tmp_path):
    dm = _datumaro()
    images, pred, truth = shapes
    root, _, _ = _coco_folder(tmp_path, images, pred)
    by_name = {r["file_name"]: r for r in truth.values()}
    n = 0
    for item in dm.Dataset.import_from(str(root), "coco_instances"):
        row = by_name[item.id + ".png"]
        got = sorted((a for a in item.annotations if a.type == dm.AnnotationType.mask), key=lambda a: a.id)
        assert [a.image.astype(bool).tolist() for a in got] == [_decode(m).tolist() for m in row["masks"]]
        n += len(got)
    assert n > 10


# --- the way back: a tool's export (ids renumbered) imported against the original images -----------------


def _as_a_tool_exports_it(written: dict) -> dict:
    """Image and annotation ids renumbered (CVAT numbers from 1 in its own order), images shuffled."""
    rng = np.random.default_rng(0)
    images = [dict(im) for im in written["images"]]
    new_id = {im["id"]: 100 + n for n, im in enumerate(rng.permutation(images).tolist())}
    for im in images:
        im["id"] = new_id[im["id"]]
    anns = [{**a, "id": 5000 + n, "image_id": new_id[a["image_id"]]} for n, a in enumerate(written["annotations"])]
    return {**written, "images": images[::-1], "annotations": anns[::-1]}


@pytest.mark.parametrize("against", ["dataset", "folder"])
def test_round_trip_relinks_by_file_name(shapes, tmp_path, against):
    images, pred, truth = shapes
    export = tmp_path / "export.json"
    assert _cli("export-coco", pred, export, "--as-dataset").exit_code == 0
    tool = tmp_path / "from_tool.json"
    tool.write_text(json.dumps(_as_a_tool_exports_it(json.loads(export.read_text()))))
    if against == "dataset":
        source = images
    else:  # a folder of the files, in a sub-folder the tool's file_names do not name
        source = tmp_path / "photos"
        (source / "set1").mkdir(parents=True)
        for s in list_shards(images):
            for r in read_shard(s, columns=["file_name", "image"]).to_pylist():
                (source / "set1" / r["file_name"]).write_bytes(r["image"])
    result = _cli("import-coco", "--images", source, "--annotations", tool, tmp_path / "back")
    assert result.exit_code == 0, result.output
    assert ("relinked to" in result.output) if against == "dataset" else ("found by base name only: 9" in result.output)
    rows = [r for s in list_shards(str(tmp_path / "back")) for r in read_shard(s).to_pylist()]
    names = {c["id"]: c["name"] for c in read_meta(str(tmp_path / "back")).categories}
    originals = {r["file_name"]: r for s in list_shards(images) for r in read_shard(s).to_pylist()}
    n = 0
    for row in rows:
        file_name = row["file_name"].rsplit("/", 1)[-1]
        want = next(t for t in truth.values() if t["file_name"] == file_name)
        assert row["image"] == originals[file_name]["image"]
        if against == "dataset":
            assert row["image_id"] == originals[file_name]["image_id"] and row["file_name"] == file_name
        else:
            assert row["file_name"] == f"set1/{file_name}"
        anns = sorted(row["annotations"], key=lambda a: a["id"])  # the file lists them reversed; ids keep the order
        assert [names[a["category_id"]] for a in anns] == [["circle", "rectangle", "triangle"][c - 1] for c in want["category_ids"]]
        for a, box, rle in zip(anns, want["boxes"], want["masks"]):
            x, y, w, h = a["bbox"]
            np.testing.assert_allclose([x, y, x + w, y + h], box, atol=0.01)
            assert (_decode(a["segmentation"]["rle"]) == _decode(rle)).all()
            n += 1
    assert len(rows) == len(truth) - 1 and n > 10


def test_relink_refuses_images_the_dataset_does_not_have(shapes, tmp_path):
    images, pred, _ = shapes
    export = tmp_path / "export.json"
    export_coco(pred, str(export), as_dataset=True)
    written = json.loads(export.read_text())
    written["images"][0] = {**written["images"][0], "file_name": "elsewhere/not_ours.png"}
    export.write_text(json.dumps(written))
    result = _cli("import-coco", "--images", images, "--annotations", export, tmp_path / "back")
    assert result.exit_code == 1 and "not_ours.png" in result.output and "are not in" in result.output
