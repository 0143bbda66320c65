"""Segment stage vs the loop a user would write with torchvision, images/s at two image sizes.

The user's loop, per image (what torchvision's segmentation docs show): the weights' transform
(``SemanticSegmentation``: resize, scale, normalise), ``model(x.unsqueeze(0))["out"]``, bilinear
upsampling of the logits to the image size, argmax -> an (H, W) label map in memory.

The stage (:class:`pipeline.stages.segment.SegmentStage`) is called as a job calls it, on decoded
batches of ``--batch-size`` images (Arrow tables), and does more: it groups images of one resized
size into one model call, maps labels to category ids and writes one COCO RLE per category present
into Arrow columns. Two numbers for it: ``predict`` (the label maps only: the same output as the
loop) and ``stage`` (the whole call, RLE columns included).

Both run the *same* ``nn.Module`` (the stage's), one torch thread, on the same synthetic images
(:mod:`pipeline.data.synth`, seed 300; sides vary +-25% around the nominal size, so few images
share a size). Every repeat checks that the stage's label maps equal the loop's, pixel for pixel:
a bench of a bug would be worthless. Best of ``--repeats`` per part, the parts timed in turn
within each repeat; ratios are within this run.

    python bench/segment.py                            # 2 models x 2 sizes, 24 images, best of 5 (~2.5 min on 2 cores)
    python bench/segment.py --images 4 --repeats 1     # a smoke test
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHIPPED = str(REPO / "conf" / "models" / "small_unet_shapes.pth")


def configs() -> list[tuple[str, dict]]:
    """(row name, SegmentStage kwargs); images are run at their native size (no resize)."""
    return [
        ("small_unet (shipped)", {"model": "small_unet", "weights": SHIPPED, "resize": "native"}),
        ("lraspp_mobilenet_v3_large, random, 21 classes", {"model": "lraspp_mobilenet_v3_large", "weights": "none", "resize": "native"}),
    ]


def synthetic(n: int, size: int, seed: int = 300) -> list[np.ndarray]:
    """``n`` decoded RGB (H, W, 3) uint8 synthetic shapes images of about ``size`` px."""
    import io

    from PIL import Image

    from pipeline.data.synth import synth_image

    return [np.asarray(Image.open(io.BytesIO(synth_image(seed, i, size)[0])).convert("RGB")) for i in range(n)]


def tables(images: list[np.ndarray], batch_size: int) -> list:
    """The decoded Arrow batches a job hands the stage."""
    import io

    from PIL import Image

    from pipeline import schema
    from pipeline.data.decode import decode_batch

    rows = []
    for i, im in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        rows.append({"image_id": i, "file_name": f"{i}.png", "width": im.shape[1], "height": im.shape[0], "image": buf.getvalue()})
    return [decode_batch(schema.image_table(rows[i : i + batch_size])) for i in range(0, len(rows), batch_size)]


def user_loop(model, transform, images: list[np.ndarray]) -> list[np.ndarray]:
    """The torchvision loop: one image at a time, label maps (H, W) int64."""
    import torch
    import torch.nn.functional as F

    out = []
    with torch.inference_mode():
        for im in images:
            x = transform(torch.from_numpy(im).permute(2, 0, 1)).unsqueeze(0)
            logits = model(x)["out"]
            logits = F.interpolate(logits, size=im.shape[:2], mode="bilinear", align_corners=False)
            out.append(logits[0].argmax(0).numpy())
    return out


def measure(kwargs: dict, images: list[np.ndarray], batch_size: int, repeats: int) -> dict[str, float]:
    """Images/s of the loop, the stage's predict and the whole stage call: best of ``repeats``,
    the three timed in turn within each repeat (so a slow spell of the machine hits all of them)."""
    from torchvision.transforms._presets import SemanticSegmentation

    from pipeline.stages.segment import SegmentStage

    stage = SegmentStage(**kwargs, num_classes=None if kwargs["weights"] != "none" else 21, threads=1)
    transform = SemanticSegmentation(resize_size=stage.resize)
    batches = tables(images, batch_size)
    parts = {
        "loop": lambda: user_loop(stage.model, transform, images),
        "predict": lambda: [m for i in range(0, len(images), batch_size) for m in stage.predict(images[i : i + batch_size])],
        "stage": lambda: [stage(b) for b in batches],
    }
    stage(batches[0])  # warm-up (allocator, first-call costs) for all: same module
    best = dict.fromkeys(parts, float("inf"))
    for _ in range(repeats):
        results = {}
        for name, run in parts.items():
            start = time.perf_counter()
            results[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
        if any(not np.array_equal(a, b) for a, b in zip(results["loop"], results["predict"])):
            raise AssertionError("the stage's label maps differ from the torchvision loop's: the bench is measuring a bug")
    return {name: len(images) / t for name, t in best.items()}


@click.command()
@click.option("--images", default=24, show_default=True, help="images per configuration and size")
@click.option("--sizes", default="128,384", show_default=True, help="nominal image sides, px")
@click.option("--batch-size", default=8, show_default=True, help="images per stage call (jobs/segment_shapes.yaml: 8)")
@click.option("--repeats", default=5, show_default=True, help="timings per part; the best is kept")
def main(images: int, sizes: str, batch_size: int, repeats: int) -> None:
    import torch

    torch.set_num_threads(1)
    started = time.time()
    rows = [("configuration", "size px", "loop img/s", "predict img/s", "stage img/s", "predict/loop", "stage/loop")]
    for name, kwargs in configs():
        for size in (int(s) for s in sizes.split(",")):
            r = measure(kwargs, synthetic(images, size), batch_size, repeats)
            rows.append((name, str(size), f"{r['loop']:.2f}", f"{r['predict']:.2f}", f"{r['stage']:.2f}",
                         f"{r['predict'] / r['loop']:.2f}", f"{r['stage'] / r['loop']:.2f}"))
            print(f"done: {name}, {size} px ({time.time() - started:.0f} s)", flush=True)
    print(f"\n{images} images per row, batches of {batch_size}, best of {repeats}; torch threads 1; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {time.time() - started:.0f} s\n")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print(" | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
