"""Image classification evaluation (``--iou-type classification``): top-1/top-5 accuracy and per-category
top-1 recall against the ground truth's image-level ``label`` column.

The reference is an independent plain-Python computation on random cases: null (unlabelled) ground
truth labels, top-5 category-id lists over 7 categories with ``-1`` (unmapped) ids, scores written out
of order and with ties (ranked by score, ties in written order), an error row, a null prediction
row and a labelled image missing from the predictions, over several shards. Also: the per-shard
state merges exactly (saved state, more shards), top5 is null where the docstring says so, bad input
is an EvalInputError naming the problem, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline import schema
from pipeline.cli import main
from pipeline.data.shards import DatasetMeta, list_shards, read_shard, write_meta, write_shard
from pipeline.eval import EvalInputError, evaluate

CATEGORIES = [{"id": i, "name": n} for i, n in zip((1, 2, 3, 5, 8, 13, 21), ("cat", "dog", "cow", "hen", "pig", "owl", "eel"))]
IDS = [c["id"] for c in CATEGORIES]
NAMES = {c["id"]: c["name"] for c in CATEGORIES}
PRED_SCHEMA = pa.schema([*schema.PREDICTION_BASE_SCHEMA,
                         pa.field(schema.CLASS_LABELS, schema.CLASS_LABELS_TYPE),
                         pa.field(schema.CLASS_SCORES, schema.CLASS_SCORES_TYPE),
                         pa.field(schema.CLASS_CATEGORY_IDS, schema.CLASS_CATEGORY_IDS_TYPE)])
MISSING, ERROR, NULL_ROW = 104, 107, 111  # labelled images: no prediction row / an error row / null class columns


def write_gt(path: str, labels: dict[int, int | None], *, shards: int = 2, categories=CATEGORIES) -> None:
    rows = [{schema.IMAGE_ID: i, schema.FILE_NAME: f"{i}.png", schema.WIDTH: 8, schema.HEIGHT: 8,
             schema.ANNOTATIONS: [], schema.LABEL: y} for i, y in labels.items()]
    for n, part in enumerate(np.array_split(np.arange(len(rows)), shards)):
        write_shard(f"{path}/part-{n:05d}.parquet", pa.Table.from_pylist([rows[i] for i in part], schema=schema.LABEL_IMAGE_SCHEMA))
    write_meta(path, DatasetMeta(categories=categories))


def pred_row(image_id: int, ids: list[int] | None, scores: list[float] | None = None, *, error: str | None = None) -> dict:
    return {schema.IMAGE_ID: image_id, schema.FILE_NAME: f"{image_id}.png", schema.ERROR: error,
            schema.CLASS_LABELS: None if ids is None else list(range(len(ids))),
            schema.CLASS_SCORES: scores, schema.CLASS_CATEGORY_IDS: ids}


def write_pred(path: str, rows: list[dict], *, shards: int, pa_schema=PRED_SCHEMA, categories=CATEGORIES) -> None:
    for n, part in enumerate(np.array_split(np.arange(len(rows)), shards)):
        write_shard(f"{path}/part-{n:05d}.parquet", pa.Table.from_pylist([rows[i] for i in part], schema=pa_schema))
    write_meta(path, DatasetMeta(categories=categories, kind="predictions"))


def random_case(seed: int = 0, images: int = 40):
    """(labels {image_id: id or None}, prediction rows): k=5 ids with replacement from the categories and -1,
    scores on a 0.1 grid (ties), written in random order."""
    rng = np.random.default_rng(seed)
    labels = {100 + k: (None if rng.random() < 0.2 else int(rng.choice(IDS))) for k in range(images)}
    labels[MISSING], labels[ERROR], labels[NULL_ROW] = IDS[0], IDS[1], IDS[2]
    rows = []
    for i, y in labels.items():
        if i == MISSING:
            continue
        ids = [int(v) for v in rng.choice([-1, *IDS], size=5)]
        if y is not None and rng.random() < 0.5:
            ids[int(rng.integers(5))] = y  # plenty of hits
        scores = [float(np.float32(v)) for v in np.round(rng.random(5), 1)]
        rows.append(pred_row(i, None if i == NULL_ROW else ids, None if i == NULL_ROW else scores,
                             error="cannot decode" if i == ERROR else None))
    return labels, rows


def reference(labels: dict, rows: list[dict]) -> dict:
    """Top-1/top-5/per-category top-1 straight from the definitions (sorted() is stable: ties keep the written order)."""
    ranked = {}
    for r in rows:
        if r[schema.ERROR] is None and r[schema.CLASS_CATEGORY_IDS] is not None:
            ids, s = r[schema.CLASS_CATEGORY_IDS], r[schema.CLASS_SCORES]
            ranked[r[schema.IMAGE_ID]] = [ids[j] for j in sorted(range(len(ids)), key=lambda j: -s[j])]
    labelled = {i: y for i, y in labels.items() if y is not None}
    top1 = {i: i in ranked and ranked[i][0] == y for i, y in labelled.items()}
    top5 = {i: i in ranked and y in ranked[i][:5] for i, y in labelled.items()}
    per = {}
    for c in IDS:
        members = [i for i, y in labelled.items() if y == c]
        per[NAMES[c]] = {"top1": sum(top1[i] for i in members) / len(members) if members else None, "images": len(members)}
    return {"top1": sum(top1.values()) / len(labelled), "top5": sum(top5.values()) / len(labelled), "per_category": per,
            "top1_hits": sum(top1.values()), "top5_hits": sum(top5.values()),
            "top1_unmapped": sum(1 for i in labelled if i in ranked and ranked[i][0] == -1)}


def check(metrics: dict, ref: dict) -> None:
    assert metrics["top1"] == pytest.approx(ref["top1"], abs=1e-12)
    assert metrics["top5"] == pytest.approx(ref["top5"], abs=1e-12)
    assert set(metrics["per_category"]) == set(ref["per_category"])
    for name, want in ref["per_category"].items():
        got = metrics["per_category"][name]
        assert got["images"] == want["images"], name
        assert got["top1"] == (None if want["top1"] is None else pytest.approx(want["top1"], abs=1e-12)), name


@pytest.fixture()
def case(tmp_path):
    labels, rows = random_case()
    write_gt(str(tmp_path / "gt"), labels)
    write_pred(str(tmp_path / "pred"), rows, shards=3)
    return {"gt": str(tmp_path / "gt"), "pred": str(tmp_path / "pred"), "labels": labels, "rows": rows, "root": tmp_path}


def run(pred, gt, **kw) -> dict:
    return evaluate(pred if isinstance(pred, list) else [pred], gt, ["classification"], use_ray=False, **kw)["classification"]


def test_equals_an_independent_computation_with_its_counts(case):
    m = run(case["pred"], case["gt"], use_state=False)
    ref = reference(case["labels"], case["rows"])
    check(m, ref)
    assert 0 < ref["top1"] < ref["top5"] < 1 and ref["top1_unmapped"] > 0  # a case that tells things apart
    c = m["counts"]
    unlabelled = sum(y is None for y in case["labels"].values())
    assert unlabelled > 0
    assert c["images"] == len(case["labels"]) - unlabelled and c["images_without_label"] == unlabelled
    assert (c["images_without_predictions"], c["error_rows"], c["null_prediction_rows"]) == (1, 1, 1)
    assert (c["top1_hits"], c["top5_hits"], c["top1_unmapped"]) == (ref["top1_hits"], ref["top5_hits"], ref["top1_unmapped"])
    assert c["predictions_with_fewer_than_5_classes"] == 0 and c["skipped"] == {}
    assert (c["shards"], c["shards_from_state"], c["ray_tasks"]) == (3, 0, 0)


def test_state_is_reused_and_merges_exactly_over_more_shards(case):
    drop = ("shards", "shards_from_state")
    first = run(case["pred"], case["gt"], use_state=True)
    saved = case["root"] / "pred" / "eval" / "classification"
    assert sorted(p.name for p in saved.iterdir()) == [f"part-{n:05d}.npz" for n in range(3)]
    again = run(case["pred"], case["gt"], use_state=True)
    assert again["counts"]["shards_from_state"] == 3 and first["counts"]["shards_from_state"] == 0
    assert {k: v for k, v in again.items() if k != "counts"} == {k: v for k, v in first.items() if k != "counts"}
    assert {k: v for k, v in again["counts"].items() if k not in drop} == {k: v for k, v in first["counts"].items() if k not in drop}
    rows = [r for s in list_shards(case["pred"]) for r in read_shard(s).to_pylist()]
    write_pred(str(case["root"] / "seven"), rows, shards=7)
    seven = run(str(case["root"] / "seven"), case["gt"], use_state=True)
    assert seven["counts"]["shards"] == 7
    assert {k: v for k, v in seven.items() if k != "counts"} == {k: v for k, v in first.items() if k != "counts"}
    assert {k: v for k, v in seven["counts"].items() if k not in drop} == {k: v for k, v in first["counts"].items() if k not in drop}
    # relabelling the ground truth invalidates the saved state (its key holds the labels)
    relabelled = {i: (IDS[3] if y is not None else None) for i, y in case["labels"].items()}
    write_gt(str(case["root"] / "gt2"), relabelled)
    other = run(case["pred"], str(case["root"] / "gt2"), use_state=True)
    assert other["counts"]["shards_from_state"] == 0
    check(other, reference(relabelled, case["rows"]))


def test_an_image_predicted_twice_counts_once_the_first_wins(case):
    labelled = next(i for i, y in case["labels"].items() if y is not None and i not in (MISSING, ERROR, NULL_ROW))
    y = case["labels"][labelled]
    wrong = next(c for c in IDS if c != y)
    write_pred(str(case["root"] / "extra"), [pred_row(labelled, [wrong] * 5, [0.9] * 5), pred_row(MISSING, [IDS[0]], [1.0])], shards=1)
    m = run([case["pred"], str(case["root"] / "extra")], case["gt"], use_state=False)
    rows = case["rows"] + [pred_row(MISSING, [IDS[0]], [1.0])]
    assert m["top1"] == pytest.approx(reference(case["labels"], rows)["top1"], abs=1e-12)
    assert m["counts"]["images_without_predictions"] == 0 and m["counts"]["skipped"] == {"duplicate_images": 1}
    assert m["top5"] is None and m["counts"]["predictions_with_fewer_than_5_classes"] == 1  # MISSING's 1-class row


def test_top5_is_null_below_five_categories(tmp_path):
    from pipeline.data.synth import synth_dataset

    synth_dataset(str(tmp_path / "gt"), images=6, seed=1, size=32, classification=True)  # 3 categories
    gt = {r[schema.IMAGE_ID]: r[schema.LABEL] for s in list_shards(str(tmp_path / "gt")) for r in read_shard(s).to_pylist()}
    cats = json.loads((tmp_path / "gt" / "dataset.json").read_text())["categories"]
    ids = sorted(c["id"] for c in cats)
    rows = [pred_row(i, sorted(ids, key=lambda c: c != y), [0.7, 0.2, 0.1]) for i, y in gt.items()]
    rows[0][schema.CLASS_CATEGORY_IDS] = [c for c in ids if c != gt[rows[0][schema.IMAGE_ID]]] + [gt[rows[0][schema.IMAGE_ID]]]
    write_pred(str(tmp_path / "pred"), rows, shards=2, categories=cats)
    m = run(str(tmp_path / "pred"), str(tmp_path / "gt"), use_state=False)
    assert m["top1"] == pytest.approx(5 / 6, abs=1e-12) and m["top5"] is None
    assert sum(v["images"] for v in m["per_category"].values()) == 6


def test_top5_is_null_when_a_prediction_ranks_fewer_than_five(tmp_path):
    write_gt(str(tmp_path / "gt"), {1: 1, 2: 2})
    write_pred(str(tmp_path / "pred"), [pred_row(1, [1, 2, 3, 5, 8], [0.5, 0.2, 0.1, 0.1, 0.1]), pred_row(2, [2, 1], [0.6, 0.4])], shards=1)
    m = run(str(tmp_path / "pred"), str(tmp_path / "gt"), use_state=False)
    assert m["top1"] == 1.0 and m["top5"] is None and m["counts"]["predictions_with_fewer_than_5_classes"] == 1


def test_bad_input_is_an_error_naming_the_problem(tmp_path):
    write_gt(str(tmp_path / "gt"), {1: 1, 2: 2})
    write_pred(str(tmp_path / "bare"), [pred_row(1, None), pred_row(2, None)], shards=1, pa_schema=schema.PREDICTION_BASE_SCHEMA)
    with pytest.raises(EvalInputError, match=r"no 'class_category_ids' column; run a classify stage first"):
        run(str(tmp_path / "bare"), str(tmp_path / "gt"), use_state=False)
    write_gt(str(tmp_path / "badgt"), {1: 1, 2: 99})
    write_pred(str(tmp_path / "pred"), [pred_row(1, [1], [1.0]), pred_row(2, [2], [1.0])], shards=1)
    with pytest.raises(EvalInputError, match=r"image_id 2: label 99 is not a category of the ground truth \(1, 2, 3, 5, 8, 13, 21\)"):
        run(str(tmp_path / "pred"), str(tmp_path / "badgt"), use_state=False)
    write_pred(str(tmp_path / "ragged"), [pred_row(1, [1, 2], [1.0]), pred_row(2, [2], [1.0])], shards=1)
    with pytest.raises(EvalInputError, match=r"image_id 1: 2 class_category_ids but 1 class_scores"):
        run(str(tmp_path / "ragged"), str(tmp_path / "gt"), use_state=False)
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(EvalInputError, match="classification reads a prediction dataset"):
        run(str(tmp_path / "results.json"), str(tmp_path / "gt"), use_state=False)
    from pipeline.data.synth import synth_dataset

    synth_dataset(str(tmp_path / "detection"), images=2, seed=0, size=32)  # annotations, no image labels
    with pytest.raises(EvalInputError, match=r"has no image labels \(a non-null 'label' column\)"):
        run(str(tmp_path / "pred"), str(tmp_path / "detection"), use_state=False)


def test_cli_prints_top1_and_writes_metrics_json(case):
    out = case["root"] / "metrics"
    result = CliRunner().invoke(main, ["eval", case["pred"], "--gt", case["gt"], "--iou-type", "classification",
                                       "--out", str(out), "--no-ray"])
    assert result.exit_code == 0, result.output
    ref = reference(case["labels"], case["rows"])
    n = sum(y is not None for y in case["labels"].values())
    for text in ("top1", "top5", f"{ref['top1']:.3f}", "classification (image-level labels",
                 f"classification: {n} labelled images ({len(case['labels']) - n} without label, 1 without predictions, 1 error rows)"):
        assert text in result.output, text
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"classification"}
    check(metrics["classification"], ref)
    assert metrics["classification"]["counts"]["top1_hits"] == ref["top1_hits"]
