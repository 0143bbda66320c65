"""pipeline data merge: counts per category, human annotations untouched, a source per annotation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.annotate import AnnotationError
from pipeline.annotate.merge import ANNOTATION_SCORES, ANNOTATION_SOURCES, merge
from pipeline.annotate.select import SelectOptions
from pipeline.cli import main
from pipeline.data.shards import DatasetMeta, list_shards, read_meta, read_shard, write_meta

NAMES = ["circle", "rectangle", "triangle"]


@pytest.fixture(scope="module")
def half_labelled(shapes, tmp_path_factory):
    """The shapes images with every other annotation removed: what a person labelled so far."""
    images, pred, truth = shapes
    out = tmp_path_factory.mktemp("half") / "ds"
    out.mkdir()
    for shard in list_shards(images):
        table = read_shard(shard)
        rows = table.to_pylist()
        for r in rows:
            r["annotations"] = r["annotations"][::2]
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out / shard.rsplit("/", 1)[1])
    shutil.copy(f"{images}/dataset.json", out / "dataset.json")
    return str(out)


def _rows(path):
    return {r["image_id"]: r for s in list_shards(str(path)) for r in read_shard(s).to_pylist()}


def _raw_annotations(path):
    """image_id -> the annotations column's Arrow value (what is stored, not a Python copy)."""
    out = {}
    for s in list_shards(str(path)):
        t = read_shard(s, columns=["image_id", "annotations"])
        for i, anns in zip(t["image_id"].to_pylist(), t["annotations"]):
            out[i] = anns
    return out


def _iou(a, b):
    """Box IoU, xyxy (written here, not pycocotools: the merge uses pycocotools)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _expected(ds, truth, *, min_score, iou):
    """Per category: (added, skipped) for fill-missing, computed from the truth."""
    rows = _rows(ds)
    added, skipped = {n: 0 for n in NAMES}, {n: 0 for n in NAMES}
    for i, t in truth.items():
        if t["error"] is not None:
            continue
        gt = [(a["category_id"], [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]])
              for a in rows[i]["annotations"]]
        for box, score, cat in zip(t["boxes"], t["scores"], t["category_ids"]):
            if float(np.float32(score)) < min_score:
                continue
            hit = any(c == cat and _iou([float(np.float32(v)) for v in box], g) >= iou for c, g in gt)
            (skipped if hit else added)[NAMES[cat - 1]] += 1
    return added, skipped


def test_fill_missing_counts_and_human_annotations_untouched(shapes, half_labelled, tmp_path):
    images, pred, truth = shapes
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["data", "merge", half_labelled, pred, str(out), "--mode", "fill-missing",
                                       "--iou", "0.5", "--min-score", "0.5"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "merge.json").read_text())
    added, skipped = _expected(half_labelled, truth, min_score=0.5, iou=0.5)
    assert sum(added.values()) > 3 and sum(skipped.values()) > 3
    ds_rows = _rows(half_labelled)
    kept = {n: sum(1 for r in ds_rows.values() for a in r["annotations"] if a["category_id"] == k + 1) for k, n in enumerate(NAMES)}
    for name in NAMES:
        c = report["per_category"][name]
        assert (c["kept"], c["added"], c["skipped"], c["replaced"]) == (kept[name], added[name], skipped[name], 0), name
    assert report["totals"]["below_threshold"] == report["dropped"]["below_threshold"] > 0
    for name in NAMES:  # printed, one line per category
        c = report["per_category"][name]
        assert any(line.split() == [name, *map(str, (c["kept"], c["replaced"], c["added"], c["skipped"], c["below_threshold"]))]
                   for line in result.output.splitlines())
    assert "objects scoring below their threshold" in result.output

    before, after = _raw_annotations(half_labelled), _raw_annotations(out)
    merged = _rows(out)
    assert sorted(merged) == sorted(ds_rows)
    for i, row in merged.items():
        n = len(ds_rows[i]["annotations"])
        assert after[i].values.slice(0, n).equals(before[i].values)  # human annotations: the same stored values
        assert row["annotations"][:n] == ds_rows[i]["annotations"]
        assert row["image"] == ds_rows[i]["image"] and row["error"] == ds_rows[i]["error"]
        assert row[ANNOTATION_SOURCES][:n] == ["human"] * n and row[ANNOTATION_SCORES][:n] == [None] * n
        assert all(s == "shapes_test" for s in row[ANNOTATION_SOURCES][n:])
        assert all(s >= 0.5 for s in row[ANNOTATION_SCORES][n:])
    new_ids = [a["id"] for r in merged.values() for a in r["annotations"][len(ds_rows[r["image_id"]]["annotations"]):]]
    old_max = max(a["id"] for r in ds_rows.values() for a in r["annotations"])
    assert len(new_ids) == sum(added.values()) and sorted(new_ids) == list(range(old_max + 1, old_max + 1 + len(new_ids)))
    assert read_meta(str(out)).categories == read_meta(half_labelled).categories
    assert read_meta(str(out)).info["merge"]["totals"] == report["totals"]


def test_append_and_replace(shapes, half_labelled, tmp_path):
    images, pred, truth = shapes
    ds_rows = _rows(half_labelled)
    r = merge(half_labelled, pred, str(tmp_path / "a"), mode="append", options=SelectOptions(min_score=0.5))
    kept_scores = [s for t in truth.values() if t["error"] is None for s in t["scores"] if float(np.float32(s)) >= 0.5]
    assert r["totals"]["added"] == len(kept_scores) and r["totals"]["skipped"] == 0
    assert r["totals"]["kept"] == sum(len(x["annotations"]) for x in ds_rows.values())

    r = merge(half_labelled, pred, str(tmp_path / "r"), mode="replace")
    merged = _rows(tmp_path / "r")
    for i, row in merged.items():
        if truth[i]["error"] is not None:  # no readable prediction: the image keeps its labels
            assert row["annotations"] == ds_rows[i]["annotations"] and set(row[ANNOTATION_SOURCES]) <= {"human"}
        else:  # its predictions replace them (image 2 had none: now it has none)
            assert len(row["annotations"]) == len(truth[i]["boxes"])
            assert row[ANNOTATION_SOURCES] == ["shapes_test"] * len(truth[i]["boxes"])
            for a, box in zip(row["annotations"], truth[i]["boxes"]):
                x, y, w, h = a["bbox"]
                np.testing.assert_allclose([x, y, x + w, y + h], box, atol=1e-4)
    replaced = sum(len(ds_rows[i]["annotations"]) for i in ds_rows if truth[i]["error"] is None)
    assert r["totals"]["replaced"] == replaced and r["images"]["prediction_error_rows"] == 1
    # a second merge keeps the sources the first recorded
    again = merge(str(tmp_path / "r"), pred, str(tmp_path / "rr"), mode="fill-missing")
    assert again["totals"]["added"] == 0
    rows = _rows(tmp_path / "rr")
    assert any("shapes_test" in r[ANNOTATION_SOURCES] for r in rows.values())


def test_out_must_be_empty_unless_overwrite(shapes, half_labelled, tmp_path):
    _, pred, _ = shapes
    out = tmp_path / "m"
    args = ["data", "merge", half_labelled, pred, str(out), "--mode", "append"]
    assert CliRunner().invoke(main, args).exit_code == 0
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "not empty" in again.output and "--overwrite" in again.output
    replaced = CliRunner().invoke(main, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "merge.json", "part-00000.parquet"]


def test_bad_input_names_the_item(shapes, half_labelled, tmp_path):
    images, pred, _ = shapes
    (tmp_path / "map.yaml").write_text("circle: disc\nrectangle: rectangle\ntriangle: null\n")
    result = CliRunner().invoke(main, ["data", "merge", half_labelled, pred, str(tmp_path / "o"), "--categories", str(tmp_path / "map.yaml")])
    assert result.exit_code == 1 and "disc" in result.output and "circle, rectangle, triangle" in result.output
    assert not (tmp_path / "o").exists()  # refused before writing anything
    with pytest.raises(AnnotationError, match="--mode"):
        merge(half_labelled, pred, str(tmp_path / "o"), mode="overwrite-all")
    # predictions made on other images
    other = tmp_path / "other"
    from pipeline.data.synth import synth_dataset

    synth_dataset(str(other), images=4, seed=99, size=64)
    with pytest.raises(AnnotationError, match="not made on this dataset|not in"):
        merge(str(other), pred, str(tmp_path / "o2"), mode="append")
    with pytest.raises(AnnotationError, match="prediction dataset"):
        merge(pred, pred, str(tmp_path / "o3"), mode="append")


def test_unlabelled_dataset_takes_the_predictions_classes(shapes, tmp_path):
    images, pred, truth = shapes
    photos = tmp_path / "photos"
    photos.mkdir()
    for s in list_shards(images):
        t = read_shard(s)
        rows = t.to_pylist()
        for r in rows:
            r["annotations"] = []
        pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), photos / s.rsplit("/", 1)[1])
    write_meta(str(photos), DatasetMeta(info={"source": "photos"}))
    r = merge(str(photos), pred, str(tmp_path / "m"), mode="fill-missing", options=SelectOptions(min_score=0.5))
    assert [c["name"] for c in read_meta(str(tmp_path / "m")).categories] == NAMES
    assert r["totals"]["added"] == sum(1 for t in truth.values() if t["error"] is None for s in t["scores"] if float(np.float32(s)) >= 0.5)

    # the merged dataset is ground truth like any other: eval reads it (the extra columns are ignored)
    from pipeline.eval import evaluate

    metrics = evaluate([pred], str(tmp_path / "m"), ["bbox"], use_ray=False, use_state=False)
    assert metrics["bbox"]["AP50"] > 0.9
