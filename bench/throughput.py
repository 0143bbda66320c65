"""Throughput of ``pipeline run`` against a plain single-process loop over the same images.

Both sides run the same detector with the same weights and torch threads, over the same
synthetic shards, doing the same work per image: read the Parquet row, decode the PNG, run the
model. The loop is the baseline; the table reports each pipeline configuration as a ratio to
the loop measured in the same run (these machines are noisy, absolute numbers drift).

Peak memory is the peak summed RSS of the measured process and all its descendants (for the
pipeline: the driver plus every Ray process it started), sampled every 0.1 s.

    python bench/throughput.py                    # sizes 64 and 256
    python bench/throughput.py --sizes 32 --sizes 64 --pools 1
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
MODEL = {
    "model": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "weights": "none",
    "num_classes": 4,
    "score_threshold": 0.3,
}
LOOP = """
import sys, time, torch
from pipeline.data.shards import list_shards, iter_shard
from pipeline.data.decode import decode_image
from pipeline.stages.detect import DetectStage
dataset, threads, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = dict(MODEL_JSON)
stage = DetectStage(**model, threads=threads)
start = time.time(); n = 0; pending = []
for shard in list_shards(dataset):
    for table in iter_shard(shard, 64, columns=["image"]):
        for data in table["image"].to_pylist():
            pending.append(decode_image(data))
            if len(pending) == batch:
                stage.predict(pending); n += len(pending); pending = []
if pending:
    stage.predict(pending); n += len(pending)
print(n, time.time() - start)
"""


def tree_rss(root: int) -> int:
    """Summed RSS (bytes) of ``root`` and all its descendants, read from /proc (Linux)."""
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
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def measure(cmd: list[str]) -> tuple[float, int, str]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes of its process tree, stdout)."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return time.time() - start, peak, out


def run_loop(dataset: str, threads: int, batch: int) -> dict:
    script = LOOP.replace("dict(MODEL_JSON)", repr(MODEL))
    wall, peak, out = measure([sys.executable, "-c", script, dataset, str(threads), str(batch)])
    n, loop_s = out.split()[-2:]
    return {"images": int(n), "process_s": wall, "work_s": float(loop_s), "peak_rss": peak}


def run_pipeline(dataset: str, out: str, pool: int, threads: int, batch: int) -> dict:
    num_cpus = 1.0 if pool == 1 else 0.75  # leave CPU for read/decode tasks (2-core machine)
    sets = {**MODEL, "pool_size": pool, "num_cpus": num_cpus, "threads": threads, "batch_size": batch}
    cmd = [sys.executable, "-m", "pipeline", "run", "jobs/detect.yaml", "--input", dataset, "--output", out,
           "--overwrite", "--no-progress"]
    for key, value in sets.items():
        cmd += ["--set", f"stages.detect.{key}={json.dumps(value)}"]
    wall, peak, _ = measure(cmd)
    summary = json.loads((Path(out) / "job.json").read_text())["summary"]
    return {"images": summary["rows_out"], "process_s": wall, "work_s": summary["wall_s"], "peak_rss": peak}


@click.command()
@click.option("--sizes", multiple=True, type=int, default=(64, 256), show_default=True, help="Dataset sizes (images).")
@click.option("--pools", multiple=True, type=int, default=(1, 2), show_default=True, help="Actor pool sizes to try.")
@click.option("--threads", default=1, show_default=True, help="Torch threads, the same for loop and actors.")
@click.option("--batch", default=4, show_default=True, help="Images per model call, the same for both.")
@click.option("--json-out", default="bench-output/throughput.json", show_default=True, help="Where to save raw numbers.")
def main(sizes, pools, threads, batch, json_out) -> None:
    """Print images/s of pipeline run vs a plain loop, their ratio and peak memory."""
    from pipeline.data.synth import synth_dataset

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            dataset = f"{tmp}/shapes-{size}"
            synth_dataset(dataset, images=size, seed=11, rows_per_shard=32)
            base = run_loop(dataset, threads, batch)
            results.append({"size": size, "mode": f"plain loop ({threads} thread)", **base})
            for pool in pools:
                res = run_pipeline(dataset, f"{tmp}/out-{size}-{pool}", pool, threads, batch)
                results.append({"size": size, "mode": f"pipeline run, pool {pool}", **res})
    header = ("images", "mode", "img/s (work)", "ratio", "img/s (process)", "ratio", "peak RSS MiB")
    rows = []
    for r in results:
        base = next(b for b in results if b["size"] == r["size"] and b["mode"].startswith("plain"))
        ips_work, ips_proc = r["images"] / r["work_s"], r["images"] / r["process_s"]
        rows.append((r["size"], r["mode"], f"{ips_work:.2f}", f"{ips_work / (base['images'] / base['work_s']):.2f}",
                     f"{ips_proc:.2f}", f"{ips_proc / (base['images'] / base['process_s']):.2f}", f"{r['peak_rss'] / 2**20:.0f}"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for i, row in enumerate([header] + rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\nwork = model loop only (loop) / job wall time after Ray is up (pipeline);"
          " process = whole command incl. interpreter, imports, Ray start-up.")
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
