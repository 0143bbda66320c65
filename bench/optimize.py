"""Images made by optimisation against the shipped classifier: does each method do what it says, and at what cost?

In one process (``--threads`` torch threads), on held-out one-shape images (seed 300) and
``conf/models/small_cnn_shapes.pth`` (a VGG-style network: ImageNet VGG-16 weights are not on
this machine):

* feature inversion (``synthesize``, ``method: invert``) from each of the four convolution blocks:
  relative feature error and PSNR against the image as the network saw it (the 64 px crop);
* DeepDream (``method: deepdream``) on ``features.4``: the gain of its mean squared activation;
* class visualisation (``pipeline generate class-visualisation``'s generator): the share the same
  classifier, run as the classify stage runs it, assigns to the class each image was made for;
* texture synthesis (``pipeline generate texture``'s generator) from a synthetic image: the Gram
  loss at the end over the loss at the start (smallest drop over the textures);
* fooling images: ``bench/fool.py``.

    python bench/optimize.py                       # 32 images, 10 per class, 8 textures (~6 min on 2 cores)
    python bench/optimize.py --images 2 --per-class 1 --textures 1 --steps-scale 0.1   # a smoke test
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = str(REPO / "conf" / "models" / "small_cnn_shapes.pth")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@click.command()
@click.option("--images", default=32, show_default=True, help="held-out images for invert and deepdream")
@click.option("--per-class", default=10, show_default=True, help="class visualisations per class")
@click.option("--textures", default=8, show_default=True)
@click.option("--steps-scale", default=1.0, show_default=True, help="multiplies every method's default steps")
@click.option("--threads", default=2, show_default=True, help="torch threads")
def main(images: int, per_class: int, textures: int, steps_scale: float, threads: int) -> None:
    import torch

    from pipeline import schema
    from pipeline.data.decode import decode_batch
    from pipeline.data.shards import list_shards, read_shard
    from pipeline.data.synth import synth_dataset, synth_image
    from pipeline.generate.class_visualisation import ClassVisualisation
    from pipeline.generate.texture import TextureSynthesis
    from pipeline.stages.classify import ClassifyStage
    from pipeline.stages.synthesize import DEFAULT_STEPS, SynthesizeStage

    torch.set_num_threads(threads)

    def steps(n: int) -> int:
        return max(1, round(n * steps_scale))

    with tempfile.TemporaryDirectory() as root:
        synth_dataset(root, images=images, seed=300, classification=True)
        table = decode_batch(read_shard(list_shards(root)[0]))
        texture = Path(root) / "texture.png"
        texture.write_bytes(synth_image(3, 0, 128)[0])
        print(f"small_cnn (small_cnn_shapes.pth), {threads} torch threads; steps x {steps_scale}")
        print("| method | setting | measured | value | images/s |")
        print("|---|---|---|---|---|")
        for layer in ("features.0", "features.2", "features.4", "features.6"):
            stage = SynthesizeStage(method="invert", model="small_cnn", weights=WEIGHTS, layer=layer, steps=steps(DEFAULT_STEPS["invert"]))
            out, seconds = timed(lambda: stage(table))
            error = np.mean(out[schema.INVERT_FEATURE_ERROR].to_pylist())
            psnr = np.mean(out[schema.INVERT_PSNR].to_pylist())
            print(f"| invert | {layer}, {stage.settings.steps} steps | feature error / PSNR | {error:.3f} / {psnr:.1f} dB | {images / seconds:.2f} |", flush=True)
        stage = SynthesizeStage(method="deepdream", model="small_cnn", weights=WEIGHTS, layer="features.4", steps=steps(DEFAULT_STEPS["deepdream"]))
        out, seconds = timed(lambda: stage(table))
        gain = np.asarray(out[schema.DREAM_GAIN].to_pylist())
        print(f"| deepdream | features.4, 3 octaves x {stage.settings.steps} steps | activation gain mean (min) | {gain.mean():.1f} ({gain.min():.1f}) | {images / seconds:.2f} |", flush=True)

        visualiser = ClassVisualisation(model="small_cnn", weights=WEIGHTS, per_class=per_class, steps=steps(150))()
        n = per_class * len(visualiser.label_ids)
        made, seconds = timed(lambda: visualiser.generate(list(range(n)), list(range(n))))
        predicted = ClassifyStage(model="small_cnn", weights=WEIGHTS, top_k=1).predict([m[0] for m in made])[0][:, 0]
        wanted = np.array([visualiser.label_ids.index(m[1]) for m in made])
        print(f"| class visualisation | {per_class} per class, {visualiser.loop.steps} steps | assigned to their class | {np.mean(predicted == wanted):.3f} | {n / seconds:.2f} |", flush=True)

        synthesiser = TextureSynthesis(texture=str(texture), model="small_cnn", weights=WEIGHTS, size=96, steps=steps(300))()
        made, seconds = timed(lambda: synthesiser.generate(list(range(textures)), list(range(textures))))
        drops = np.array([m[2][schema.TEXTURE_LOSS_START] / m[2][schema.TEXTURE_LOSS_END] for m in made])
        print(f"| texture | 96 px, {synthesiser.loop.steps} steps | Gram loss start / end, smallest | {drops.min():.0f}x | {textures / seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
