"""A real Ray cluster on loopback, started with `ray start` and torn down even on failure.

``local_cluster`` (one per session): the head has 1 CPU and a `head_node` resource, the worker 2
CPUs and a `worker_node` resource, so a stage that asks for `worker_node` can only run on the
worker. ``start_cluster`` starts a head and any workers for a test of its own (test_node_loss.py:
two workers, one of which it kills). Both run from this venv (jobs
submitted through the Job API use the `python` on the node's PATH). Token auth is disabled and
every address is loopback (RAY_AUTH_MODE=disabled and --node-ip-address=127.0.0.1 on every ray start). The cluster has its own temp dir
and ports, so it never touches the embedded Ray of other tests; it is stopped by killing the
process groups of the `ray start --block` commands, never with `ray stop` (which would stop
every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest


@dataclass
class LocalCluster:
    gcs: str
    dashboard: str
    temp_dir: str
    env: dict
    procs: list = field(default_factory=list)  # the `ray start --block` commands: head first, then workers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: `{' '.join(p.args[:3])}` exited with {p.returncode}")
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


def alive_nodes(dashboard: str) -> int:
    with urllib.request.urlopen(f"{dashboard}/nodes?view=summary", timeout=5) as r:
        summary = json.load(r)["data"]["summary"]
    return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")


@pytest.fixture(scope="session")
def local_cluster():
    with start_cluster(workers=[{"num_cpus": 2, "resources": {"worker_node": 2}}]) as cluster:
        yield cluster


@contextmanager
def start_cluster(workers: list[dict], extra_env: dict | None = None):
    """A head (1 CPU, ``head_node``) and one worker node per entry of ``workers`` (``num_cpus``,
    ``resources``), each its own `ray start --block` process group, all killed on exit."""
    bin_dir = os.path.dirname(sys.executable)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        **(extra_env or {}),
    }
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dash_port, client_port = free_port(), free_port(), free_port()
    ray_bin = os.path.join(bin_dir, "ray")
    head_cmd = [
        ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--ray-client-server-port={client_port}",
        "--num-cpus=1", '--resources={"head_node": 1}', f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={free_port()}",  # several nodes on one host: each agent its own port
    ]
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    procs: list[subprocess.Popen] = []
    dashboard = f"http://127.0.0.1:{dash_port}"
    try:
        procs.append(subprocess.Popen(head_cmd, env=env, start_new_session=True, stdout=log, stderr=log))
        wait_for(lambda: alive_nodes(dashboard) >= 1, 90, "head node", procs)
        for n, worker in enumerate(workers, start=2):
            worker_cmd = [
                ray_bin, "start", "--block", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                f"--num-cpus={worker['num_cpus']}", f"--resources={json.dumps(worker['resources'])}",
                f"--dashboard-agent-listen-port={free_port()}",
            ]
            procs.append(subprocess.Popen(worker_cmd, env=env, start_new_session=True, stdout=log, stderr=log))
            wait_for(lambda: alive_nodes(dashboard) >= n, 90, f"worker node {n - 1}", procs)
        yield LocalCluster(gcs=f"127.0.0.1:{port}", dashboard=dashboard, temp_dir=temp_dir, env=env, procs=procs)
    finally:
        for p in reversed(procs):
            _kill_group(p)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever ignored SIGTERM (raylet children, workers)
    except ProcessLookupError:
        pass
    proc.wait()
