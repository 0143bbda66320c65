"""What ``pipeline eval`` writes and prints.

Files (in ``--out``), written by :func:`~pipeline.eval.evaluation.evaluate` only:

* ``metrics.json``: ``{iou_type: {stat: value, ..., "counts": {...}}}``, the stats of each type
  being its entry's ``stat_keys`` (:mod:`~pipeline.eval.iou_types`): the 12 COCO stats for
  bbox/segm (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl) and 10 for keypoints
  (AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl), each followed by ``"per_category": {name:
  AP}``; AR@100, AR@300, AR@1000, ARs@1000, ARm@1000, ARl@1000 for proposals. -1 wherever
  pycocotools gives -1 (no GT in that area range / category).
* ``pr_<iou_type>.png`` (types matched per image): precision/recall curves (area "all", largest
  maxDets) at IoU 0.50, 0.75 and averaged over 0.50:0.95, each averaged over the categories that
  have ground truth.
"""

from __future__ import annotations

import io
import json
import posixpath

import numpy as np

from pipeline.data.shards import resolve
from pipeline.eval.iou_types import IoUType


def write_metrics(metrics: dict, path: str) -> None:
    _write_bytes(path, (json.dumps(metrics, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def pr_curves(eval_result: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """label -> (recall points, mean precision over categories with GT); empty when none has GT."""
    p = eval_result["params"]
    precision = eval_result["precision"][:, :, :, 0, -1]  # T, R, K
    curves = {}
    for label, t_index in (("IoU=0.50", [0]), ("IoU=0.75", [5]), ("IoU=0.50:0.95", list(range(len(p.iouThrs))))):
        s = precision[t_index]  # t, R, K
        valid = (s > -1).all(axis=1)  # t, K: categories with GT
        if not valid.any():
            continue
        mean = np.array([s[:, r, :][valid].mean() for r in range(s.shape[1])])
        curves[label] = (np.asarray(p.recThrs), mean)
    return curves


def plot_pr_curves(eval_result: dict, *, iou_type: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    curves = pr_curves(eval_result)
    for label, (recall, precision) in curves.items():
        ax.plot(recall, precision, label=label)
    if not curves:
        ax.text(0.5, 0.5, "no ground truth", ha="center", va="center")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision", title=f"{iou_type}: precision / recall")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="upper right")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _write_bytes(path, buf.getvalue())


def summary_table(iou_type: IoUType, metrics: dict) -> tuple[tuple, list[tuple]]:
    """(header, rows) of one type's stats in its order: (stat, what it averages, value) where the
    type labels its stats, else (stat, value); 3 decimals, -1 kept."""
    labels = iou_type.stat_labels
    if labels is None:
        return ("metric", "value"), [(k, _fmt(metrics[k])) for k in iou_type.stat_keys]
    return ("metric", "setting", "value"), [(k, labels[k], _fmt(metrics[k])) for k in iou_type.stat_keys]


def per_category_rows(metrics: dict) -> tuple[tuple, list[tuple]]:
    """(header, rows): AP per category, one column per type that has them."""
    types = [t for t, m in metrics.items() if "per_category" in m]
    names = list(metrics[types[0]]["per_category"]) if types else []
    return ("category", *(f"AP {t}" for t in types)), [
        (name, *(_fmt(metrics[t]["per_category"][name]) for t in types)) for name in names
    ]


def _fmt(v: float) -> str:
    return "-1" if v == -1 else f"{v:.3f}"


def _write_bytes(path: str, data: bytes) -> None:
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)
