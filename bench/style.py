"""Throughput of the style stage against a direct TransformerNet loop, in one process.

Both sides run the same TransformerNet (random weights: the cost is the same as a trained
style's) with the same torch threads over the same square images, in batches of the same size:

* ``loop``: what a person would write -- uint8 (H, W, 3) -> float NCHW tensor -> ``net(x)`` ->
  clamp, uint8 numpy. No encoding.
* ``stage``: :class:`pipeline.stages.style.StyleStage` on a decoded Arrow batch, as a job's actor
  calls it: pixels out of the Arrow column, grouping by size, forward, clamp, and encoding each
  result (JPEG q90 by default), appended as a column.

Each side is warmed up, then timed ``--repeats`` times, interleaved, and the best time is kept
(this machine is shared; the best run is the least disturbed). The ratio is stage / loop images/s.

    python bench/style.py                          # 256 and 512 px, 4 images each
    python bench/style.py --sizes 256 --images 8 --format png
"""

from __future__ import annotations

import os
import tempfile
import time

import click
import numpy as np


def images_of(size: int, n: int) -> list[np.ndarray]:
    """``n`` synthetic shape pictures (pipeline.data.synth), resized to exactly size x size."""
    import io

    from PIL import Image

    from pipeline.data.synth import synth_image

    return [
        np.asarray(Image.open(io.BytesIO(synth_image(11, i, size=size)[0])).convert("RGB").resize((size, size)))
        for i in range(n)
    ]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@click.command()
@click.option("--sizes", multiple=True, type=int, default=(256, 512), show_default=True, help="Square image sides (px).")
@click.option("--images", default=4, show_default=True, help="Images per timed run.")
@click.option("--batch-size", default=2, show_default=True, help="Images per forward pass (both sides).")
@click.option("--threads", default=2, show_default=True, help="torch threads.")
@click.option("--repeats", default=2, show_default=True, help="Timed runs per side; the best is kept.")
@click.option("--format", "fmt", type=click.Choice(["jpeg", "png"]), default="jpeg", show_default=True, help="Stage output encoding.")
def main(sizes, images, batch_size, threads, repeats, fmt) -> None:
    """Print images/s of the style stage and of a direct TransformerNet loop, and their ratio."""
    import torch

    from pipeline import schema
    from pipeline.data.decode import decode_batch
    from pipeline.models.transformer_net import TransformerNet
    from pipeline.stages.style import StyleStage, encode_image

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = TransformerNet().eval()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "random.pth")
        torch.save(net.state_dict(), path)
        stage = StyleStage(model=path, format=fmt, threads=threads)

    def loop(pictures: list[np.ndarray]) -> None:
        with torch.inference_mode():
            for offset in range(0, len(pictures), batch_size):
                x = torch.from_numpy(np.stack(pictures[offset:offset + batch_size])).permute(0, 3, 1, 2).float().contiguous()
                net(x).clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()

    rows = []
    load = os.getloadavg()[0]
    for size in sizes:
        pictures = images_of(size, images)
        table = schema.image_table([
            {"image_id": i, "file_name": f"{i}.png", "width": size, "height": size, "image": encode_image(p, "png")} for i, p in enumerate(pictures)
        ])
        batch = decode_batch(table)
        slices = [batch.slice(o, batch_size) for o in range(0, batch.num_rows, batch_size)]

        def run_stage(slices=slices) -> None:
            for part in slices:
                stage(part)

        loop(pictures[:batch_size])  # warm-up: first calls pick kernels
        stage(slices[0])
        loop_s, stage_s = [], []
        for _ in range(repeats):  # interleaved, so both sides see the same machine
            loop_s.append(timed(lambda pictures=pictures: loop(pictures)))
            stage_s.append(timed(run_stage))
        loop_ips, stage_ips = images / min(loop_s), images / min(stage_s)
        rows.append((f"{size}x{size}", images, batch_size, f"{loop_ips:.2f}", f"{stage_ips:.2f}", f"{stage_ips / loop_ips:.2f}"))
        print(f"  {size}px: loop {loop_ips:.2f} img/s, stage {stage_ips:.2f} img/s", flush=True)

    print(f"\nstyle stage vs direct TransformerNet loop: {os.cpu_count()} CPU cores (load average {load:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end), {threads} threads, random weights, stage output {fmt}, best of {repeats}")
    header = ("size", "images", "batch", "loop img/s", "stage img/s", "stage/loop")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for i, row in enumerate([header] + rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
