"""``pipeline data ...``: create, import and inspect datasets."""

from __future__ import annotations

import click

from pipeline.cli.common import print_table, report_unreadable, user_errors


@click.group()
def data() -> None:
    """Create, import and inspect datasets (Parquet image shards)."""


def _report(result: dict, out: str) -> None:
    click.echo(f"wrote {result['images']} images, {result['annotations']} annotations in {result['shards']} shard(s) to {out}")
    report_unreadable(result.get("errors") or [])


@data.command("import-coco")
@click.option("--images", "images_dir", required=True, type=click.Path(file_okay=False),
              help="Folder the COCO file_names are relative to, or the original dataset to relink them to (ids and bytes from it).")
@click.option("--annotations", "annotations_file", required=True, type=click.Path(dir_okay=False), help="COCO annotations JSON file.")
@click.option("--rows-per-shard", default=1000, show_default=True, type=click.IntRange(min=1), help="Images per Parquet shard.")
@click.option("--overwrite", is_flag=True, help="Replace the dataset already at OUT (its shards and dataset.json).")
@click.option("--allow-missing-images", is_flag=True, help="Import the annotations even if no image file is found (ground truth for eval only).")
@click.argument("out")
@user_errors
def import_coco_cmd(images_dir: str, annotations_file: str, rows_per_shard: int, out: str, overwrite: bool, allow_missing_images: bool) -> None:
    """Import a COCO dataset (images + JSON) into shards at OUT.

    Images are found by file_name (else by base name, if unique); with a dataset as --images,
    each image is relinked to the original image of that name and takes its image_id, as a
    labelling tool's export needs (tools renumber ids).
    """
    from pipeline.data.importers import import_coco, is_dataset

    result = import_coco(
        images_dir, annotations_file, out, rows_per_shard=rows_per_shard, overwrite=overwrite, allow_missing_images=allow_missing_images
    )
    _report(result, out)
    if is_dataset(images_dir):
        click.echo(f"  relinked to {images_dir} by file name: {result['images']} image(s) "
                   f"({result['relinked']} by base name only); image_ids are the dataset's", err=True)
    elif result["relinked"]:
        click.echo(f"  found by base name only: {result['relinked']} image(s) (file_name set to the path found under --images)", err=True)


@data.command("import-images")
@click.option("--labels", "labels_dir", type=click.Path(file_okay=False),
              help="Folder of VOC-style label PNGs (pixel = category id, 255 = ignore), same relative path as each image.")
@click.option("--categories", "categories_file", type=click.Path(dir_okay=False),
              help="JSON list of COCO categories {id, name}, or of names (index = id); default: ids found, class_<id>.")
@click.option("--class-folders", is_flag=True,
              help="ImageFolder layout IMAGES_DIR/<class>/**/<image>: each image labelled by its class folder (ids 1..K, sorted names).")
@click.option("--rows-per-shard", default=1000, show_default=True, type=click.IntRange(min=1), help="Images per Parquet shard.")
@click.option("--overwrite", is_flag=True, help="Replace the dataset already at OUT (its shards and dataset.json).")
@click.argument("images_dir", type=click.Path(file_okay=False))
@click.argument("out")
@user_errors
def import_images_cmd(images_dir: str, out: str, labels_dir: str | None, categories_file: str | None, class_folders: bool,
                      rows_per_shard: int, overwrite: bool) -> None:
    """Import a folder of images (optionally with label maps, or labelled by class folder) into shards at OUT.

    With --labels, IMAGES_DIR/a/b.jpg takes LABELS_DIR/a/b.png as its semantic ground truth; an
    image without one is kept, and left out of semantic evaluation. With --class-folders,
    IMAGES_DIR/cat/x.jpg gets the image label "cat" (as torchvision's ImageFolder reads it), for
    pipeline eval --iou-type classification.
    """
    from pipeline.data.importers import import_images

    result = import_images(images_dir, out, rows_per_shard=rows_per_shard, overwrite=overwrite,
                           labels_dir=labels_dir, categories_file=categories_file, class_folders=class_folders)
    _report(result, out)
    if labels_dir:
        _report_labels(result, labels_dir)
    if class_folders:
        categories = result["categories"]
        click.echo(f"  class folders: {len(categories)} categor{'y' if len(categories) == 1 else 'ies'}: "
                   + _first_8([f"{c['id']} {c['name']}" for c in categories]))
        click.echo("  images per category: " + _first_8([f"{name} {n}" for name, n in result["images_per_category"].items()]))


def _first_8(texts: list[str]) -> str:
    return ", ".join(texts[:8]) + (", ..." if len(texts) > 8 else "")


def _report_labels(result: dict, labels_dir: str) -> None:
    categories = result["categories"]
    names = _first_8([f"{c['id']} {c['name']}" for c in categories])
    click.echo(f"  label maps: {result['label_maps']} of {result['images']} image(s); "
               f"{len(categories)} categor{'y' if len(categories) == 1 else 'ies'} "
               f"({'from the values found' if result['categories_inferred'] else 'from --categories'}): {names}")
    if result["images_without_label_file"]:
        click.echo(f"  {result['images_without_label_file']} image(s) have no label file in {labels_dir}: "
                   "kept, and left out of semantic evaluation", err=True)
    unused = result["labels_without_image"]
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        click.echo(f"warning: {len(unused)} label file(s) match no image, not imported: {', '.join(unused[:5])}{more}", err=True)


@data.command("synth")
@click.option("--images", required=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--seed", default=0, show_default=True, type=int, help="Dataset seed (same seed, same images).")
@click.option("--size", default=128, show_default=True, type=click.IntRange(min=32), help="Nominal image side in pixels (varies +-25%).")
@click.option("--rows-per-shard", default=256, show_default=True, type=click.IntRange(min=1), help="Images per Parquet shard.")
@click.option("--classification", is_flag=True, help="One shape per image and an image-level `label` column (for classify).")
@click.option("--overwrite", is_flag=True, help="Replace the dataset already at OUT (its shards and dataset.json).")
@click.argument("out")
@user_errors
def synth_cmd(images: int, seed: int, size: int, rows_per_shard: int, classification: bool, out: str, overwrite: bool) -> None:
    """Write a synthetic shapes dataset with exact boxes and masks (or image labels)."""
    from pipeline.data.synth import synth_dataset

    _report(synth_dataset(out, images=images, seed=seed, size=size, rows_per_shard=rows_per_shard, overwrite=overwrite,
                          classification=classification), out)


@data.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.argument("path")
@user_errors
def info_cmd(path: str, as_json: bool) -> None:
    """Rows, shards, bytes, categories and annotations of a dataset."""
    import json

    from pipeline.data.info import dataset_info

    info = dataset_info(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    per_category = info.pop("annotations_per_category")
    error_examples = info.pop("error_examples", [])
    print_table([(k, v) for k, v in info.items()])
    if per_category:
        click.echo("")
        print_table(sorted(per_category.items()), header=("category", "annotations"))
    if error_examples:
        click.echo("")
        click.echo(f"error rows (first {len(error_examples)} of {info['error_rows']}):")
        print_table([(e["image_id"], e["file_name"] or "", e["error"]) for e in error_examples],
                    header=("image_id", "file_name", "error"))
        if info["error_rows"] > len(error_examples):
            click.echo(f"... and {info['error_rows'] - len(error_examples)} more")


@data.command("render")
@click.option("--images", "images", help="Dataset holding the images (default: the job's input, from PRED's dataset.json; or PRED itself).")
@click.option("--limit", default=8, show_default=True, type=click.IntRange(min=1), help="How many images to draw.")
@click.option("--min-score", default=0.3, show_default=True, type=float, help="Draw only predictions scoring at least this.")
@click.argument("pred")
@click.argument("out_dir")
@user_errors
def render_cmd(pred: str, out_dir: str, images: str | None, limit: int, min_score: float) -> None:
    """Draw predictions (boxes, masks, keypoints, semantic maps) on their images as PNGs.

    Files are OUT_DIR/<image_id>_<name>.png plus contact_sheet.png; labels are category names and
    scores, semantic maps get a legend. PRED may also be a dataset with label maps (its ground
    truth is drawn). With --images, the dataset must hold the same image ids, file names and sizes.
    """
    from pipeline.data.render import render_predictions

    result = render_predictions(pred, out_dir, images=images, limit=limit, min_score=min_score)
    click.echo(f"wrote {len(result['paths'])} picture(s) to {out_dir}")
    if result["sheet"]:
        click.echo(f"contact sheet: {result['sheet']}")
    for what, rows in (("error row(s)", result["error_rows"]), ("image(s) that could not be decoded", result["undecodable"])):
        if rows:
            click.echo(f"skipped {len(rows)} {what}:", err=True)
            for image_id, file_name, reason in rows[:5]:
                click.echo(f"  image_id {image_id} {file_name or ''}: {reason}", err=True)
            if len(rows) > 5:
                click.echo(f"  ... and {len(rows) - 5} more", err=True)


@data.command("export-images")
@click.option("--column", default="stylized", show_default=True, help="Image column to write out (e.g. a style stage's).")
@click.option("--images", "images", help="Dataset holding the originals for the contact sheet (default: the job's input).")
@click.option("--sheet-limit", default=16, show_default=True, type=click.IntRange(min=0), help="Images on the contact sheet (0: no sheet).")
@click.option("--overwrite", is_flag=True, help="Write into OUT_DIR even if it is not empty.")
@click.argument("pred")
@click.argument("out_dir")
@user_errors
def export_images_cmd(pred: str, out_dir: str, column: str, images: str | None, sheet_limit: int, overwrite: bool) -> None:
    """Write an image column (stylized) as files, plus a contact sheet.

    Files are OUT_DIR/<image_id>_<name>.jpg|png; contact_sheet.png shows originals next to results.
    """
    from pipeline.data.export_images import export_images

    result = export_images(
        pred, out_dir, column=column, images=images, sheet=sheet_limit > 0, sheet_limit=max(sheet_limit, 1), overwrite=overwrite
    )
    click.echo(f"wrote {result['written']} image(s) to {out_dir} ({result['error_rows']} error rows and "
               f"{result['empty_rows']} rows without {column} skipped)")
    if result["sheet"]:
        click.echo(f"contact sheet: {result['sheet']}")


@data.command("export-masks")
@click.option("--overwrite", is_flag=True, help="Write into OUT_DIR even if it is not empty.")
@click.argument("pred")
@click.argument("out_dir")
@user_errors
def export_masks_cmd(pred: str, out_dir: str, overwrite: bool) -> None:
    """Write semantic predictions as label PNGs (VOC palette), one per image.

    OUT_DIR/<file_name>.png, folders kept: pixel = category id, 255 = unlabelled. They import back
    as ground truth with: pipeline data import-images IMAGES --labels OUT_DIR.
    """
    from pipeline.data.export_masks import export_masks

    result = export_masks(pred, out_dir, overwrite=overwrite)
    click.echo(f"wrote {result['written']} label map(s) to {out_dir} ({result['error_rows']} error rows and "
               f"{result['empty_rows']} rows without semantic masks skipped)")
    renamed = result["renamed"]
    if renamed:
        listed = ", ".join(f"image_id {i} -> {name}" for i, name in renamed[:5]) + (" ..." if len(renamed) > 5 else "")
        click.echo(f"  {len(renamed)} file name(s) already written for another image, so named <name>_<image_id>.png: {listed}", err=True)
