"""Per-stage throughput on this machine, and the recall of each region-proposal method.

Runs the stage objects directly (no Ray): each stage is built once (its load time is reported
apart), warmed up on one image, then timed over synthetic shape images
(:mod:`pipeline.data.synth`) in batches. All models have random weights (``weights: none``:
nothing can be downloaded here), so detections mean nothing; their *cost* is real. Random
weights score every box alike, so the detection stages run with 2 classes (background + one)
and ``score_threshold 0.05``: every candidate (random score ~0.5) goes through NMS as on a busy
image, and each image keeps ``--detections`` boxes, so the mask and keypoint heads do the work
they would do for that many objects. The machine's load average is printed with the table:
on a shared 2-core machine other processes can slow every number down several times.

Proposal recall: every proposal method runs on ``--recall-images`` synthetic images with exact
ground truth; its proposals are scored by pycocotools as class-agnostic detections (COCOeval,
iouType bbox, ``useCats = 0``, ``maxDets = [100, 300, 1000]``), and AR@100 / AR@1000 are
COCOeval's average recall over IoU 0.50:0.95 at those caps. Uniform random boxes are the floor:
an untrained RPN (random weights) ranks its anchors by noise, so expect it near that floor.

    python bench/stages.py                          # 8 images for throughput, 32 for recall
    python bench/stages.py --images 4 --recall-images 8 --skip keypoints
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path

import click
import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
R_CNN = {"min_size": 512, "max_size": 853}  # what jobs/maskrcnn.yaml and jobs/keypoints.yaml use


def stage_table() -> list[tuple[str, str, type, dict]]:
    """(row name, settings in words, stage class, keyword arguments) for every measured stage."""
    from pipeline.stages.detect import DetectStage
    from pipeline.stages.keypoints import KeypointsStage
    from pipeline.stages.masks import MasksStage
    from pipeline.stages.proposals import ProposalsStage

    return [
        ("detect", "fasterrcnn_mobilenet_v3_large_320_fpn (jobs/detect.yaml)", DetectStage,
         {"model": "fasterrcnn_mobilenet_v3_large_320_fpn"}),
        ("masks", "maskrcnn_resnet50_fpn, min_size 512", MasksStage,
         {"model": "maskrcnn_resnet50_fpn", "model_kwargs": R_CNN}),
        ("keypoints", "keypointrcnn_resnet50_fpn, min_size 512", KeypointsStage,
         {"model": "keypointrcnn_resnet50_fpn", "model_kwargs": R_CNN}),
        ("proposals rpn", "fasterrcnn_resnet50_fpn RPN, min_size 512, top_k 1000", ProposalsStage,
         {"method": "rpn", "model": "fasterrcnn_resnet50_fpn", "top_k": 1000, "model_kwargs": R_CNN}),
        ("selective search fast", "OpenCV, top_k 2000", ProposalsStage,
         {"method": "selective_search", "mode": "fast", "top_k": 2000}),
        ("detect, Fast R-CNN", "same model, RoI heads on selective search (fast) proposals", DetectStage,
         {"model": "fasterrcnn_mobilenet_v3_large_320_fpn", "proposals_column": "proposals"}),
        ("selective search quality", "OpenCV, top_k 2000", ProposalsStage,
         {"method": "selective_search", "mode": "quality", "top_k": 2000}),
    ]


def synthetic(n: int, seed: int, size: int) -> tuple[pa.Table, list[dict]]:
    """A decoded batch of ``n`` synthetic images and their COCO image records with annotations."""
    from pipeline import schema
    from pipeline.data.decode import decode_batch
    from pipeline.data.synth import synth_image

    rows, images = [], []
    for i in range(n):
        png, width, height, annotations = synth_image(seed, i, size)
        rows.append({"image_id": i + 1, "file_name": f"{i}.png", "width": width, "height": height, "image": png})
        images.append({"id": i + 1, "width": width, "height": height, "annotations": annotations})
    return decode_batch(schema.image_table(rows)), images


def run_stage(stage, batch: pa.Table, batch_size: int) -> tuple[pa.Table, float]:
    """Warm up on one row, then time ``stage`` over ``batch``; returns (output, seconds)."""
    stage(batch.slice(0, 1))
    parts, start = [], time.perf_counter()
    for offset in range(0, batch.num_rows, batch_size):
        parts.append(stage(batch.slice(offset, batch_size)))
    return pa.concat_tables(parts), time.perf_counter() - start


def average_recall(images: list[dict], boxes: list[np.ndarray], scores: list[np.ndarray]) -> dict[str, float]:
    """COCOeval AR@100/300/1000 (IoU .50:.95, all areas) of class-agnostic xyxy proposals."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from pipeline.data.synth import CATEGORIES

    gt = COCO()
    gt.dataset = {
        "images": [{"id": im["id"], "width": im["width"], "height": im["height"]} for im in images],
        "annotations": [
            {"id": a["id"], "image_id": im["id"], "category_id": a["category_id"], "bbox": a["bbox"], "area": a["area"],
             "iscrowd": 0}
            for im in images
            for a in im["annotations"]
        ],
        "categories": CATEGORIES,
    }
    dets = [
        {"image_id": im["id"], "category_id": 1, "score": float(s),
         "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]}  # xyxy -> COCO xywh
        for im, b, sc in zip(images, boxes, scores)
        for (x1, y1, x2, y2), s in zip(b, sc)
    ]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and its table
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(dets), "bbox")
        evaluation.params.useCats = 0
        evaluation.params.maxDets = [100, 300, 1000]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"AR@100": evaluation.stats[6], "AR@300": evaluation.stats[7], "AR@1000": evaluation.stats[8]}


def random_boxes(images: list[dict], n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` uniformly random xyxy boxes per image (corners uniform in the image), random order."""
    rng = np.random.default_rng(seed)
    boxes = []
    for im in images:
        xs = np.sort(rng.uniform(0, im["width"], size=(n, 2)), axis=1)
        ys = np.sort(rng.uniform(0, im["height"], size=(n, 2)), axis=1)
        boxes.append(np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1))
    return boxes, [1.0 / (1.0 + np.arange(n)) for _ in images]


def print_table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for i, row in enumerate([header] + rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


@click.command()
@click.option("--images", default=8, show_default=True, help="Images timed per stage.")
@click.option("--recall-images", default=32, show_default=True,
              help="Images the proposal methods run on (timed and scored).")
@click.option("--size", default=256, show_default=True, help="Synthetic image size (pixels, about; R-CNNs resize to min_size).")
@click.option("--batch-size", default=2, show_default=True, help="Images per stage call.")
@click.option("--detections", default=20, show_default=True, help="Boxes per image the detection stages keep.")
@click.option("--threads", default=2, show_default=True, help="torch / OpenCV threads per stage.")
@click.option("--skip", multiple=True, help="Stage rows to leave out, e.g. --skip keypoints.")
@click.option("--json-out", default="bench-output/stages.json", show_default=True, help="Where to save raw numbers.")
def main(images, recall_images, size, batch_size, detections, threads, skip, json_out) -> None:
    """Print images/s and ms per image of each stage, then proposal recall (AR) per method."""
    import torch

    from pipeline import schema

    load_before = os.getloadavg()[0]
    timed, _ = synthetic(images, seed=21, size=size)
    scored, gt_images = synthetic(max(recall_images, images), seed=21, size=size)
    results, recall, ss_fast = [], {}, None
    for name, settings, cls, kwargs in stage_table():
        if name in skip:
            continue
        if "method" not in kwargs:
            kwargs = {**kwargs, "weights": "none", "num_classes": 2, "score_threshold": 0.05, "max_detections": detections}
        torch.manual_seed(0)  # each stage's random weights do not depend on which rows ran before
        start = time.perf_counter()
        stage = cls(**kwargs, threads=threads)
        load_s = time.perf_counter() - start
        is_proposals = "method" in kwargs
        batch = scored if is_proposals else timed
        if kwargs.get("proposals_column"):
            if ss_fast is None:
                raise click.UsageError("the Fast R-CNN row needs the 'selective search fast' row (do not skip it)")
            batch = batch.append_column(schema.PROPOSALS, ss_fast.slice(0, batch.num_rows)[schema.PROPOSALS])
        out, seconds = run_stage(stage, batch, batch_size)
        column = schema.PROPOSALS if is_proposals else schema.BOXES
        per_image = np.mean([len(b) for b in out[column].to_pylist()])
        results.append({"stage": name, "settings": settings, "images": batch.num_rows, "boxes_per_image": float(per_image),
                        "load_s": load_s, "seconds": seconds, "ms_per_image": 1000 * seconds / batch.num_rows,
                        "images_per_s": batch.num_rows / seconds})
        print(f"  {name}: {results[-1]['images_per_s']:.2f} img/s", flush=True)
        if is_proposals:
            boxes = [np.asarray(b, np.float64).reshape(-1, 4) for b in out[schema.PROPOSALS].to_pylist()]
            recall[name] = average_recall(gt_images, boxes, out[schema.PROPOSAL_SCORES].to_pylist())
            if name == "selective search fast":
                ss_fast = out
        del stage
    n_boxes = 1000
    recall[f"random boxes ({n_boxes}/image, floor)"] = average_recall(gt_images, *random_boxes(gt_images, n_boxes, seed=0))

    print(f"\nstage throughput: {os.cpu_count()} CPU cores (load average {load_before:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end), {threads} threads, batch {batch_size}, synthetic images of ~{size} px, "
          f"random weights; detection stages keep {detections} boxes/image")
    print_table(
        ("stage", "settings", "images", "boxes/img", "load s", "ms/img", "img/s"),
        [(r["stage"], r["settings"], r["images"], f"{r['boxes_per_image']:.0f}", f"{r['load_s']:.1f}",
          f"{r['ms_per_image']:.0f}", f"{r['images_per_s']:.2f}") for r in results],
    )
    gt_boxes = sum(len(im["annotations"]) for im in gt_images)
    print(f"\nproposal recall on {len(gt_images)} synthetic images ({gt_boxes} ground-truth boxes), "
          "COCOeval useCats=0, IoU .50:.95")
    print_table(("method", "AR@100", "AR@300", "AR@1000"),
                [(m, f"{r['AR@100']:.3f}", f"{r['AR@300']:.3f}", f"{r['AR@1000']:.3f}") for m, r in recall.items()])
    print("\nThe RPN has random weights: its ranking is noise, so its recall says nothing about a trained RPN.")
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps({"throughput": results, "recall": recall}, indent=2))


if __name__ == "__main__":
    main()
