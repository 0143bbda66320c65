"""The IoU-type registry: one entry per type, checked once, and everything else follows from it."""

from __future__ import annotations

import pickle

import pytest
from click.testing import CliRunner
from pycocotools.cocoeval import Params

from pipeline import schema
from pipeline.cli.eval import eval_cmd
from pipeline.eval import IOU_TYPES, EvalInputError
from pipeline.eval.iou_types import (
    NUM_KEYPOINTS,
    CocoIoUType,
    IoUType,
    get_iou_type,
    iou_types_for_columns,
    list_iou_types,
    register,
)

DETECT = [schema.BOXES, schema.SCORES, schema.LABELS, schema.CATEGORY_IDS]


def test_builtin_types():
    assert IOU_TYPES == ("bbox", "segm", "keypoints", "proposals", "semantic", "classification") == tuple(list_iou_types())
    assert NUM_KEYPOINTS == 17


def test_unknown_name_is_one_clear_error_listing_the_known_ones():
    with pytest.raises(EvalInputError, match="unknown IoU type 'mask'; choose from bbox, segm, keypoints, proposals"):
        get_iou_type("mask")


def test_an_entry_resolves_to_itself_and_travels_by_name():
    segm = get_iou_type("segm")
    assert get_iou_type(segm) is segm
    assert pickle.loads(pickle.dumps(segm)) is segm  # Ray tasks key their records by the entry


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        register(get_iou_type("bbox"))


def test_cli_choices_and_help_come_from_the_registry():
    result = CliRunner().invoke(eval_cmd, ["--help"])
    assert all(name in result.output for name in list_iou_types())
    assert "proposals: recall AR@100/300/1000 of a proposals stage" in " ".join(result.output.split())
    bad = CliRunner().invoke(eval_cmd, ["x", "--gt", "y", "--iou-type", "mask"])
    assert bad.exit_code == 2 and "'mask' is not one of" in bad.output


@pytest.mark.parametrize("name", [n for n in list_iou_types() if get_iou_type(n).per_image_matching])
def test_coco_entries_are_pycocotools_settings(name):
    t = get_iou_type(name)
    assert isinstance(t, CocoIoUType)
    p, reference = t.params(), Params(iouType=name)
    assert p.iouType == name and p.maxDets == sorted(reference.maxDets) and len(t.stat_keys) in (10, 12)
    assert t.params_fingerprint() == t.params_fingerprint()
    assert set(t.stat_keys) == set(t.stat_labels)


@pytest.mark.parametrize("name", list_iou_types())
def test_every_entry_declares_what_it_reads_and_writes(name):
    t = get_iou_type(name)
    assert isinstance(t, IoUType) and t.name == name and t.stat_keys and t.pred_columns
    assert set(t.gt_fields) | set(t.det_fields) <= {"bbox", "segm", "keypoints"}


def test_types_for_the_columns_a_job_writes():
    """What runner.metric_types maps by hand (boxes -> bbox, masks -> segm, keypoints -> keypoints)."""
    assert iou_types_for_columns(DETECT) == ["bbox"]
    assert iou_types_for_columns([*DETECT, schema.MASKS]) == ["bbox", "segm"]
    assert iou_types_for_columns([*DETECT, schema.KEYPOINTS]) == ["bbox", "keypoints"]
    assert iou_types_for_columns([schema.PROPOSALS, schema.PROPOSAL_SCORES]) == []  # recall is asked for by name
    assert iou_types_for_columns([schema.STYLIZED]) == []
