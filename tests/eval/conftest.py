"""Shared fixtures for the evaluation tests: one local Ray, the published COCO cases, a synthetic set.

The published cases are in ``tests/fixtures/coco-eval`` (sources and licences in
``tests/fixtures/README.md``).
"""

from __future__ import annotations

import json

import pytest

from pipeline.data.importers import import_coco
from pipeline.eval.synthetic_cases import synthetic_case, write_predictions


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A 160-image synthetic case: GT imported with import_coco, predictions in 4 shards.

    Returns a dict of paths: ``gt_json``, ``gt`` (dataset), ``pred`` (prediction dataset), plus
    ``coco`` (the GT dict) and ``rows`` (prediction rows).
    """
    root = tmp_path_factory.mktemp("synthetic")
    coco, rows = synthetic_case(images=160, seed=3, detections_per_image=16, categories=6, keypoints=True)
    gt_json = root / "gt.json"
    gt_json.write_text(json.dumps(coco))
    import_coco(str(root / "images"), str(gt_json), str(root / "gt"), rows_per_shard=50, allow_missing_images=True)
    write_predictions(rows, str(root / "pred"), categories=coco["categories"], rows_per_shard=40)
    return {"root": root, "gt_json": gt_json, "gt": str(root / "gt"), "pred": str(root / "pred"), "coco": coco, "rows": rows}
