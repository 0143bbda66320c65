from pathlib import Path

import pytest

from pipeline.config.load import ConfigError, apply_override, dump, read_yaml
from pipeline.engine.jobfile import load_job
from pipeline.train.train_spec import TrainSpec
from pipeline.stages.detect import DetectSpec

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str, name="job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASIC = """
name: t
input: in
output: out
stages:
  - name: detect
    num_classes: 4
"""


def test_stage_type_defaults_to_its_name(tmp_path):
    job = load_job(write(tmp_path, BASIC))
    assert isinstance(job.stages[0], DetectSpec) and job.stages[0].type == "detect"


def test_overrides_by_index_by_name_and_nested(tmp_path):
    job = load_job(
        write(tmp_path, BASIC),
        overrides=["stages.0.batch_size=8", "stages.detect.score_threshold=0.3", "decode.max_pixels=1000", "stages.detect.model_kwargs.min_size=200"],
    )
    stage = job.stages[0]
    assert stage.batch_size == 8 and stage.score_threshold == 0.3 and stage.model_kwargs == {"min_size": 200}
    assert job.decode.max_pixels == 1000


def test_input_output_flags_win(tmp_path):
    job = load_job(write(tmp_path, BASIC), input="elsewhere", output="o2")
    assert (job.input, job.output) == ("elsewhere", "o2")


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.detect.scor_threshold=0.3", "stages.0 (detect).scor_threshold: unknown key"),
        ("stages.0.batch_size=many", "stages.0 (detect).batch_size: Input should be a valid integer"),
        ("stages.0.num_gpus=-1", "stages.0 (detect).num_gpus: Input should be greater than or equal to 0"),
        ("decode.max_pixel=5", "decode.max_pixel: unknown key"),
        ("stages.0.model=nonexistent_net", "stages.0 (detect).model: Value error, unknown model 'nonexistent_net'"),
        ("stages.0.type=nope", "stages.0.type: unknown stage type 'nope'"),
    ],
)
def test_errors_name_file_and_key(tmp_path, override, message):
    path = write(tmp_path, BASIC)
    with pytest.raises(ConfigError) as info:
        load_job(path, overrides=[override])
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "name: t\ninput: in\nstages: [{name: detect}]\n")
    with pytest.raises(ConfigError, match="output: Field required"):
        load_job(path)


def test_override_unknown_stage_name(tmp_path):
    with pytest.raises(ConfigError, match="no stage named 'segment'"):
        load_job(write(tmp_path, BASIC), overrides=["stages.segment.batch_size=2"])


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "stages.0.batch_size")


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    write(tmp_path, "decode: {max_pixels: 500, batch_size: 3}\nstages: [{name: detect, batch_size: 99}]\n", "base.yaml")
    job = load_job(write(tmp_path, "extends: base.yaml\n" + BASIC + "decode: {batch_size: 5}\n"))
    assert (job.decode.max_pixels, job.decode.batch_size) == (500, 5)
    assert job.stages[0].batch_size == 4  # the job's stage list replaced the base's


def test_duplicate_stage_names(tmp_path):
    path = write(tmp_path, BASIC + "  - name: detect\n")
    with pytest.raises(ConfigError, match="duplicate stage name 'detect'"):
        load_job(path)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(write(tmp_path, "name: [unclosed"))
    with pytest.raises(ConfigError, match="cannot read job file"):
        load_job(tmp_path / "nope.yaml")


def test_dump_includes_stage_parameters(tmp_path):
    data = dump(load_job(write(tmp_path, BASIC)))
    assert data["stages"][0]["score_threshold"] == 0.05 and data["stages"][0]["model"]


@pytest.mark.parametrize("job_file", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_validates(job_file):
    data = read_yaml(job_file)
    if "train" in data:  # a training spec (pipeline train)
        assert TrainSpec.model_validate(data).epochs >= 1
    else:
        assert load_job(job_file).stages


# --- model_kwargs of a stage are checked against the model's builder -------------------------------


def test_misspelt_model_kwarg_is_an_error_naming_the_key_and_the_fix(tmp_path):
    job = write(tmp_path, BASIC.replace("num_classes: 4", "num_classes: 4\n    model_kwargs: {min_size: 256, box_nms_tresh: 0.4}"))
    with pytest.raises(ConfigError) as info:
        load_job(job)
    message = str(info.value)
    assert (
        "stages.0 (detect).model_kwargs.box_nms_tresh: unknown keyword for fasterrcnn_mobilenet_v3_large_320_fpn "
        "(did you mean box_nms_thresh?)" in message
    )
    assert "min_size" not in message  # the right key is not reported
    # the same through --set, for each stage type that takes model_kwargs
    with pytest.raises(ConfigError, match=r"stages.0 \(detect\).model_kwargs.min_sise: unknown keyword .*did you mean min_size\?"):
        load_job(write(tmp_path, BASIC), overrides=["stages.detect.model_kwargs.min_sise=256"])
    with pytest.raises(ConfigError, match=r"stages.0 \(masks\).model_kwargs.min_sise: unknown keyword for maskrcnn_resnet50_fpn"):
        load_job(REPO / "jobs" / "maskrcnn.yaml", overrides=["stages.masks.model_kwargs.min_sise=256"])
    with pytest.raises(ConfigError, match=r"model_kwargs.num_keypionts: unknown keyword .*did you mean num_keypoints\?"):
        load_job(REPO / "jobs" / "keypoints.yaml", overrides=["stages.0.model_kwargs.num_keypionts=3"])
    rpn = "name: t\ninput: in\noutput: out\nstages:\n  - {name: p, type: proposals, method: rpn, model_kwargs: {rpn_pre_nms_top_n_tst: 9}}\n"
    with pytest.raises(ConfigError, match=r"stages.0 \(p\).model_kwargs.rpn_pre_nms_top_n_tst: .*did you mean rpn_pre_nms_top_n_test\?"):
        load_job(write(tmp_path, rpn, "rpn.yaml"))


def test_valid_model_kwargs_of_builder_model_and_transform_pass(tmp_path):
    kwargs = "{min_size: 256, trainable_backbone_layers: 2, box_nms_thresh: 0.4, size_divisible: 64}"  # builder, model, transform
    job = load_job(write(tmp_path, BASIC.replace("num_classes: 4", "num_classes: 4\n    model_kwargs: " + kwargs)))
    assert job.stages[0].model_kwargs["size_divisible"] == 64
    spec = DetectSpec(name="d", type="detect", model="small_maskrcnn", model_kwargs={"fpn_channels": 32})  # a project model
    assert spec.model_kwargs == {"fpn_channels": 32}
    with pytest.raises(ValueError, match="model_kwargs.fpn_chanels\n.*did you mean fpn_channels"):
        DetectSpec(name="d", type="detect", model="small_maskrcnn", model_kwargs={"fpn_chanels": 32})


def test_misspelt_model_kwarg_fails_in_the_cli_before_ray(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import ray

    from pipeline.cli import main

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start for an invalid spec"))
    result = CliRunner().invoke(
        main, ["run", str(REPO / "jobs" / "maskrcnn.yaml"), "--set", "stages.masks.model_kwargs.min_sise=256",
               "--input", str(tmp_path / "no-data"), "--output", str(tmp_path / "out")]
    )
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "stages.0 (masks).model_kwargs.min_sise: unknown keyword for maskrcnn_resnet50_fpn (did you mean min_size?)" in result.output
    assert not (tmp_path / "out").exists()


# --- file settings of a job copied elsewhere ---------------------------------------------------


def test_a_job_folder_copied_elsewhere_finds_its_base_and_its_model(tmp_path, monkeypatch):
    """extends: and weights: are looked up beside the job file first, then in the working directory."""
    import shutil

    job_dir = tmp_path / "myjobs"
    (job_dir / "models").mkdir(parents=True)
    shutil.copy(REPO / "conf" / "defaults.yaml", job_dir / "base.yaml")
    shutil.copy(REPO / "conf" / "models" / "small_maskrcnn_shapes.pth", job_dir / "models" / "shapes.pth")
    text = (REPO / "jobs" / "shapes_masks.yaml").read_text()
    text = text.replace("extends: ../conf/defaults.yaml", "extends: base.yaml").replace(
        "weights: conf/models/small_maskrcnn_shapes.pth", "weights: models/shapes.pth"
    )
    (job_dir / "job.yaml").write_text(text)
    monkeypatch.chdir(tmp_path / "..")  # anywhere but the job's folder
    job = load_job(job_dir / "job.yaml")
    assert job.stages[0].weights == str(job_dir / "models" / "shapes.pth")
    assert job.decode.max_pixels == 64_000_000  # from base.yaml


def test_the_shipped_jobs_still_resolve_from_the_repository_root(monkeypatch):
    monkeypatch.chdir(REPO)
    job = load_job(REPO / "jobs" / "shapes_masks.yaml")
    assert job.stages[0].weights == "conf/models/small_maskrcnn_shapes.pth"  # as written: found from the working directory


def test_missing_base_or_model_names_the_key_and_every_path_tried(tmp_path, monkeypatch, synth_ds):
    from pipeline.engine.preflight import preflight

    text = (REPO / "jobs" / "shapes_masks.yaml").read_text()
    (tmp_path / "job.yaml").write_text(text)  # extends ../conf/defaults.yaml: not there from tmp
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ConfigError) as err:
        load_job(tmp_path / "job.yaml")
    message = str(err.value)
    assert "extends: ../conf/defaults.yaml not found" in message
    assert f"{(tmp_path / '..' / 'conf' / 'defaults.yaml').resolve()} (beside the job file)" in message
    assert f"{tmp_path / 'conf' / 'defaults.yaml'} (in the working directory)" in message

    # The model file is checked by preflight (a spec may be validated before its model exists),
    # which a dry run runs too: the message names the key and both places looked in.
    (tmp_path / "job.yaml").write_text(text.replace("extends: ../conf/defaults.yaml", f"extends: {REPO / 'conf' / 'defaults.yaml'}"))
    job = load_job(tmp_path / "job.yaml", input=synth_ds)
    with pytest.raises(ConfigError) as err:
        preflight(job, str(tmp_path / "job.yaml"))
    message = str(err.value)
    assert "stages.0 (masks).weights: file conf/models/small_maskrcnn_shapes.pth not found" in message
    assert f"{tmp_path / 'conf' / 'models' / 'small_maskrcnn_shapes.pth'} (beside the job file)" in message
    assert f"{tmp_path / 'elsewhere' / 'conf' / 'models' / 'small_maskrcnn_shapes.pth'} (in the working directory)" in message


def test_cluster_settings_extend_the_defaults(tmp_path):
    job = write(tmp_path, f"extends: [{REPO / 'conf' / 'defaults.yaml'}, {REPO / 'conf' / 'cluster_gpu.yaml'}]\n" + BASIC)
    spec = load_job(job)
    assert spec.decode.num_cpus == 1 and spec.decode.batch_size == 8 and spec.ray.address == "auto"
    assert spec.decode.max_pixels == 64_000_000  # the rest from the defaults
