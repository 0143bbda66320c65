"""``pipeline review``: exact statuses on a constructed case, pycocotools' own matches on real data,
and the gallery in a real headless Chromium (console errors, order, filters, a screenshot)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import select
import shutil
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from pipeline import schema
from pipeline.annotate import AnnotationError
from pipeline.annotate.review import build_review, greedy_match, match_objects, write_review
from pipeline.cli import main
from pipeline.data.shards import DatasetMeta, write_meta, write_shard
from tests.conftest import FIXTURES, REPO

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "rectangle"}, {"id": 3, "name": "triangle"}]
PRED_SCHEMA = pa.schema(list(schema.PREDICTION_BASE_SCHEMA) + [
    pa.field(schema.BOXES, schema.BOXES_TYPE), pa.field(schema.SCORES, schema.SCORES_TYPE),
    pa.field(schema.LABELS, schema.IDS_TYPE), pa.field(schema.CATEGORY_IDS, schema.IDS_TYPE),
])

# image_id -> (file name, ground truth [(ann id, category, xywh, iscrowd)], predictions [(category, xyxy, score)] or
# an error string, or None for "no prediction row")
CASE = {
    1: ("busy.png", [(11, 1, [10, 10, 40, 40], 0), (12, 2, [60, 10, 40, 30], 0), (13, 3, [100, 60, 40, 40], 0)],
        [(1, [10, 10, 50, 50], 0.9),     # tp gt-11, IoU 1
         (1, [12, 10, 52, 50], 0.8),     # fp: gt-11 is taken (IoU 0.905 with it)
         (3, [60, 10, 100, 40], 0.95)]),  # fp: a triangle on the rectangle (gt-12 and gt-13 missed)
    2: ("clean.png", [(21, 2, [20, 20, 60, 40], 0)],
        [(2, [20, 20, 80, 60], 0.97),    # tp
         (1, [100, 80, 120, 100], 0.1),  # fp, too low to count or to be drawn
         (-1, [0, 0, 10, 10], 0.99)]),   # no category: not reviewed, counted
    3: ("margin.png", [(31, 1, [30, 30, 40, 40], 0)],
        [(1, [30, 30, 70, 70], 0.55),    # tp, 0.05 above T: low margin
         (2, [100, 20, 130, 50], 0.45)]),  # fp below T: only its margin counts
    4: ("near.png", [(41, 1, [0, 0, 40, 40], 0)],
        [(1, [20, 0, 60, 40], 0.7)]),    # IoU 1/3: fp at 0.5 (and gt-41 fn), tp at 0.3
    5: ("broken.png", [(51, 3, [10, 10, 20, 20], 0)], "cannot decode image: truncated"),
    6: ("crowd.png", [(61, 1, [0, 0, 100, 100], 1), (62, 1, [110, 10, 30, 30], 0)],
        [(1, [10, 10, 50, 50], 0.9),     # inside the crowd region: ignored
         (1, [110, 10, 140, 40], 0.85)]),  # tp gt-62
    7: ("nopred.png", [(71, 2, [5, 5, 30, 30], 0)], None),  # no prediction row: gt-71 missed
}
EXPECTED = {  # id -> (eval, eval_id, eval_iou)
    "pred-1-0": ("tp", "gt-11", 1.0), "pred-1-1": ("fp", None, None), "pred-1-2": ("fp", None, None),
    "gt-11": ("tp", "pred-1-0", 1.0), "gt-12": ("fn", None, None), "gt-13": ("fn", None, None),
    "pred-2-0": ("tp", "gt-21", 1.0), "pred-2-1": ("fp", None, None), "gt-21": ("tp", "pred-2-0", 1.0),
    "pred-3-0": ("tp", "gt-31", 1.0), "pred-3-1": ("fp", None, None), "gt-31": ("tp", "pred-3-0", 1.0),
    "pred-4-0": ("fp", None, None), "gt-41": ("fn", None, None),
    "gt-51": ("fn", None, None),
    "pred-6-0": ("ignored", "gt-61", 1.0), "pred-6-1": ("tp", "gt-62", 1.0),
    "gt-61": ("ignored", "pred-6-0", 1.0), "gt-62": ("tp", "pred-6-1", 1.0),
    "gt-71": ("fn", None, None),
}
SCORES = {1: 0.8 + 0.95 + 2, 2: 0.0, 3: 0.25 + 0.25, 4: 0.7 + 1, 5: 1.0, 6: 0.0, 7: 1.0}
RANKING = [1, 4, 5, 7, 3, 2, 6]  # by score, ties by image_id


def _png(gt: list) -> bytes:
    image = Image.new("RGB", (160, 120), (200, 200, 190))
    draw = ImageDraw.Draw(image)
    for _, cat, (x, y, w, h), crowd in gt:
        if not crowd:
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=[(200, 40, 40), (40, 160, 40), (40, 40, 200)][cat - 1])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(ground-truth dataset with image bytes, predictions dataset) of CASE."""
    root = tmp_path_factory.mktemp("review")
    gt, pred = str(root / "gt"), str(root / "pred")
    images, rows = [], []
    for i, (name, anns, preds) in CASE.items():
        images.append({
            schema.IMAGE_ID: i, schema.FILE_NAME: name, schema.WIDTH: 160, schema.HEIGHT: 120, schema.IMAGE: _png(anns),
            schema.ANNOTATIONS: [{"id": a, "category_id": c, "bbox": [float(v) for v in box], "area": float(box[2] * box[3]),
                                  "iscrowd": crowd} for a, c, box, crowd in anns],
        })
        if preds is None:
            continue
        row = {schema.IMAGE_ID: i, schema.FILE_NAME: name, schema.WIDTH: 160, schema.HEIGHT: 120}
        if isinstance(preds, str):
            rows.append({**row, schema.WIDTH: None, schema.HEIGHT: None, schema.ERROR: preds})
            continue
        rows.append({**row, schema.BOXES: [b for _, b, _ in preds], schema.SCORES: [s for _, _, s in preds],
                     schema.LABELS: [c for c, _, _ in preds], schema.CATEGORY_IDS: [c for c, _, _ in preds]})
    write_shard(f"{gt}/part-00000.parquet", pa.Table.from_pylist(images, schema=schema.IMAGE_SCHEMA))
    write_meta(gt, DatasetMeta(categories=CATEGORIES))
    # two shards, so the review reads across them
    write_shard(f"{pred}/part-00000.parquet", pa.Table.from_pylist(rows[:3], schema=PRED_SCHEMA))
    write_shard(f"{pred}/part-00001.parquet", pa.Table.from_pylist(rows[3:], schema=PRED_SCHEMA))
    write_meta(pred, DatasetMeta(categories=CATEGORIES, kind="predictions", info={"source": gt}))
    return gt, pred


def test_constructed_case_has_exactly_the_expected_statuses_and_scores(case):
    gt, pred = case
    review = build_review(pred, gt)
    table = review.table().to_pylist()
    got = {r["id"]: (r["eval"], r["eval_id"], None if r["eval_iou"] is None else round(r["eval_iou"], 6)) for r in table}
    assert got == EXPECTED
    assert [im.image_id for im in review.images] == RANKING
    for im in review.images:
        assert im.score == pytest.approx(SCORES[im.image_id], abs=1e-6), im.image_id  # scores are float32
    by_id = {r["id"]: r for r in table}
    assert by_id["pred-1-2"]["category"] == "triangle" and by_id["pred-1-2"]["box"] == [60, 10, 100, 40]
    assert by_id["gt-12"]["box"] == [60, 10, 100, 40] and by_id["gt-12"]["score"] is None  # xywh -> xyxy
    assert by_id["gt-51"]["error"] == "cannot decode image: truncated" and by_id["gt-51"]["file_name"] == "broken.png"
    assert by_id["gt-71"]["file_name"] == "nopred.png"  # from the ground truth: no prediction row names it
    assert [r["review_rank"] for r in table] == sorted(r["review_rank"] for r in table)  # worst image first
    c = review.counts
    assert c["predictions"] == {"tp": 4, "fp": 5, "ignored": 1}
    assert c["ground_truth"] == {"tp": 4, "fn": 5, "ignored": 1}
    assert c["skipped_predictions"] == {"unmapped_category": 1}
    assert c["error_rows"] == [{"image_id": 5, "file_name": "broken.png", "error": "cannot decode image: truncated"}]
    assert c["images"] == 7 and c["images_without_predictions"] == 1


def test_iou_threshold_is_settable(case):
    gt, pred = case
    rows = {r["id"]: r for r in build_review(pred, gt, iou=0.3).table().to_pylist()}
    assert (rows["pred-4-0"]["eval"], rows["pred-4-0"]["eval_id"]) == ("tp", "gt-41")
    assert rows["pred-4-0"]["eval_iou"] == pytest.approx(1 / 3)
    assert rows["gt-41"]["eval"] == "tp"


def test_greedy_match_follows_evaluate_img_on_ties_and_crowds():
    # two GT with the same IoU: the last one wins; a taken GT is skipped; crowd regions come last and take many
    ious = np.array([[0.6, 0.6, 0.9], [0.6, 0.6, 0.9], [0.6, 0.6, 0.9], [0.4, 0.4, 0.9]])
    det_gt, gt_det = greedy_match(ious, iou_threshold=0.5, gt_crowd=np.array([False, False, True]))
    assert det_gt.tolist() == [1, 0, 2, 2] and gt_det.tolist() == [1, 0, 3]


# --- pycocotools' own matches ---------------------------------------------------------------------


def coco_matches(gt_dict: dict, results: list[dict], iou_type: str, iou: float) -> tuple[dict, dict]:
    """pycocotools' evalImgs at one IoU threshold, area 'all': {dt id: (gt id or 0, ignored)}, {gt id: (dt id or 0, ignored)}."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt_dict))
        coco.createIndex()
        e = COCOeval(coco, coco.loadRes(json.loads(json.dumps(results))), iou_type)
        e.params.iouThrs = np.array([iou])
        e.evaluate()
    dts, gts = {}, {}
    for ev in e.evalImgs:
        if ev is None or list(ev["aRng"]) != [0, 1e10]:
            continue
        for k, d in enumerate(ev["dtIds"]):
            dts[d] = (int(ev["dtMatches"][0][k]), bool(ev["dtIgnore"][0][k]))
        for k, g in enumerate(ev["gtIds"]):
            gts[g] = (int(ev["gtMatches"][0][k]), bool(ev["gtIgnore"][k]))
    return dts, gts


def assert_same_as_pycocotools(statuses: dict, dts: dict, gts: dict) -> dict:
    """``statuses``: {("dt", results index + 1) | ("gt", annotation id): (eval, partner's COCO id or 0)}.
    Returns how many objects of each status were compared."""
    compared = {"tp": 0, "fp": 0, "fn": 0, "ignored": 0}
    for (side, coco_id), (status, partner) in statuses.items():
        if side == "dt":
            if coco_id not in dts:
                continue  # past pycocotools' 100 per image and class: not in evalImgs
            match, ignored = dts[coco_id]
            assert (match, ignored) == ({"tp": partner, "ignored": partner}.get(status, 0), status == "ignored"), coco_id
        else:
            match, ignored = gts[coco_id]
            assert ignored == (status == "ignored"), coco_id
            assert match == (partner if status in ("tp", "ignored") else 0), coco_id
        compared[status] += 1
    return compared


PUBLISHED_CASES = [  # (fixture case, results file, iou type, IoU threshold)
    ("val2014_100", "dt_bbox.json", "bbox", 0.5),  # 100 COCO val2014 images, cocoapi's fake results
    ("val2014_100", "dt_bbox.json", "bbox", 0.75),
    ("val2014_100", "dt_segm.json", "segm", 0.5),
    ("crowd_2299", "dt.json", "bbox", 0.5),  # 13 people and a crowd region that detections fall into
]


@pytest.mark.parametrize("case_name,dt_file,iou_type,iou", PUBLISHED_CASES)
def test_matching_equals_pycocotools_on_published_cases(case_name, dt_file, iou_type, iou):
    from pipeline.eval.detections import results_to_detections
    from pipeline.eval.groundtruth import load_ground_truth

    case_dir = FIXTURES / "coco-eval" / case_name
    results = [dict(d, image_id=int(d["image_id"])) for d in json.loads((case_dir / dt_file).read_text())]
    ground = load_ground_truth(str(case_dir / "gt.json"), segm=iou_type == "segm", keypoints=False)
    dets, skipped = results_to_detections(results, gt=ground, source=dt_file, masks=iou_type == "segm")
    assert len(dets.image_id) == len(results) and not skipped  # so results index k is pycocotools' id k + 1
    m = match_objects(ground, dets, iou=iou, iou_type=iou_type)
    statuses = {("dt", k + 1): (m.det_status[k], int(ground.ann_id[m.det_partner[k]]) if m.det_partner[k] >= 0 else 0)
                for k in range(len(dets.image_id))}
    statuses |= {("gt", int(ground.ann_id[j])): (m.gt_status[j], int(m.gt_partner[j]) + 1 if m.gt_partner[j] >= 0 else 0)
                 for j in range(len(ground.ann_id))}
    dts, gts = coco_matches(ground.to_coco_dict(), results, iou_type, iou)
    compared = assert_same_as_pycocotools(statuses, dts, gts)
    if case_name == "crowd_2299":
        assert compared["ignored"] > 1 and compared["tp"] > 0  # detections on the crowd region: ignored
    else:
        assert min(compared["tp"], compared["fp"], compared["fn"]) > 50


@pytest.fixture(scope="module")
def model_run(ray_local, tmp_path_factory):
    """``pipeline run jobs/shapes_masks.yaml`` (the shipped small Mask R-CNN) over 12 held-out synthetic images."""
    from pipeline.data.synth import synth_dataset

    root = tmp_path_factory.mktemp("review-model")
    gt, pred = str(root / "gt"), str(root / "pred")
    synth_dataset(gt, images=12, seed=300, size=128)
    args = ["run", str(REPO / "jobs" / "shapes_masks.yaml"), "--input", gt, "--output", pred, "--no-progress",
            "--set", f"stages.masks.weights={REPO / 'conf' / 'models' / 'small_maskrcnn_shapes.pth'}"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return gt, pred


@pytest.mark.ray
@pytest.mark.parametrize("iou_type,iou", [("bbox", 0.5), ("bbox", 0.85), ("segm", 0.75)])
def test_review_of_a_real_model_run_equals_pycocotools(model_run, iou_type, iou):
    from pipeline.data.shards import list_shards, read_shard
    from pipeline.eval.groundtruth import load_ground_truth

    gt, pred = model_run
    rows = {r["id"]: r for r in build_review(pred, gt, iou_type=iou_type, iou=iou).table().to_pylist()}
    results, coco_id = [], {}
    for shard in list_shards(pred):  # COCO results in shard order, as pipeline data export-coco writes them
        for r in read_shard(shard).to_pylist():
            for n, (box, score, cat, mask) in enumerate(zip(r["boxes"], r["scores"], r["category_ids"], r["masks"])):
                if cat != -1:
                    x1, y1, x2, y2 = box
                    results.append({"image_id": r["image_id"], "category_id": cat, "score": score,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": mask})
                    coco_id[f"pred-{r['image_id']}-{n}"] = len(results)
    assert len(results) > 30
    statuses = {}
    for oid, r in rows.items():
        if r["kind"] == "prediction":
            partner = int(r["eval_id"][3:]) if r["eval_id"] else 0
            statuses[("dt", coco_id[oid])] = (r["eval"], partner)
        else:
            statuses[("gt", int(oid[3:]))] = (r["eval"], coco_id[r["eval_id"]] if r["eval_id"] else 0)
    assert len(statuses) == len(rows)
    dts, gts = coco_matches(load_ground_truth(gt, segm=True, keypoints=False).to_coco_dict(), results, iou_type, iou)
    compared = assert_same_as_pycocotools(statuses, dts, gts)
    assert compared["tp"] > 0 and compared["fp"] > 0 and sum(compared.values()) == len(rows)
    assert compared["fn"] > 0 or iou == 0.5  # at 0.5 the model finds every shape of these 12 images


# --- the command --------------------------------------------------------------------------------


def test_command_writes_table_page_and_counts_and_guards_its_folder(case, tmp_path):
    gt, pred = case
    out = tmp_path / "review"
    result = CliRunner().invoke(main, ["review", pred, "--gt", gt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "reviewed 7 images: predictions 4 tp, 5 fp, 1 on crowd regions; ground truth 4 found, 5 missed (fn), 1 crowd" in text
    assert "worst: image 1 (busy.png), review score 3.75" in text
    assert "image 5 (broken.png): cannot decode image: truncated" in text  # the error row is listed
    assert "predictions not reviewed: 1 unmapped category" in text
    assert "images with no prediction row: 1" in text
    assert sorted(os.listdir(out)) == ["index.html", "review.json", "review.parquet", "thumbs"]
    table = pq.read_table(out / "review.parquet")
    assert table.num_rows == len(EXPECTED)
    assert {"eval", "eval_id", "eval_iou", "review_score", "box", "kind", "category", "category_id"} <= set(table.column_names)
    assert len(os.listdir(out / "thumbs")) == 7
    summary = json.loads((out / "review.json").read_text())
    assert summary["settings"]["iou"] == 0.5 and "review_score" in summary["settings"]["formula"]

    again = CliRunner().invoke(main, ["review", pred, "--gt", gt, "--out", str(out)])
    assert again.exit_code == 1 and "is not empty" in again.output and "--overwrite" in again.output
    assert CliRunner().invoke(main, ["review", pred, "--gt", gt, "--out", str(out), "--overwrite", "--iou", "0.3"]).exit_code == 0
    (out / "notes.txt").write_text("mine")
    foreign = CliRunner().invoke(main, ["review", pred, "--gt", gt, "--out", str(out), "--overwrite"])
    assert foreign.exit_code == 1 and "notes.txt" in foreign.output and (out / "notes.txt").exists()


def test_help_states_the_formula():
    text = CliRunner().invoke(main, ["review", "--help"]).output
    assert "review_score = sum(score of each fp scoring >= T)" in text and "--iou" in text


def test_bad_settings_are_user_errors(case, tmp_path):
    gt, pred = case
    with pytest.raises(AnnotationError, match="--max-images"):
        write_review(pred, gt, str(tmp_path / "r"), max_images=-1)
    with pytest.raises(AnnotationError, match="--margin"):
        build_review(pred, gt, margin=-0.1)


def test_the_page_escapes_what_it_shows():
    from pipeline.annotate.review import ImageReview
    from pipeline.annotate.review_page import _card

    obj = {"kind": "prediction", "id": "pred-1-0", "category_id": 1, "category": "<b>cat</b>", "score": 0.9,
           "box": [0, 0, 1, 1], "eval": "fp", "eval_id": None, "eval_iou": None}
    im = ImageReview(image_id=1, file_name='x"><script>alert(1)</script>.png', width=4, height=4,
                     error="<img src=x onerror=alert(2)>", objects=[obj], score=0.9, rank=1)
    card = _card(im, [obj], "thumbs/1_x.png", (4, 4), None)
    assert "<script>" not in card and "<img src=x" not in card and "<b>cat" not in card
    assert "&lt;script&gt;" in card and "&lt;b&gt;cat&lt;/b&gt;" in card


def test_a_missing_chromium_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set and chromium is not installed"):
        chromium_binary()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
        chromium_binary()


# --- the gallery in a real browser ----------------------------------------------------------------


class Chromium:
    """Headless Chromium driven with the DevTools protocol over a pipe (``--remote-debugging-pipe``:
    NUL-separated JSON on file descriptors 3 and 4), so no Python package is needed. Records every
    console error, uncaught exception and failed load (``Runtime`` and ``Log`` domains)."""

    def __init__(self, binary: str, profile: str, size=(1280, 1000)):
        import fcntl

        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()
        # the child's ends moved to descriptors >= 10, so that putting them on 3 and 4 cannot overwrite one another
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]
        for fd in (to_child, from_child):
            os.close(fd)
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe",
                f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", "--hide-scrollbars", "about:blank"]
        os.makedirs(profile, exist_ok=True)
        self.log = os.path.join(profile, "chromium.log")
        with open(self.log, "wb") as log:  # bash (dash takes fds 0-9 only) puts them on Chromium's 3 (in) and 4 (out)
            self.proc = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{high[0]} 4>&{high[1]}', *args],
                                         pass_fds=high, stdout=log, stderr=log)
        for fd in high:
            os.close(fd)
        self._buf, self._id, self.events, self.session = b"", 0, [], None
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False})

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._in], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                with open(self.log, errors="replace") as f:
                    raise EOFError(f"Chromium closed the DevTools pipe; its output ends:\n{f.read()[-2000:]}")
            self._buf += chunk
        message, self._buf = self._buf.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._recv(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def open(self, url: str, timeout: float = 30) -> None:
        self.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._recv(deadline))

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors and assertions, uncaught exceptions, error log entries (e.g. a file that failed to load)."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p["exceptionDetails"])[:300])
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def screenshot(self, path) -> None:
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._in)
        os.close(self._out)


def chromium_binary() -> str:
    """Debian's chromium (``apt-get install chromium``). Missing: a skip on a workstation, a failure in CI."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI is set and chromium is not installed: the review gallery must be tested in a real browser "
                    "(.ci/run installs it: apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); CI installs it and runs this test")


@pytest.fixture
def browser(tmp_path):
    chromium = Chromium(chromium_binary(), str(tmp_path / "profile"))
    yield chromium
    chromium.close()


def test_gallery_in_headless_chromium(case, tmp_path, browser):
    gt, pred = case
    out = tmp_path / "review"
    write_review(pred, gt, str(out))
    browser.open((out / "index.html").as_uri())
    # every thumbnail (lazy-loaded, all near the viewport here) decodes; a missing file would also be a log error
    loaded = browser.evaluate(
        "Promise.all(Array.from(document.images).map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; })))"
        ".then(() => Array.from(document.images).map(i => i.naturalWidth))")
    assert len(loaded) == 7 and all(w > 0 for w in loaded)
    assert browser.problems() == []

    cards = "Array.from(document.querySelectorAll('.card'))"
    visible = f"{cards}.filter(c => c.offsetParent !== null).map(c => Number(c.dataset.imageId))"
    assert browser.evaluate(f"{cards}.map(c => Number(c.dataset.imageId))") == RANKING
    first = browser.evaluate("(() => { const r = document.querySelector('.card').getBoundingClientRect(); "
                             "return [r.top, r.bottom, window.innerHeight]; })()")
    assert 0 <= first[0] and first[1] <= first[2]  # the worst image's whole card is in the screenshot

    def choose(class_id: str, status: str) -> list[int]:
        browser.evaluate(f"""(() => {{
            for (const [id, v] of [['class-filter', '{class_id}'], ['status-filter', '{status}']]) {{
                const s = document.getElementById(id); s.value = v; s.dispatchEvent(new Event('change'));
            }} }})()""")
        shown = browser.evaluate(visible)
        assert browser.evaluate("Number(document.getElementById('shown-count').textContent)") == len(shown)
        return shown

    assert choose("3", "") == [1, 5]  # triangles: the fp triangle of image 1, the missed one of image 5
    assert choose("", "fn") == [1, 4, 5, 7]
    assert choose("1", "fp") == [1, 4]  # image 2's circle fp scores 0.1: not drawn, not listed, not matched
    assert choose("", "error") == [5]
    assert choose("", "") == RANKING
    assert browser.problems() == []

    shot = tmp_path / "gallery.png"
    browser.screenshot(shot)
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (1280, 1000)
        rgb = image.convert("RGB")
    colours = {c for _, c in rgb.getcolors(1 << 24)}
    assert np.asarray(rgb).std() > 20 and len(colours) > 100  # not blank
    # the two box colours of the legend are on the page (the thumbnails draw them)
    from pipeline.annotate.review_page import GT_COLOUR, PRED_COLOUR

    assert GT_COLOUR in colours and PRED_COLOUR in colours
