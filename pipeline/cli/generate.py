"""``pipeline generate``: new images datasets made on Ray actors (see :mod:`pipeline.generate`)."""

from __future__ import annotations

import functools

import click

from pipeline.cli.common import print_table, user_errors


@click.group()
def generate() -> None:
    """Make new datasets: generative samples, class visualisations, textures.

    Each command spreads its images over Ray actors and records a seed per image.
    """


def on_ray(fn):
    """The options every generate command shares: where, how many actors, how the shards are cut."""
    options = [
        click.option("--out", required=True, help="Where to write the dataset (must be empty, or --overwrite)."),
        click.option("--seed", default=0, show_default=True, type=int, help="Image i is made from seed + i (recorded per row)."),
        click.option("--rows-per-shard", type=click.IntRange(min=1), help="Default: enough shards for every actor, at most 64 rows each."),
        click.option("--actors", type=click.IntRange(min=1), help="Ray actors (default: one per CPU, or per GPU with --num-gpus)."),
        click.option("--num-gpus", default=0.0, show_default=True, type=click.FloatRange(min=0), help="GPUs per actor."),
        click.option("--address", help="Run on this Ray cluster instead of embedded local Ray."),
        click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def run_generator(settings, *, images: int, prefix: str, categories: list[dict], out: str, seed: int, rows_per_shard: int | None,
                  actors: int | None, num_gpus: float, address: str | None, overwrite: bool) -> None:
    from pipeline.generate.distribute import generate_dataset

    summary = generate_dataset(out, settings, images=images, seed=seed, prefix=prefix, categories=categories,
                               provenance=settings.provenance(), rows_per_shard=rows_per_shard, address=address,
                               actors=actors, num_gpus=num_gpus, overwrite=overwrite)
    print_table([(k, v) for k, v in {**summary, "dataset": out}.items()])


def settings_or_usage(build):
    """Settings that cannot work are said before Ray starts or anything is written."""
    try:
        return build()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


@generate.command("class-visualisation")
@click.argument("model")
@click.option("--weights", default=None, help="Weights when MODEL is a model name: 'none', a torchvision weights name or a .pth "
              "(default: MODEL is a project checkpoint .pth, which names its model).")
@click.option("--per-class", required=True, type=click.IntRange(min=1), help="Images per class.")
@click.option("--size", type=click.IntRange(min=8), help="Side of the square images, px (default: the classifier's crop).")
@click.option("--steps", default=150, show_default=True, type=click.IntRange(min=1), help="Adam steps per image.")
@click.option("--lr", default=0.05, show_default=True, type=float, help="Adam step size, pixel values in [0, 1].")
@click.option("--l2", default=0.05, show_default=True, type=float, help="Weight of the L2 pull towards mid-grey.")
@click.option("--blur-every", default=4, show_default=True, type=click.IntRange(min=0), help="Blur the image every this many steps (0: never).")
@click.option("--jitter", default=2, show_default=True, type=click.IntRange(min=0), help="Random shift of the image the network sees, px.")
@on_ray
@user_errors
def class_visualisation(model, weights, per_class, size, steps, lr, l2, blur_every, jitter, **ray_options) -> None:
    """Images the classifier MODEL scores as each of its classes (gradient ascent from noise).

    MODEL is a project checkpoint (e.g. conf/models/small_cnn_shapes.pth) or a classifier name with
    --weights. Writes PER_CLASS images per class with the class as each image's label.
    """
    from pipeline.generate.class_visualisation import ClassVisualisation
    from pipeline.models.weights import checkpoint_model_name

    if weights is None:
        weights, model = model, checkpoint_model_name(model)
    settings = settings_or_usage(lambda: ClassVisualisation(model=model, weights=weights, per_class=per_class, size=size,
                                                            steps=steps, lr=lr, l2=l2, blur_every=blur_every, jitter=jitter))
    categories = settings.categories()
    run_generator(settings, images=per_class * len(categories), prefix="class-visualisation", categories=categories, **ray_options)


@generate.command("texture")
@click.argument("texture_image", type=click.Path(dir_okay=False))
@click.option("--images", required=True, type=click.IntRange(min=1), help="Textures to make.")
@click.option("--model", default="vgg16", show_default=True, help="The classifier whose features describe the texture.")
@click.option("--weights", default="DEFAULT", show_default=True,
              help="Its weights: a torchvision name (read from the torch hub cache, never downloaded), a .pth, or 'none' (random).")
@click.option("--layers", help="Comma-separated module names (default: auto, known for vgg16, vgg19 and small_cnn).")
@click.option("--size", default=128, show_default=True, type=click.IntRange(min=16), help="Side of the square textures, px.")
@click.option("--max-side", default=256, show_default=True, type=click.IntRange(min=16), help="Downscale the texture image to this longer side.")
@click.option("--steps", default=300, show_default=True, type=click.IntRange(min=1), help="Adam steps per texture.")
@click.option("--lr", default=0.02, show_default=True, type=float, help="Adam step size, pixel values in [0, 1].")
@on_ray
@user_errors
def texture(texture_image, images, model, weights, layers, size, max_side, steps, lr, **ray_options) -> None:
    """New images with the texture of TEXTURE_IMAGE (Gatys et al.: Gram matrices of a network's features)."""
    from pipeline.generate.texture import TextureSynthesis
    from pipeline.models.weights import resolve_weights

    resolve_weights(model, weights)  # missing weights: the file to provide is named before Ray starts
    chosen = tuple(name.strip() for name in layers.split(",") if name.strip()) if layers else None
    settings = settings_or_usage(lambda: TextureSynthesis(texture=texture_image, model=model, weights=weights, layers=chosen,
                                                          size=size, max_side=max_side, steps=steps, lr=lr))
    run_generator(settings, images=images, prefix="texture", categories=[], **ray_options)


@generate.command("samples")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--images", required=True, type=click.IntRange(min=1), help="Samples to make.")
@click.option("--size", type=click.IntRange(min=1), help="Side of the images, px: must be the one the model learned (the default).")
@on_ray
@user_errors
def samples(model, images, size, **ray_options) -> None:
    """Samples of the generative model MODEL (a checkpoint pipeline train wrote: conv_vae, pixelcnn, dcgan).

    The PixelCNN draws its images sub-pixel by sub-pixel: 3 x size x size forward passes per shard.
    """
    from pipeline.generate.samples import Sampling

    settings = settings_or_usage(lambda: Sampling(model, size))
    run_generator(settings, images=images, prefix=f"samples-{settings.model_name()}", categories=[], **ray_options)


@generate.command("interpolate")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--pairs", default=8, show_default=True, type=click.IntRange(min=1), help="Walks, one per row.")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=2), help="Images per walk, both ends included.")
@click.option("--images", help="Walk between the VAE's codes of real images of this dataset (rows 2k, 2k+1), shown at the ends.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the ends drawn from the prior (without --images).")
@click.option("--out", required=True, help="Folder for interpolation.png and interpolation.json.")
@user_errors
def interpolate(model, pairs, steps, images, seed, out) -> None:
    """Latent walks of a VAE or GAN checkpoint MODEL, as a contact sheet.

    Each row is a straight line between two latent codes, decoded at --steps points.
    """
    from pipeline.generate.interpolate import interpolate as walk

    record = settings_or_usage(lambda: walk(model, out, pairs=pairs, steps=steps, seed=seed, images=images))
    print_table([("pairs", record["pairs"]), ("steps", record["steps"]), ("sheet", f"{out.rstrip('/')}/interpolation.png")])
