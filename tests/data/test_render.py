"""render: predictions drawn on their images, readable at any size, named, on a contact sheet."""

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import schema
from pipeline.cli import main
from pipeline.data.decode import decode_image
from pipeline.data.export_images import SHEET
from pipeline.data.importers import import_coco
from pipeline.data.render import (
    MIN_SIDE,
    category_names,
    colour_for,
    known_categories,
    label_rect,
    label_text,
    layout_labels,
    render_predictions,
    upscale_factor,
)
from pipeline.data.shards import DatasetError, DatasetMeta, list_shards, read_meta, read_shard, write_meta, write_shard
from pipeline.data.synth import CATEGORIES, synth_dataset

PRED_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("file_name", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("error", pa.string()), ("boxes", schema.BOXES_TYPE), ("scores", schema.SCORES_TYPE),
    ("category_ids", schema.IDS_TYPE), ("masks", schema.MASKS_TYPE)])


def xyxy(bbox):
    return [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]


def predictions_from_gt(rows, pred, source, *, categories=CATEGORIES, errors=(), masks=True, score=0.9):
    """A prediction dataset made from exact ground truth (real boxes and RLE masks); ``errors``: ids of error rows."""
    preds = []
    for r in rows:
        anns = r["annotations"] or []
        bad = r["image_id"] in errors
        preds.append({
            "image_id": r["image_id"], "file_name": r["file_name"], "width": None if bad else r["width"],
            "height": None if bad else r["height"], "error": "cannot decode image: truncated file" if bad else None,
            "boxes": None if bad else [xyxy(a["bbox"]) for a in anns],
            "scores": None if bad else [score] * len(anns),
            "category_ids": None if bad else [a["category_id"] for a in anns],
            "masks": None if bad or not masks else [a["segmentation"]["rle"] for a in anns],
        })
    write_shard(pred + "/part-00000.parquet", pa.Table.from_pylist(preds, schema=PRED_SCHEMA))
    write_meta(pred, DatasetMeta(categories=categories, info={"source": source}, kind="predictions"))
    return preds


@pytest.fixture()
def shapes(tmp_path):
    """4 synthetic ~120 px images and predictions from their ground truth; image 2 is an error row."""
    src = str(tmp_path / "src")
    synth_dataset(src, images=4, seed=4, size=120)
    rows = read_shard(list_shards(src)[0]).to_pylist()
    pred = str(tmp_path / "pred")
    preds = predictions_from_gt(rows, pred, src, errors={2})
    return src, pred, rows, preds


def run_length_up(picture: np.ndarray, x: int, y: int, colour) -> int:
    """How many pixels straight up from (x, y) have exactly ``colour``."""
    n = 0
    while y - n >= 0 and tuple(picture[y - n, x]) == tuple(colour):
        n += 1
    return n


def test_small_images_are_upscaled_named_and_drawn(shapes, tmp_path):
    src, pred, rows, preds = shapes
    result = render_predictions(pred, str(tmp_path / "pics"), limit=8)
    names = [p.rsplit("/", 1)[1] for p in result["paths"]]
    assert names == ["1_synth-4-000000.png", "3_synth-4-000002.png", "4_synth-4-000003.png"]
    assert result["error_rows"] == [(2, "synth-4-000001.png", "cannot decode image: truncated file")]
    original = decode_image(rows[0]["image"])
    drawn = np.asarray(Image.open(result["paths"][0]).convert("RGB"))
    f = upscale_factor(original.shape[1], original.shape[0])
    assert min(original.shape[:2]) < MIN_SIDE and f > 1
    assert drawn.shape == (original.shape[0] * f, original.shape[1] * f, 3) and min(drawn.shape[:2]) >= MIN_SIDE
    # the box outline is drawn in its category's colour, at the upscaled position
    box, category = preds[0]["boxes"][-1], preds[0]["category_ids"][-1]
    x1, y1, x2, y2 = (int(round(v * f)) for v in box)
    colour = colour_for(category)
    assert (drawn[(y1 + y2) // 2, x1] == colour).all() and (drawn[(y1 + y2) // 2, x2 - 1] == colour).all()
    # masks tint the picture: away from boxes and labels, upscaled pixels are the original's
    unchanged = (drawn[::f, ::f] == original).all(axis=2)
    assert 0.02 < 1 - unchanged.mean() < 0.9


def test_contact_sheet_shows_every_picture(shapes, tmp_path):
    _, pred, _, _ = shapes
    result = render_predictions(pred, str(tmp_path / "pics"), limit=8)
    assert result["sheet"] == str(tmp_path / "pics" / SHEET)
    sheet = Image.open(result["sheet"])
    # 3 pictures: a 2x2 grid of 256 px cells with a caption line each
    assert 2 * 256 <= sheet.width <= 2 * 256 + 40 and 2 * 256 <= sheet.height <= 2 * 256 + 80
    pixels = np.asarray(sheet.convert("RGB"))
    assert pixels.std() > 10  # pictures on it, not a blank background


def test_label_text_is_the_category_name_and_score():
    names = category_names(CATEGORIES)
    assert label_text(1, 0.934, names) == "circle 0.93"
    assert label_text(3, 0.5, names) == "triangle 0.50"
    assert label_text(7, 0.5, names) == "class 7 0.50"  # no name known anywhere
    assert label_text(-1, 0.5, names, label=12) == "unmapped label 12 0.50"
    assert category_names([{"id": 2, "name": ""}]) == {}


def test_names_come_from_the_images_dataset_when_predictions_record_none(shapes, tmp_path):
    src, _, rows, _ = shapes
    pred = str(tmp_path / "bare")
    predictions_from_gt(rows, pred, src, categories=[])
    assert category_names(known_categories(read_meta(pred))) == {1: "circle", 2: "rectangle", 3: "triangle"}
    missing = DatasetMeta(info={"source": str(tmp_path / "gone")})
    assert known_categories(missing) == []


def test_labels_stay_inside_the_picture():
    W, H = 400, 300
    size = (120, 30)
    above = label_rect((100, 100, 200, 200), size, W, H)
    assert above == (100, 70, 220, 100)  # above the box, touching its top edge
    for box in [(0, 0, 50, 40), (350, 0, 400, 20), (390, 290, 400, 300), (-20, -20, 500, 400), (0, 0, 400, 300)]:
        x0, y0, x1, y1 = label_rect(box, size, W, H, line=3)
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H, box
        assert (x1 - x0, y1 - y0) == size
    assert label_rect((0, 0, 50, 40), size, W, H, line=3)[1] == 3  # no room above: inside, under the edge
    wide = label_rect((10, 10, 20, 20), (500, 30), W, H)
    assert wide[0] == 0 and wide[2] == W  # wider than the picture: cut to it
    # labels of neighbouring boxes do not cover each other when there is another place
    rects = layout_labels([(100, 100, 200, 200), (110, 100, 210, 200)], [size, size], W, H, line=3)
    a, b = rects
    assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
    assert all(0 <= r[0] and r[2] <= W and 0 <= r[1] and r[3] <= H for r in rects)


def test_a_real_photo_gets_labels_scaled_to_its_size(fixtures_dir, tmp_path):
    """terrain1.jpg (2048x1365) with its 7 annotated people, one box moved to the top edge."""
    sahi = fixtures_dir / "images" / "sahi"
    src = str(tmp_path / "src")
    import_coco(str(sahi), str(sahi / "terrain1_coco.json"), src)
    rows = read_shard(list_shards(src)[0]).to_pylist()
    rows[0]["annotations"][0]["bbox"] = [600.0, 0.0, 150.0, 120.0]
    pred = str(tmp_path / "pred")
    preds = predictions_from_gt(rows, pred, src, categories=read_meta(src).categories, masks=False)
    result = render_predictions(pred, str(tmp_path / "pics"))
    assert [p.rsplit("/", 1)[1] for p in result["paths"]] == ["1_terrain1.jpg".replace(".jpg", ".png")]
    drawn = np.asarray(Image.open(result["paths"][0]).convert("RGB"))
    assert drawn.shape == (1365, 2048, 3)  # big enough already: not rescaled
    colour = colour_for(1)
    # the box at the top edge: its label is inside the picture, under the edge (rows 0-4: the 5 px outline)
    under_edge = drawn[6:60, 608:760]
    assert (under_edge == colour).all(axis=2).sum() > 2000  # the filled background
    assert (under_edge == 255).all(axis=2).sum() > 200  # white text on it
    assert (drawn[:5, 608:740] == colour).all()  # the box's top edge itself, not covered by its label
    # the others sit above their boxes, as tall as a ~34 px font needs (the default PIL font: 11 px)
    x, y, _, _ = preds[0]["boxes"][1]
    assert run_length_up(drawn, int(x) + 2, int(y) - 3, colour) >= 30


def test_images_of_another_dataset_are_refused(shapes, tmp_path):
    _, pred, _, _ = shapes
    other = str(tmp_path / "other")
    synth_dataset(other, images=4, seed=9, size=120)  # same ids, other files and sizes
    out = tmp_path / "pics"
    result = CliRunner().invoke(main, ["data", "render", pred, str(out), "--images", other])
    assert result.exit_code != 0
    assert "are not the ones" in result.output and "image_id 1: file_name 'synth-4-000000.png'" in result.output
    assert "'synth-9-000000.png'" in result.output
    assert not list(out.glob("*.png"))  # nothing drawn
    fewer = str(tmp_path / "fewer")
    synth_dataset(fewer, images=1, seed=4, size=120)  # only image 1, the very same
    with pytest.raises(DatasetError, match="image_id 3 is not in"):
        render_predictions(pred, str(out), images=fewer)


def test_cli_lists_skipped_error_rows(shapes, tmp_path):
    src, pred, _, _ = shapes
    result = CliRunner().invoke(main, ["data", "render", pred, str(tmp_path / "pics"), "--images", src])
    assert result.exit_code == 0, result.output
    assert "wrote 3 picture(s)" in result.stdout and "contact_sheet.png" in result.stdout
    assert "skipped 1 error row(s)" in result.stderr and "image_id 2 synth-4-000001.png: cannot decode" in result.stderr
