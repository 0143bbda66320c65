"""The review gallery: ``index.html`` + ``thumbs/*.png``, a static page that opens from its folder.

One card per image, worst review score first (:mod:`pipeline.annotate.review`), for the
``max_images`` worst images. A thumbnail (at most ``THUMB`` px a side; small images are upscaled
by a whole factor, nearest neighbour) draws the ground truth in blue and the predictions in
orange (the legend says so), each labelled ``<status> <class> [score]``. Drawn, and listed on the
card: every ground-truth object, every matched prediction, and unmatched predictions scoring at
least ``T - M`` (the ones the review score can count); ``review.parquet`` has them all.

Filters (plain inline JavaScript, no library, nothing fetched): by class and by status; a card
stays when one of its listed objects has both, and ``error`` keeps the images the job could not
read. Images the job could not read are listed at the top with the reason, whether or not they
have a card. Everything the page shows is escaped; it loads only its own thumbnails.
"""

from __future__ import annotations

import html
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from pipeline import schema
from pipeline.annotate import AnnotationError
from pipeline.annotate.review import GROUND_TRUTH, PAGE, PREDICTION, THUMBS, Review
from pipeline.data.decode import DecodeError, decode_image
from pipeline.data.render import check_same_images, font, layout_labels, picture_name, text_colour
from pipeline.data.shards import DatasetError, list_shards, read_meta, read_shard, shard_schema

THUMB = 320
GT_COLOUR = (0, 114, 178)  # blue   (Okabe-Ito: told apart by colour-blind readers too)
PRED_COLOUR = (230, 159, 0)  # orange
PLACEHOLDER = (96, 96, 96)


def shown_objects(objects: list[dict], *, score_threshold: float, margin: float) -> list[dict]:
    """The objects a card draws and lists (see the module docstring)."""
    floor = score_threshold - margin
    return [o for o in objects if o["kind"] == GROUND_TRUTH or o["eval"] != "fp" or o["score"] >= floor]


def write_page(review: Review, out: str, *, images: str | None = None, max_images: int = 500) -> dict:
    """Draw the thumbnails and write ``index.html`` in ``out``; returns what the counts report."""
    cards = review.images[:max_images]
    source = _image_source(review.settings["gt"], review.settings["pred"], images)
    pictures = _read_pictures(source, {im.image_id for im in cards}) if source else {}
    if source:
        rows = [{"image_id": im.image_id, "file_name": im.file_name,
                 "width": None if im.error else im.width, "height": None if im.error else im.height} for im in cards]
        check_same_images(rows, pictures, review.settings["pred"], source)
    os.makedirs(os.path.join(out, THUMBS), exist_ok=True)
    s = review.settings
    undecodable, html_cards = [], []
    for im in cards:
        objects = shown_objects(im.objects, score_threshold=s["score_threshold"], margin=s["margin"])
        rgb, problem = None, None if source else "no image bytes: boxes drawn on grey"
        if source:
            try:
                rgb = decode_image(pictures[im.image_id][3])
            except DecodeError as exc:
                problem = str(exc)
                undecodable.append({"image_id": im.image_id, "file_name": im.file_name, "reason": problem})
        thumb = draw_thumbnail(rgb, im.width, im.height, objects)
        name = picture_name(im.image_id, im.file_name)
        thumb.save(os.path.join(out, THUMBS, name))
        html_cards.append(_card(im, objects, f"{THUMBS}/{name}", thumb.size, problem))
    path = os.path.join(out, PAGE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(_page(review, html_cards, len(cards)))
    return {"gallery_images": len(cards), "image_source": source, "undecodable": undecodable, "page": path}


def _image_source(gt: str, pred: str, images: str | None) -> str | None:
    """The dataset holding the image bytes: ``images``, else ``gt``, else the predictions' source."""
    def has_bytes(path: str) -> bool:
        try:
            return any(schema.IMAGE in shard_schema(s).names for s in list_shards(path))
        except (DatasetError, OSError):
            return False

    if images:
        if not has_bytes(images):
            raise AnnotationError(f"--images {images}: not a dataset holding image bytes (no '{schema.IMAGE}' column)")
        return images
    if not (gt.endswith(".json") and os.path.isfile(gt)) and has_bytes(gt):
        return gt
    source = read_meta(pred).info.get("source")
    return source if source and has_bytes(source) else None


def _read_pictures(source: str, ids: set[int]) -> dict[int, tuple]:
    """image_id -> (file_name, width, height, bytes), shard by shard, only for ``ids`` (first wins)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found: dict[int, tuple] = {}
    for shard in list_shards(source):
        if len(found) == len(ids):
            break
        present = shard_schema(shard).names
        cols = [c for c in (schema.IMAGE_ID, schema.FILE_NAME, schema.WIDTH, schema.HEIGHT, schema.IMAGE) if c in present]
        t = read_shard(shard, columns=cols)
        t = t.filter(pc.is_in(t[schema.IMAGE_ID], value_set=pa.array(sorted(ids), pa.int64())))
        for r in t.to_pylist():
            found.setdefault(r[schema.IMAGE_ID], (r.get(schema.FILE_NAME), r.get(schema.WIDTH), r.get(schema.HEIGHT),
                                                  r.get(schema.IMAGE)))
    return found


# --- thumbnails ---------------------------------------------------------------------------------


def label(o: dict) -> str:
    """``fp circle 0.93`` / ``fn circle``: status, class, score (predictions)."""
    what = o["category"] or f"class {o['category_id']}"
    return f"{o['eval']} {what}" + (f" {o['score']:.2f}" if o["score"] is not None else "")


def draw_thumbnail(rgb: np.ndarray | None, width: int | None, height: int | None, objects: list[dict]) -> Image.Image:
    """The image (grey when ``rgb`` is None) at most ``THUMB`` px a side, with ``objects`` drawn (xyxy)."""
    if rgb is not None:
        image = Image.fromarray(rgb)
    else:
        image = Image.new("RGB", (int(width or THUMB), int(height or THUMB)), PLACEHOLDER)
    w, h = image.size
    f = THUMB / max(w, h, 1)
    if f >= 2:
        f = math.floor(f)
        image = image.resize((w * f, h * f), Image.NEAREST)
    elif f < 1:
        image = image.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR)
    else:
        f = 1
    W, H = image.size
    draw = ImageDraw.Draw(image)
    line, typeface, pad = 2, font(11), 2
    # misses and false positives first: their labels get the best places
    order = sorted(objects, key=lambda o: o["eval"] not in ("fn", "fp"))
    for o in order[::-1]:
        x1, y1, x2, y2 = (v * f for v in o["box"])
        colour = GT_COLOUR if o["kind"] == GROUND_TRUTH else PRED_COLOUR
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=line)
    texts = [label(o) for o in order]
    extents = [draw.textbbox((0, 0), t, font=typeface) for t in texts]
    rects = layout_labels([tuple(v * f for v in o["box"]) for o in order],
                          [(r - l + 2 * pad, b - t + 2 * pad) for l, t, r, b in extents], W, H, line)
    for o, text, (left, top, _, _), rect in reversed(list(zip(order, texts, extents, rects))):
        colour = GT_COLOUR if o["kind"] == GROUND_TRUTH else PRED_COLOUR
        draw.rectangle([rect[0], rect[1], rect[2] - 1, rect[3] - 1], fill=colour)
        draw.text((rect[0] + pad - left, rect[1] + pad - top), text, font=typeface, fill=text_colour(colour))
    return image


# --- the page -----------------------------------------------------------------------------------


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


def _card(im, objects: list[dict], src: str, size: tuple[int, int], problem: str | None) -> str:
    e = html.escape
    counts = im.counts()
    counts["tp"] = sum(o["eval"] == "tp" for o in im.objects if o["kind"] == PREDICTION)  # a match once, not twice
    hidden_fp = counts["fp"] - sum(o["eval"] == "fp" for o in objects)
    tally = " · ".join(f"{k} {counts[k]}" for k in ("tp", "fp", "fn", "ignored") if counts[k] or k != "ignored")
    if hidden_fp:
        tally += f" ({hidden_fp} fp not drawn: scores below the floor)"
    rows = []
    for o in objects:
        gt = o["kind"] == GROUND_TRUTH
        rows.append(f'<tr class="{"gt" if gt else "pred"}"><td>{"GT" if gt else "pred"}</td>'
                    f'<td>{e(o["category"] or str(o["category_id"]))}</td><td>{_num(o["score"])}</td>'
                    f'<td class="s-{e(o["eval"])}">{e(o["eval"])}</td><td>{_num(o["eval_iou"])}</td></tr>')
    data = e(json.dumps([[o["category_id"], o["eval"]] for o in objects]), quote=True)
    error = f'<p class="error">could not be read by the job: {e(im.error)}</p>' if im.error else ""
    note = f'<p class="note">{e(problem)}</p>' if problem else ""
    return (
        f'<article class="card" id="image-{im.image_id}" data-image-id="{im.image_id}" data-rank="{im.rank}" '
        f'data-error="{1 if im.error else 0}" data-objects="{data}">'
        f'<a href="{e(src)}"><img src="{e(src)}" width="{size[0]}" height="{size[1]}" loading="lazy" '
        f'alt="image {im.image_id}: ground truth and predictions"></a>'
        f'<h2>#{im.rank} · score {im.score:.2f}</h2><p class="name">{e(im.file_name or "")} (image {im.image_id})</p>'
        f'<p class="tally">{e(tally)}</p>{error}{note}'
        f'<table><tr><th></th><th>class</th><th>score</th><th>eval</th><th>IoU</th></tr>{"".join(rows)}</table></article>'
    )


def _page(review: Review, cards: list[str], n_cards: int) -> str:
    e = html.escape
    s, c = review.settings, review.counts
    present = sorted({o["category_id"] for im in review.images[:n_cards] for o in im.objects})
    classes = "".join(f'<option value="{k}">{e(review.categories.get(k, str(k)))}</option>' for k in present)
    pred, gt = c["predictions"], c["ground_truth"]
    errors = c["error_rows"]
    error_list = ""
    if errors:
        items = "".join(f'<li><a href="#image-{r["image_id"]}">image {r["image_id"]}</a> {e(r["file_name"] or "")}: '
                        f'{e(r["error"])}</li>' for r in errors)
        error_list = (f'<section class="errors"><h2>{len(errors)} image(s) the job could not read</h2>'
                      f"<p>Their ground truth counts as missed, as in COCO evaluation.</p><ul>{items}</ul></section>")
    return PAGE_TEMPLATE.format(
        title=e(f"Review: {s['pred']}"),
        pred=e(s["pred"]), gt=e(s["gt"]), iou=s["iou"], iou_type=e(s["iou_type"]), T=s["score_threshold"], M=s["margin"],
        floor=_num(s["score_threshold"] - s["margin"]),
        images=c["images"], n_cards=n_cards,
        tp=pred["tp"], fp=pred["fp"], fn=gt["fn"], pred_ignored=pred["ignored"], gt_ignored=gt["ignored"],
        gt_colour="#%02x%02x%02x" % GT_COLOUR, pred_colour="#%02x%02x%02x" % PRED_COLOUR,
        classes=classes, errors=error_list, cards="\n".join(cards), script=SCRIPT,
    )


PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 16px; background: #f6f6f6; color: #222; }}
header h1 {{ font-size: 20px; margin: 0 0 4px; }}
.legend span {{ display: inline-block; width: 14px; height: 14px; vertical-align: -2px; margin: 0 4px 0 12px; border: 3px solid; }}
.controls {{ margin: 10px 0; }}
.controls label {{ margin-right: 16px; }}
.errors {{ background: #fde8e8; border: 1px solid #d33; padding: 4px 12px; margin: 10px 0; }}
.errors h2 {{ font-size: 15px; margin: 6px 0; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.card {{ background: #fff; border: 1px solid #ccc; border-radius: 4px; padding: 8px; width: 336px; }}
.card[hidden] {{ display: none; }}
.card img {{ display: block; max-width: 320px; height: auto; image-rendering: pixelated; }}
.card h2 {{ font-size: 15px; margin: 6px 0 2px; }}
.card p {{ margin: 2px 0; }}
.name {{ color: #555; word-break: break-all; }}
.error {{ color: #b00; }}
.note {{ color: #777; font-style: italic; }}
table {{ border-collapse: collapse; margin-top: 4px; font-size: 12px; }}
td, th {{ padding: 1px 6px 1px 0; text-align: left; }}
tr.gt td:first-child {{ color: {gt_colour}; font-weight: bold; }}
tr.pred td:first-child {{ color: {pred_colour}; font-weight: bold; }}
.s-fp, .s-fn {{ color: #b00; font-weight: bold; }}
</style></head>
<body>
<header>
<h1>Review queue</h1>
<p>Predictions <code>{pred}</code> against ground truth <code>{gt}</code>; {iou_type} IoU &ge; {iou}.
{images} images; predictions: {tp} tp, {fp} fp, {pred_ignored} on crowd regions (ignored);
ground-truth objects missed (fn): {fn}; crowd regions (ignored): {gt_ignored}.
The {n_cards} worst images are shown, worst first.</p>
<p>Review score = sum of the scores of false positives scoring &ge; T
+ 1 per missed ground-truth object + 0.5 &times; (1 &minus; |score &minus; T| / M) per prediction within M of T
(T = {T}, M = {M}). Cards draw every ground-truth object, every matched prediction, and false positives scoring &ge; {floor}.</p>
<p class="legend">Legend:<span style="border-color: {gt_colour}"></span>ground truth
<span style="border-color: {pred_colour}"></span>prediction
&nbsp; labels: <code>tp</code> matched, <code>fp</code> false positive, <code>fn</code> missed, <code>ignored</code> crowd</p>
<div class="controls">
<label>Class <select id="class-filter"><option value="">all classes</option>{classes}</select></label>
<label>Status <select id="status-filter"><option value="">any status</option><option value="tp">tp</option>
<option value="fp">fp</option><option value="fn">fn</option><option value="ignored">ignored</option>
<option value="error">could not be read</option></select></label>
<span id="shown-count">{n_cards}</span> of {n_cards} images shown
</div>
</header>
{errors}
<main class="grid" id="cards">
{cards}
</main>
<script>
{script}
</script>
</body></html>
"""

SCRIPT = """(function () {
  "use strict";
  var classFilter = document.getElementById("class-filter");
  var statusFilter = document.getElementById("status-filter");
  var shownCount = document.getElementById("shown-count");
  var cards = Array.prototype.slice.call(document.querySelectorAll(".card"));
  var objects = cards.map(function (card) { return JSON.parse(card.getAttribute("data-objects")); });

  function keep(i) {
    var cls = classFilter.value, status = statusFilter.value;
    var card = cards[i];
    if (status === "error") {
      return card.getAttribute("data-error") === "1" &&
        (cls === "" || objects[i].some(function (o) { return String(o[0]) === cls; }));
    }
    if (cls === "" && status === "") return true;
    return objects[i].some(function (o) {
      return (cls === "" || String(o[0]) === cls) && (status === "" || o[1] === status);
    });
  }

  function apply() {
    var n = 0;
    for (var i = 0; i < cards.length; i++) {
      var ok = keep(i);
      cards[i].hidden = !ok;
      if (ok) n++;
    }
    shownCount.textContent = String(n);
  }

  classFilter.addEventListener("change", apply);
  statusFilter.addEventListener("change", apply);
  apply();
})();"""
