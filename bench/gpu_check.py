"""On one CUDA GPU: ``pipeline run`` (the real CLI, embedded Ray) against a bare torch loop, detect and masks.

What it measures, on ``--images`` (default 2000) COCO-sized JPEGs:

* **data**: synthetic shapes (:func:`pipeline.data.synth.synth_image` at ``--size`` px, 64 distinct
  bases) resized to ``4/3 * size x size`` (640x480 by default), each shifted/mirrored so that no two
  files are alike, written with PIL at quality 90 into a folder, then imported with
  ``pipeline data import-images`` (8 shards). Both sides read the same files.
* **pipeline**: ``python -m pipeline run jobs/detect.yaml`` (and ``jobs/maskrcnn.yaml``) as a
  subprocess on embedded Ray, the job files as shipped plus ``--set`` overrides: the model
  (``--detect-model``, ``--masks-model``; random init, weights ``none``, 91 classes), the input size
  (``model_kwargs.min_size/max_size``, the same for both models), ``batch_size``, and on a GPU
  ``num_gpus=1``, ``device=cuda``. The pipeline decodes in Ray CPU tasks beside the GPU actor, as
  always. Its images/s is the job's own ``wall_s`` (job.json: Ray already up; the actors' start,
  imports and model build included).
* **loop**: a bare torch loop in its own process doing the same work: a ``DataLoader`` whose
  workers read and decode each file with the pipeline's own decode
  (:func:`pipeline.data.decode.decode_image`: PIL, EXIF, RGB), the same model built by the same
  call (:func:`pipeline.models.registry.build_model`, seeded random init: identical weights), the
  same tensor conversion and batch size, and the stage's post-processing: tensors to numpy, and
  for masks :func:`pipeline.stages.masks.masks_unpasted` +
  :func:`pipeline.stages.masks.encode_in_boxes` (the RLE encoder the masks stage calls). Its
  images/s counts from before ``import torch`` to the last output. The loop's settings are read
  from the resolved job spec (``load_job`` with the same overrides), so they cannot drift apart.
  ``same output``: for the first 8 images, how many have the pipeline's boxes (within 0.01 px) and
  RLE strings exactly.
* **loop (nvjpeg)**, ``--gpu-decode detect`` (default on a GPU, not with ``--quick``): the loop
  with ``torchvision.io.decode_jpeg(device="cuda")`` on a batch of file bytes instead of PIL in
  workers (nvjpeg's pixels differ slightly from libjpeg's and EXIF is not applied, so its
  ``same output`` may be < 8).
* **GPU utilisation**: ``nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used
  --format=csv,noheader,nounits -lms 500`` runs in the background for the whole script; each run
  reports mean and p90 utilisation (and peak memory) over the window its images/s is measured on
  (so start-up inside that window counts as idle GPU on both sides).

Table columns: ``pipeline/loop`` = pipeline img/s / loop img/s (target >= 0.9); ``masks/detect`` =
masks img/s / detect img/s, loop and pipeline (target >= 0.5; the same backbone and input size on
both sides, so the ratio is the cost of the mask head and the masks' RLE); ``cmd s`` = whole
command wall (interpreter, imports, Ray start-up). The table, the date, ``nvidia-smi -L`` and the
phase times are appended to ``--results`` (bench-output/gpu_check.md) to paste into bench/README.md.

Random weights score boxes broadly (not ~1/91 each: on two 640x480 images, the 90th percentile of
the top 1000 scores was 0.38-0.50), so at the jobs' ``score_threshold`` 0.5 an image keeps tens of
boxes up to ``max_detections`` (100), and the masks side encodes that many RLEs per image: a busy
case. ``dets/img`` says how many there were.

How the pipeline could use nvjpeg (not done here; pipeline code unchanged): a decode option that
leaves JPEG bytes undecoded (checking only the header's size) and lets the GPU stage's
``to_tensors`` call ``decode_jpeg(list_of_bytes, device="cuda")``; PNG/CMYK/greyscale rows and EXIF
rotation would go through the CPU decode as now. It saves the CPU decode and moves several times
fewer bytes through Ray's object store (a JPEG instead of raw RGB: ~60 KB instead of 900 KB for
these 640x480 files), at the price of pixels that differ slightly from PIL's.

Needs: the project's pinned dependencies (``pip install -e .``: torch with CUDA, torchvision, ray,
pyarrow, pycocotools, Pillow), ``nvidia-smi`` on PATH for the utilisation columns (optional), and
a CUDA device (refused without one unless ``--device cpu``). Run from anywhere; it runs the
pipeline from this repository (PYTHONPATH is set for its subprocesses).

    python bench/gpu_check.py                      # 2000 images, detect + masks (+ nvjpeg loop): ~4-6 min on an H200 (estimated)
    python bench/gpu_check.py --quick              # 500 images, no nvjpeg loop: ~2-3 min (estimated)
    python bench/gpu_check.py --results "$OUT/gpu_check.md"   # a lent device machine: the results file comes back
    python bench/gpu_check.py --device cpu --images 8 --quick --size 96 --min-size 96 --max-size 128 \\
        --detect-model fasterrcnn_mobilenet_v3_large_320_fpn --masks-model small_maskrcnn \\
        --masks-weights conf/models/small_maskrcnn_shapes.pth       # CPU smoke test (numbers mean nothing)
    python bench/gpu_check.py --fidelity           # older check: stage vs direct torchvision on the GPU, GPU vs CPU img/s
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

JOBS = {"detect": ("jobs/detect.yaml", "detect"), "masks": ("jobs/maskrcnn.yaml", "masks")}  # task -> (job file, stage name)
SAMPLE = 8  # images whose outputs are compared between loop and pipeline
LEGEND = (
    "img/s: loop from before `import torch` to its last output; pipeline: job.json wall_s (Ray up; actor start, imports "
    "and model build included). GPU util: nvidia-smi every 0.5 s over those same windows. dets/img: the loop's. "
    f"same output: of the first {SAMPLE} images, those with the pipeline's boxes (0.01 px) and RLEs exactly"
)
NEEDS = (
    "needs: the project's pinned dependencies (pip install -e . in this repository: torch with CUDA, torchvision, "
    "ray[data], pyarrow, pycocotools, Pillow), nvidia-smi on PATH for GPU utilisation (optional), and one CUDA GPU "
    "(or --device cpu for a smoke run)"
)


# --------------------------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="pipeline run vs a bare torch loop on one GPU (detect and masks); see the module docstring.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: smoke test only (numbers mean nothing)")
    p.add_argument("--images", type=int, default=None, help="JPEGs to generate (default 2000; 500 with --quick)")
    p.add_argument("--quick", action="store_true", help="fewer images by default, no nvjpeg loop")
    p.add_argument("--size", type=int, default=480, help="image height; width is 4/3 of it (480: 640x480)")
    p.add_argument("--tasks", default="detect,masks", help="comma list of detect, masks")
    p.add_argument("--detect-model", default="fasterrcnn_resnet50_fpn")
    p.add_argument("--detect-weights", default="none", help="none (seeded random init) or a .pth path")
    p.add_argument("--masks-model", default="maskrcnn_resnet50_fpn")
    p.add_argument("--masks-weights", default="none", help="none (seeded random init) or a .pth path")
    p.add_argument("--num-classes", type=int, default=91, help="with weights none (a checkpoint brings its own)")
    p.add_argument("--score-threshold", type=float, default=None, help="default: the job files' (0.5)")
    p.add_argument("--max-detections", type=int, default=None, help="default: the job files' (100)")
    p.add_argument("--min-size", type=int, default=800, help="model_kwargs.min_size, both models (torchvision's default)")
    p.add_argument("--max-size", type=int, default=1333, help="model_kwargs.max_size, both models")
    p.add_argument("--batch-size", type=int, default=4, help="images per model call, both jobs and the loop")
    p.add_argument("--gpu-decode", default=None, help="tasks that also run the loop with decode_jpeg(device=cuda) "
                   "(default: detect on a GPU, none with --quick or --device cpu; 'none' for none)")
    p.add_argument("--loop-workers", type=int, default=None, help="DataLoader decode workers (default: min(8, CPUs - 2), at least 1)")
    p.add_argument("--pipeline-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set for both jobs; {stage} is replaced by the stage name, e.g. stages.{stage}.pool_size=2")
    p.add_argument("--run-timeout", type=int, default=300, help="seconds before one loop or pipeline run is killed")
    p.add_argument("--results", default="bench-output/gpu_check.md", help="markdown file the table is appended to")
    p.add_argument("--workdir", default=None, help="where images, datasets and outputs go (default: a temporary folder, removed)")
    p.add_argument("--fidelity", action="store_true", help="run the older check instead: stage vs direct torchvision on the GPU")
    p.add_argument("--run-loop", default=None, help=argparse.SUPPRESS)  # internal: the loop's own process
    args = p.parse_args(argv)
    if args.images is None:
        args.images = 500 if args.quick else 2000
    if args.images < 1:
        p.error("--images must be at least 1")
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in JOBS]
    if unknown or not args.tasks:
        p.error(f"--tasks: unknown {unknown} (choose from {', '.join(JOBS)})")
    if args.gpu_decode is None:
        args.gpu_decode = "" if (args.quick or args.device == "cpu") else "detect"
    args.gpu_decode = [t.strip() for t in args.gpu_decode.split(",") if t.strip() and t.strip() != "none"]
    if args.device == "cpu" and args.gpu_decode:
        p.error("--gpu-decode needs --device cuda")
    if args.loop_workers is None:
        args.loop_workers = max(1, min(8, (os.cpu_count() or 2) - 2))
    return args


# --------------------------------------------------------------------------------------------- the loop


class _Files:
    """DataLoader dataset: (file name, decoded RGB as an (H, W, 3) uint8 tensor) or (name, the file's bytes)."""

    def __init__(self, paths: list[str], raw: bool):
        self.paths, self.raw = paths, raw

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        path = self.paths[i]
        if self.raw:
            import torchvision

            return os.path.basename(path), torchvision.io.read_file(path)
        from pipeline.data.decode import decode_image

        with open(path, "rb") as f:
            rgb = decode_image(f.read())
        return os.path.basename(path), torch.from_numpy(rgb.copy())  # PIL's array is read-only; the stage copies too


def _collate(items):
    return [name for name, _ in items], [x for _, x in items]


def loop_main(config_path: str) -> int:
    """The bare loop, in its own process; writes its numbers and first outputs to cfg["out"] (JSON)."""
    t_start = time.time()  # before torch is imported, as a pipeline actor's start includes its imports
    cfg = json.loads(Path(config_path).read_text())
    import torch
    import torchvision
    from torch.utils.data import DataLoader

    from pipeline.models.registry import build_model
    from pipeline.models.weights import resolve_weights
    from pipeline.stages.masks import MASK_PROBS, encode_in_boxes, masks_unpasted

    device = torch.device(cfg["device"])
    gpu_decode = cfg["decode"] == "nvjpeg"
    # torchvision 0.29 deprecates torchvision.io's decoders (for TorchCodec); decode_jpeg still works.
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated")
    paths = sorted(str(p) for p in Path(cfg["folder"]).glob("*.jpg"))
    workers = cfg["workers"]
    loader = DataLoader(
        _Files(paths, raw=gpu_decode),
        batch_size=cfg["batch_size"],
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda" and not gpu_decode,
        prefetch_factor=4 if workers else None,
        multiprocessing_context="fork" if workers else None,
    )
    batches = iter(loader)  # workers start decoding while the model is built
    s = cfg["stage"]
    model, _ = build_model(
        s["model"], resolve_weights(s["model"], s["weights"]), num_classes=s["num_classes"],
        score_threshold=s["score_threshold"], max_detections=s["max_detections"], extra=s["model_kwargs"],
    )
    model.to(device)
    t_model = time.time()
    masks = cfg["task"] == "masks"
    images = dets = 0
    samples: dict[str, dict] = {}
    with torch.inference_mode():
        for names, items in batches:
            if gpu_decode:
                decoded = torchvision.io.decode_jpeg(items, mode=torchvision.io.ImageReadMode.RGB, device=device)
                tensors = [d.float().div(255) for d in decoded]
                sizes = [tuple(d.shape[1:]) for d in decoded]
            else:  # as DetectStage.to_tensors
                tensors = [t.to(device, non_blocking=True).permute(2, 0, 1).float().div(255) for t in items]
                sizes = [tuple(t.shape[:2]) for t in items]
            if masks:
                with masks_unpasted(model):
                    outputs = model(tensors)
                results = []
                for output, size in zip(outputs, sizes):  # as MasksStage.predict
                    probs = output.pop(MASK_PROBS)
                    out = {k: v.detach().cpu().numpy() for k, v in output.items()}
                    out["masks"] = encode_in_boxes(probs, output["boxes"], size, s["mask_threshold"])
                    results.append(out)
            else:  # as DetectStage.predict
                results = [{k: v.detach().cpu().numpy() for k, v in output.items()} for output in model(tensors)]
            for name, out in zip(names, results):
                images += 1
                dets += len(out["boxes"])
                if len(samples) < SAMPLE:
                    samples[name] = {"boxes": out["boxes"].tolist(), **({"masks": [m["counts"] for m in out["masks"]]} if masks else {})}
    t_end = time.time()
    Path(cfg["out"]).write_text(json.dumps({
        "images": images, "dets": dets, "t_start": t_start, "t_model": t_model, "t_end": t_end,
        "work_s": t_end - t_start, "samples": samples, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "workers": workers,
    }))
    return 0


# --------------------------------------------------------------------------------------------- helpers


class GpuSampler:
    """``nvidia-smi ... -lms 500`` in the background; per-window utilisation mean/p90 and peak memory."""

    def __init__(self, log: Path):
        self.log, self.proc, self.available = log, None, shutil.which("nvidia-smi") is not None
        if not self.available:
            return
        index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        cmd = ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used", "--format=csv,noheader,nounits",
               "-lms", "500", "-i", index]
        self.file = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.file, stderr=subprocess.DEVNULL)

    def window(self, start: float, end: float) -> dict | None:
        if not self.available:
            return None
        self.file.flush()
        return utilisation(self.log.read_text(), start, end)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.file.close()


def utilisation(csv: str, start: float, end: float) -> dict | None:
    """Mean and p90 of ``utilization.gpu`` and max ``memory.used`` of the nvidia-smi lines stamped in [start, end].

    Lines are ``timestamp, utilization.gpu, memory.used`` (``--format=csv,noheader,nounits``), the
    timestamp in nvidia-smi's local-time format ``2026/12/01 04:50:12.345``; others are skipped.
    """
    util, mem = [], []
    for line in csv.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            t = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            u, m = float(parts[1]), float(parts[2])
        except ValueError:
            continue
        if start <= t <= end:
            util.append(u)
            mem.append(m)
    if not util:
        return None
    util.sort()
    return {"mean": sum(util) / len(util), "p90": util[max(0, math.ceil(0.9 * len(util)) - 1)],
            "mem_max_mib": max(mem), "samples": len(util)}


class Clock:
    def __init__(self):
        self.t0 = time.time()
        self.phases: list[tuple[str, float]] = []

    def phase(self, name: str, seconds: float) -> None:
        self.phases.append((name, seconds))
        print(f"[{time.time() - self.t0:6.1f} s] {name}: {seconds:.1f} s", flush=True)


def _env() -> dict:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""), "RAY_USAGE_STATS_ENABLED": "0"}


def _run(cmd: list[str], log: Path, timeout: int) -> float:
    """Run ``cmd`` from the repository root, output to ``log``; return its wall seconds, raise with the log's tail."""
    start = time.time()
    with open(log, "w") as out:
        # Its own process group: on a timeout the command and everything it started (Ray's processes) are stopped.
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # `pipeline run` shuts Ray down on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = f"stopped after {timeout} s (--run-timeout)"
    if rc != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{' '.join(cmd)}\nexit {rc}; last output ({log}):\n{tail}")
    return time.time() - start


BASES = 64  # distinct synthetic images; every file is one of them shifted (and every other round mirrored)


def _make_images(job: tuple[str, int, int, int]) -> int:
    """Write every image ``base, base + BASES, ...`` below ``count`` into ``folder`` (one worker of the data phase)."""
    import numpy as np
    from PIL import Image

    from pipeline.data.synth import synth_image

    folder, base, count, height = job
    width = height * 4 // 3
    png = synth_image(20261201, base, height)[0]
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB").resize((width, height), Image.BILINEAR))
    for i in range(base, count, BASES):
        shifted = np.roll(pixels, (i * 37) % width, axis=1)
        if (i // BASES) % 2:
            shifted = shifted[:, ::-1]
        Image.fromarray(np.ascontiguousarray(shifted)).save(os.path.join(folder, f"{i:06d}.jpg"), format="JPEG", quality=90)
    return len(range(base, count, BASES))


def write_jpegs(folder: Path, images: int, height: int) -> None:
    from multiprocessing import get_context

    jobs = [(str(folder), b, images, height) for b in range(min(BASES, images))]
    procs = max(1, min(os.cpu_count() or 1, 16, len(jobs)))
    if procs == 1:
        for j in jobs:
            _make_images(j)
    else:
        with get_context("fork").Pool(procs) as pool:
            pool.map(_make_images, jobs)


def make_data(work: Path, images: int, height: int, timeout: int) -> tuple[Path, Path]:
    """``images`` JPEG files, and the same files imported as a dataset of 8 shards."""
    folder, dataset = work / "jpeg", work / "dataset"
    folder.mkdir()
    write_jpegs(folder, images, height)
    rows = max(1, math.ceil(images / 8))
    _run([sys.executable, "-m", "pipeline", "data", "import-images", str(folder), str(dataset), "--rows-per-shard", str(rows)],
         work / "import.log", timeout)
    return folder, dataset


def _weights_path(weights: str) -> str:
    """``none``, or the checkpoint as an absolute path (relative: to the current folder, else to the repository)."""
    if weights.lower() == "none":
        return weights
    path = Path(weights)
    if not path.is_absolute() and not path.exists() and (REPO / path).exists():
        path = REPO / path
    return str(path.resolve())


def overrides(args: argparse.Namespace, task: str) -> list[str]:
    stage = JOBS[task][1]
    model = args.detect_model if task == "detect" else args.masks_model
    weights = args.detect_weights if task == "detect" else args.masks_weights
    weights = _weights_path(weights)
    sets = {
        "model": model,
        "weights": weights,
        "batch_size": args.batch_size,
        "num_gpus": 1 if args.device == "cuda" else 0,
        "device": args.device,
        "model_kwargs.min_size": args.min_size,
        "model_kwargs.max_size": args.max_size,
    }
    if weights.lower() == "none":
        sets["num_classes"] = args.num_classes
    if args.score_threshold is not None:
        sets["score_threshold"] = args.score_threshold
    if args.max_detections is not None:
        sets["max_detections"] = args.max_detections
    return [f"stages.{stage}.{k}={v}" for k, v in sets.items()] + [s.replace("{stage}", stage) for s in args.pipeline_set]


def run_loop(args, task: str, stage: dict, folder: Path, work: Path, decode: str) -> dict:
    name = f"{task}-loop-{decode}"
    cfg = {"task": task, "stage": stage, "folder": str(folder), "device": args.device, "decode": decode,
           "batch_size": args.batch_size, "workers": args.loop_workers, "out": str(work / f"{name}.json")}
    (work / f"{name}-config.json").write_text(json.dumps(cfg))
    wall = _run([sys.executable, str(Path(__file__).resolve()), "--run-loop", str(work / f"{name}-config.json")],
                work / f"{name}.log", args.run_timeout)
    result = json.loads((work / f"{name}.json").read_text())
    result["cmd_s"] = wall
    result["window"] = (result["t_start"], result["t_end"])  # the window of its img/s
    return result


def run_pipeline(args, task: str, sets: list[str], dataset: Path, work: Path) -> dict:
    out = work / f"{task}-pipeline-out"
    cmd = [sys.executable, "-m", "pipeline", "run", JOBS[task][0], "--input", str(dataset), "--output", str(out),
           "--overwrite", "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    wall = _run(cmd, work / f"{task}-pipeline.log", args.run_timeout)
    record = json.loads((out / "job.json").read_text())
    summary = record["summary"]
    started = dt.datetime.fromisoformat(record["started"]).timestamp()
    import pyarrow.parquet as pq

    table = pq.read_table([str(p) for p in sorted(out.glob("part-*.parquet"))])
    return {"images": summary["rows_out"], "errors": summary["error_rows"], "work_s": summary["wall_s"], "cmd_s": wall,
            "actors": summary.get("actors", ""), "window": (started, started + record.get("elapsed_s", summary["wall_s"]) + 1.0),
            "table": table}


def compare(samples: dict[str, dict], table) -> tuple[int, int, float]:
    """(images whose outputs agree, images compared, max |box difference|) between the loop and the pipeline."""
    import numpy as np

    names = table.column("file_name").to_pylist()
    masks = "masks" in table.column_names
    same, worst = 0, 0.0
    for name, loop in samples.items():
        row = names.index(name)
        boxes = np.asarray(table.column("boxes")[row].as_py() or [], np.float64).reshape(-1, 4)
        mine = np.asarray(loop["boxes"], np.float64).reshape(-1, 4)
        if boxes.shape != mine.shape:
            worst = math.inf
            continue
        diff = float(np.abs(boxes - mine).max()) if len(boxes) else 0.0
        worst = max(worst, diff)
        ok = diff <= 0.01
        if masks:
            ok = ok and [m["counts"] for m in table.column("masks")[row].as_py() or []] == loop["masks"]
        same += ok
    return same, len(samples), worst


def _util(u: dict | None) -> str:
    return "n/a" if u is None else f"{u['mean']:.0f} / {u['p90']:.0f}"


def table_text(rows: list[dict]) -> str:
    header = ("name", "model", "images", "dets/img", "loop img/s", "pipeline img/s", "pipeline/loop",
              "GPU util % loop mean/p90", "GPU util % pipeline mean/p90", "GPU MiB pipeline max",
              "masks/detect loop, pipeline", "same output", "cmd s loop, pipeline")
    lines = []
    for r in rows:
        lines.append((
            r["name"], r["model"], str(r["images"]), f"{r['dets_per_img']:.1f}", f"{r['loop_ips']:.2f}", f"{r['pipe_ips']:.2f}",
            f"{r['pipe_ips'] / r['loop_ips']:.2f}", _util(r["loop_util"]), _util(r["pipe_util"]),
            "n/a" if r["pipe_util"] is None else f"{r['pipe_util']['mem_max_mib']:.0f}",
            r.get("masks_detect", ""), f"{r['same'][0]}/{r['same'][1]}", f"{r['loop_cmd_s']:.0f}, {r['pipe_cmd_s']:.0f}",
        ))
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    out = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [header] + lines]
    out.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(out)


def verdicts(rows: list[dict], device: str) -> list[str]:
    notes = []
    for r in rows:
        ratio = r["pipe_ips"] / r["loop_ips"]
        if "nvjpeg" in r["name"]:
            notes.append(f"{r['name']}: pipeline/loop {ratio:.2f} (for information: the pipeline decodes with PIL on CPU)")
        else:
            notes.append(f"{r['name']}: pipeline/loop {ratio:.2f} ({'meets' if ratio >= 0.9 else 'misses'} >= 0.9)")
    md = [r for r in rows if r.get("masks_detect_pipe") is not None]
    for r in md:
        v = r["masks_detect_pipe"]
        notes.append(f"masks/detect (pipeline) {v:.2f} ({'meets' if v >= 0.5 else 'misses'} >= 0.5)")
    if device == "cpu":
        notes.insert(0, "CPU smoke run: the numbers are not meaningful (no GPU)")
    return notes


def nvidia_smi_l() -> str:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip() or "(no output)"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi -L failed: {exc}"


# --------------------------------------------------------------------------------------------- main


def check_environment(args) -> str | None:
    """None if the script can run; else why not (printed with NEEDS)."""
    missing = []
    for module in ("torch", "torchvision", "ray", "pyarrow", "pycocotools", "PIL", "pydantic", "yaml", "click"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        return f"missing Python packages: {', '.join(missing)} (python: {sys.executable})"
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return (f"no CUDA device visible to torch {torch.__version__} (built for CUDA {torch.version.cuda or 'none: a CPU-only build'}). "
                "This check needs one NVIDIA GPU; for a smoke run of the script itself pass --device cpu "
                "(e.g. --device cpu --images 8 --quick --size 96).")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_loop:
        return loop_main(args.run_loop)
    problem = check_environment(args)
    if problem:
        print(f"gpu_check: refused: {problem}\n{NEEDS}", file=sys.stderr)
        return 2
    if args.fidelity:
        return fidelity_main()
    import torch
    import torchvision

    from pipeline.engine.jobfile import load_job

    clock = Clock()
    print(f"gpu_check: {args.images} images {args.size * 4 // 3}x{args.size}, tasks {', '.join(args.tasks)}, device {args.device}, "
          f"batch {args.batch_size}, min/max size {args.min_size}/{args.max_size}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}", flush=True)
    print(nvidia_smi_l(), flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    sampler = GpuSampler(work / "nvidia-smi.csv")
    rows: list[dict] = []
    failures: list[str] = []
    try:
        start = time.time()
        folder, dataset = make_data(work, args.images, args.size, args.run_timeout)
        clock.phase(f"data: {args.images} JPEGs (q90) + pipeline data import-images", time.time() - start)
        by_task: dict[str, dict] = {}
        for task in args.tasks:
            try:
                row, pipe, stage = run_task(args, task, folder, dataset, work, sampler, clock, load_job)
            except RuntimeError as exc:  # one task's failure still leaves the other's numbers
                failures.append(f"{task} FAILED: {exc}")
                print(f"gpu_check: {failures[-1]}", file=sys.stderr, flush=True)
                continue
            by_task[task] = row
            rows.append(row)
            if task in args.gpu_decode:
                try:
                    nv = run_loop(args, task, stage, folder, work, "nvjpeg")
                except RuntimeError as exc:
                    failures.append(f"{task} loop with nvjpeg FAILED: {exc}")
                    print(f"gpu_check: {failures[-1]}", file=sys.stderr, flush=True)
                else:
                    clock.phase(f"{task} loop, nvjpeg decode ({nv['images']} images, work {nv['work_s']:.1f} s)", nv["cmd_s"])
                    rows.append({**row, "name": f"{task} (loop nvjpeg)", "dets_per_img": nv["dets"] / nv["images"],
                                 "loop_ips": nv["images"] / nv["work_s"], "loop_util": sampler.window(*nv["window"]),
                                 "same": compare(nv["samples"], pipe["table"]), "loop_cmd_s": nv["cmd_s"]})
            print(table_text(rows), flush=True)
        if "detect" in by_task and "masks" in by_task:
            d, m = by_task["detect"], by_task["masks"]
            m["masks_detect"] = f"{m['loop_ips'] / d['loop_ips']:.2f}, {m['pipe_ips'] / d['pipe_ips']:.2f}"
            m["masks_detect_pipe"] = m["pipe_ips"] / d["pipe_ips"]
    finally:
        sampler.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = table_text(rows)
    notes = verdicts(rows, args.device) + [f.splitlines()[0] for f in failures] + [LEGEND]
    total = time.time() - clock.t0
    print()
    print(text)
    for n in notes:
        print(n)
    print(f"total {total:.1f} s")
    write_results(args, argv, text, notes, clock, total)
    return 1 if failures else 0


def run_task(args, task: str, folder: Path, dataset: Path, work: Path, sampler: GpuSampler, clock: Clock, load_job):
    """Loop, then pipeline, for one task; returns (table row, pipeline result, the loop's stage settings)."""
    sets = overrides(args, task)
    job = load_job(REPO / JOBS[task][0], overrides=sets, input=str(dataset), output=str(work / "unused"))
    stage = {k: v for k, v in job.stages[0].stage_kwargs([]).items() if k in (
        "model", "weights", "num_classes", "score_threshold", "max_detections", "model_kwargs", "mask_threshold")}
    stage.setdefault("mask_threshold", 0.5)
    loop = run_loop(args, task, stage, folder, work, "cpu")
    clock.phase(f"{task} loop ({loop['images']} images, work {loop['work_s']:.1f} s)", loop["cmd_s"])
    pipe = run_pipeline(args, task, sets, dataset, work)
    clock.phase(f"{task} pipeline ({pipe['images']} images, work {pipe['work_s']:.1f} s; {pipe['actors']})", pipe["cmd_s"])
    if pipe["images"] != args.images or pipe["errors"]:
        raise RuntimeError(f"{task} pipeline wrote {pipe['images']} rows, {pipe['errors']} error rows (expected {args.images}, 0)")
    row = {"name": task, "model": stage["model"], "images": args.images, "dets_per_img": loop["dets"] / loop["images"],
           "loop_ips": loop["images"] / loop["work_s"], "pipe_ips": pipe["images"] / pipe["work_s"],
           "loop_util": sampler.window(*loop["window"]), "pipe_util": sampler.window(*pipe["window"]),
           "same": compare(loop["samples"], pipe["table"]), "loop_cmd_s": loop["cmd_s"], "pipe_cmd_s": pipe["cmd_s"]}
    return row, pipe, stage


def write_results(args, argv, text: str, notes: list[str], clock: Clock, total: float) -> None:
    import ray
    import torch
    import torchvision

    path = Path(args.results)
    if not path.is_absolute():
        path = REPO / path
    path.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    phases = "; ".join(f"{name}: {s:.1f} s" for name, s in clock.phases)
    section = [
        f"## gpu_check {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC ({args.device})",
        "",
        f"`{command}`",
        "",
        f"{os.cpu_count()} CPUs; torch {torch.__version__}, torchvision {torchvision.__version__}, ray {ray.__version__}; "
        f"{args.images} JPEGs {args.size * 4 // 3}x{args.size} q90; batch {args.batch_size}; min/max size {args.min_size}/{args.max_size}",
        "",
        "```",
        nvidia_smi_l(),
        "```",
        "",
        "```",
        text,
        "```",
        "",
        *[f"* {n}" for n in notes],
        f"* phases: {phases}; total {total:.1f} s",
        "",
    ]
    with open(path, "a") as f:
        f.write("\n".join(section) + "\n")
    print(f"appended to {path}")


# --------------------------------------------------------------------------------------------- --fidelity (older check)


def fidelity_main() -> int:
    """Stage vs a direct torchvision call on the GPU (max |diff| <= 1e-4), and GPU vs CPU images/s of each stage.

    Random weights (fixed seed) are saved as a checkpoint and loaded by the stage; 16 synthetic
    640x480 images, batch 4, score threshold 0.05, 100 detections.
    """
    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    from pipeline import schema
    from pipeline.data.decode import decode_batch
    from pipeline.models.registry import get_entry
    from pipeline.stages import STAGES

    if not torch.cuda.is_available():
        print("--fidelity needs a CUDA device", file=sys.stderr)
        return 2
    models = {"detect": ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn",
                         "ssdlite320_mobilenet_v3_large"], "masks": ["maskrcnn_resnet50_fpn"], "keypoints": ["keypointrcnn_resnet50_fpn"]}
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), 16, 480)
        files = sorted(Path(tmp).glob("*.jpg"))
        images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        batch = decode_batch(schema.image_table([{"image_id": i, "file_name": f.name, "width": 640, "height": 480, "image": f.read_bytes()}
                                                 for i, f in enumerate(files)]))
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.cuda.get_device_name()}")
    failures, rows = 0, []
    for stage_type, names in models.items():
        if stage_type not in STAGES:
            continue
        stage_cls = STAGES[stage_type].stage_class()
        for name in names:
            torch.manual_seed(0)
            entry = get_entry(name)
            settings = {entry.score_kwarg: 0.05, entry.max_dets_kwarg: 100}
            reference = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3, **settings).eval()
            with tempfile.NamedTemporaryFile(suffix=".pth") as f:
                torch.save(reference.state_dict(), f.name)
                gpu = stage_cls(model=name, weights=f.name, num_classes=3, score_threshold=0.05, max_detections=100, device="cuda")
                cpu = stage_cls(model=name, weights=f.name, num_classes=3, score_threshold=0.05, max_detections=100, device="cpu",
                                threads=torch.get_num_threads())
            reference = reference.cuda()
            out = gpu(batch.slice(0, 4)).to_pylist()
            with torch.inference_mode():
                expected = reference([torch.from_numpy(im.copy()).cuda().permute(2, 0, 1).float() / 255 for im in images[:4]])
            diff = 0.0
            for row, exp in zip(out, expected):
                boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)
                if boxes.shape != tuple(exp["boxes"].shape):
                    diff = float("inf")
                    break
                if len(boxes):
                    diff = max(diff, float(np.abs(boxes - exp["boxes"].cpu().numpy()).max()),
                               float(np.abs(np.asarray(row["scores"]) - exp["scores"].cpu().numpy()).max()))
            failures += diff > 1e-4
            speeds = {}
            for label, stage in (("gpu", gpu), ("cpu", cpu)):
                stage(batch.slice(0, 4))  # warm-up
                n = 16 if label == "gpu" else 4
                torch.cuda.synchronize()
                start = time.time()
                for i in range(0, n, 4):
                    stage(batch.slice(i % 16, 4))
                torch.cuda.synchronize()
                speeds[label] = n / (time.time() - start)
            rows.append((stage_type, name, f"{diff:.2e}", f"{speeds['gpu']:.1f}", f"{speeds['cpu']:.2f}", f"{speeds['gpu'] / speeds['cpu']:.1f}x"))
    header = ("stage", "model", "max |stage - direct| (gpu)", "gpu img/s", f"cpu img/s ({torch.get_num_threads()} thr)", "gpu/cpu")
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for i, r in enumerate([header] + rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("batch 4 at 640x480, random weights (fixed seed), score threshold 0.05, max 100 detections")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
