"""Every column the pipeline reads or writes, with its Arrow type, in one place.

A dataset is a folder of Parquet shards (``part-00000.parquet``, ...) plus a ``dataset.json``
carrying the category list and dataset info (see :mod:`pipeline.data.shards`). Input datasets
and prediction datasets share the image columns, so a prediction dataset is itself a dataset:
``pipeline data info`` reads both, and later jobs can take one as input.

Conventions that matter downstream:

* Ground-truth ``bbox`` is COCO **xywh** (float64, pixels), exactly as in a COCO file.
* Predicted ``boxes`` are **xyxy** float32 in the pixels of the *decoded* image (EXIF orientation
  applied), i.e. the same frame as ``width``/``height``.
* Images are stored encoded (JPEG/PNG bytes as found on disk); decoded pixels exist only in flight
  between the decode step and the stages (column ``pixels``), never in a written shard.
"""

from __future__ import annotations

import pyarrow as pa

# --- image columns (every dataset) -------------------------------------------------------------
IMAGE_ID = "image_id"
FILE_NAME = "file_name"
WIDTH = "width"
HEIGHT = "height"
IMAGE = "image"
ANNOTATIONS = "annotations"
ERROR = "error"  # null when the row is fine; otherwise why it could not be processed

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
"""Compressed COCO RLE: ``size`` is [height, width], ``counts`` the LEB128-like string."""

SEGMENTATION_TYPE = pa.struct(
    [
        ("polygons", pa.list_(pa.list_(pa.float64()))),  # [[x0, y0, x1, y1, ...], ...]
        ("rle", RLE_TYPE),
    ]
)
"""Exactly one of ``polygons``/``rle`` is set when an annotation has a segmentation."""

ANNOTATION_TYPE = pa.struct(
    [
        ("id", pa.int64()),
        ("category_id", pa.int64()),
        ("bbox", pa.list_(pa.float64(), 4)),  # xywh
        ("area", pa.float64()),
        ("iscrowd", pa.int8()),
        ("segmentation", SEGMENTATION_TYPE),
        ("keypoints", pa.list_(pa.float64())),  # x, y, v triples
        ("num_keypoints", pa.int32()),
    ]
)

IMAGE_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.int64(), nullable=False),
        pa.field(FILE_NAME, pa.string()),
        pa.field(WIDTH, pa.int32()),
        pa.field(HEIGHT, pa.int32()),
        pa.field(IMAGE, pa.binary()),
        pa.field(ANNOTATIONS, pa.list_(ANNOTATION_TYPE)),
        pa.field(ERROR, pa.string()),
    ]
)

# --- in-flight columns (between decode and stages; never written) -----------------------------
PIXELS = "pixels"  # raw RGB uint8 bytes, row-major HxWx3, shape from HEIGHT/WIDTH
IN_FLIGHT_COLUMNS = (IMAGE, PIXELS, ANNOTATIONS)

# --- prediction columns (written by stages) ----------------------------------------------------
BOXES = "boxes"
SCORES = "scores"
LABELS = "labels"
CATEGORY_IDS = "category_ids"

MASKS = "masks"  # instance masks, one compressed COCO RLE per box, at the decoded image size
KEYPOINTS = "keypoints"  # per box: [x1, y1, v1, x2, y2, v2, ...] (COCO order), float32

BOXES_TYPE = pa.list_(pa.list_(pa.float32(), 4))  # per row: N boxes, xyxy
MASKS_TYPE = pa.list_(RLE_TYPE)
KEYPOINTS_TYPE = pa.list_(pa.list_(pa.float32()))
SCORES_TYPE = pa.list_(pa.float32())
IDS_TYPE = pa.list_(pa.int64())

PREDICTION_BASE_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.int64(), nullable=False),
        pa.field(FILE_NAME, pa.string()),
        pa.field(WIDTH, pa.int32()),
        pa.field(HEIGHT, pa.int32()),
        pa.field(ERROR, pa.string()),
    ]
)
"""Columns every prediction shard has; stages append the columns they declare."""


def image_table(rows: list[dict]) -> pa.Table:
    """Build an image-schema table from python dicts (missing optional keys become null)."""
    return pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Reorder/cast ``table`` to ``schema``, adding absent nullable columns as nulls.

    Shards written by older versions or by other tools may lack optional columns (``error``,
    ``annotations``); conforming at read time keeps every consumer on one schema.
    """
    arrays = []
    for field in schema:
        if field.name in table.column_names:
            arrays.append(table[field.name].cast(field.type))
        else:
            arrays.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


# --- region proposals (written by the proposals stage, read by detect/masks in Fast R-CNN mode) -----
PROPOSALS = "proposals"  # per row: N class-agnostic boxes, xyxy float32 (BOXES_TYPE), best first
PROPOSAL_SCORES = "proposal_scores"  # per row: N float32, non-increasing (SCORES_TYPE)

# --- style transfer (written by the style stage; `column` may rename it) ---------------------------
STYLIZED = "stylized"  # per row: the restyled picture, encoded (JPEG or PNG bytes), EXIF orientation applied
STYLIZED_TYPE = pa.binary()
SYNTHESIZED = "synthesized"  # per row: an image made by optimisation (a synthesize stage), PNG bytes at the image's size (invert: the crop's)
SYNTHESIZED_TYPE = pa.binary()
FOOL_TARGET = "fool_target"  # per row: the class label a fooling image was made for
FOOL_TARGET_TYPE = pa.int32()
FOOL_SUCCESS = "fool_success"  # per row: the classifier puts that class first on the 8-bit fooling image
FOOL_SUCCESS_TYPE = pa.bool_()
FOOL_LINF = "fool_linf"  # per row: the perturbation's L-infinity norm, pixel values in [0, 1]
FOOL_L2 = "fool_l2"  # per row: its L2 norm over all pixels and channels, same units
FOOL_NORM_TYPE = pa.float32()
FOOL_STEPS = "fool_steps"  # per row: signed-gradient steps taken (the image stops once fooled)
FOOL_STEPS_TYPE = pa.int32()
INVERT_FEATURE_ERROR = "invert_feature_error"  # per row: ||f(x) - f(x0)|| / ||f(x0)|| of a feature inversion at its layer
INVERT_PSNR = "invert_psnr"  # per row: PSNR (dB) of the inversion against the image as the network saw it
DREAM_GAIN = "dream_gain"  # per row: DeepDream's mean squared activation of its layer, after over before
SYNTH_METRIC_TYPE = pa.float32()
TEXTURE_LOSS_START = "texture_loss_start"  # per row of a generated texture: the Gram loss of its starting noise
TEXTURE_LOSS_END = "texture_loss_end"  # ... and of the image written

# --- image classification (written by the classify stage) ------------------------------------------
# Per row, the model's top k classes, best first (k = the stage's top_k, at most the model's classes).
CLASS_LABELS = "class_labels"  # per row: k model class indices (int32)
CLASS_SCORES = "class_scores"  # per row: their softmax probabilities (float32), descending
CLASS_CATEGORY_IDS = "class_category_ids"  # per row: the dataset's category ids for them (-1: no mapping)
CLASS_LABELS_TYPE = pa.list_(pa.int32())
CLASS_SCORES_TYPE = pa.list_(pa.float32())
CLASS_CATEGORY_IDS_TYPE = pa.list_(pa.int64())  # as detect's CATEGORY_IDS and the ground truth's LABEL
# Image-level ground truth, optional in an image dataset (written by `synth_dataset(..., classification=True)`):
# the category id of the whole image, one of dataset.json's categories; null = unlabelled (left out of
# classification evaluation, counted). Never travels into a job (the stream reads only the image columns).
LABEL = "label"
LABEL_TYPE = pa.int64()
LABEL_IMAGE_SCHEMA = IMAGE_SCHEMA.append(pa.field(LABEL, LABEL_TYPE))
SEED = "seed"  # per row of a generated dataset (pipeline generate): the seed its image was made from
SEED_TYPE = pa.int64()

# --- visual explanations (written by the explain stage) ----------------------------------------
# One entry per explained prediction (a classify stage's top-1 class: one per image), same order.
ATTRIBUTION_MAPS = "attribution_maps"  # per row: 8-bit grey PNGs at the image's size, each scaled to max 255 (b"": a box not explained)
ATTRIBUTION_IN_BOX = "attribution_in_box"  # per row: share of each map's positive mass inside its box (null: no box)
ATTRIBUTION_PEAK_IN_BOX = "attribution_peak_in_box"  # per row: whether each map's maximum lies in its box (null: no box)
ATTRIBUTION_MAPS_TYPE = pa.list_(pa.binary())
ATTRIBUTION_IN_BOX_TYPE = pa.list_(pa.float32())
ATTRIBUTION_PEAK_IN_BOX_TYPE = pa.list_(pa.bool_())

# --- semantic segmentation (written by the segment stage) -----------------------------------------
# One compressed COCO RLE per category present in the image (the form detectron2 uses for semantic
# predictions), at the decoded image size; together the masks cover every pixel exactly once.
# Background is category id 0 and counts as a class (as in VOC).
SEMANTIC_CATEGORY_IDS = "semantic_category_ids"  # per row: the dataset's category ids present, ascending
SEMANTIC_MASKS = "semantic_masks"  # per row: one RLE per id of SEMANTIC_CATEGORY_IDS, same order
SEMANTIC_CATEGORY_IDS_TYPE = pa.list_(pa.int32())
SEMANTIC_MASKS_TYPE = pa.list_(RLE_TYPE)
SEMANTIC_IGNORE = 255  # label-map value that evaluation ignores (VOC's "void")
# Semantic ground truth, optional in an image dataset (written by `pipeline data import-images --labels`):
# PNG bytes of a uint8 map (H, W) at the image's displayed size, of category ids, 255 = ignore (VOC stores
# palette PNGs read by index; pipeline.data.label_maps reads and writes them). Never travels into a job.
# What a null label_map means depends on the dataset: where dataset.json's info says
# {SEMANTIC_GROUND_TRUTH: LABEL_MAP} (an import of a label folder), the image has no ground truth and
# semantic evaluation leaves it out (counted); elsewhere it takes its semantic ground truth from its
# instance annotations.
LABEL_MAP = "label_map"
LABEL_MAP_TYPE = pa.binary()
LABEL_MAP_IMAGE_SCHEMA = IMAGE_SCHEMA.append(pa.field(LABEL_MAP, LABEL_MAP_TYPE))
SEMANTIC_GROUND_TRUTH = "semantic_ground_truth"  # dataset.json info key: LABEL_MAP when label maps are the semantic GT
