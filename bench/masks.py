"""Masks stage per image: model forward vs mask post-processing, full-size paste vs paste into boxes.

The masks stage's work per image is the model forward (transform, backbone, RPN, RoI heads, box
rescaling) and then the masks' post-processing: paste each detection's M x M mask probability at
the image size, threshold, COCO-RLE encode. Two post-processings are timed on the *same* model
outputs (the forward runs once per repeat, under :func:`pipeline.stages.masks.masks_unpasted`):

* old: what the stage did before -- torchvision's ``paste_masks_in_image`` (an (N, 1, H, W)
  float tensor), ``> mask_threshold``, pycocotools ``encode`` of the N full-size masks;
* new: what it does now -- :func:`pipeline.stages.masks.encode_in_boxes`: paste into each box
  only, threshold the crop, RLE from the crop and its offset.

Every repeat checks that both give the same RLE strings. Each image is timed ``--repeats``
times and the best time of each part is kept (the machine is shared and noisy); the table shows
per-image means over the images and the ratios, all measured in this one run.

    python bench/masks.py                     # 3 configurations, 4 images each, best of 3
    python bench/masks.py --images 2 --repeats 2 --skip resnet50
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHIPPED = str(REPO / "conf" / "models" / "small_maskrcnn_shapes.pth")


def configs() -> list[tuple[str, str, int, dict]]:
    """(key, row name, image size, MasksStage kwargs)."""
    return [
        ("shipped", "small_maskrcnn (shipped), 128 px, score 0.05", 128,
         {"model": "small_maskrcnn", "weights": SHIPPED, "score_threshold": 0.05, "max_detections": 100}),
        ("shipped0", "small_maskrcnn (shipped), 128 px, score 0, 100 dets", 128,
         {"model": "small_maskrcnn", "weights": SHIPPED, "score_threshold": 0.0, "max_detections": 100}),
        ("resnet50", "maskrcnn_resnet50_fpn random, 416 px, score 0.05, 100 dets", 416,
         {"model": "maskrcnn_resnet50_fpn", "weights": "none", "num_classes": 2, "score_threshold": 0.05,
          "max_detections": 100, "model_kwargs": {"min_size": 416, "max_size": 480}}),
    ]


def synthetic(n: int, size: int, seed: int = 300) -> list[np.ndarray]:
    from PIL import Image

    from pipeline.data.synth import synth_image

    return [np.asarray(Image.open(io.BytesIO(synth_image(seed, i, size)[0])).convert("RGB")) for i in range(n)]


def measure(stage, image: np.ndarray, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds of the forward and of each post-processing, for one image."""
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from pipeline.stages.common import encode_masks
    from pipeline.stages.masks import MASK_PROBS, encode_in_boxes, masks_unpasted

    best = {"forward": float("inf"), "old": float("inf"), "new": float("inf")}
    size = image.shape[:2]
    detections = 0
    for _ in range(repeats):
        with torch.inference_mode():
            start = time.perf_counter()
            tensors = stage.to_tensors([image])
            with masks_unpasted(stage.model):
                out = stage.model(tensors)[0]
            probs, boxes = out[MASK_PROBS], out["boxes"]
            t_forward = time.perf_counter()
            binary = (paste_masks_in_image(probs, boxes, size)[:, 0] > stage.mask_threshold).cpu().numpy()
            old = encode_masks(binary)
            t_old = time.perf_counter()
            new = encode_in_boxes(probs, boxes, size, stage.mask_threshold)
            t_new = time.perf_counter()
        if old != new:
            raise AssertionError("the two post-processings disagree: the bench is measuring a bug")
        detections = len(new)
        best["forward"] = min(best["forward"], t_forward - start)
        best["old"] = min(best["old"], t_old - t_forward)
        best["new"] = min(best["new"], t_new - t_old)
    return {**best, "detections": detections}


@click.command()
@click.option("--images", default=4, show_default=True, help="images per configuration")
@click.option("--repeats", default=3, show_default=True, help="timings per image; the best is kept")
@click.option("--threads", default=1, show_default=True, help="torch threads (a stage's num_cpus)")
@click.option("--skip", multiple=True, help="configuration keys to leave out: shipped, shipped0, resnet50")
def main(images: int, repeats: int, threads: int, skip: tuple[str, ...]) -> None:
    import torch

    from pipeline.stages.masks import MasksStage

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    for key, name, size, kwargs in configs():
        if key in skip:
            continue
        stage = MasksStage(**kwargs, threads=threads)
        batch = synthetic(images, size)
        measure(stage, batch[0], 1)  # warm-up
        per_image = [measure(stage, im, repeats) for im in batch]
        mean = {k: float(np.mean([p[k] for p in per_image])) for k in per_image[0]}
        rows.append((name, mean))
        print(f"done: {name}", flush=True)

    print(f"\nper image, best of {repeats}, mean over {images} images; torch threads {threads}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    header = ("configuration", "dets", "forward ms", "old post ms", "new post ms", "post old/new",
              "old post share", "new post share", "stage old/new")
    table = [header]
    for name, m in rows:
        fwd, old, new = m["forward"], m["old"], m["new"]
        table.append((
            name, f"{m['detections']:.0f}", f"{fwd * 1e3:.1f}", f"{old * 1e3:.1f}", f"{new * 1e3:.1f}",
            f"{old / new:.1f}x", f"{old / (fwd + old):.1%}", f"{new / (fwd + new):.1%}", f"{(fwd + old) / (fwd + new):.2f}x",
        ))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print(" | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
