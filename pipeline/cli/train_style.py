"""``pipeline train-style``: train a fast-neural-style network for one style image, on Ray."""

from __future__ import annotations

import click

from pipeline.cli.common import print_table, user_errors


def _default_vgg() -> str:
    from pipeline.models.transformer_net import DEFAULT_VGG  # torch: only when the command runs

    return DEFAULT_VGG


@click.command("train-style")
@click.argument("style_image", type=click.Path(dir_okay=False))
@click.option("--content", required=True, help="Dataset of content images (our shards), e.g. from pipeline data import-images.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the TransformerNet state dict (.pth).")
@click.option("--steps", default=2000, show_default=True, type=click.IntRange(min=1), help="Optimiser steps (batches).")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1), help="Content images per step.")
@click.option("--image-size", default=256, show_default=True, type=click.IntRange(min=16), help="Side of the square content crops (px).")
@click.option("--style-size", type=click.IntRange(min=16), help="Downscale the style image to this longer side (default: as it is).")
@click.option(
    "--vgg-weights",
    default=_default_vgg,
    show_default="the ImageNet VGG16 weights the style stage uses",
    help="Loss network: a torchvision VGG16 weights name (torch hub cache, never downloaded), a .pth path, or 'none' (random, tests).",
)
@click.option("--content-weight", default=1e5, show_default=True, type=float, help="Weight of the relu2_2 content loss.")
@click.option("--style-weight", default=1e10, show_default=True, type=float, help="Weight of the Gram-matrix style loss.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate.")
@click.option("--seed", default=42, show_default=True, type=int, help="Seed of the initial weights and the shard order.")
@click.option("--log-every", default=50, show_default=True, type=click.IntRange(min=1), help="Print the losses every this many steps.")
@click.option("--num-cpus", default=1.0, show_default=True, type=click.FloatRange(min=0.1), help="CPUs of the training actor when no GPU.")
@click.option("--address", help="Train on this Ray cluster (a GPU actor if it has GPUs) instead of embedded local Ray.")
@user_errors
def train_style(style_image, content, out, steps, batch_size, image_size, style_size, vgg_weights, content_weight, style_weight,
                lr, seed, log_every, num_cpus, address) -> None:
    """Train a fast neural style network (Johnson et al.) for STYLE_IMAGE.

    Content images come from the dataset --content; the result loads in a job's style stage
    (model: OUT) and in pytorch/examples fast_neural_style.
    """
    from pipeline.train.train_style import StyleTrainConfig
    from pipeline.train.train_style import train_style as run_training

    config = StyleTrainConfig(
        style_image=style_image, content=content, out=out, steps=steps, batch_size=batch_size, image_size=image_size,
        style_size=style_size, vgg_weights=vgg_weights, content_weight=content_weight, style_weight=style_weight, lr=lr,
        seed=seed, log_every=log_every, num_cpus=num_cpus,
    )
    summary = run_training(config, address=address, echo=click.echo)
    history = summary["history"]
    first, last = history[0], history[-1]
    click.echo("")
    print_table(
        [("first step", f"{first['content']:.4g}", f"{first['style']:.4g}", f"{first['total']:.4g}"),
         ("last step", f"{last['content']:.4g}", f"{last['style']:.4g}", f"{last['total']:.4g}")],
        header=("loss", "content", "style", "total"),
    )
    click.echo(f"{summary['images']} content images seen ({summary['skipped_rows']} rows skipped), "
               f"{summary['device']}, {summary['wall_s']:.1f} s")
    click.echo(f"model: {out}  (run it with: pipeline run jobs/style.yaml --set stages.style.model={out})")
