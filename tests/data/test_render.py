import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import schema
from pipeline.data.decode import decode_image
from pipeline.data.render import render_predictions
from pipeline.data.shards import DatasetMeta, list_shards, read_shard, write_meta, write_shard
from pipeline.data.synth import CATEGORIES, synth_dataset


def test_render_draws_boxes_and_masks_from_a_prediction_dataset(tmp_path):
    src = str(tmp_path / "src")
    synth_dataset(src, images=3, seed=4)
    rows = read_shard(list_shards(src)[0]).to_pylist()
    # "Predictions" made from the exact ground truth: real boxes (xywh -> xyxy) and RLE masks.
    preds = []
    for r in rows:
        anns = r["annotations"]
        preds.append({
            "image_id": r["image_id"], "error": None,
            "boxes": [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
            "scores": [0.9] * len(anns), "category_ids": [a["category_id"] for a in anns],
            "masks": [a["segmentation"]["rle"] for a in anns],
        })
    table = pa.Table.from_pylist(preds, schema=pa.schema([
        ("image_id", pa.int64()), ("error", pa.string()), ("boxes", schema.BOXES_TYPE), ("scores", schema.SCORES_TYPE),
        ("category_ids", schema.IDS_TYPE), ("masks", schema.MASKS_TYPE)]))
    pred = str(tmp_path / "pred")
    write_shard(pred + "/part-00000.parquet", table)
    write_meta(pred, DatasetMeta(categories=CATEGORIES, info={"source": src}, kind="predictions"))

    paths = render_predictions(pred, str(tmp_path / "pics"), limit=2)
    assert len(paths) == 2
    original = decode_image(rows[0]["image"])
    drawn = np.asarray(Image.open(paths[0]).convert("RGB"))
    assert drawn.shape == original.shape
    x1, y1, x2, y2 = (int(round(v)) for v in preds[0]["boxes"][0])
    assert (drawn[y1, x1:x2] != original[y1, x1:x2]).any()  # the box outline is drawn
    assert (drawn != original).mean() > 0.01  # masks tinted
