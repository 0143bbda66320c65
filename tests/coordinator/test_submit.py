"""`pipeline submit` before the cluster: a bad spec or an unreachable cluster is one clear line."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pipeline.cli import main
from tests.conftest import REPO

JOB = str(REPO / "jobs" / "detect.yaml")


def test_bad_spec_fails_before_contacting_any_cluster():
    result = CliRunner().invoke(main, ["submit", JOB, "--address", "http://127.0.0.1:9", "--set", "stages.detect.bogus=1"])
    assert result.exit_code != 0
    assert "stages.0 (detect).bogus: unknown key" in result.output
    assert "cannot reach" not in result.output and "submission" not in result.output


def test_dry_run_shows_the_entrypoint_and_resolved_spec():
    out = CliRunner().invoke(main, ["submit", JOB, "--dry-run", "--input", "/data/in", "--output", "/data/out", "--priority", "3"])
    assert out.exit_code == 0, out.output
    plan = json.loads(out.output)
    assert plan["entrypoint"].startswith("python -m pipeline run job.yaml --address auto --resume ")
    assert "--priority 3" in plan["entrypoint"]
    assert (plan["spec"]["input"], plan["spec"]["output"], plan["spec"]["ray"]["address"]) == ("/data/in", "/data/out", None)
    assert plan["metadata"] == {"pipeline_job": "detect", "priority": "3", "input": "/data/in", "output": "/data/out"}
    over = CliRunner().invoke(main, ["submit", JOB, "--dry-run", "--overwrite"])
    assert "--overwrite" in json.loads(over.output)["entrypoint"] and "--resume" not in json.loads(over.output)["entrypoint"]


def test_unreachable_cluster_is_one_clean_line():
    for args in (["submit", JOB], ["jobs", "list"], ["jobs", "status", "x"]):
        result = CliRunner().invoke(main, args + ["--address", "http://127.0.0.1:9"])
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: ") and "Traceback" not in result.output
        assert "127.0.0.1:9" in result.output


def test_jobs_list_without_a_cluster_says_how_to_get_one(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = CliRunner().invoke(main, ["jobs", "list"])  # the default address; nothing listens in the tests
    assert result.exit_code == 1
    assert "set --address (or RAY_ADDRESS)" in result.output and "ray start --head" in result.output
    assert "pipeline run JOB.yaml" in result.output
