import numpy as np
import pyarrow.compute as pc
from pycocotools import mask as mask_utils

from pipeline.data.shards import list_shards, read_meta, read_shard
from pipeline.data.synth import CATEGORIES, synth_dataset, synth_image


def test_same_seed_same_bytes_and_prefix_stable():
    assert synth_image(3, 5) == synth_image(3, 5)
    assert synth_image(3, 5)[0] != synth_image(4, 5)[0]


def test_ground_truth_is_exact(tmp_path):
    out = str(tmp_path / "ds")
    result = synth_dataset(out, images=40, seed=1, rows_per_shard=16)
    assert result["shards"] == 3 and result["images"] == 40
    assert read_meta(out).categories == CATEGORIES
    table = read_shard(list_shards(out)[0])
    sizes = set()
    categories = set()
    for row in table.to_pylist():
        sizes.add((row["width"], row["height"]))
        for ann in row["annotations"]:
            rle = ann["segmentation"]["rle"]
            mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            assert mask.shape == (row["height"], row["width"])
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            assert ann["area"] == mask.sum() == mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()})
            categories.add(ann["category_id"])
    assert len(sizes) > 5, "image sizes should vary"
    assert categories == {1, 2, 3}


def test_shapes_overlap_sometimes(tmp_path):
    out = str(tmp_path / "ds")
    synth_dataset(out, images=60, seed=2)
    table = read_shard(list_shards(out)[0])
    counts = pc.list_value_length(table["annotations"]).to_pylist()
    assert max(counts) >= 3 and min(counts) >= 1
    overlapping = 0
    for row in table.to_pylist():
        boxes = [a["bbox"] for a in row["annotations"]]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                (x1, y1, w1, h1), (x2, y2, w2, h2) = boxes[i], boxes[j]
                if x1 < x2 + w2 and x2 < x1 + w1 and y1 < y2 + h2 and y2 < y1 + h1:
                    overlapping += 1
    assert overlapping > 0
