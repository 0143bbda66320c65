"""Semantic predictions out as files: export-masks (VOC palette PNGs that import back as ground truth)
and render (a colour per category, a legend under the picture)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline import schema
from pipeline.cli import main
from pipeline.data.decode import decode_image
from pipeline.data.export_masks import export_masks, mask_name
from pipeline.data.importers import import_images
from pipeline.data.render import MIN_SIDE, colour_for, render_predictions, upscale_factor
from pipeline.data.shards import DatasetError, DatasetMeta, list_shards, read_shard, write_meta, write_shard
from pipeline.eval import evaluate
from tests.data.label_folders import write_grey, write_rgb

CATEGORIES = [{"id": 1, "name": "sky"}, {"id": 2, "name": "road"}, {"id": 3, "name": "car"}, {"id": 5, "name": "tree"}]
VOID = (224, 224, 192)  # VOC's colour of 255
PRED_SCHEMA = pa.schema([*schema.PREDICTION_BASE_SCHEMA,
                         pa.field(schema.SEMANTIC_CATEGORY_IDS, schema.SEMANTIC_CATEGORY_IDS_TYPE),
                         pa.field(schema.SEMANTIC_MASKS, schema.SEMANTIC_MASKS_TYPE)])


def encode(categories: np.ndarray) -> tuple[list[int], list[dict]]:
    """A map of category ids (-1: no mask) -> the segment stage's two columns."""
    ids, masks = [], []
    for c in sorted(set(categories.reshape(-1).tolist()) - {-1}):
        rle = mask_utils.encode(np.asfortranarray((categories == c).astype(np.uint8)))
        ids.append(c)
        masks.append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})
    return ids, masks


def write_predictions(path: str, rows: list[dict], source: str | None, categories=CATEGORIES) -> None:
    write_shard(path + "/part-00000.parquet", pa.Table.from_pylist(rows[:2], schema=PRED_SCHEMA))
    write_shard(path + "/part-00001.parquet", pa.Table.from_pylist(rows[2:], schema=PRED_SCHEMA))
    write_meta(path, DatasetMeta(categories=categories, info={"source": source} if source else {}, kind="predictions"))


def pred_row(image_id: int, file_name: str | None, categories: np.ndarray | None, *, error: str | None = None) -> dict:
    ids, masks = encode(categories) if categories is not None else (None, None)
    h, w = categories.shape if categories is not None else (None, None)
    return {schema.IMAGE_ID: image_id, schema.FILE_NAME: file_name, schema.WIDTH: w, schema.HEIGHT: h, schema.ERROR: error,
            schema.SEMANTIC_CATEGORY_IDS: ids, schema.SEMANTIC_MASKS: masks}


@pytest.fixture()
def predicted(tmp_path):
    """Five images imported from a folder and predictions for them: two maps (one with unlabelled
    pixels, -1), an error row, a row without masks, and one in a sub-folder."""
    images = tmp_path / "images"
    shapes = {"a.png": (12, 16), "b.png": (10, 10), "c.png": (6, 6), "d.png": (6, 6), "sub/e.jpg": (8, 12)}
    for n, (name, (h, w)) in enumerate(shapes.items()):
        write_rgb(images / name, h, w, seed=n)
    src = str(tmp_path / "src")
    import_images(str(images), src)
    ids = {r["file_name"]: r["image_id"] for s in list_shards(src) for r in read_shard(s).to_pylist()}
    maps = {"a.png": np.zeros((12, 16), int), "b.png": np.full((10, 10), 5), "sub/e.jpg": np.full((8, 12), 2)}
    maps["a.png"][2:6, 3:12] = 1
    maps["a.png"][8:, :] = 2
    maps["a.png"][0, :4] = -1  # no mask covers these
    maps["b.png"][:5, :5] = 0
    rows = [pred_row(ids["a.png"], "a.png", maps["a.png"]), pred_row(ids["b.png"], "b.png", maps["b.png"]),
            pred_row(ids["c.png"], "c.png", None, error="cannot decode image: truncated file"),
            pred_row(ids["d.png"], "d.png", None), pred_row(ids["sub/e.jpg"], "sub/e.jpg", maps["sub/e.jpg"])]
    pred = str(tmp_path / "pred")
    write_predictions(pred, rows, src)
    return {"images": images, "src": src, "pred": pred, "maps": maps, "ids": ids}


def test_export_writes_voc_palette_pngs_holding_the_predicted_ids(predicted, tmp_path):
    out = tmp_path / "masks"
    result = export_masks(predicted["pred"], str(out))
    assert (result["written"], result["error_rows"], result["empty_rows"], result["renamed"]) == (3, 1, 1, [])
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["a.png", "b.png", "sub/e.png"]
    for name, categories in predicted["maps"].items():
        image = Image.open(out / (name.rsplit(".", 1)[0] + ".png"))
        assert image.mode == "P"
        expected = np.where(categories == -1, 255, categories)
        assert np.array_equal(np.asarray(image), expected), name  # read back by index: exactly the ids
    palette = Image.open(out / "a.png").getpalette()
    assert palette[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] and palette[3 * 5 : 3 * 6] == [128, 0, 128]
    assert tuple(palette[3 * 255 : 3 * 256]) == VOID


def test_export_import_eval_round_trip_is_exact(predicted, tmp_path):
    """Exported maps imported back as ground truth: the predictions score mIoU 1.0 against them, and
    the images that got no file (error row, no masks) are left out of the evaluation, not missed."""
    out, back = str(tmp_path / "masks"), str(tmp_path / "back")
    runner = CliRunner()
    exported = runner.invoke(main, ["data", "export-masks", predicted["pred"], out])
    assert exported.exit_code == 0, exported.output
    assert "wrote 3 label map(s)" in exported.output and "1 error rows and 1 rows without semantic masks skipped" in exported.output
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps(CATEGORIES))
    imported = runner.invoke(main, ["data", "import-images", str(predicted["images"]), back, "--labels", out, "--categories", str(cats)])
    assert imported.exit_code == 0, imported.output
    assert "label maps: 3 of 5 image(s)" in imported.stdout and "2 image(s) have no label file" in imported.stderr
    rows = {r["file_name"]: r for s in list_shards(back) for r in read_shard(s).to_pylist()}
    assert [r["image_id"] for r in rows.values()] == [predicted["ids"][n] for n in rows]  # same folder, same ids
    metrics = evaluate([predicted["pred"]], back, ["semantic"], use_ray=False)["semantic"]
    assert (metrics["mIoU"], metrics["pACC"], metrics["fwIoU"]) == (1.0, 1.0, 1.0)
    c = metrics["counts"]
    assert (c["images"], c["images_without_label_map"], c["error_rows"], c["unlabelled_pixels"]) == (3, 2, 0, 0)
    assert c["ignored_pixels"] == 4  # a.png's unlabelled pixels came back as 255
    cli = runner.invoke(main, ["eval", predicted["pred"], "--gt", back, "--iou-type", "semantic", "--no-ray", "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["semantic"]["mIoU"] == 1.0


def test_export_names_never_collide_and_bad_input_is_refused(tmp_path):
    pred = str(tmp_path / "pred")
    one = np.ones((2, 2), int)
    write_predictions(pred, [pred_row(1, "x.jpg", one), pred_row(2, "x.png", one), pred_row(3, None, one),
                             pred_row(4, "../../up.png", one)], None)
    result = export_masks(pred, str(tmp_path / "out"))
    assert [p.rsplit("/", 1)[1] for p in result["paths"]] == ["x.png", "x_2.png", "3.png", "up.png"]
    assert result["renamed"] == [(2, "x_2.png")]
    assert mask_name(7, "a/b.c.jpeg") == "a/b.c.png" and mask_name(7, "") == "7.png"

    again = CliRunner().invoke(main, ["data", "export-masks", pred, str(tmp_path / "out")])
    assert again.exit_code == 1 and "not empty" in again.output and "--overwrite" in again.output
    assert CliRunner().invoke(main, ["data", "export-masks", pred, str(tmp_path / "out"), "--overwrite"]).exit_code == 0

    big = str(tmp_path / "big")
    write_predictions(big, [pred_row(1, "x.png", np.full((2, 2), 300))], None, categories=[])
    with pytest.raises(DatasetError, match=r"image_id 1: category id\(s\) \[300\] do not fit an 8-bit label map"):
        export_masks(big, str(tmp_path / "o1"))
    boxes = str(tmp_path / "boxes")
    write_shard(boxes + "/part-00000.parquet", pa.table({"image_id": [1], "boxes": pa.array([[]], schema.BOXES_TYPE)}))
    with pytest.raises(DatasetError, match=r"has no 'semantic_masks' column \(its prediction columns: boxes\)"):
        export_masks(boxes, str(tmp_path / "o2"))


def test_render_tints_each_category_and_adds_a_legend(predicted, tmp_path):
    result = render_predictions(predicted["pred"], str(tmp_path / "pics"))
    assert [p.rsplit("/", 1)[1] for p in result["paths"]] == ["1_a.png", "2_b.png", "4_d.png", "5_e.png"]  # d: no masks, drawn bare
    assert [r[0] for r in result["error_rows"]] == [3]
    assert Image.open(result["paths"][2]).height == upscale_factor(6, 6) * 6  # nothing semantic: no legend either
    rows = {r["file_name"]: r for s in list_shards(predicted["src"]) for r in read_shard(s).to_pylist()}
    original = decode_image(rows["a.png"]["image"])
    categories = predicted["maps"]["a.png"]
    f = upscale_factor(16, 12)
    assert f == -(-MIN_SIDE // 12)
    drawn = np.asarray(Image.open(result["paths"][0]).convert("RGB"))
    assert drawn.shape[1] == 16 * f and drawn.shape[0] > 12 * f  # the picture, then the legend strip under it

    expected = original.astype(np.float32)
    for c, colour in ((1, colour_for(1)), (2, colour_for(2)), (-1, VOID)):  # background (0) left as it is
        expected[categories == c] = 0.5 * expected[categories == c] + 0.5 * np.array(colour, np.float32)
    assert np.array_equal(drawn[: 12 * f : f, :: f], expected.astype(np.uint8))

    legend = drawn[12 * f :].reshape(-1, 3)
    def swatch(colour):
        return int((legend == colour).all(axis=1).sum())
    assert swatch(colour_for(1)) >= 100 and swatch(colour_for(2)) >= 100 and swatch(VOID) >= 100  # present: a swatch each
    assert swatch(colour_for(5)) == 0 and swatch(colour_for(3)) == 0  # tree and car are not in this image


def test_render_draws_a_ground_truth_label_map_dataset(tmp_path):
    """An imported label-map dataset given as PRED: its own images, its label maps, 255 tinted void."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    original = write_rgb(images / "p.png", 8, 8)
    values = write_grey(labels / "p.png", np.array([[0, 0, 3, 3, 3, 3, 255, 255]] * 8))
    ds = str(tmp_path / "ds")
    import_images(str(images), ds, labels_dir=str(labels))
    result = CliRunner().invoke(main, ["data", "render", ds, str(tmp_path / "pics")])
    assert result.exit_code == 0, result.output
    drawn = np.asarray(Image.open(tmp_path / "pics" / "1_p.png").convert("RGB"))
    f = upscale_factor(8, 8)
    expected = original.astype(np.float32)
    expected[values == 3] = 0.5 * expected[values == 3] + 0.5 * np.array(colour_for(3), np.float32)
    expected[values == 255] = 0.5 * expected[values == 255] + 0.5 * np.array(VOID, np.float32)
    assert np.array_equal(drawn[: 8 * f : f, :: f], expected.astype(np.uint8))

    broken = str(tmp_path / "broken")
    row = pred_row(1, "p.png", np.ones((8, 7), int)) | {schema.WIDTH: 8}  # the image's size, masks of another
    write_predictions(broken, [row], ds)
    bad = render_predictions(broken, str(tmp_path / "pics2"))
    assert bad["paths"] == [] and bad["undecodable"] == [(1, "p.png", "image_id 1: semantic mask 0 (category 1) is 8x7, the image is 8x8")]
