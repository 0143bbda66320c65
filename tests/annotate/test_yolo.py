"""export-yolo, read back by supervision's YOLO loader (a real third-party reader, not our parser)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from pycocotools import mask as mask_utils

from pipeline.annotate import AnnotationError
from pipeline.annotate.select import SelectOptions, Selector
from pipeline.annotate.yolo import export_yolo, mask_outline
from pipeline.cli import main

NAMES = ["circle", "rectangle", "triangle"]


def _load(out):
    import supervision as sv

    return sv.DetectionDataset.from_yolo(str(out / "images"), str(out / "labels"), str(out / "data.yaml"))


def _by_name(ds) -> dict:
    import os

    return {os.path.basename(path): det for path, _, det in ds}


def test_boxes_round_trip_through_supervision(shapes, tmp_path):
    images, pred, truth = shapes
    result = CliRunner().invoke(main, ["data", "export-yolo", pred, str(tmp_path / "y")])
    assert result.exit_code == 0, result.output
    assert "left out: 1 error row(s)" in result.output and "1 empty label file(s)" in result.output

    ds = _load(tmp_path / "y")
    assert ds.classes == NAMES
    dets = _by_name(ds)
    error_file = truth[3]["file_name"]
    assert error_file not in dets and not (tmp_path / "y" / "images" / error_file).exists()
    assert len(dets) == len(truth) - 1
    assert len(dets[truth[2]["file_name"]]) == 0 and (tmp_path / "y" / "labels" / truth[2]["file_name"].replace(".png", ".txt")).read_text() == ""
    n = 0
    for i, row in truth.items():
        if row["error"] is not None:
            continue
        det = dets[row["file_name"]]
        ours = np.array(row["boxes"], dtype=np.float32).reshape(-1, 4)
        assert len(det) == len(ours)
        np.testing.assert_allclose(det.xyxy, ours, atol=0.01)
        assert [NAMES[c] for c in det.class_id] == [NAMES[c - 1] for c in row["category_ids"]]
        n += len(ours)
    assert n > 10
    # the image bytes are the dataset's, untouched
    from pipeline.data.shards import list_shards, read_shard

    first = read_shard(list_shards(images)[0]).to_pylist()[0]
    assert (tmp_path / "y" / "images" / first["file_name"]).read_bytes() == first["image"]


def test_segments_are_the_masks(shapes, tmp_path):
    _, pred, truth = shapes
    r = export_yolo(pred, str(tmp_path / "s"), options=SelectOptions(), segments=True)
    import supervision as sv

    ds = sv.DetectionDataset.from_yolo(str(tmp_path / "s" / "images"), str(tmp_path / "s" / "labels"),
                                       str(tmp_path / "s" / "data.yaml"), force_masks=True)
    dets = _by_name(ds)
    ious, covered, exact = [], [], []
    for row in truth.values():
        if row["error"] is not None:
            continue
        det = dets[row["file_name"]]
        assert len(det) == len(row["masks"])
        if not len(det):
            continue
        h, w = row["height"], row["width"]
        lines = (tmp_path / "s" / "labels" / row["file_name"].replace(".png", ".txt")).read_text().splitlines()
        for rle, got, line in zip(row["masks"], det.mask, lines):
            want = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
            ious.append((want & got).sum() / (want | got).sum())
            covered.append((want & got).sum() / want.sum())
            xy = np.array(line.split()[1:], dtype=np.float64).reshape(-1, 2) * [w, h]
            drawn = mask_utils.decode(mask_utils.frPyObjects([xy.ravel().tolist()], h, w))[:, :, 0].astype(bool)
            exact.append(bool((drawn == want).all()))
    assert r["objects_written"] == len(ious) > 10
    # supervision rounds vertices to whole pixels and fills them inclusively (cv2.fillPoly), so its
    # masks are ours plus about a pixel on the right and bottom edges: it covers every pixel of ours.
    assert min(covered) > 0.97 and np.median(ious) > 0.75, (covered, ious)
    # in COCO's convention (pycocotools), the outline is the mask, except where a hole was filled
    # or a second piece left out; those are counted
    assert sum(not e for e in exact) <= r.get("mask_holes_filled", 0) + r.get("mask_parts_dropped", 0)
    assert sum(exact) >= len(exact) - 2


def test_mask_outline_rasterises_back_exactly():
    """The outline is traced on pixel edges (not boundary-pixel centres): pycocotools draws the same mask."""
    h, w = 20, 24
    m = np.zeros((h, w), bool)
    m[3:9, 4:7] = True  # an L shape, concave corner included
    m[8:12, 4:15] = True
    m[15, 20] = True  # a second piece: one pixel
    polygons, holes = mask_outline(m)
    assert holes == 0 and len(polygons) == 2
    back = mask_utils.decode(mask_utils.frPyObjects([polygons[0].ravel().tolist()], h, w))[:, :, 0].astype(bool)
    expected = m.copy()
    expected[15, 20] = False
    assert (back == expected).all()
    single = mask_utils.decode(mask_utils.frPyObjects([polygons[1].ravel().tolist()], h, w))[:, :, 0]
    assert single.sum() == 1 and single[15, 20] == 1


def test_thresholds_and_map_select_and_count(shapes, tmp_path):
    _, pred, truth = shapes
    cmap = tmp_path / "map.yaml"
    cmap.write_text("circle: round\nrectangle: boxy\ntriangle: null\n")
    options = SelectOptions.from_cli(min_score=0.5, per_class=["rectangle=0.9"], categories_file=str(cmap))
    r = export_yolo(pred, str(tmp_path / "m"), options=options)
    objects = [(c, s) for row in truth.values() if row["error"] is None for c, s in zip(row["category_ids"], row["scores"])]
    expect_kept = sum(1 for c, s in objects if (c == 1 and s >= 0.5) or (c == 2 and s >= 0.9))
    assert r["objects_kept"] == r["objects_written"] == expect_kept > 0
    assert r["dropped_by_map"] == sum(1 for c, _ in objects if c == 3) > 0
    assert r["below_threshold"] == len(objects) - expect_kept - r["dropped_by_map"] > 0
    assert r["objects_in"] == len(objects) and r["error_rows"] == 1
    ds = _load(tmp_path / "m")
    assert ds.classes == ["round", "boxy"]
    assert sum(len(d) for _, _, d in ds) == expect_kept


def test_bad_selection_input_is_a_clear_error(shapes, tmp_path):
    _, pred, _ = shapes
    with pytest.raises(AnnotationError, match="unknown class persn.*circle, rectangle, triangle"):
        Selector(pred, SelectOptions.from_cli(per_class=["persn=0.7"]))
    with pytest.raises(AnnotationError, match="expected CLASS=SCORE"):
        SelectOptions.from_cli(per_class=["0.7"])
    cmap = tmp_path / "map.yaml"
    cmap.write_text("circle: round\ncirlce: x\n")
    result = CliRunner().invoke(main, ["data", "export-yolo", pred, str(tmp_path / "o"), "--categories", str(cmap)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "does not mention: rectangle, triangle" in result.output and "cirlce" in result.output
    assert not (tmp_path / "o").exists()  # nothing written before the check
    allowed = export_yolo(pred, str(tmp_path / "o"), options=SelectOptions.from_cli(categories_file=str(cmap), allow_unmatched=True))
    assert allowed["unmapped"] > 0 and _load(tmp_path / "o").classes == ["round"]
    again = CliRunner().invoke(main, ["data", "export-yolo", pred, str(tmp_path / "o")])
    assert again.exit_code == 1 and "--overwrite" in again.output
