"""Benchmark: ``pipeline.eval`` vs single-process pycocotools (and faster-coco-eval if installed).

Synthetic set (``pipeline.eval.synthetic``): N images x ~20 detections, 80 categories, boxes and
masks. Ground truth is imported into shards with ``import_coco``; predictions are written as
prediction shards (500 rows each), and exported with ``export_coco`` for the reference tools.

Every timing includes loading ground truth and predictions. Rows:

* ``pycocotools``: ``COCO(gt.json)``, ``loadRes(results.json)``, evaluate, accumulate, summarize.
* ``faster-coco-eval``: the same through its drop-in ``COCOeval_faster`` (only if installed).
* ``ours, Ray cold``: ``evaluate()`` starting (and stopping) its own local Ray.
* ``ours, Ray warm``: ``evaluate()`` with Ray already running (e.g. right after a job).
* ``ours, 1 process``: ``evaluate(use_ray=False)`` -- also what ``pipeline eval`` does by default
  when no Ray is running and there are fewer than 20,000 images to match (Ray's start-up would
  cost more than it saves on 2 cores).
* ``ours, from state``: every shard's records already saved beside the predictions (a resumed run).

Usage::

    python bench/eval_speed.py                       # 5,000 images, bbox and segm
    python bench/eval_speed.py --images 500          # a quick run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.importers import import_coco  # noqa: E402
from pipeline.eval import evaluate, export_coco  # noqa: E402
from pipeline.eval.params import stat_keys  # noqa: E402
from pipeline.eval.synthetic import synthetic_case, write_predictions  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=5000, help="Number of images (default 5000).")
    ap.add_argument("--detections", type=int, default=20, help="Mean detections per image (default 20).")
    ap.add_argument("--categories", type=int, default=80, help="Categories with ground truth (default 80).")
    ap.add_argument("--iou-types", default="bbox,segm", help="Comma-separated IoU types (default bbox,segm).")
    ap.add_argument("--rows-per-shard", type=int, default=500, help="Prediction rows per shard (default 500).")
    ap.add_argument("--seed", type=int, default=0, help="Synthetic set seed (default 0).")
    ap.add_argument("--out", default="bench-output/eval_speed", help="Working folder (default bench-output/eval_speed).")
    return ap.parse_args()


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def pycocotools_stats(gt_json: Path, results: Path, iou_type: str) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        e = COCOeval(gt, gt.loadRes(str(results)), iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return np.asarray(e.stats)


def faster_coco_eval_stats(gt_json: Path, results: Path, iou_type: str) -> np.ndarray | None:
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        e = COCOeval_faster(gt, gt.loadRes(str(results)), iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return np.asarray(e.stats)


def ours(pred: str, gt: str, iou_type: str, **kwargs) -> np.ndarray:
    metrics = evaluate([pred], gt, [iou_type], **kwargs)
    return np.array([metrics[iou_type][k] for k in stat_keys(iou_type)])


def main() -> None:
    args = parse_args()
    types = [t for t in args.iou_types.split(",") if t]
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)

    t_gen, (coco, rows) = timed(
        lambda: synthetic_case(images=args.images, seed=args.seed, detections_per_image=args.detections,
                               categories=args.categories, masks="segm" in types)
    )
    gt_json, gt_ds, pred, results = root / "gt.json", str(root / "gt"), str(root / "pred"), root / "results.json"
    gt_json.write_text(json.dumps(coco))
    import_coco(str(root / "images"), str(gt_json), gt_ds, rows_per_shard=1000, allow_missing_images=True)
    write_predictions(rows, pred, categories=coco["categories"], rows_per_shard=args.rows_per_shard)
    exported = export_coco(pred, str(results))
    n_shards = len(list(Path(pred).glob("*.parquet")))
    print(f"synthetic set: {args.images} images, {len(coco['annotations'])} GT, {exported['detections']} detections, "
          f"{n_shards} prediction shards (generated in {t_gen:.1f}s); CPUs: {os.cpu_count()}\n", flush=True)

    import ray

    table = []
    for t in types:
        ref_s, ref = timed(lambda: pycocotools_stats(gt_json, results, t))
        rows_t = [("pycocotools", ref_s, ref)]
        fast_s, fast = timed(lambda: faster_coco_eval_stats(gt_json, results, t))
        if fast is not None:
            rows_t.append(("faster-coco-eval", fast_s, fast))
        if ray.is_initialized():
            ray.shutdown()
        rows_t.append(("ours, Ray cold", *timed(lambda: ours(pred, gt_ds, t, use_state=False, use_ray=True))))
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ours(pred, gt_ds, t, use_state=False, use_ray=True)  # warm the workers (imports) once
        rows_t.append(("ours, Ray warm", *timed(lambda: ours(pred, gt_ds, t, use_state=False, use_ray=True))))
        ours(pred, gt_ds, t)  # writes state beside the predictions
        rows_t.append(("ours, from state", *timed(lambda: ours(pred, gt_ds, t))))
        ray.shutdown()
        rows_t.append(("ours, 1 process", *timed(lambda: ours(pred, gt_ds, t, use_ray=False, use_state=False))))
        for name, seconds, stats in rows_t:
            table.append((t, name, seconds, ref_s / seconds, float(np.abs(stats - ref).max()), stats[0]))
            print(f"  {t:<5} {name:<17} {seconds:7.2f}s", flush=True)

    print()
    header = ("iou", "tool", "seconds", "speed-up", "max |diff| vs pycocotools", "AP")
    widths = (5, 17, 8, 9, 26, 8)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for t, name, seconds, speedup, diff, ap in table:
        print(f"{t:<5}  {name:<17}  {seconds:8.2f}  {speedup:8.2f}x  {diff:<26.3g}  {ap:.6f}")


if __name__ == "__main__":
    main()
