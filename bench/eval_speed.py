"""Benchmark: ``pipeline eval`` vs pycocotools vs faster-coco-eval, each a whole cold command.

Synthetic set (``pipeline.eval.synthetic_cases``): N images x ~20 detections, 80 categories, boxes and
masks, written as a COCO annotations file (``gt.json``) and a COCO results file
(``results.json``, through ``export_coco`` of prediction shards). Every tool then runs as its own
fresh process -- interpreter start, imports, reading both JSON files, matching, accumulate,
summarize -- which is what a user waits for:

* ``pycocotools``: ``COCO(gt)``, ``loadRes``, ``COCOeval`` evaluate/accumulate/summarize;
* ``faster-coco-eval``: the same through its ``COCOeval_faster`` (``pip install -e .[bench]``);
* ``pipeline eval``: ``pipeline eval results.json --gt gt.json --iou-type T --json`` (default
  settings: no Ray below ``RAY_AUTO_MIN_IMAGES`` images, see ``pipeline.eval.evaluation``);
* with ``--shards``: also ``pipeline eval PRED --gt GT_DATASET --no-state`` on our own formats;
* with ``--ray``: also ``pipeline eval ... --ray`` (a private local Ray started and stopped).

Each command runs ``--repeats`` times, alternating tools; the table shows the best wall time
(the machine is shared: the best run is the one least disturbed) and the CPU time (user + sys,
children included) of that run. The 12 stats of every run must equal pycocotools' to 1e-12, or the
benchmark fails.

Usage::

    python bench/eval_speed.py                          # 5,000 images, bbox and segm, 3 repeats
    python bench/eval_speed.py --iou-types bbox --repeats 5
    python bench/eval_speed.py --images 500             # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOLERANCE = 1e-12

REFERENCE = """\
import contextlib, io, json, sys
tool, gt, dt, iou = sys.argv[1:5]
if tool == "pycocotools":
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
else:
    from faster_coco_eval import COCO
    from faster_coco_eval import COCOeval_faster as COCOeval
with contextlib.redirect_stdout(io.StringIO()):
    g = COCO(gt)
    e = COCOeval(g, g.loadRes(dt), iou)
    e.evaluate(); e.accumulate(); e.summarize()
print(json.dumps([float(x) for x in e.stats]))
"""


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=5000, help="Number of images (default 5000).")
    ap.add_argument("--detections", type=int, default=20, help="Mean detections per image (default 20).")
    ap.add_argument("--categories", type=int, default=80, help="Categories with ground truth (default 80).")
    ap.add_argument("--iou-types", default="bbox,segm", help="Comma-separated IoU types (default bbox,segm).")
    ap.add_argument("--rows-per-shard", type=int, default=500, help="Prediction rows per shard (default 500).")
    ap.add_argument("--seed", type=int, default=0, help="Synthetic set seed (default 0).")
    ap.add_argument("--repeats", type=int, default=3, help="Cold runs per command; the best counts (default 3).")
    ap.add_argument("--shards", action="store_true", help="Also time pipeline eval on prediction shards + GT dataset.")
    ap.add_argument("--ray", action="store_true", help="Also time pipeline eval --ray (local Ray start included).")
    ap.add_argument("--reuse", action="store_true", help="Reuse the synthetic set already in --out.")
    ap.add_argument("--out", default="bench-output/eval_speed", help="Working folder (default bench-output/eval_speed).")
    return ap.parse_args()


def make_set(args, root: Path, types: list[str]) -> None:
    from pipeline.data.importers import import_coco
    from pipeline.annotate.coco import export_coco
    from pipeline.eval.synthetic_cases import synthetic_case, write_predictions

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    coco, rows = synthetic_case(images=args.images, seed=args.seed, detections_per_image=args.detections,
                                categories=args.categories, masks="segm" in types)
    (root / "gt.json").write_text(json.dumps(coco))
    import_coco(str(root / "images"), str(root / "gt.json"), str(root / "gt"), rows_per_shard=1000,
                allow_missing_images=True)
    write_predictions(rows, str(root / "pred"), categories=coco["categories"], rows_per_shard=args.rows_per_shard)
    export_coco(str(root / "pred"), str(root / "results.json"))


def commands(root: Path, iou_type: str, args) -> list[tuple[str, list[str]]]:
    py = sys.executable
    pipeline = [py, "-m", "pipeline", "eval"]
    gt, dt = str(root / "gt.json"), str(root / "results.json")
    out = [
        ("pycocotools", [py, "-c", REFERENCE, "pycocotools", gt, dt, iou_type]),
        ("faster-coco-eval", [py, "-c", REFERENCE, "faster-coco-eval", gt, dt, iou_type]),
        ("pipeline eval", [*pipeline, dt, "--gt", gt, "--iou-type", iou_type, "--json"]),
    ]
    if args.shards:
        out.append(("pipeline eval shards", [*pipeline, str(root / "pred"), "--gt", str(root / "gt"), "--iou-type",
                                             iou_type, "--no-state", "--json"]))
    if args.ray:
        out.append(("pipeline eval --ray", [*pipeline, dt, "--gt", gt, "--iou-type", iou_type, "--ray", "--json"]))
    return out


def run_cold(cmd: list[str], iou_type: str) -> tuple[float, float, np.ndarray]:
    """(wall seconds, CPU seconds of the process and its children, the 12 (10) stats)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd[:3])} ...\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    value = json.loads(proc.stdout)
    if isinstance(value, dict):  # pipeline eval --json
        from pipeline.eval.iou_types import get_iou_type

        value = [value[iou_type][k] for k in get_iou_type(iou_type).stat_keys]
    return wall, cpu, np.asarray(value, dtype=np.float64)


def main() -> None:
    args = parse_args()
    types = [t for t in args.iou_types.split(",") if t]
    root = Path(args.out).resolve()
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        raise SystemExit("faster-coco-eval is not installed: pip install -e '.[bench]'") from None
    if not (args.reuse and (root / "results.json").exists()):
        t0 = time.perf_counter()
        make_set(args, root, types)
        print(f"synthetic set written to {root} in {time.perf_counter() - t0:.1f}s", flush=True)
    n_dets = len(json.loads((root / "results.json").read_text()))
    print(f"{args.images} images, {n_dets} detections; CPUs: {os.cpu_count()}; best of {args.repeats} cold runs\n")

    table = []
    for t in types:
        cmds = commands(root, t, args)
        best: dict[str, tuple[float, float]] = {}
        stats: dict[str, list[np.ndarray]] = {name: [] for name, _ in cmds}
        for r in range(args.repeats):
            for name, cmd in cmds if r % 2 == 0 else cmds[::-1]:  # alternate, so drift hits all alike
                wall, cpu, s = run_cold(cmd, t)
                stats[name].append(s)
                print(f"  {t:<5} {name:<21} run {r + 1}: {wall:6.2f}s wall, {cpu:6.2f}s CPU", flush=True)
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, cpu)
        ref = stats["pycocotools"][0]
        for name, _ in cmds:
            diff = max(float(np.abs(s - ref).max()) for s in stats[name])
            if not diff <= TOLERANCE:
                raise SystemExit(f"{t} {name}: stats differ from pycocotools by {diff:.3g} (> {TOLERANCE})")
            wall, cpu = best[name]
            table.append((t, name, wall, cpu, best["pycocotools"][0] / wall, wall / best["faster-coco-eval"][0], diff,
                          stats[name][0][0]))

    print()
    header = ("iou", "command", "wall s", "CPU s", "vs pycocotools", "/ faster-coco-eval", "max |diff|", "AP")
    widths = (5, 21, 7, 7, 14, 18, 10, 8)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for t, name, wall, cpu, speedup, ratio, diff, ap in table:
        print(f"{t:<5}  {name:<21}  {wall:7.2f}  {cpu:7.2f}  {speedup:13.2f}x  {ratio:17.2f}x  {diff:<10.3g}  {ap:.6f}")


if __name__ == "__main__":
    main()
