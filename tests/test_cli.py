"""The CLI parses and delegates: commands exist, have help, and turn user errors into clean exits."""

import json

import click
from click.testing import CliRunner

from pipeline.cli import main


def all_commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    out = {}
    for name, cmd in group.commands.items():
        out[f"{prefix}{name}"] = cmd
        if isinstance(cmd, click.Group):
            out.update(all_commands(cmd, f"{prefix}{name} "))
    return out


def test_help_lists_every_command_with_one_line_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name, cmd in main.commands.items():
        line = next(l for l in result.output.splitlines() if l.strip().startswith(name + " "))
        assert not line.rstrip().endswith("..."), f"help of {name!r} is cut: make its first sentence shorter"
    for name, cmd in all_commands(main).items():
        assert cmd.get_short_help_str(limit=100).strip(), f"{name} has no help"
        for param in cmd.params:
            if isinstance(param, click.Option) and param.name not in ("help", "version"):
                assert param.help, f"option {param.opts} of {name} has no help"


def test_data_commands_end_to_end(tmp_path, fixtures_dir):
    runner = CliRunner()
    synth = runner.invoke(main, ["data", "synth", str(tmp_path / "s"), "--images", "5", "--seed", "3", "--rows-per-shard", "2"])
    assert synth.exit_code == 0 and "wrote 5 images" in synth.output and "3 shard(s)" in synth.output
    info = runner.invoke(main, ["data", "info", str(tmp_path / "s"), "--json"])
    data = json.loads(info.output)
    assert data["rows"] == 5 and data["shards"] == 3 and data["categories"] == 3 and data["annotations"] > 0
    text = runner.invoke(main, ["data", "info", str(tmp_path / "s")])
    assert "circle" in text.output and "annotations" in text.output

    sahi = fixtures_dir / "images" / "sahi"
    imported = runner.invoke(
        main, ["data", "import-coco", "--images", str(sahi), "--annotations", str(sahi / "terrain_all_coco.json"), str(tmp_path / "c")]
    )
    assert imported.exit_code == 0, imported.output
    assert "wrote 3 images" in imported.output and "terrain3.png" in imported.output  # the missing file is named


def test_user_errors_are_one_clean_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [{"id": 1, "file_name": "../x.jpg", "width": 1, "height": 1}]}')
    result = CliRunner().invoke(main, ["data", "import-coco", "--images", str(tmp_path), "--annotations", str(bad), str(tmp_path / "o")])
    assert result.exit_code == 1 and "escapes the images folder" in result.output and "Traceback" not in result.output
    missing = CliRunner().invoke(main, ["data", "info", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "dataset not found" in missing.output


def test_run_dry_run_prints_resolved_spec_and_runs_the_preflight(tmp_path, synth_ds):
    from tests.conftest import REPO

    detect = str(REPO / "jobs" / "detect.yaml")
    args = ["run", detect, "--dry-run", "--input", synth_ds, "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args + ["--set", "stages.detect.batch_size=7", "--address", "auto"])
    assert result.exit_code == 0, result.output
    spec = json.loads(result.stdout)
    assert spec["stages"][0]["batch_size"] == 7 and spec["ray"]["address"] == "auto"
    assert "preflight passed; 3 of 3 shard(s) (24 rows) would be processed" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written

    # What a real run refuses, a dry run refuses too (it once passed both of these).
    missing = CliRunner().invoke(main, ["run", detect, "--dry-run", "--input", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "input: dataset not found" in missing.output
    hub = CliRunner().invoke(main, args + ["--set", "stages.detect.weights=DEFAULT"], env={"TORCH_HOME": str(tmp_path / "empty-hub")})
    assert hub.exit_code == 1 and "not in the torch hub cache" in hub.output


def test_help_and_version_load_no_heavy_library():
    """`pipeline --help` took 5-7 s because torch was imported when the CLI loaded. Measured as the
    set of modules imported (not a time, which depends on the machine): commands import their
    heavy libraries when they run."""
    import subprocess
    import sys

    probe = (
        "import json, sys\n"
        "from pipeline.cli import main\n"
        "for args in (['--help'], ['--version'], ['data', '--help'], ['run', '--help'], ['train-style', '--help']):\n"
        "    try:\n"
        "        main(args, standalone_mode=False)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    heavy = {"torch", "torchvision", "ray", "pyarrow", "cv2", "matplotlib", "pandas", "pydantic"}
    assert not heavy & loaded, f"--help imports {sorted(heavy & loaded)}"


def test_hints_for_the_usual_first_mistakes(tmp_path, synth_ds):
    """A folder of photos given as --input, and Ray failing to start: say what to do, and never
    suggest --resume for a run that did nothing."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    photos = str(REPO / "tests" / "fixtures" / "images" / "skimage")
    folder = CliRunner().invoke(main, ["run", str(REPO / "jobs" / "detect.yaml"), "--input", photos, "--dry-run"])
    assert folder.exit_code == 1 and f"pipeline data import-images {photos} DATASET" in folder.output

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "RAY_TMPDIR": str(blocker / "ray")}  # a temporary folder Ray cannot create
    cmd = [sys.executable, "-m", "pipeline", "run", str(REPO / "jobs" / "detect.yaml"), "--input", synth_ds, "--output", str(tmp_path / "o")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert "Ray did not start" in result.stderr and "no image was processed" in result.stderr and "RAY_TMPDIR" in result.stderr
    assert "--resume" not in result.stderr
    assert not list((tmp_path / "o").glob("part-*"))
