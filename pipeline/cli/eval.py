"""``pipeline eval`` and ``pipeline data export-coco``: COCO evaluation and export of predictions.

Register with::

    from pipeline.cli.eval import eval_cmd, export_coco_cmd
    main.add_command(eval_cmd)          # pipeline eval
    data.add_command(export_coco_cmd)   # pipeline data export-coco
"""

from __future__ import annotations

import functools
import json

import click

from pipeline.cli.common import print_table, user_errors
from pipeline.eval.params import IOU_TYPES, EvalInputError


SKIP_REASONS = {
    "error_rows": "prediction rows with an error (image not processed; its GT counts as missed)",
    "unmapped_category": "detections with category -1 (no mapping to a dataset category)",
    "unknown_category": "detections of a category the ground truth does not have",
    "duplicate_images": "images already counted from an earlier shard or PRED",
    "duplicate_image_rows": "repeated rows of one image within a shard",
}


def _report_skips(skipped: dict) -> None:
    for reason, n in skipped.items():
        click.echo(f"  skipped: {n} {SKIP_REASONS.get(reason, reason.replace('_', ' '))}", err=True)


def eval_errors(fn):
    """Bad predictions / ground truth are user errors: one clear line naming the record."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EvalInputError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


@click.command("eval")
@click.argument("pred", nargs=-1, required=True)
@click.option("--gt", required=True, help="Ground truth: a dataset with annotations, or a COCO annotations JSON file.")
@click.option(
    "--iou-type",
    "iou_types",
    multiple=True,
    type=click.Choice(IOU_TYPES),
    help="What to evaluate (repeatable). Default: bbox.",
)
@click.option("--out", "out_dir", help="Folder for metrics.json and pr_<iou_type>.png.")
@click.option("--no-state", is_flag=True, help="Recompute every shard; neither read nor write PRED/eval/ state.")
@click.option(
    "--method",
    type=click.Choice(["vectorized", "pycocotools"]),
    default="vectorized",
    show_default=True,
    help="Per-image matching: numpy lock-step, or pycocotools' evaluateImg itself (same numbers, slower).",
)
@click.option(
    "--ray/--no-ray",
    "use_ray",
    default=None,
    help="Match shards as Ray tasks / in this process. Default: Ray if running, or for 20,000+ images.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics.json content instead of tables.")
@user_errors
@eval_errors
def eval_cmd(pred, gt, iou_types, out_dir, no_state, method, use_ray, as_json) -> None:
    """COCO evaluation of predictions against ground truth.

    PRED is a prediction dataset (job output) or a COCO results JSON file; give several to merge
    runs (an image predicted twice counts once). Numbers equal pycocotools' COCOeval.
    """
    from pipeline.eval.driver import evaluate
    from pipeline.eval.report import per_category_rows, summary_rows

    metrics = evaluate(
        list(pred), gt, list(iou_types) or ["bbox"], out_dir, method=method, use_state=not no_state, use_ray=use_ray
    )
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    for iou_type, m in metrics.items():
        click.echo(f"\n{iou_type}")
        print_table(summary_rows(iou_type, m), header=("metric", "setting", "value"))
    header, rows = per_category_rows(metrics)
    if rows:
        click.echo("")
        print_table(rows, header=header)
    click.echo("")
    for iou_type, m in metrics.items():
        c = m["counts"]
        line = (
            f"{iou_type}: {c['images']} images ({c['images_without_predictions']} without predictions), "
            f"{c['detections']} detections, {c['shards']} shard(s) ({c['shards_from_state']} from saved state)"
        )
        click.echo(line)
        _report_skips(c["skipped"])
    if out_dir:
        click.echo(f"metrics: {out_dir.rstrip('/')}/metrics.json  curves: {out_dir.rstrip('/')}/pr_<iou_type>.png")


eval = eval_cmd  # noqa: A001 - the command is called "eval"; this name is what the CLI registers


@click.command("export-coco")
@click.argument("pred")
@click.argument("out")
@click.option("--as-dataset", is_flag=True, help="Write a full COCO dataset (images, categories, annotations) instead of a results list.")
@user_errors
@eval_errors
def export_coco_cmd(pred: str, out: str, as_dataset: bool) -> None:
    """Export predictions as COCO results JSON (or a COCO dataset).

    Writes prediction dataset PRED to OUT: bbox xywh, the dataset's category ids, mask RLE with
    counts as str, keypoints.
    """
    from pipeline.eval.export import export_coco

    result = export_coco(pred, out, as_dataset=as_dataset)
    what = "annotations" if as_dataset else "detections"
    click.echo(f"wrote {result['detections']} {what} for {result['images']} images to {out}")
    _report_skips(result["skipped"])
