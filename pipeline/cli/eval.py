"""``pipeline eval``: evaluation of predictions (COCO metrics, proposal recall, semantic mIoU, classification accuracy);
``pipeline eval-generative``: sample quality of a generative model's dataset.

Register with::

    from pipeline.cli.eval import eval_cmd, eval_generative_cmd
    main.add_command(eval_cmd)              # pipeline eval
    main.add_command(eval_generative_cmd)   # pipeline eval-generative

``pipeline data export-coco`` lives with the other annotation exports (:mod:`pipeline.cli.annotate`).
"""

from __future__ import annotations

import json

import click

from pipeline.cli.common import print_table, user_errors
from pipeline.eval.iou_types import get_iou_type, list_iou_types

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


def _nested_per_category(m: dict) -> bool:
    return any(isinstance(v, dict) for v in m.get("per_category", {}).values())


def _printable(m: dict) -> dict:
    """None (a metric without ground truth: detectron2's NaN) printed as nan."""
    return {k: float("nan") if v is None else v for k, v in m.items()}


def _fmt_value(v) -> str:
    return "nan" if v is None else f"{v:.3f}"


def _iou_type_help() -> str:
    notes = "".join(f" {t.name}: {t.help}." for t in map(get_iou_type, list_iou_types()) if t.help)
    return f"What to evaluate (repeatable). Default: bbox.{notes}"


@click.command("eval")
@click.argument("pred", nargs=-1, required=True)
@click.option("--gt", required=True, help="Ground truth: a dataset with annotations, or a COCO annotations JSON file.")
@click.option("--iou-type", "iou_types", multiple=True, type=click.Choice(list_iou_types()), help=_iou_type_help())
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
    help="Match shards as Ray tasks / in this process. Default: Ray if it is running, or for sets large enough to repay starting it (RAY_AUTO_MIN_IMAGES in pipeline/eval/evaluation.py).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics.json content instead of tables.")
@user_errors
def eval_cmd(pred, gt, iou_types, out_dir, no_state, method, use_ray, as_json) -> None:
    """Evaluate predictions against ground truth.

    COCO AP/AR (bbox, segm, keypoints), proposal recall, semantic segmentation mIoU, or
    classification top-1/top-5. PRED is a prediction dataset (job output) or a COCO results JSON
    file; give several to merge runs (an image predicted twice counts once). COCO numbers equal
    pycocotools' COCOeval; semantic follows detectron2's SemSegEvaluator (mIoU, fwIoU, mACC, pACC).
    """
    from pipeline.eval.evaluation import evaluate
    from pipeline.eval.report import per_category_rows, summary_table

    types = [get_iou_type(t) for t in iou_types or ["bbox"]]  # click has checked the names
    for t in types:
        if len(pred) > 1 and not t.merges_predictions:  # evaluate() says so too; here it is a usage error
            raise click.UsageError(f"--iou-type {t.name} takes one prediction dataset")
    metrics = evaluate(list(pred), gt, types, out_dir, method=method, use_state=not no_state, use_ray=use_ray)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    for t in types:
        click.echo(f"\n{t.title}")
        header, rows = summary_table(t, _printable(metrics[t.name]))
        print_table(rows, header=header)
    nested = {name for name, m in metrics.items() if _nested_per_category(m)}
    header, rows = per_category_rows({name: m for name, m in metrics.items() if name not in nested})
    if rows:
        click.echo("")
        print_table(rows, header=header)
    for name in nested:  # {category: {stat: value}} (semantic: IoU and ACC per class)
        per_category = metrics[name]["per_category"]
        stats = list(dict.fromkeys(k for v in per_category.values() for k in v))
        click.echo("")
        print_table([(cat, *(_fmt_value(v.get(k)) for k in stats)) for cat, v in per_category.items()],
                    header=("category", *(f"{k} {name}" for k in stats)))
    click.echo("")
    for t in types:
        counts = metrics[t.name]["counts"]
        click.echo(t.counts_text(counts))
        if isinstance(counts["skipped"], dict):  # reasons; a self-contained type may give only a number
            _report_skips(counts["skipped"])
    if out_dir:
        curves = f"  curves: {out_dir.rstrip('/')}/pr_<iou_type>.png" if any(t.per_image_matching for t in types) else ""
        click.echo(f"metrics: {out_dir.rstrip('/')}/metrics.json{curves}")


eval = eval_cmd  # noqa: A001 - the command is called "eval"; this name is what the CLI registers


@click.command("eval-generative")
@click.argument("samples")
@click.option("--reference", required=True, help="Held-out real images (e.g. pipeline data synth ... --classification).")
@click.option("--train", help="The training set, for its class shares (default: the reference's labels).")
@click.option("--classifier", default="conf/models/small_cnn_shapes.pth", show_default=True,
              help="A project classifier checkpoint that knows the domain; its features give the Frechet distance.")
@click.option("--out", "out_dir", help="Folder for metrics.json and samples.png (the first 64 samples).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics.json content instead of a table.")
@user_errors
def eval_generative_cmd(samples, reference, train, classifier, out_dir, as_json) -> None:
    """Measure generative samples SAMPLES through a trained classifier.

    Confident share (top class >= 0.9) against the real images', class shares against the training
    set's, and a Frechet distance in the classifier's feature space with its real-vs-real floor
    (the FID formula on this classifier: not Inception FID). See pipeline/generate/quality.py.
    """
    import os

    from pipeline.generate.quality import evaluate_samples, samples_sheet

    metrics = evaluate_samples(samples, reference, classifier=classifier, train=train)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        samples_sheet(samples).save(os.path.join(out_dir, "samples.png"))
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    rows = [(k, _fmt_value(v) if isinstance(v, float) else v) for k, v in metrics.items() if not isinstance(v, dict)]
    rows += [(f"{k} {name}", _fmt_value(v)) for k in ("class_histogram", "train_class_histogram") for name, v in metrics[k].items()]
    print_table(rows, header=("measure", "value"))
    if out_dir:
        click.echo(f"metrics: {out_dir.rstrip('/')}/metrics.json  sheet: {out_dir.rstrip('/')}/samples.png")
