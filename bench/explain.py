"""Do the explain stage's maps land on the object? The pointing game per method, and its cost.

For each method, the ``explain`` stage runs as a job calls it (decoded Arrow batches) after the
shipped model's own predictions on held-out synthetic shapes (seed 300, never trained on):

* ``detector`` (default): ``masks`` with ``conf/models/small_maskrcnn_shapes.pth``, then every
  detection with score >= 0.5 explained against its own box;
* ``classifier``: ``classify`` with ``conf/models/small_cnn_shapes.pth`` on one-shape images, the
  top-1 class explained against the shape's ground-truth box.

Per method: the pointing game (the map's maximum inside the box), the share of the map's positive
mass inside the box, that share over the box's share of the image area (1 = no better than a
uniform map), predictions that no longer matched, and images/s of the explain call alone (one
process, torch threads as set). A random point lands in a box with probability = the box's area
share: the ``random point`` row.

    python bench/explain.py                                  # detector, 40 images, all methods (~5 min on 2 cores)
    python bench/explain.py --model classifier --images 200
    python bench/explain.py --images 2 --methods saliency    # a smoke test
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "detector": ("small_maskrcnn", str(REPO / "conf" / "models" / "small_maskrcnn_shapes.pth")),
    "classifier": ("small_cnn", str(REPO / "conf" / "models" / "small_cnn_shapes.pth")),
}
METHODS = ("saliency", "smoothgrad", "guided_backprop", "occlusion", "gradcam", "hirescam")


def predictions(model: str, images: int, batch_size: int, root: str) -> tuple[list, list[list[np.ndarray]]]:
    """Held-out images with the shipped model's predictions, as decoded batches; and per row the
    boxes to explain against (xyxy): its detections (detector) or its shape's box (classifier)."""
    from pipeline import schema
    from pipeline.data.decode import decode_batch
    from pipeline.data.shards import list_shards, read_shard
    from pipeline.data.synth import synth_dataset
    from pipeline.stages.classify import ClassifyStage
    from pipeline.stages.masks import MasksStage

    name, weights = MODELS[model]
    synth_dataset(root, images=images, seed=300, classification=model == "classifier")
    raw = read_shard(list_shards(root)[0])
    table = decode_batch(raw)
    if model == "detector":
        stage = MasksStage(model=name, weights=weights, score_threshold=0.05)
    else:
        stage = ClassifyStage(model=name, weights=weights, top_k=3)
    batches = [stage(table.slice(i, batch_size)) for i in range(0, table.num_rows, batch_size)]
    if model == "detector":
        boxes = [[np.asarray(b, np.float64) for b in row] for batch in batches for row in batch[schema.BOXES].to_pylist()]
    else:
        boxes = [[np.array([x, y, x + w, y + h]) for x, y, w, h in [row[schema.ANNOTATIONS][0]["bbox"]]] for row in raw.to_pylist()]
    return batches, boxes


def score(out_batches: list, boxes: list[list[np.ndarray]], model: str) -> dict[str, float]:
    """Pointing game and mass shares over the explained predictions (classifier: from the maps and the GT box)."""
    import io

    from PIL import Image

    from pipeline import schema
    from pipeline.stages.explain_boxes import box_statistics

    hits, shares, ratios, unmatched, explained = [], [], [], 0, 0
    columns = [schema.WIDTH, schema.HEIGHT, schema.ATTRIBUTION_MAPS, schema.ATTRIBUTION_IN_BOX, schema.ATTRIBUTION_PEAK_IN_BOX]
    columns += [schema.SCORES] if model == "detector" else []
    rows = [row for batch in out_batches for row in batch.select(columns).to_pylist()]
    for row, row_boxes in zip(rows, boxes):
        area = row[schema.WIDTH] * row[schema.HEIGHT]
        for k, (png, box) in enumerate(zip(row[schema.ATTRIBUTION_MAPS], row_boxes)):
            wanted = model == "classifier" or row[schema.SCORES][k] >= 0.5
            if not wanted:
                continue
            if not png:
                unmatched += 1
                continue
            explained += 1
            if model == "detector":
                share, hit = row[schema.ATTRIBUTION_IN_BOX][k], row[schema.ATTRIBUTION_PEAK_IN_BOX][k]
            else:
                share, hit = box_statistics(np.asarray(Image.open(io.BytesIO(png)), np.float32), box)
            box_share = (box[2] - box[0]) * (box[3] - box[1]) / area
            hits.append(hit)
            shares.append(share)
            ratios.append(share / box_share)
    return {"explained": explained, "unmatched": unmatched, "pointing": float(np.mean(hits)),
            "in_box": float(np.mean(shares)), "ratio": float(np.mean(ratios))}


def random_point(out_batches: list, boxes: list[list[np.ndarray]], model: str) -> float:
    """The pointing game of a uniformly random point: the mean box share of the image."""
    from pipeline import schema

    shares = []
    rows = [row for batch in out_batches for row in batch.select([schema.WIDTH, schema.HEIGHT]).to_pylist()]
    scores = [row for batch in out_batches for row in (batch[schema.SCORES].to_pylist() if model == "detector" else [None] * batch.num_rows)]
    for row, row_boxes, row_scores in zip(rows, boxes, scores):
        for k, box in enumerate(row_boxes):
            if row_scores is None or row_scores[k] >= 0.5:
                shares.append((box[2] - box[0]) * (box[3] - box[1]) / (row[schema.WIDTH] * row[schema.HEIGHT]))
    return float(np.mean(shares))


@click.command()
@click.option("--model", type=click.Choice(sorted(MODELS)), default="detector", show_default=True)
@click.option("--images", default=40, show_default=True, help="held-out images (seed 300)")
@click.option("--methods", default=",".join(METHODS), show_default=True)
@click.option("--stride", default=8, show_default=True, help="occlusion stride (the patch is 16 px)")
@click.option("--samples", default=12, show_default=True, help="smoothgrad copies")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--threads", default=2, show_default=True, help="torch threads")
def main(model: str, images: int, methods: str, stride: int, samples: int, batch_size: int, threads: int) -> None:
    import tempfile
    import warnings

    import torch

    from pipeline.stages.explain import ExplainStage

    warnings.filterwarnings("ignore", message="Setting backward hooks")  # captum's guided backprop, every call
    torch.set_num_threads(threads)
    name, weights = MODELS[model]
    with tempfile.TemporaryDirectory() as root:
        batches, boxes = predictions(model, images, batch_size, root)
    print(f"{model}: {name} ({Path(weights).name}), {images} held-out images, occlusion 16 px patch stride {stride}, "
          f"smoothgrad {samples} copies, {threads} torch threads")
    print(f"| method | explained | no longer matched | pointing game | in-box mass share | in-box mass / box area share | images/s |")
    print("|---|---|---|---|---|---|---|")
    for method in methods.split(","):
        stage = ExplainStage(method=method, model=name, weights=weights, stride=stride, samples=samples)
        stage(batches[0].slice(0, 1))  # warm-up: first-call costs (allocator, captum's hooks) out of the timing
        start = time.perf_counter()
        out = [stage(b) for b in batches]
        seconds = time.perf_counter() - start
        s = score(out, boxes, model)
        print(f"| {method} | {s['explained']} | {s['unmatched']} | {s['pointing']:.3f} | {s['in_box']:.3f} | "
              f"{s['ratio']:.2f} | {images / seconds:.2f} |", flush=True)
    print(f"| random point | | | {random_point(batches, boxes, model):.3f} | | 1.00 | |")


if __name__ == "__main__":
    main()
