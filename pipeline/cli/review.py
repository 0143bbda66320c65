"""``pipeline review PRED --gt DS --out DIR``: the review queue (pipeline.annotate.review).

Only click is imported here; the command imports the library when it runs.
"""

from __future__ import annotations

import click

from pipeline.cli.common import user_errors


@click.command("review")
@click.argument("pred")
@click.option("--gt", required=True, help="Ground truth: a dataset with annotations, or a COCO annotations JSON file.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Folder for review.parquet, index.html (+ thumbs/) and review.json; must be empty unless --overwrite.")
@click.option("--iou", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="IoU at which a prediction matches a ground-truth object (COCO's greedy matching).")
@click.option("--iou-type", default="bbox", show_default=True, type=click.Choice(["bbox", "segm"]),
              help="Match boxes, or masks (predictions need a masks column).")
@click.option("--score-threshold", "score_threshold", default=0.5, show_default=True, type=float,
              help="T: false positives scoring at least T count in the review score; predictions near T are low-margin.")
@click.option("--margin", default=0.1, show_default=True, type=click.FloatRange(min=0),
              help="M: a prediction within M of T adds 0.5 * (1 - |score - T| / M).")
@click.option("--images", "images", help="Dataset with the image bytes for thumbnails (default: --gt, else PRED's source).")
@click.option("--max-images", default=500, show_default=True, type=click.IntRange(min=0),
              help="Cards in the gallery (the worst images); the table always has every object.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier review in --out.")
@user_errors
def review_cmd(pred, gt, out, iou, iou_type, score_threshold, margin, images, max_images, overwrite) -> None:
    """Review queue: each object tp / fp / fn, the images worst first.

    \b
    Per object (COCO's matching at --iou): eval = tp | fp | fn | ignored (crowd),
    eval_id = the partner's id, eval_iou = the IoU with it. Per image:
      review_score = sum(score of each fp scoring >= T) + 1 per missed ground-truth object
                     + 0.5 * sum(1 - |score - T| / M) over predictions within M of T
    Writes review.parquet (one row per object), index.html with thumbs/ (open it from the
    folder, no server: filter by class and status) and review.json (counts, error rows).
    """
    from pipeline.annotate.review import write_review

    r = write_review(pred, gt, out, images=images, max_images=max_images, overwrite=overwrite, iou=iou,
                     iou_type=iou_type, score_threshold=score_threshold, margin=margin)
    p, g = r["predictions"], r["ground_truth"]
    click.echo(f"reviewed {r['images']} images: predictions {p['tp']} tp, {p['fp']} fp, {p['ignored']} on crowd regions; "
               f"ground truth {g['tp']} found, {g['fn']} missed (fn), {g['ignored']} crowd")
    worst = r["worst"][0] if r["worst"] else None
    if worst:
        click.echo(f"worst: image {worst['image_id']} ({worst['file_name']}), review score {worst['review_score']:.2f}")
    click.echo(f"table: {out}/review.parquet; gallery: {r['page']} ({r['gallery_images']} images, worst first)")
    if r["images_without_predictions"]:
        click.echo(f"  images with no prediction row: {r['images_without_predictions']} (their ground truth counts as missed)", err=True)
    if r["error_rows"]:
        click.echo(f"  {len(r['error_rows'])} image(s) the job could not read (listed in the gallery and review.json):", err=True)
        for e in r["error_rows"][:10]:
            click.echo(f"    image {e['image_id']} ({e['file_name']}): {e['error']}", err=True)
        if len(r["error_rows"]) > 10:
            click.echo(f"    ... and {len(r['error_rows']) - 10} more", err=True)
    for reason, n in r["skipped_predictions"].items():
        click.echo(f"  predictions not reviewed: {n} {reason.replace('_', ' ')}", err=True)
    if r["gt_annotations_unknown_category"]:
        click.echo(f"  ground-truth annotations of unknown categories left out: {r['gt_annotations_unknown_category']}", err=True)
    if r["image_source"] is None:
        click.echo("  no dataset with image bytes found (pass --images): thumbnails draw the boxes on grey", err=True)
    for u in r["undecodable"][:5]:
        click.echo(f"  thumbnail without picture: image {u['image_id']} ({u['file_name']}): {u['reason']}", err=True)
