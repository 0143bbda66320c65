"""Semantic segmentation evaluation (``--iou-type semantic``): detectron2's SemSegEvaluator numbers
from a confusion matrix per shard, summed.

The reference is an independent numpy computation straight from the pixels (no matrix), on random
label maps: several images of several sizes in several shards, a class absent from the ground
truth but predicted, ignore pixels, unlabelled pixels, an error row and an image missing from the
predictions."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline import schema
from pipeline.cli import main
from pipeline.data.shards import DatasetMeta, list_shards, write_meta, write_shard
from pipeline.eval import EvalInputError, evaluate
from pipeline.eval.groundtruth import from_coco_dicts
from pipeline.eval.iou_types import iou_types_for_columns
from pipeline.eval.semantic import LABEL_MAP, Classes, gt_from_annotations
from pipeline.eval.shard_tasks import load_array_state

CATEGORIES = [{"id": 1, "name": "sky"}, {"id": 2, "name": "road"}, {"id": 3, "name": "car"}, {"id": 5, "name": "tree"}]
CLASS_IDS = [0, 1, 2, 3, 5]  # background 0 counts as a class
ABSENT = 3  # never in the ground truth, sometimes predicted
NAMES = {0: "background", 1: "sky", 2: "road", 3: "car", 5: "tree"}

PRED_SCHEMA = pa.schema([*schema.PREDICTION_BASE_SCHEMA,
                         pa.field(schema.SEMANTIC_CATEGORY_IDS, schema.SEMANTIC_CATEGORY_IDS_TYPE),
                         pa.field(schema.SEMANTIC_MASKS, schema.SEMANTIC_MASKS_TYPE)])


def png(values: np.ndarray, *, palette: bool = False) -> bytes:
    im = Image.fromarray(values.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")  # grey -> palette keeps each index
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_label_map_gt(path: str, maps: dict[int, np.ndarray], *, palette_every: int = 3) -> None:
    """A hand-built ground-truth dataset: image rows with a ``label_map`` column, no annotations."""
    rows = [{schema.IMAGE_ID: i, schema.FILE_NAME: f"{i}.png", schema.WIDTH: m.shape[1], schema.HEIGHT: m.shape[0],
             schema.ANNOTATIONS: []} for i, m in maps.items()]
    table = schema.image_table(rows)
    table = table.append_column(LABEL_MAP, pa.array([png(m, palette=k % palette_every == 0) for k, m in enumerate(maps.values())],
                                                    pa.binary()))
    write_shard(path + "/part-00000.parquet", table)
    write_meta(path, DatasetMeta(categories=CATEGORIES))


def encode(pred: np.ndarray, *, unmapped: int | None = None) -> tuple[list[int], list[dict]]:
    """A predicted map (category ids; -1 = nothing) -> the segment stage's columns."""
    ids, masks = [], []
    for c in sorted(set(pred.reshape(-1).tolist()) - {-1}):
        rle = mask_utils.encode(np.asfortranarray((pred == c).astype(np.uint8)))
        ids.append(-1 if c == unmapped else c)
        masks.append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})
    return ids, masks


def pred_row(image_id: int, pred: np.ndarray | None, *, error: str | None = None, unmapped: int | None = None) -> dict:
    row = {schema.IMAGE_ID: image_id, schema.FILE_NAME: f"{image_id}.png", schema.ERROR: error,
           schema.SEMANTIC_CATEGORY_IDS: None, schema.SEMANTIC_MASKS: None}
    if pred is not None:
        row[schema.WIDTH], row[schema.HEIGHT] = pred.shape[1], pred.shape[0]
        row[schema.SEMANTIC_CATEGORY_IDS], row[schema.SEMANTIC_MASKS] = encode(pred, unmapped=unmapped)
    return row


def write_pred(path: str, rows: list[dict], *, shards: int) -> None:
    for n, part in enumerate(np.array_split(np.arange(len(rows)), shards)):
        table = pa.Table.from_pylist([rows[i] for i in part], schema=PRED_SCHEMA)
        write_shard(f"{path}/part-{n:05d}.parquet", table)
    write_meta(path, DatasetMeta(categories=CATEGORIES, kind="predictions"))


def random_case(seed: int = 0, images: int = 9):
    """(GT maps, predicted maps with -1 = unlabelled, ids missing from the predictions, error ids)."""
    rng = np.random.default_rng(seed)
    gt, pred = {}, {}
    for k in range(images):
        h, w = int(rng.integers(5, 40)), int(rng.integers(5, 40))
        g = rng.choice([0, 1, 2, 5, 255], size=(h, w), p=[0.4, 0.2, 0.2, 0.15, 0.05])
        p = np.where(rng.random((h, w)) < 0.6, g, rng.choice([0, 1, 2, 3, 5, -1], size=(h, w)))
        p[p == 255] = 0  # a prediction is a category or nothing
        gt[100 + k], pred[100 + k] = g, p
    return gt, pred


def reference_metrics(gt: dict, pred: dict) -> dict:
    """Straight from the pixels: what detectron2 defines, with pred -1 (nothing) wrong for every class."""
    g = np.concatenate([m.reshape(-1) for m in gt.values()])
    p = np.concatenate([pred.get(i, np.full(m.shape, -1)).reshape(-1) for i, m in gt.items()])
    keep = g != 255
    g, p = g[keep], p[keep]
    iou, acc, weight = {}, {}, {}
    for c in CLASS_IDS:
        n_gt = np.sum(g == c)
        if n_gt == 0:
            continue
        tp = np.sum((g == c) & (p == c))
        iou[c] = tp / (n_gt + np.sum(p == c) - tp)
        acc[c] = tp / n_gt
        weight[c] = n_gt / len(g)
    return {"mIoU": np.mean(list(iou.values())), "mACC": np.mean(list(acc.values())),
            "fwIoU": sum(weight[c] * iou[c] for c in iou), "pACC": np.mean(g == p), "iou": iou, "acc": acc}


def check(metrics: dict, ref: dict) -> None:
    for k in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert metrics[k] == pytest.approx(ref[k], abs=1e-12), k
    for c in CLASS_IDS:
        entry = metrics["per_category"][NAMES[c]]
        assert entry["IoU"] == (pytest.approx(ref["iou"][c], abs=1e-12) if c in ref["iou"] else None)
        assert entry["ACC"] == (pytest.approx(ref["acc"][c], abs=1e-12) if c in ref["acc"] else None)


@pytest.fixture()
def case(tmp_path):
    gt, pred = random_case()
    write_label_map_gt(str(tmp_path / "gt"), gt)
    missing, error = 103, 106
    rows = [pred_row(i, None if i == error else p, error="cannot decode" if i == error else None)
            for i, p in pred.items() if i != missing]
    write_pred(str(tmp_path / "pred"), rows, shards=3)
    seen = {i: p for i, p in pred.items() if i not in (missing, error)}
    return {"gt": str(tmp_path / "gt"), "pred": str(tmp_path / "pred"), "maps": gt, "seen": seen, "root": tmp_path}


def test_equals_an_independent_computation_on_random_label_maps(case):
    metrics = evaluate([case["pred"]], case["gt"], ["semantic"], use_ray=False)["semantic"]
    check(metrics, reference_metrics(case["maps"], case["seen"]))
    c = metrics["counts"]
    assert c["images"] == 9 and c["images_without_predictions"] == 1 and c["error_rows"] == 1
    assert c["shards"] == 3 and c["gt_label_maps"] == 9
    labelled = sum(int(np.sum(m != 255)) for m in case["maps"].values())
    assert c["pixels"] == labelled and c["ignored_pixels"] == sum(int(np.sum(m == 255)) for m in case["maps"].values())
    assert metrics["per_category"]["car"] == {"IoU": None, "ACC": None}  # predicted, never in the GT: NaN in detectron2


def test_equals_detectron2s_formulas_when_every_pixel_is_predicted(tmp_path):
    """detectron2's evaluate() on its own (pred, gt) matrix, written out as it has it."""
    gt, pred = random_case(seed=4, images=5)
    pred = {i: np.where(p == -1, 0, p) for i, p in pred.items()}
    write_label_map_gt(str(tmp_path / "gt"), gt)
    write_pred(str(tmp_path / "pred"), [pred_row(i, p) for i, p in pred.items()], shards=2)
    ours = evaluate([str(tmp_path / "pred")], str(tmp_path / "gt"), ["semantic"], use_ray=False)["semantic"]
    index = {c: k for k, c in enumerate(CLASS_IDS)} | {255: len(CLASS_IDS)}
    n = len(CLASS_IDS) + 1
    conf = np.zeros((n, n), np.int64)
    for i in gt:
        g = np.vectorize(index.get)(gt[i]).reshape(-1)
        p = np.vectorize(index.get)(pred[i]).reshape(-1)
        conf += np.bincount(n * p + g, minlength=n * n).reshape(n, n)
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = conf[:-1, :-1].sum(0).astype(float)
    pos_pred = conf[:-1, :-1].sum(1).astype(float)
    acc_valid = pos_gt > 0
    iou = np.full(n - 1, np.nan)
    union = pos_gt + pos_pred - tp
    iou_valid = acc_valid & (union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    assert ours["mIoU"] == pytest.approx(np.sum(iou[iou_valid]) / np.sum(iou_valid), abs=1e-12)
    assert ours["fwIoU"] == pytest.approx(np.sum(iou[iou_valid] * (pos_gt / pos_gt.sum())[iou_valid]), abs=1e-12)
    assert ours["mACC"] == pytest.approx(np.mean(tp[acc_valid] / pos_gt[acc_valid]), abs=1e-12)
    assert ours["pACC"] == pytest.approx(tp.sum() / pos_gt.sum(), abs=1e-12)


def test_two_shards_merge_to_one_shard_holding_both_and_state_is_reused(case):
    one = case["root"] / "one"
    rows = [r for s in list_shards(case["pred"]) for r in pq.read_table(s).to_pylist()]
    write_pred(str(one), rows, shards=1)
    merged = evaluate([case["pred"]], case["gt"], ["semantic"], use_ray=False)["semantic"]
    single = evaluate([str(one)], case["gt"], ["semantic"], use_ray=False)["semantic"]
    drop = ("shards", "shards_from_state", "ray_tasks")
    assert {k: v for k, v in merged.items() if k != "counts"} == {k: v for k, v in single.items() if k != "counts"}
    assert {k: v for k, v in merged["counts"].items() if k not in drop} == {k: v for k, v in single["counts"].items() if k not in drop}
    saved = [load_array_state(str(case["root"] / "pred" / "eval" / "semantic" / f"part-{n:05d}.npz"))[0] for n in range(3)]
    whole = load_array_state(str(one / "eval" / "semantic" / "part-00000.npz"))[0]
    np.testing.assert_array_equal(sum(saved), whole)  # exact: integer pixel counts
    again = evaluate([case["pred"]], case["gt"], ["semantic"], use_ray=False)["semantic"]
    assert again["counts"]["shards_from_state"] == 3 and again == merged | {"counts": again["counts"]}
    assert {k: v for k, v in again["counts"].items() if k != "shards_from_state"} == {
        k: v for k, v in merged["counts"].items() if k != "shards_from_state"}
    fresh = evaluate([case["pred"]], case["gt"], ["semantic"], use_ray=False, use_state=False)["semantic"]
    assert fresh["counts"]["shards_from_state"] == 0 and fresh["mIoU"] == merged["mIoU"]


def test_ray_tasks_give_the_same_numbers(case, ray_local):
    local = evaluate([case["pred"]], case["gt"], ["semantic"], use_ray=False, use_state=False)["semantic"]
    on_ray = evaluate([case["pred"]], case["gt"], ["semantic"], use_ray=True, use_state=False)["semantic"]
    assert on_ray["counts"]["ray_tasks"] == 3
    assert {k: v for k, v in on_ray.items() if k != "counts"} == {k: v for k, v in local.items() if k != "counts"}


def test_unlabelled_and_unmapped_pixels_are_misses(tmp_path):
    g = np.array([[1, 1, 2, 2]] * 2)
    write_label_map_gt(str(tmp_path / "gt"), {7: g})
    p = np.array([[1, -1, 2, 5]] * 2)
    write_pred(str(tmp_path / "pred"), [pred_row(7, p, unmapped=5)], shards=1)  # the 5 mask says category -1
    m = evaluate([str(tmp_path / "pred")], str(tmp_path / "gt"), ["semantic"], use_ray=False)["semantic"]
    assert m["per_category"]["sky"] == {"IoU": 0.5, "ACC": 0.5} and m["per_category"]["road"] == {"IoU": 0.5, "ACC": 0.5}
    assert m["pACC"] == 0.5 and m["counts"]["unlabelled_pixels"] == 4
    assert m["counts"]["skipped"] == {"unmapped_category_masks": 1}


def test_ground_truth_from_instance_annotations_later_wins_crowd_ignored():
    square = lambda x0, y0, x1, y1: [[x0, y0, x1, y0, x1, y1, x0, y1]]  # noqa: E731
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "area": 1.0, "iscrowd": 0, "segmentation": square(0, 0, 6, 6)},
        {"id": 2, "image_id": 1, "category_id": 2, "area": 1.0, "iscrowd": 0, "segmentation": square(3, 3, 8, 8)},
        {"id": 3, "image_id": 1, "category_id": 5, "area": 1.0, "iscrowd": 1, "segmentation": square(0, 7, 2, 10)},
        {"id": 4, "image_id": 1, "category_id": 5, "area": 1.0, "iscrowd": 0, "bbox": [8, 0, 2, 2]},  # no mask
    ]
    ground = from_coco_dicts([(1, 10, 10)], anns, CATEGORIES, source="gt.json")
    classes = Classes.from_categories(CATEGORIES)
    counts = Counter()
    idx = gt_from_annotations(ground, 1, 10, 10, classes, counts)
    ids = np.array([*classes.ids, 255])[idx]
    expected = np.zeros((10, 10), int)
    for a, value in ((anns[0], 1), (anns[1], 2)):  # in annotation order: the later one wins
        expected[mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], 10, 10))).astype(bool)] = value
    expected[mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(anns[2]["segmentation"], 10, 10))).astype(bool)] = 255
    expected[0:2, 8:10] = 255  # an annotation without a mask: its box is ignored
    np.testing.assert_array_equal(ids, expected)
    assert counts["gt_annotations_without_mask"] == 1


def test_cli_end_to_end_on_an_instance_dataset(tmp_path):
    from pipeline.data.synth import CATEGORIES as SHAPES
    from pipeline.data.synth import synth_dataset
    from pipeline.eval.groundtruth import load_ground_truth

    synth_dataset(str(tmp_path / "gt"), images=4, seed=2, size=48)
    ground = load_ground_truth(str(tmp_path / "gt"))
    classes = Classes.from_categories(SHAPES)
    rows = []
    for k, (i, h, w) in enumerate(zip(ground.image_ids, ground.heights, ground.widths)):
        ids = np.array([*classes.ids, 255])[gt_from_annotations(ground, int(i), int(h), int(w), classes, Counter())]
        pred = np.where(ids == 255, 0, ids)
        if k == 0:
            pred[:, : w // 2] = 0  # one image half background: not perfect
        rows.append(pred_row(int(i), pred))
    write_pred(str(tmp_path / "pred"), rows, shards=2)
    out = tmp_path / "metrics"
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                                       "--iou-type", "semantic", "--out", str(out), "--no-ray"])
    assert result.exit_code == 0, result.output
    for text in ("mIoU", "fwIoU", "mACC", "pACC", "IoU semantic", "ACC semantic", "background", "circle",
                 "semantic: 4 images (0 without predictions, 0 error rows)"):
        assert text in result.output
    metrics = json.loads((out / "metrics.json").read_text())["semantic"]
    assert set(metrics) == {"mIoU", "fwIoU", "mACC", "pACC", "per_category", "counts"}
    assert 0.5 < metrics["mIoU"] < 1.0 and metrics["per_category"]["background"]["ACC"] == 1.0
    assert set(metrics["per_category"]) == {"background", "circle", "rectangle", "triangle"}


def test_a_mask_of_the_wrong_size_is_an_error_naming_the_image(tmp_path):
    write_label_map_gt(str(tmp_path / "gt"), {7: np.zeros((4, 6), int), 8: np.zeros((5, 5), int)})
    rows = [pred_row(7, np.zeros((4, 6), int)), pred_row(8, np.zeros((5, 4), int))]
    write_pred(str(tmp_path / "pred"), rows, shards=1)
    with pytest.raises(EvalInputError, match=r"image_id 8: semantic mask 0 \(category 0\) is 5x4, the image is 5x5"):
        evaluate([str(tmp_path / "pred")], str(tmp_path / "gt"), ["semantic"], use_ray=False)


def test_bad_label_maps_and_overlapping_masks_are_errors_naming_the_image(tmp_path):
    write_label_map_gt(str(tmp_path / "gt"), {7: np.full((4, 4), 4)})  # 4 is no category
    write_pred(str(tmp_path / "pred"), [pred_row(7, np.zeros((4, 4), int))], shards=1)
    with pytest.raises(EvalInputError, match=r"image_id 7: label map value\(s\) \[4\] are not categories"):
        evaluate([str(tmp_path / "pred")], str(tmp_path / "gt"), ["semantic"], use_ray=False)
    write_label_map_gt(str(tmp_path / "gt2"), {7: np.zeros((4, 4), int)})
    row = pred_row(7, np.zeros((4, 4), int))
    row[schema.SEMANTIC_CATEGORY_IDS], row[schema.SEMANTIC_MASKS] = [0, 1], row[schema.SEMANTIC_MASKS] * 2
    write_pred(str(tmp_path / "pred2"), [row], shards=1)
    with pytest.raises(EvalInputError, match=r"image_id 7: semantic mask 1 \(category 1\) overlaps"):
        evaluate([str(tmp_path / "pred2")], str(tmp_path / "gt2"), ["semantic"], use_ray=False)


def test_jobs_writing_semantic_masks_are_evaluated_automatically():
    assert iou_types_for_columns([schema.SEMANTIC_CATEGORY_IDS, schema.SEMANTIC_MASKS]) == ["semantic"]


def test_in_a_label_map_dataset_an_image_without_one_is_left_out_and_counted(tmp_path):
    """Image 3 has no label map. In a dataset whose dataset.json says label maps are its semantic
    ground truth (import-images --labels), it has no ground truth: left out, prediction and all, and
    counted; elsewhere it falls back to its (absent) annotations, i.e. all background."""
    maps = {1: np.array([[0, 1, 1], [2, 2, 255]]), 2: np.array([[5, 5], [0, 1]]), 3: None}
    sizes = {1: (2, 3), 2: (2, 2), 3: (4, 4)}
    rows = [{schema.IMAGE_ID: i, schema.FILE_NAME: f"{i}.png", schema.WIDTH: sizes[i][1], schema.HEIGHT: sizes[i][0],
             schema.ANNOTATIONS: [], LABEL_MAP: None if m is None else png(m)} for i, m in maps.items()]
    table = pa.Table.from_pylist(rows, schema=schema.LABEL_MAP_IMAGE_SCHEMA)
    preds = [pred_row(1, np.where(maps[1] == 255, 0, maps[1])), pred_row(2, maps[2]), pred_row(3, np.ones((4, 4), int))]
    write_pred(str(tmp_path / "pred"), preds, shards=2)
    results = {}
    for marked in (True, False):
        gt = str(tmp_path / f"gt-{marked}")
        write_shard(gt + "/part-00000.parquet", table)
        info = {schema.SEMANTIC_GROUND_TRUTH: schema.LABEL_MAP} if marked else {}
        write_meta(gt, DatasetMeta(categories=CATEGORIES, info=info))
        results[marked] = evaluate([str(tmp_path / "pred")], gt, ["semantic"], use_ray=False, use_state=False)["semantic"]
    left_out = results[True]
    assert left_out["mIoU"] == 1.0 and left_out["pACC"] == 1.0  # image 3's all-sky prediction is not held against it
    c = left_out["counts"]
    assert (c["images"], c["images_without_label_map"], c["images_without_predictions"], c["gt_label_maps"]) == (2, 1, 0, 2)
    assert c["pixels"] == 5 + 4 and c["ignored_pixels"] == 1
    fallback = results[False]
    assert fallback["counts"]["images"] == 3 and fallback["counts"]["images_without_label_map"] == 0
    assert fallback["per_category"]["background"]["ACC"] == pytest.approx(2 / (2 + 16))  # 16 background pixels predicted sky
    assert fallback["mIoU"] < 1.0


def test_left_out_images_are_not_missing_predictions(tmp_path):
    """A label-map dataset's image without a label map and without a prediction is neither a miss nor an error."""
    rows = [{schema.IMAGE_ID: i, schema.FILE_NAME: f"{i}.png", schema.WIDTH: 2, schema.HEIGHT: 2, schema.ANNOTATIONS: [],
             LABEL_MAP: png(np.array([[1, 0], [0, 2]])) if i == 1 else None} for i in (1, 2)]
    gt = str(tmp_path / "gt")
    write_shard(gt + "/part-00000.parquet", pa.Table.from_pylist(rows, schema=schema.LABEL_MAP_IMAGE_SCHEMA))
    write_meta(gt, DatasetMeta(categories=CATEGORIES, info={schema.SEMANTIC_GROUND_TRUTH: schema.LABEL_MAP}))
    write_pred(str(tmp_path / "pred"), [pred_row(1, np.array([[1, 0], [0, 2]]))], shards=1)
    m = evaluate([str(tmp_path / "pred")], gt, ["semantic"], use_ray=False)["semantic"]
    assert m["mIoU"] == 1.0
    assert (m["counts"]["images"], m["counts"]["images_without_label_map"], m["counts"]["images_without_predictions"]) == (1, 1, 0)
