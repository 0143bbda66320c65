"""Every registered stage type: built from its spec, it writes exactly the columns its spec declares.

One test per stage type (and per column mode: proposals, boxes_column, output_prefix) builds the
stage the way an actor does -- ``spec.stage_kwargs(...)`` into ``spec.stage_class()`` -- at its
smallest settings with random weights, runs it on two 64 px images and compares the columns it
appended, names, order and Arrow types, with ``spec.output_columns()``. No Ray. A registered
stage without tiny settings here, without a row in README.md's stage table or without a job under
jobs/ fails too.
"""

from __future__ import annotations

import inspect
import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline import schema
from pipeline.config.load import read_yaml
from pipeline.engine.jobfile import validate_job
from pipeline.config.spec import RUN_CONTEXT, StageSpec
from pipeline.data.synth import synth_image
from pipeline.models.transformer_net import TransformerNet
from pipeline.stages import STAGES, get_stage_spec, list_stages
from pipeline.stages.chain import check_columns
from tests.conftest import REPO
from tests.engine.probe_stage import ProbeSpec
from tests.stages.helpers import make_batch, with_column

R_CNN_64 = {"min_size": 64, "max_size": 64, "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20}

# The smallest settings of each stage type (random weights; {checkpoint} is filled in by a fixture).
TINY: dict[str, dict] = {
    "detect": {"model": "fasterrcnn_mobilenet_v3_large_320_fpn", "num_classes": 3, "score_threshold": 0.0,
               "max_detections": 5, "model_kwargs": R_CNN_64},
    "masks": {"model": "small_maskrcnn", "num_classes": 4, "score_threshold": 0.0, "max_detections": 5,
              "model_kwargs": {"min_size": 64, "max_size": 64}},
    "keypoints": {"model": "keypointrcnn_resnet50_fpn", "score_threshold": 0.0, "max_detections": 2, "model_kwargs": R_CNN_64},
    "proposals": {"method": "selective_search", "top_k": 10},
    "style": {"method": "network", "model": "{checkpoint}", "format": "png"},
    "segment": {"model": "lraspp_mobilenet_v3_large", "num_classes": 3, "resize": 64},
    "classify": {"model": "mobilenet_v3_small", "num_classes": 4, "top_k": 2, "resize": 40, "crop": 32},
    "explain": {"method": "gradcam", "model": "small_cnn", "num_classes": 3, "resize": 40, "crop": 32},
    "synthesize": {"method": "fool", "model": "small_cnn", "num_classes": 3, "resize": 40, "crop": 32, "steps": 2},
}
# Column modes beside each type's default: keys that change what a stage reads or writes.
MODES = [
    ("detect", {"proposals_column": "proposals", "output_prefix": "det_"}),
    ("masks", {"boxes_column": "boxes", "output_prefix": "seg_"}),
    ("keypoints", {"boxes_column": "boxes"}),
    ("proposals", {"output_prefix": "ss_"}),
    ("style", {"column": "restyled"}),
    ("explain", {"model": "small_maskrcnn", "num_classes": 4, "min_score": 0.0, "model_kwargs": {"min_size": 64, "max_size": 64}}),
    ("synthesize", {"column": "fooled", "target": 1}),
]
CASES = [(name, {}) for name in list_stages()] + MODES
# What an earlier stage would have left in a column of each type this test may need to provide.
EARLIER = {schema.BOXES_TYPE: [[5.0, 6.0, 40.0, 50.0], [0.0, 0.0, 64.0, 64.0]], schema.IDS_TYPE: [1, 2],
           schema.CLASS_LABELS_TYPE: [2, 0], schema.SCORES_TYPE: [0.9, 0.6]}


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Two synthetic shape images of 64 px."""
    return [np.asarray(Image.open(io.BytesIO(synth_image(5, i, size=64)[0])).convert("RGB")) for i in range(2)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A random TransformerNet, saved as a style checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("style") / "net.pth"
    torch.save(TransformerNet().state_dict(), path)
    return str(path)


def spec_of(type_name: str, settings: dict, checkpoint: str) -> StageSpec:
    raw = {k: v.format(checkpoint=checkpoint) if isinstance(v, str) else v for k, v in settings.items()}
    return get_stage_spec(type_name).model_validate({"name": type_name, "type": type_name, **raw})


@pytest.mark.parametrize("type_name, mode", CASES, ids=[f"{n}-{'-'.join(m) or 'default'}" for n, m in CASES])
def test_stage_writes_exactly_the_declared_columns(type_name, mode, images, checkpoint):
    assert type_name in TINY, f"stage {type_name!r} is registered but has no tiny settings in this test"
    spec = spec_of(type_name, {**TINY[type_name], **mode}, checkpoint)
    batch = make_batch(images)
    for column, dtype in spec.input_columns().values():
        batch = with_column(batch, column, [EARLIER[dtype]] * batch.num_rows, dtype)
    torch.manual_seed(0)
    stage = spec.stage_class()(**spec.stage_kwargs([{"id": 1, "name": "circle"}]))
    out = stage(batch)

    declared = spec.output_columns()
    assert out.num_rows == batch.num_rows
    assert out.column_names[: batch.num_columns] == batch.column_names  # nothing the stage read is changed
    appended = out.schema.names[batch.num_columns :]
    assert appended == list(declared), f"{type_name} appended {appended}, its spec declares {list(declared)}"
    for name, dtype in declared.items():
        assert out.schema.field(name).type == dtype, f"{type_name}: {name} is {out.schema.field(name).type}, declared {dtype}"


@pytest.mark.parametrize("type_name", list_stages())
def test_every_setting_reaches_the_stage_and_the_stage_takes_nothing_else(type_name):
    """``stage_kwargs`` derives the constructor arguments from the names: a setting the stage's
    ``__init__`` does not take would be dropped without a word, and an ``__init__`` parameter no
    setting feeds could only ever have its default."""
    spec_cls = get_stage_spec(type_name)
    settings = set(spec_cls.model_fields) - set(StageSpec.model_fields)
    params = inspect.signature(spec_cls.stage_class().__init__).parameters
    taken = {name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert not settings - taken, f"{type_name}: settings its stage class never receives: {sorted(settings - taken)}"
    assert not taken - settings - set(RUN_CONTEXT), f"{type_name}: __init__ parameters no setting feeds: {sorted(taken - settings - set(RUN_CONTEXT))}"
    defaults = spec_cls.defaults()
    for name in taken & settings:  # a stage built without a config behaves as one from a spec that sets nothing
        default = params[name].default
        if default is not inspect.Parameter.empty and not (default is None and getattr(defaults, name) == {}):
            assert default == getattr(defaults, name), f"{type_name}.{name}: __init__ default {default!r}, spec default {getattr(defaults, name)!r}"


@pytest.mark.parametrize("type_name", list_stages())
def test_every_stage_is_documented_in_the_readme(type_name):
    readme = (REPO / "README.md").read_text()
    assert f"| `{type_name}` |" in readme, f"README.md's stage table (columns each stage writes) has no row for {type_name}"


@pytest.mark.parametrize("type_name", list_stages())
def test_every_stage_has_a_job_example(type_name):
    used = set()
    for job in sorted((REPO / "jobs").glob("*.yaml")):
        stages = read_yaml(job).get("stages")
        if isinstance(stages, list):
            used |= {s.get("type", s.get("name")) for s in stages if isinstance(s, dict)}
    assert type_name in used, f"no job under jobs/ uses a {type_name} stage (a job file is the stage's runnable example)"


def test_a_new_stage_type_is_one_module_and_one_registry_line(monkeypatch, images):
    """tests/engine/probe_stage.py registered: the loader, the chain check and the actor's kwargs need nothing else."""
    monkeypatch.setitem(STAGES, ProbeSpec.type_name, ProbeSpec)
    job = validate_job({"name": "t", "input": "in", "output": "out", "stages": [{"name": "probe", "fail_from": 7}]}, "job.yaml")
    spec = job.stages[0]
    assert isinstance(spec, ProbeSpec) and spec.stage_kwargs([]) == {"sleep_s": 0.0, "fail_from": 7, "fail_if_exists": None}
    out = spec.stage_class()(**spec.stage_kwargs([]))(make_batch(images))
    assert out.schema.names[-1:] == list(spec.output_columns()) and out.schema.field("pixel_sum").type == pa.int64()
    # The chain check knows its column from the spec alone.
    masks = get_stage_spec("masks")(name="masks", type="masks", **TINY["masks"], boxes_column="pixel_sum")
    assert check_columns([spec, masks]) == [
        f"stages.1 (masks).boxes_column: column 'pixel_sum' is int64, this stage needs {schema.BOXES_TYPE}",
        "stages.1 (masks).labels_column: column 'labels' is not written by an earlier stage (earlier stages write: pixel_sum)",
    ]
