"""Throughput of ``pipeline run jobs/detect.yaml`` (as shipped) against a plain single-process loop.

The dataset: ``N`` synthetic shapes images of about 320 px (``synth_image``, size 320), re-encoded
to JPEG (quality 90) into a folder, then imported with ``import-images`` (one dataset for the
pipeline; the loop reads the same JPEG files from the folder).

* **loop**: one Python process: ``import torch, torchvision``, build the same detector as
  ``jobs/detect.yaml`` (random init, ``fasterrcnn_mobilenet_v3_large_320_fpn``, 91 classes,
  score 0.5, 100 detections), then for every file: PIL decode to RGB, ``to_tensor``, batches of 4,
  ``model(batch)`` under ``inference_mode``. Torch's default threads (all cores).
* **pipeline**: ``python -m pipeline run jobs/detect.yaml --input DS --output OUT --overwrite
  --no-progress``: the job file unmodified (its pool size / threads are whatever it ships).

Both are timed as whole commands (interpreter start, imports, Ray start-up included). ``ratio`` is
loop wall / pipeline wall (> 1: the pipeline is faster); ``overhead`` is pipeline wall minus loop
wall. Peak memory is the peak summed RSS of the command's process tree (for the pipeline the
driver plus every Ray process it started), sampled every 0.2 s with psutil (or /proc if psutil is
not installed). Each size runs ``--repeats`` times, loop and pipeline alternating, and the best
wall of each is kept: these machines are shared, and other processes' load slows both sides.

    python bench/throughput.py                          # 32, 512, 2048 images
    python bench/throughput.py --sizes 32 --repeats 3
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
JOB = "jobs/detect.yaml"
LOOP = r"""
import os, sys, time
import torch, torchvision
from PIL import Image
from torchvision.transforms.functional import to_tensor
folder, batch = sys.argv[1], int(sys.argv[2])
model = torchvision.models.get_model(
    "fasterrcnn_mobilenet_v3_large_320_fpn", weights=None, weights_backbone=None, num_classes=91,
    box_score_thresh=0.5, box_detections_per_img=100,
).eval()
start = time.time(); n = 0; pending = []
files = sorted(os.listdir(folder))
with torch.inference_mode():
    for name in files:
        pending.append(to_tensor(Image.open(os.path.join(folder, name)).convert("RGB")))
        if len(pending) == batch or name == files[-1]:
            model(pending); n += len(pending); pending = []
print(n, time.time() - start, torch.get_num_threads())
"""


def _tree_pids(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in tree]
        tree.update(children)
        frontier.extend(children)
    return tree


def tree_rss(root: int) -> int:
    """Summed RSS (bytes) of ``root`` and all its descendants."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(root)
            procs = [proc] + proc.children(recursive=True)
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total
    total = 0
    for pid in _tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes of its process tree, stdout)."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})})
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.time() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, peak, out


def make_dataset(tmp: str, size: int) -> tuple[str, str]:
    """``size`` 320 px synthetic images as JPEG files, and the same files imported as a dataset."""
    from PIL import Image

    from pipeline.data.importers import import_images
    from pipeline.data.synth import synth_image

    folder = Path(tmp) / f"jpeg-{size}"
    folder.mkdir()
    for i in range(size):
        png = synth_image(7, i, 320)[0]
        Image.open(io.BytesIO(png)).convert("RGB").save(folder / f"{i:06d}.jpg", quality=90)
    dataset = f"{tmp}/ds-{size}"
    import_images(str(folder), dataset, rows_per_shard=1000)
    return str(folder), dataset


def run_loop(folder: str, batch: int) -> dict:
    wall, peak, out = measure([sys.executable, "-c", LOOP, folder, str(batch)])
    n, work, threads = out.split()[-3:]
    return {"images": int(n), "wall_s": wall, "work_s": float(work), "peak_rss": peak, "threads": int(threads)}


def run_pipeline(dataset: str, out: str) -> dict:
    cmd = [sys.executable, "-m", "pipeline", "run", JOB, "--input", dataset, "--output", out, "--overwrite", "--no-progress"]
    wall, peak, _ = measure(cmd, env={"RAY_USAGE_STATS_ENABLED": "0"})
    summary = json.loads((Path(out) / "job.json").read_text())["summary"]
    return {"images": summary["rows_out"], "wall_s": wall, "work_s": summary["wall_s"], "peak_rss": peak}


def table(results: list[dict]) -> str:
    header = ("images", "loop wall s", "pipeline wall s", "ratio loop/pipeline", "overhead s", "loop img/s",
              "pipeline img/s", "peak RSS loop MiB", "peak RSS pipeline MiB", "RSS diff MiB")
    rows = []
    for r in results:
        loop, pipe = r["loop"], r["pipeline"]
        rows.append((
            r["size"], f"{loop['wall_s']:.1f}", f"{pipe['wall_s']:.1f}", f"{loop['wall_s'] / pipe['wall_s']:.2f}",
            f"{pipe['wall_s'] - loop['wall_s']:+.1f}" if r["size"] <= 32 else "",
            f"{r['size'] / loop['wall_s']:.2f}", f"{r['size'] / pipe['wall_s']:.2f}",
            f"{loop['peak_rss'] / 2**20:.0f}", f"{pipe['peak_rss'] / 2**20:.0f}",
            f"{(pipe['peak_rss'] - loop['peak_rss']) / 2**20:+.0f}",
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = [" | ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [header] + rows]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


@click.command()
@click.option("--sizes", multiple=True, type=int, default=(32, 512, 2048), show_default=True, help="Dataset sizes (images).")
@click.option("--repeats", default=2, show_default=True, help="Runs of each side per size; the best wall is kept.")
@click.option("--repeat-up-to", default=512, show_default=True, help="Larger sizes run once (a 2,048-image loop takes minutes).")
@click.option("--batch", default=4, show_default=True, help="Images per model call in the loop (the job's is its own).")
@click.option("--json-out", default="bench-output/throughput.json", show_default=True, help="Where to save raw numbers.")
def main(sizes, repeats, repeat_up_to, batch, json_out) -> None:
    """Print loop vs `pipeline run` wall time, their ratio, the fixed overhead and peak memory."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            folder, dataset = make_dataset(tmp, size)
            loops, pipes = [], []
            for i in range(repeats if size <= repeat_up_to else 1):
                loops.append(run_loop(folder, batch))
                pipes.append(run_pipeline(dataset, f"{tmp}/out-{size}"))
                print(f"{size} images, run {i + 1}: loop {loops[-1]['wall_s']:.1f} s, pipeline {pipes[-1]['wall_s']:.1f} s "
                      f"(ratio {loops[-1]['wall_s'] / pipes[-1]['wall_s']:.2f})", file=sys.stderr, flush=True)
            best = lambda runs: min(runs, key=lambda r: r["wall_s"])  # noqa: E731
            results.append({"size": size, "loop": best(loops), "pipeline": best(pipes), "runs": {"loop": loops, "pipeline": pipes},
                            "peak_rss_max": {"loop": max(r["peak_rss"] for r in loops), "pipeline": max(r["peak_rss"] for r in pipes)}})
            print(table(results), file=sys.stderr, flush=True)  # so far (a long run can be read before it ends)
    print(table(results))
    print(f"\nbest of {repeats} per side (sizes up to {repeat_up_to}; larger: one run); ratio = loop wall / pipeline wall (whole commands); overhead (32 images) ="
          " pipeline wall - loop wall; RSS = peak summed RSS of each command's process tree.")
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
