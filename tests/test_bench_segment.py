"""bench/segment.py runs end to end: its equality check (stage label maps == the torchvision loop's) passes
and it prints its table, so the numbers in bench/README.md can be reproduced."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_segment_bench_smoke():
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "segment.py"), "--images", "2", "--sizes", "48", "--repeats", "1", "--batch-size", "2"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if "|" in line and "configuration" not in line and "-+-" not in line]
    assert len(rows) == 2 and all(len(r.split("|")) == 7 for r in rows)
    assert all(float(r.split("|")[5]) > 0 for r in rows)  # predict/loop: a measured ratio
