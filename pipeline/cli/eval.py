"""``pipeline eval`` and ``pipeline data export-coco``: COCO evaluation and export of predictions.

Register with::

    from pipeline.cli.eval import eval_cmd, export_coco_cmd
    main.add_command(eval_cmd)          # pipeline eval
    data.add_command(export_coco_cmd)   # pipeline data export-coco
"""

from __future__ import annotations

import json
import os

import click

from pipeline.cli.common import print_table, user_errors
from pipeline.eval.params import IOU_TYPES

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


@click.command("eval")
@click.argument("pred", nargs=-1, required=True)
@click.option("--gt", required=True, help="Ground truth: a dataset with annotations, or a COCO annotations JSON file.")
@click.option(
    "--iou-type",
    "iou_types",
    multiple=True,
    type=click.Choice([*IOU_TYPES, "proposals"]),
    help="What to evaluate (repeatable). Default: bbox. proposals: recall AR@100/300/1000 of a proposals stage.",
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
    help="Match shards as Ray tasks / in this process. Default: Ray if it is running, or for sets large enough to repay starting it (RAY_AUTO_MIN_IMAGES in pipeline/eval/driver.py).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics.json content instead of tables.")
@user_errors
def eval_cmd(pred, gt, iou_types, out_dir, no_state, method, use_ray, as_json) -> None:
    """COCO evaluation of predictions against ground truth.

    PRED is a prediction dataset (job output) or a COCO results JSON file; give several to merge
    runs (an image predicted twice counts once). Numbers equal pycocotools' COCOeval.
    """
    from pipeline.eval.driver import evaluate
    from pipeline.eval.report import per_category_rows, summary_rows

    iou_types = list(iou_types) or ["bbox"]
    recall = None
    if "proposals" in iou_types:
        iou_types.remove("proposals")
        recall = _proposal_recall(list(pred), gt, out_dir, as_json=as_json)
        if not iou_types:
            return
    metrics = evaluate(list(pred), gt, iou_types, out_dir, method=method, use_state=not no_state, use_ray=use_ray)
    if recall is not None and out_dir:  # one metrics.json for everything asked
        path = os.path.join(out_dir, "metrics.json")
        with open(path, encoding="utf-8") as f:
            merged = json.load(f)
        merged["proposals"] = recall
        with open(path, "w", encoding="utf-8") as f:
            json.dump(merged, f, indent=2)
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


def _proposal_recall(pred: list[str], gt: str, out_dir: str | None, *, as_json: bool) -> dict:
    from pipeline.eval.proposals import evaluate_proposals

    if len(pred) != 1:
        raise click.UsageError("--iou-type proposals takes one prediction dataset")
    recall = evaluate_proposals(pred[0], gt)
    if as_json:
        click.echo(json.dumps({"proposals": recall}, indent=2))
    else:
        click.echo("\nproposals (class-agnostic recall, IoU 0.50:0.95)")
        print_table([(k, f"{v:.3f}") for k, v in recall.items() if k != "counts"], header=("metric", "value"))
        c = recall["counts"]
        click.echo(f"{c['images']} images ({c['images_with_proposals']} with proposals), {c['proposals']} proposals, {c['skipped']} skipped")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump({"proposals": recall}, f, indent=2)
    return recall


eval = eval_cmd  # noqa: A001 - the command is called "eval"; this name is what the CLI registers


@click.command("export-coco")
@click.argument("pred")
@click.argument("out")
@click.option("--as-dataset", is_flag=True, help="Write a full COCO dataset (images, categories, annotations) instead of a results list.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (a COCO dataset written with --as-dataset).")
@user_errors
def export_coco_cmd(pred: str, out: str, as_dataset: bool, overwrite: bool) -> None:
    """Export predictions as COCO results JSON (or a COCO dataset).

    Writes prediction dataset PRED to OUT: bbox xywh, the dataset's category ids, mask RLE with
    counts as str, keypoints.
    """
    from pipeline.eval.export import export_coco

    if as_dataset and os.path.exists(out) and not overwrite:
        raise click.ClickException(f"{out} exists; pass --overwrite to replace that dataset file, or choose another name")
    result = export_coco(pred, out, as_dataset=as_dataset)
    what = "annotations" if as_dataset else "detections"
    left_out = f"; left out {result['error_rows']} error row(s) (images that could not be read)" if result["error_rows"] else ""
    click.echo(f"wrote {result['detections']} {what} for {result['images']} images to {out}{left_out}")
    _report_skips(result["skipped"])
