"""Docs are part of the interface: fail when a command, job or setting is missing from them."""

import re

from tests.conftest import REPO
from tests.test_cli import all_commands
from pipeline.cli import main


def test_readme_starts_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    first_block = re.search(r"```\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]
    assert text.index("make demo") < 200


def test_readme_mentions_every_command():
    text = (REPO / "README.md").read_text()
    for name, cmd in all_commands(main).items():
        if not hasattr(cmd, "commands"):
            assert f"pipeline {name}" in text, f"README does not show `pipeline {name}`"


def test_jobs_readme_lists_every_job_with_its_command():
    text = (REPO / "jobs" / "README.md").read_text()
    for job in sorted((REPO / "jobs").glob("*.yaml")):
        assert f"`{job.name}`" in text, f"jobs/README.md does not list {job.name}"
        assert f"jobs/{job.name}" in text, f"jobs/README.md has no command running {job.name}"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
