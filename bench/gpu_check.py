"""On a CUDA machine: stage fidelity on the GPU and GPU-vs-CPU throughput of the detection stages.

For each model: random weights (fixed seed) are saved as a checkpoint, loaded by the stage with
``device="cuda"``, and the stage's boxes/scores are compared with a direct torchvision call of the
same model on the same GPU (must be <= 1e-4). Throughput is images/s of the stage on real photos
(scikit-image's, resized to 640x480) on the GPU and on all CPU cores, measured in the same run.

    python bench/gpu_check.py                 # needs torch with CUDA; no Ray needed
"""

from __future__ import annotations

import io
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch
import torchvision
from PIL import Image

from pipeline import schema
from pipeline.data.decode import decode_batch
from pipeline.models.registry import get_entry
from pipeline.stages import STAGES

MODELS = {
    "detect": ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "ssdlite320_mobilenet_v3_large"],
    "masks": ["maskrcnn_resnet50_fpn"],
    "keypoints": ["keypointrcnn_resnet50_fpn"],
}


def photos(n: int) -> list[np.ndarray]:
    from skimage import data

    base = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    return [np.asarray(Image.fromarray(base[i % len(base)]).convert("RGB").resize((640, 480))) for i in range(n)]


def table(images: list[np.ndarray]) -> pa.Table:
    rows = []
    for i, im in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        rows.append({"image_id": i, "file_name": f"{i}.png", "width": im.shape[1], "height": im.shape[0], "image": buf.getvalue()})
    return decode_batch(schema.image_table(rows))


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.cuda.get_device_name()}")
    images = photos(16)
    batch = table(images)
    failures = 0
    rows = []
    for stage_type, names in MODELS.items():
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
                if label == "gpu":
                    torch.cuda.synchronize()
                start = time.time()
                for i in range(0, n, 4):
                    stage(batch.slice(i % 16, 4))
                if label == "gpu":
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
