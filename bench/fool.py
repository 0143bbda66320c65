"""How many images of a dataset flip under an L-infinity budget? Fooling success against epsilon.

The ``synthesize`` stage (``method: fool``, target: each image's second most likely class, steps of
1/255) runs as a job calls it on held-out one-shape images (seed 300) against the shipped
classifier ``conf/models/small_cnn_shapes.pth``. Per epsilon: the share of images the classifier
then puts in the target class (checked on the 8-bit image, as the classify stage sees it), the mean
steps, L-infinity and L2 norms of the perturbation (pixel values in [0, 1]), and images/s.

    python bench/fool.py                              # 200 images, epsilon 1, 2, 4, 8 / 255 (~2 min on 2 cores)
    python bench/fool.py --images 4 --epsilons 4      # a smoke test
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = str(REPO / "conf" / "models" / "small_cnn_shapes.pth")


@click.command()
@click.option("--images", default=200, show_default=True, help="held-out images (seed 300)")
@click.option("--epsilons", default="1,2,4,8", show_default=True, help="L-infinity budgets, in 1/255")
@click.option("--steps", default=20, show_default=True, help="step budget per image")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--threads", default=2, show_default=True, help="torch threads")
def main(images: int, epsilons: str, steps: int, batch_size: int, threads: int) -> None:
    import torch

    from pipeline import schema
    from pipeline.data.decode import decode_batch
    from pipeline.data.shards import list_shards, read_shard
    from pipeline.data.synth import synth_dataset
    from pipeline.stages.synthesize import SynthesizeStage

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as root:
        synth_dataset(root, images=images, seed=300, classification=True)
        table = decode_batch(read_shard(list_shards(root)[0]))
    batches = [table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)]
    print(f"small_cnn (small_cnn_shapes.pth), {images} held-out images, target: next most likely, steps of 1/255, "
          f"at most {steps}, {threads} torch threads")
    print("| epsilon | success | mean steps | mean L-inf | mean L2 | images/s |")
    print("|---|---|---|---|---|---|")
    for eps in (int(e) for e in epsilons.split(",")):
        stage = SynthesizeStage(model="small_cnn", weights=WEIGHTS, epsilon=eps / 255, steps=steps)
        start = time.perf_counter()
        out = [stage(b) for b in batches]
        seconds = time.perf_counter() - start
        col = {name: np.concatenate([np.asarray(o[name].to_pylist(), np.float64) for o in out])
               for name in (schema.FOOL_SUCCESS, schema.FOOL_STEPS, schema.FOOL_LINF, schema.FOOL_L2)}
        print(f"| {eps}/255 | {col[schema.FOOL_SUCCESS].mean():.3f} | {col[schema.FOOL_STEPS].mean():.1f} | "
              f"{col[schema.FOOL_LINF].mean() * 255:.2f}/255 | {col[schema.FOOL_L2].mean():.3f} | {images / seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
