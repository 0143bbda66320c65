"""``pipeline data export-coco | export-yolo | export-labelstudio | import-labelstudio | merge``: annotation round trips.

Register with::

    from pipeline.cli.annotate import export_coco_cmd, export_yolo_cmd, export_labelstudio_cmd, import_labelstudio_cmd, merge_cmd
    data.add_command(export_coco_cmd)
    ...

Only click is imported here; each command imports its library code when it runs.
"""

from __future__ import annotations

import click

from pipeline.cli.common import report_unreadable, user_errors


def selection_options(fn):
    """The options every export shares (pipeline.annotate.select)."""
    options = [
        click.option("--min-score", default=0.0, show_default=True, type=float, help="Drop objects scoring below this."),
        click.option("--min-score-per-class", "per_class", multiple=True, metavar="CLASS=SCORE",
                     help="Threshold for one class, by the predictions' class name (repeatable), e.g. person=0.7."),
        click.option("--categories", "categories_file", type=click.Path(dir_okay=False, exists=True),
                     help="YAML map 'model_name: dataset_name' (null drops a class); strict unless --allow-unmatched."),
        click.option("--allow-unmatched", is_flag=True, help="Drop classes the --categories map does not mention, instead of failing."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _options(min_score, per_class, categories_file, allow_unmatched):
    from pipeline.annotate.select import SelectOptions

    return SelectOptions.from_cli(min_score=min_score, per_class=per_class, categories_file=categories_file,
                                  allow_unmatched=allow_unmatched)


def _report_counts(result: dict, extra: dict[str, str]) -> None:
    from pipeline.annotate.select import describe_counts

    if result.get("error_rows"):
        click.echo(f"  left out: {result['error_rows']} error row(s) (images that could not be read)", err=True)
    for line in describe_counts(result):
        click.echo(f"  {line}", err=True)
    for key, text in extra.items():
        if result.get(key):
            click.echo(f"  {text.format(n=result[key])}", err=True)


MASK_NOTES = {
    "mask_parts_dropped": "mask pieces left out: {n} (an object in several pieces keeps its largest)",
    "mask_holes_filled": "mask holes filled: {n} (polygons have no holes)",
    "empty_masks": "objects with an empty mask left out: {n}",
}


POLYGON_NOTES = {
    "empty_masks": "objects with an empty mask left out: {n} (no polygon to write)",
    "multipart_masks": "masks in several parts: {n} (one polygon per part)",
    "mask_holes": "mask holes kept: {n} (cut into their part's polygon)",
}


@click.command("export-coco")
@click.argument("pred")
@click.argument("out")
@click.option("--as-dataset", is_flag=True, help="Write a full COCO dataset (images, categories, annotations) instead of a results list.")
@click.option("--polygons", is_flag=True, help="With --as-dataset: masks as polygons (one per part, holes kept) instead of RLE.")
@click.option("--polygon-tolerance", default=0.5, show_default=True, type=float,
              help="Simplify --polygons by this many pixels (Douglas-Peucker); 0 keeps every corner.")
@selection_options
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (a COCO dataset written with --as-dataset).")
@user_errors
def export_coco_cmd(pred, out, as_dataset, polygons, polygon_tolerance, min_score, per_class, categories_file,
                    allow_unmatched, overwrite) -> None:
    """Export predictions as COCO results JSON (or a COCO dataset).

    Writes prediction dataset PRED to OUT: bbox xywh, the dataset's category ids (1..K under
    --categories), masks as RLE (or polygons), keypoints; with --as-dataset each annotation
    carries its score and attributes.source (model, weights sha256, job).
    """
    import os

    from pipeline.annotate.coco import export_coco

    if as_dataset and os.path.exists(out) and not overwrite:
        raise click.ClickException(f"{out} exists; pass --overwrite to replace that dataset file, or choose another name")
    options = _options(min_score, per_class, categories_file, allow_unmatched)
    r = export_coco(pred, out, as_dataset=as_dataset, options=options, polygons=polygons, polygon_tolerance=polygon_tolerance)
    what = "annotations" if as_dataset else "detections"
    left_out = f"; left out {r['error_rows']} error row(s) (images that could not be read)" if r["error_rows"] else ""
    click.echo(f"wrote {r['detections']} {what} for {r['images']} images, {len(r['categories'])} categories to {out}{left_out}")
    _report_counts({**r, "error_rows": 0}, POLYGON_NOTES)


@click.command("export-yolo")
@click.argument("pred")
@click.argument("out_dir")
@click.option("--segments", is_flag=True, help="Write mask outlines (class x1 y1 x2 y2 ...) instead of boxes.")
@click.option("--images", "images", help="The images dataset (default: the source named in PRED's dataset.json).")
@selection_options
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in OUT_DIR.")
@user_errors
def export_yolo_cmd(pred, out_dir, segments, images, min_score, per_class, categories_file, allow_unmatched, overwrite) -> None:
    """Export predictions as a YOLO dataset: images/, labels/*.txt, data.yaml.

    Boxes are written as 'class cx cy w h' normalised by the image size; class indices follow
    the output categories (data.yaml names).
    """
    from pipeline.annotate.yolo import export_yolo

    options = _options(min_score, per_class, categories_file, allow_unmatched)
    r = export_yolo(pred, out_dir, options=options, segments=segments, images=images, overwrite=overwrite)
    click.echo(
        f"wrote {r['images_written']} images, {r['objects_written']} {'outlines' if segments else 'boxes'} "
        f"({r['empty_label_files']} empty label file(s)), {len(r['categories'])} classes to {out_dir}"
    )
    _report_counts(r, MASK_NOTES)


@click.command("export-labelstudio")
@click.argument("pred")
@click.argument("out")
@click.option("--image-root", required=True, help="URL prefix of the images, e.g. http://host/images/ (file names are appended).")
@click.option("--from-name", default="label", show_default=True, help="Name of the labels control tag in the config.")
@click.option("--to-name", default="image", show_default=True, help="Name of the Image tag in the config.")
@click.option("--masks", type=click.Choice(["polygons", "brush"]), help="Export masks as polygons or brush RLE instead of boxes.")
@selection_options
@click.option("--overwrite", is_flag=True, help="Replace OUT and its .xml labelling config.")
@user_errors
def export_labelstudio_cmd(pred, out, image_root, from_name, to_name, masks, min_score, per_class, categories_file,
                           allow_unmatched, overwrite) -> None:
    """Export predictions as Label Studio tasks with pre-annotations.

    Writes OUT (tasks JSON) and OUT's stem + .xml (the labelling config to paste into the project).
    """
    from pipeline.annotate.labelstudio import export_labelstudio

    options = _options(min_score, per_class, categories_file, allow_unmatched)
    r = export_labelstudio(pred, out, options=options, image_root=image_root, from_name=from_name, to_name=to_name,
                           masks=masks, overwrite=overwrite)
    click.echo(f"wrote {r['tasks']} tasks, {r['regions']} regions, {len(r['categories'])} classes to {out}; "
               f"labelling config: {r['config']}")
    _report_counts(r, MASK_NOTES)


@click.command("import-labelstudio")
@click.argument("export_json", type=click.Path(dir_okay=False, exists=True))
@click.argument("out")
@click.option("--images", "images_dir", required=True, type=click.Path(file_okay=False), help="Folder holding the tasks' image files (matched by file name).")
@click.option("--rows-per-shard", default=1000, show_default=True, type=click.IntRange(min=1), help="Images per Parquet shard.")
@click.option("--overwrite", is_flag=True, help="Replace the dataset already at OUT (its shards and dataset.json).")
@user_errors
def import_labelstudio_cmd(export_json, out, images_dir, rows_per_shard, overwrite) -> None:
    """Import a Label Studio JSON export into shards at OUT.

    Reads rectanglelabels, polygonlabels and brushlabels regions of each task's first annotation
    (its first prediction when it has none).
    """
    from pipeline.annotate.labelstudio import import_labelstudio

    r = import_labelstudio(export_json, out, images_dir=images_dir, rows_per_shard=rows_per_shard, overwrite=overwrite)
    c = r["counts"]
    click.echo(f"wrote {r['images']} images, {r['annotations']} annotations in {r['shards']} shard(s) to {out}; "
               f"classes: {', '.join(r['categories']) or 'none'}")
    click.echo(f"  tasks: {c.get('from_annotations', 0)} from annotations, {c.get('from_predictions', 0)} from predictions "
               f"(no annotation), {c.get('without_labels', 0)} without either", err=True)
    if c.get("other_annotations_ignored"):
        click.echo(f"  ignored: {c['other_annotations_ignored']} further annotation(s) of tasks (the first one is used)", err=True)
    report_unreadable(r["errors"])


@click.command("merge")
@click.argument("ds")
@click.argument("pred")
@click.argument("out")
@click.option("--mode", type=click.Choice(["append", "replace", "fill-missing"]), default="fill-missing", show_default=True,
              help="append: add every selected prediction; fill-missing: only those matching no existing annotation; "
                   "replace: an image's predictions replace its annotations.")
@click.option("--iou", default=0.5, show_default=True, type=float,
              help="fill-missing: a prediction with box IoU >= this with an annotation of its class is skipped.")
@selection_options
@click.option("--rows-per-shard", default=1000, show_default=True, type=click.IntRange(min=1), help="Images per Parquet shard.")
@click.option("--overwrite", is_flag=True, help="Replace the dataset already at OUT (its shards, dataset.json and merge.json).")
@user_errors
def merge_cmd(ds, pred, out, mode, iou, min_score, per_class, categories_file, allow_unmatched, rows_per_shard, overwrite) -> None:
    """Merge predictions PRED into the labelled dataset DS, as a new dataset OUT.

    Existing annotations are never changed; each annotation's source ("human", or the model and
    weights of the predictions) and score go into the annotation_sources / annotation_scores
    columns. Counts per category are printed and written to OUT/merge.json.
    """
    from pipeline.annotate.merge import PER_CATEGORY, merge
    from pipeline.cli.common import print_table

    options = _options(min_score, per_class, categories_file, allow_unmatched)
    r = merge(ds, pred, out, mode=mode, iou=iou, options=options, rows_per_shard=rows_per_shard, overwrite=overwrite)
    t, im = r["totals"], r["images"]
    click.echo(f"{mode}: kept {t['kept']}, added {t['added']}, skipped {t['skipped']}, replaced {t['replaced']} "
               f"annotation(s) over {im['images']} images ({im.get('with_predictions', 0)} with predictions) "
               f"in {r['shards']} shard(s) to {out}")
    if r["per_category"]:
        print_table([(name, *(c[k] for k in PER_CATEGORY)) for name, c in r["per_category"].items()],
                    header=("category", *(k.replace("_", " ") for k in PER_CATEGORY)))
    if r["images"]["prediction_error_rows"]:
        click.echo(f"  {r['images']['prediction_error_rows']} prediction error row(s): those images keep their annotations", err=True)
    _report_counts({**r["dropped"], "error_rows": 0}, {})
    click.echo(f"counts: {out.rstrip('/')}/merge.json; sources: {r['source']}")
