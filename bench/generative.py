"""How good are the trained generative models? Bits/dim, sample quality through the shipped classifier, speed.

For each checkpoint given (the recipes' ``model.pth``): held-out bits/dim (the PixelCNN's exact
negative log-likelihood, the VAE's negative ELBO, an upper bound; the GAN has none), then
``pipeline generate samples`` (Ray actors, timed) and ``pipeline eval-generative`` against held-out
real images (seed 300, as ``pipeline data synth --classification`` makes them). Two rows of
reference: the held-out real images made small as the models learned them (their confident share
at the models' size, and a Frechet distance of real against real: the floor), and uniform noise
(what the measures give for images without any shape: the shipped classifier is confident on most
noise, so the confident share must be read beside the Frechet distance).

    python bench/generative.py --vae demo-output/train_vae_shapes/model.pth \\
        --gan demo-output/train_gan_shapes/model.pth --pixelcnn demo-output/train_pixelcnn_shapes/model.pth \\
        --sheet docs/generative.jpg                   # 1,000 samples (PixelCNN: 64), ~8 min on 2 cores
    python bench/generative.py --vae V.pth --images 16 --reference-images 40   # a smoke test

``--sheet``: a contact sheet, one row of 12 per model (real images at the models' size first), then
four VAE latent walks between held-out real images (shown at the ends).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER = str(REPO / "conf" / "models" / "small_cnn_shapes.pth")
PER_ROW = 12  # sheet images per model


@click.command()
@click.option("--vae", help="a conv_vae checkpoint")
@click.option("--gan", help="a dcgan checkpoint")
@click.option("--pixelcnn", help="a pixelcnn checkpoint")
@click.option("--images", default=1000, show_default=True, help="samples per model")
@click.option("--pixelcnn-images", default=64, show_default=True, help="samples of the PixelCNN (3 x 32 x 32 passes each batch)")
@click.option("--reference-images", default=1000, show_default=True, help="held-out real images (seed 300)")
@click.option("--sheet", help="write the contact sheet here (.jpg or .png)")
@click.option("--json-out", help="also write the rows as JSON")
def main(vae, gan, pixelcnn, images, pixelcnn_images, reference_images, sheet, json_out) -> None:
    import torch

    from pipeline.data.importers import import_arrays
    from pipeline.data.synth import synth_dataset
    from pipeline.generate.quality import at_size, evaluate_samples, read_images
    from pipeline.generate.distribute import generate_dataset
    from pipeline.generate.interpolate import interpolate
    from pipeline.generate.samples import Sampling
    from pipeline.generate.sheet import image_grid
    from pipeline.train.generative_objective import validation_bits_per_dim
    from pipeline.models.registry import build_model
    from pipeline.models.weights import resolve_weights

    models = [(name, path) for name, path in (("conv_vae", vae), ("dcgan", gan), ("pixelcnn", pixelcnn)) if path]
    if not models:
        raise click.UsageError("give at least one of --vae, --gan, --pixelcnn")
    rows, sheet_rows = [], []
    with tempfile.TemporaryDirectory() as root:
        reference = f"{root}/real"
        synth_dataset(reference, images=reference_images, seed=300, classification=True)
        size = Sampling(models[0][1]).image_size()
        real_small = at_size(read_images(reference), size)
        rng = np.random.default_rng(0)
        noise = import_arrays(f"{root}/noise", [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(images)])
        real_as_samples = import_arrays(f"{root}/real-small", real_small[reference_images // 2 :])  # half B: its distance is the floor

        def measure(label: str, samples: str, bits: float | None, seconds: float | None, count: int) -> None:
            m = evaluate_samples(samples, reference, classifier=CLASSIFIER)
            rows.append({"model": label, "bits_per_dim": bits, "confident_share": m["confident_share"],
                         "ratio_to_real": m["confident_share_ratio"], "histogram_distance": m["histogram_distance"],
                         "frechet_distance": m["frechet_distance"], "frechet_floor": m["frechet_floor"],
                         "frechet_count": m["frechet_count"],
                         "samples": count, "images_per_s": count / seconds if seconds else None,
                         "real_confident_share": m["real_confident_share"],
                         "real_confident_share_at_size": m["real_confident_share_at_size"]})
            pictures = read_images(samples)[:PER_ROW]
            sheet_rows.append([torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255 for p in pictures])

        measure(f"real at {size} px", real_as_samples, None, None, reference_images - reference_images // 2)
        for name, path in models:
            model, _ = build_model(name, resolve_weights(name, path))
            bits = validation_bits_per_dim(model, reference, size) if getattr(model, "likelihood", False) else None
            settings = Sampling(path)
            count = pixelcnn_images if name == "pixelcnn" else images
            start = time.perf_counter()
            generate_dataset(f"{root}/{name}", settings, images=count, seed=0, prefix=f"samples-{name}", categories=[],
                             provenance=settings.provenance(), progress=None)
            measure(name, f"{root}/{name}", bits, time.perf_counter() - start, count)
        measure("uniform noise", noise, 8.0, None, images)

        if sheet:
            walks = []
            if vae:
                interpolate(vae, f"{root}/walks", pairs=4, steps=8, images=reference)
                from PIL import Image

                walks = [Image.open(f"{root}/walks/interpolation.png")]
            picture = image_grid(sheet_rows[:-1], min_cell=64)  # noise left out
            if walks:
                combined = Image.new("RGB", (max(picture.width, walks[0].width), picture.height + walks[0].height), (32, 32, 32))
                combined.paste(picture, (0, 0))
                combined.paste(walks[0], (0, picture.height))
                picture = combined
            picture.convert("RGB").save(sheet, quality=90)

    def fmt(v):
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    keys = ["model", "bits_per_dim", "confident_share", "ratio_to_real", "histogram_distance", "frechet_distance",
            "frechet_floor", "frechet_count", "samples", "images_per_s"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(fmt(r[k]) for k in keys) + " |")
    print(f"real images' confident share: {rows[0]['real_confident_share']:.3f} as they are, "
          f"{rows[0]['real_confident_share_at_size']:.3f} at {size} px (classifier {CLASSIFIER})")
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
