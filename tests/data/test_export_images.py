"""export-images: an image column of a prediction dataset out as files, plus a contact sheet."""

import io

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import schema
from pipeline.cli import main
from pipeline.data.decode import decode_image
from pipeline.data.export_images import SHEET, export_images
from pipeline.data.shards import (
    DatasetError,
    DatasetMeta,
    list_shards,
    read_shard,
    write_meta,
    write_shard,
)
from pipeline.data.synth import synth_dataset

CELL = 64
PRED_SCHEMA = pa.schema([("image_id", pa.int64()), ("file_name", pa.string()), ("width", pa.int32()),
                         ("height", pa.int32()), ("error", pa.string()), ("stylized", schema.STYLIZED_TYPE)])


def encode(rgb: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture()
def prediction(tmp_path):
    """A source dataset of 5 images and predictions: 3 inverted pictures (PNG, JPEG), 1 error row, 1 null."""
    src = str(tmp_path / "src")
    synth_dataset(src, images=5, seed=2, size=64, rows_per_shard=3)
    rows = [r for shard in list_shards(src) for r in read_shard(shard).to_pylist()]
    preds = []
    for n, r in enumerate(rows):
        rgb = decode_image(r["image"])
        value = [encode(255 - rgb, "PNG"), encode(255 - rgb, "JPEG"), encode(255 - rgb, "PNG"), None, None][n]
        preds.append({"image_id": r["image_id"], "file_name": r["file_name"], "width": r["width"], "height": r["height"],
                      "error": "decode: broken" if n == 3 else None, "stylized": value})
    pred = str(tmp_path / "pred")
    write_shard(pred + "/part-00000.parquet", pa.Table.from_pylist(preds[:2], schema=PRED_SCHEMA))
    write_shard(pred + "/part-00001.parquet", pa.Table.from_pylist(preds[2:], schema=PRED_SCHEMA))
    write_meta(pred, DatasetMeta(info={"source": src}, kind="predictions"))
    return src, pred, rows, preds


def test_files_are_the_column_bytes_and_rows_are_counted(prediction, tmp_path):
    _, pred, _, preds = prediction
    result = export_images(pred, str(tmp_path / "out"), cell=CELL)
    assert (result["written"], result["error_rows"], result["empty_rows"]) == (3, 1, 1)
    names = sorted(p.rsplit("/", 1)[1] for p in result["paths"])
    assert names == ["1_synth-2-000000.png", "2_synth-2-000001.jpg", "3_synth-2-000002.png"]
    for path, p in zip(sorted(result["paths"]), preds[:3]):
        with open(path, "rb") as f:
            assert f.read() == p["stylized"]  # exactly the bytes in the column


def test_contact_sheet_puts_originals_next_to_results(prediction, tmp_path):
    _, pred, rows, _ = prediction
    result = export_images(pred, str(tmp_path / "out"), cell=CELL)
    assert result["sheet"].endswith(SHEET)
    sheet = np.asarray(Image.open(result["sheet"]).convert("RGB")).astype(int)
    pad, label = 4, 14
    assert sheet.shape[1] == 2 * (CELL + pad) + pad  # two columns: original | result
    assert sheet.shape[0] == 3 * (CELL + label + pad) + pad  # one line per exported image
    original = Image.fromarray(decode_image(rows[0]["image"]))
    original.thumbnail((CELL, CELL))
    thumb = np.asarray(original).astype(int)
    top, left = pad + label + (CELL - thumb.shape[0]) // 2, pad + (CELL - thumb.shape[1]) // 2
    assert np.array_equal(sheet[top:top + thumb.shape[0], left:left + thumb.shape[1]], thumb)
    left = pad + (CELL + pad) + (CELL - thumb.shape[1]) // 2  # the result: the inverted picture
    result_cell = sheet[top:top + thumb.shape[0], left:left + thumb.shape[1]]
    assert np.abs(result_cell - (255 - thumb)).mean() < 3


def test_sheet_without_the_source_shows_results_only(prediction, tmp_path):
    _, pred, _, _ = prediction
    result = export_images(pred, str(tmp_path / "out"), images=str(tmp_path / "gone"), cell=CELL)
    assert Image.open(result["sheet"]).width == CELL + 2 * 4


def test_missing_column_names_the_columns_there_are(prediction, tmp_path):
    _, pred, _, _ = prediction
    with pytest.raises(DatasetError, match=r"has no column 'styled' \(its prediction columns: stylized\)"):
        export_images(pred, str(tmp_path / "out"), column="styled")


def test_cli(prediction, tmp_path):
    _, pred, _, _ = prediction
    result = CliRunner().invoke(main, ["data", "export-images", pred, str(tmp_path / "out"), "--sheet-limit", "2"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 image(s)" in result.output and "1 error rows" in result.output and SHEET in result.output
    assert Image.open(tmp_path / "out" / SHEET).height == 2 * (192 + 14 + 4) + 4  # two lines, default 192 px cells
    bad = CliRunner().invoke(main, ["data", "export-images", pred, str(tmp_path / "o2"), "--column", "nope"])
    assert bad.exit_code == 1 and "has no column 'nope'" in bad.output and "Traceback" not in bad.output
    again = CliRunner().invoke(main, ["data", "export-images", pred, str(tmp_path / "out")])
    assert again.exit_code == 1 and "not empty" in again.output and "--overwrite" in again.output
    assert CliRunner().invoke(main, ["data", "export-images", pred, str(tmp_path / "out"), "--overwrite"]).exit_code == 0
