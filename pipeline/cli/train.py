"""``pipeline train``: train or fine-tune a detector or a semantic segmentation model on our shards with Ray Train."""

from __future__ import annotations

import click

from pipeline.cli.common import print_table, user_errors


@click.command()
@click.argument("train_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec key, e.g. epochs=2 (repeatable).")
@click.option("--address", help="Train on this Ray cluster instead of embedded local Ray.")
@user_errors
def train(train_file: str, overrides: tuple[str, ...], address: str | None) -> None:
    """Train a model on shards (Ray Train); resumes if OUTPUT has a run.

    TRAIN_FILE is a YAML training spec, e.g. jobs/train_shapes.yaml.
    """
    from pipeline.config.load import apply_override, read_yaml
    from pipeline.train.train_spec import TrainSpec
    from pipeline.train.trainer import train as run_training

    data = read_yaml(train_file)
    for assignment in overrides:
        apply_override(data, assignment)
    spec = _validate(data, train_file, TrainSpec)
    summary = run_training(spec, source=train_file, address=address)
    # val_bbox_AP, val_segm_AP (detectors), val_semantic_mIoU (semantic models): whatever validation reported
    val_keys = sorted({k for e in summary["epochs"] for k in e if k.startswith("val_")})
    rows = [(e.get("epoch"), e.get("step"), round(e.get("loss", float("nan")), 4), *(e.get(k, "") for k in val_keys))
            for e in summary["epochs"]]
    print_table(rows, header=("epoch", "step", "loss", *(k.removeprefix("val_").replace("_", " ") for k in val_keys)))
    click.echo(f"model: {summary['model']}  (load it in a job with weights: {summary['model']})")


def _validate(data: dict, source: str, model):
    from pydantic import ValidationError

    from pipeline.config.load import ConfigError, format_errors

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid training spec:\n  " + "\n  ".join(format_errors(exc, prefix=""))) from exc
