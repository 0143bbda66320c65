"""Masks stage per image: model vs mask post-processing (old vs new), and masks vs detect img/s.

The masks stage's work per image is the model (decode the in-flight pixels, transform, backbone,
RPN, RoI heads with the mask head, box rescaling, Arrow columns) and then the masks'
post-processing: paste each detection's M x M mask probability into the image, threshold, COCO
RLE. Two post-processings are compared on the *same* model outputs:

* old: what the stage did before -- torchvision's ``paste_masks_in_image`` (an (N, 1, H, W)
  float tensor), ``> mask_threshold``, pycocotools ``encode`` of the N full-size masks;
* new: what it does now -- :func:`pipeline.stages.masks.encode_in_boxes`: paste into each box
  only, threshold the crop, RLE from the crop and its offset.

Per repeat and image (a one-image batch, as the stage receives it):

1. the real ``MasksStage.__call__`` runs, with ``encode_in_boxes`` wrapped to time it (``new``)
   and keep its inputs; ``model`` = the whole call minus ``new``;
2. the old post-processing runs on those inputs (``old``), and must give the same RLE strings
   (checked on every repeat: a bench of a bug would be worthless);
3. a ``DetectStage.__call__`` with the *same* model minus its mask head (same weights, so the
   same backbone and the same detections: what ``fasterrcnn_*`` with those weights computes).

Best of ``--repeats`` per part (the machine is shared and noisy), mean over the images. Derived:
post share = post / (model + post); masks img/s = 1 / (model + post) (old: the model plus the old
post-processing), detect img/s = 1 / detect; masks/detect = their ratio (the target of the
"Throughput" issue is >= 0.5 on a GPU; bench/gpu_check.py measures that on a device machine).

    python bench/masks.py                     # 3 configurations, 3 images each, best of 3 (~3 min on 2 cores)
    python bench/masks.py --images 1 --repeats 1 --skip resnet50    # a smoke test
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHIPPED = str(REPO / "conf" / "models" / "small_maskrcnn_shapes.pth")


def configs() -> list[tuple[str, str, int, dict]]:
    """(key, row name, synthetic image size, MasksStage kwargs)."""
    return [
        ("shipped", "small_maskrcnn (shipped), 128 px, score 0.05", 128,
         {"model": "small_maskrcnn", "weights": SHIPPED, "score_threshold": 0.05, "max_detections": 100}),
        ("shipped0", "small_maskrcnn (shipped), 128 px, score 0, 100 dets", 128,
         {"model": "small_maskrcnn", "weights": SHIPPED, "score_threshold": 0.0, "max_detections": 100}),
        ("resnet50", "maskrcnn_resnet50_fpn random, 416 px, score 0.05, 100 dets", 416,
         {"model": "maskrcnn_resnet50_fpn", "weights": "none", "num_classes": 2, "score_threshold": 0.05,
          "max_detections": 100, "model_kwargs": {"min_size": 416, "max_size": 480}}),
    ]


def one_image_batches(n: int, size: int, seed: int = 300) -> list:
    """Decoded one-image batches (the table a stage receives) of synthetic shapes (PNG, ~``size`` px)."""
    from pipeline import schema
    from pipeline.data.decode import decode_batch
    from pipeline.data.synth import synth_image

    batches = []
    for i in range(n):
        png, width, height, _ = synth_image(seed, i, size)
        row = {"image_id": i, "file_name": f"{i}.png", "width": width, "height": height, "image": png}
        batches.append(decode_batch(schema.image_table([row])))
    return batches


def detect_twin(masks_stage, kwargs: dict, threads: int):
    """A DetectStage running ``masks_stage``'s model without its mask head: same weights, same boxes."""
    import copy

    from pipeline.stages.detect import DetectStage

    detect = DetectStage(**kwargs, threads=threads)
    detect.model = copy.deepcopy(masks_stage.model)
    heads = detect.model.roi_heads
    heads.mask_roi_pool = heads.mask_head = heads.mask_predictor = None  # RoIHeads.has_mask() is now False
    return detect


def measure(masks_stage, detect_stage, batch, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds of each part (see the module docstring) for one one-image batch."""
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    import pipeline.stages.masks as masks_module
    from pipeline.stages.common import encode_masks

    encode_in_boxes = masks_module.encode_in_boxes
    calls = []

    def timed(probs, boxes, image_size, threshold):
        start = time.perf_counter()
        rles = encode_in_boxes(probs, boxes, image_size, threshold)
        calls.append(((probs, boxes, image_size, threshold), rles, time.perf_counter() - start))
        return rles

    best = {"model": float("inf"), "old": float("inf"), "new": float("inf"), "detect": float("inf")}
    detections = 0
    for _ in range(repeats):
        calls.clear()
        masks_module.encode_in_boxes = timed
        try:
            start = time.perf_counter()
            out = masks_stage(batch)
            t_stage = time.perf_counter() - start
        finally:
            masks_module.encode_in_boxes = encode_in_boxes
        (probs, boxes, size, threshold), new, t_new = calls[0]
        with torch.inference_mode():
            start = time.perf_counter()
            old = encode_masks((paste_masks_in_image(probs, boxes, size)[:, 0] > threshold).cpu().numpy())
            t_old = time.perf_counter() - start
        if old != new or out["masks"].to_pylist()[0] != new:
            raise AssertionError("the two post-processings disagree: the bench is measuring a bug")
        start = time.perf_counter()
        detected = detect_stage(batch)
        t_detect = time.perf_counter() - start
        if detected["boxes"].to_pylist() != out["boxes"].to_pylist():
            raise AssertionError("the detect twin found other boxes: it is not the same model")
        detections = len(new)
        for key, value in (("model", t_stage - t_new), ("old", t_old), ("new", t_new), ("detect", t_detect)):
            best[key] = min(best[key], value)
    return {**best, "detections": detections}


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print(" | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


@click.command()
@click.option("--images", default=3, show_default=True, help="images per configuration (one-image batches)")
@click.option("--repeats", default=3, show_default=True, help="timings per image; the best of each part is kept")
@click.option("--threads", default=1, show_default=True, help="torch threads (a stage's num_cpus)")
@click.option("--skip", multiple=True, help="configuration keys to leave out: shipped, shipped0, resnet50")
def main(images: int, repeats: int, threads: int, skip: tuple[str, ...]) -> None:
    import torch

    from pipeline.stages.masks import MasksStage

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    results = []
    for key, name, size, kwargs in configs():
        if key in skip:
            continue
        masks_stage = MasksStage(**kwargs, threads=threads)
        detect_stage = detect_twin(masks_stage, kwargs, threads)
        batches = one_image_batches(images, size)
        measure(masks_stage, detect_stage, batches[0], 1)  # warm-up
        per_image = [measure(masks_stage, detect_stage, b, repeats) for b in batches]
        results.append((name, {k: float(np.mean([p[k] for p in per_image])) for k in per_image[0]}))
        print(f"done: {name} ({time.perf_counter() - started:.0f} s)", flush=True)

    print(f"\nper image, best of {repeats}, mean over {images} images; torch threads {threads}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {time.perf_counter() - started:.0f} s\n")
    split = [("configuration", "dets", "model ms", "old post ms", "new post ms", "post old/new", "old post share", "new post share")]
    speed = [("configuration", "detect img/s", "masks old img/s", "masks new img/s", "old masks/detect", "new masks/detect")]
    for name, m in results:
        model, old, new, detect = m["model"], m["old"], m["new"], m["detect"]
        split.append((
            name, f"{m['detections']:.0f}", f"{model * 1e3:.1f}", f"{old * 1e3:.1f}", f"{new * 1e3:.1f}",
            f"{old / new:.1f}x", f"{old / (model + old):.1%}", f"{new / (model + new):.1%}",
        ))
        speed.append((
            name, f"{1 / detect:.2f}", f"{1 / (model + old):.2f}", f"{1 / (model + new):.2f}",
            f"{detect / (model + old):.2f}", f"{detect / (model + new):.2f}",
        ))
    print_table(split)
    print()
    print_table(speed)


if __name__ == "__main__":
    main()
