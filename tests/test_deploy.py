"""Cluster deployment files: docker-compose.yml, docker/Dockerfile, .dockerignore, conf/kuberay/.

No Docker engine or Kubernetes here, so these read the files and check what would hurt in
production: a port published on every interface, a GPU worker without its device, a Ray node
without the shared volume, an image or manifest left on another Ray/Python than the one
installed, a RayJob whose command no longer runs. When `docker-compose` is on PATH (CI installs
Debian's 1.29 with apt) the compose file is also validated by it.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest
import ray
import yaml

from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
RAYJOB = REPO / "conf" / "kuberay" / "rayjob.yaml"
PVC = REPO / "conf" / "kuberay" / "data-pvc.yaml"

RAY_NODES = {"ray-head", "cpu-worker", "gpu-worker"}
LOCALHOST = "127.0.0.1"
RAY_IMAGE = re.compile(r"rayproject/ray:(?P<version>\d+\.\d+\.\d+)-(?P<py>py\d+)(?P<variant>-gpu)?\b")


def _python_tag() -> str:
    """py311 from pyproject's requires-python (==3.11.*), which must also be this interpreter."""
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    major, minor = re.match(r"==(\d+)\.(\d+)", spec).groups()
    assert (int(major), int(minor)) == sys.version_info[:2], f"tests run on Python {sys.version_info[:2]}, pyproject says {spec}"
    return f"py{major}{minor}"


def _default(value: str) -> str:
    """Compose interpolation with the defaults the file declares: ${VAR:-x} -> x."""
    return re.sub(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", r"\1", str(value))


def _command(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(_default(cmd)) if isinstance(cmd, str) else [_default(c) for c in cmd]


def _flag(cmd: list[str], name: str) -> str | None:
    for i, tok in enumerate(cmd):
        if tok.startswith(f"{name}="):
            return tok.split("=", 1)[1]
        if tok == name and i + 1 < len(cmd):
            return cmd[i + 1]
    return None


def _bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", str(size).strip().lower())
    assert m, f"cannot read size {size!r}"
    return int(float(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2)])


def _published(port) -> tuple[str | None, str]:
    """(host ip or None for every interface, 'host:container') of a compose `ports` entry."""
    if isinstance(port, dict):  # long syntax
        return port.get("host_ip"), f"{port.get('published')}:{port.get('target')}"
    text = str(port).split("/")[0]
    m = re.fullmatch(r"\[([^\]]+)\]:(.*)", text)  # [::1]:8265:8265
    if m:
        return m.group(1), m.group(2)
    parts = text.split(":")
    return (parts[0], ":".join(parts[1:])) if len(parts) == 3 else (None, text)


def _check_ports(services: dict) -> dict[str, list[str]]:
    published = {}
    for name, svc in services.items():
        assert svc.get("network_mode") != "host", f"{name}: network_mode host publishes every port on every interface"
        for port in svc.get("ports", []):
            ip, mapping = _published(port)
            assert ip == LOCALHOST, (
                f"{name}: port {port!r} is published on {'every interface' if ip is None else ip}; "
                f"bind it to {LOCALHOST} (the dashboard/Job API has no authentication; use an SSH tunnel)"
            )
            published.setdefault(name, []).append(mapping.split(":")[-1])
    return published


def _volume(entry) -> tuple[str, str]:
    if isinstance(entry, dict):
        return entry.get("source"), entry.get("target")
    src, dst = str(entry).split(":")[:2]
    return src, dst


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def test_ray_nodes_are_head_cpu_and_gpu_workers(services):
    ray_nodes = {name for name, svc in services.items() if _command(svc)[:2] == ["ray", "start"]}
    assert ray_nodes == RAY_NODES
    for name in RAY_NODES - {"ray-head"}:
        assert _flag(_command(services[name]), "--address") == "ray-head:6379", f"{name} must join the head's GCS"
        assert services[name]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert "--block" in _command(services["ray-head"])


def test_every_published_port_is_bound_to_localhost(services):
    published = _check_ports(services)
    assert {"8265", "10001", "6379"} <= set(published.get("ray-head", [])), published
    assert {"9000", "9001"} <= set(published.get("minio", [])), published


def test_head_exposes_dashboard_and_job_api(services):
    head = _command(services["ray-head"])
    assert "--head" in head
    # 0.0.0.0 inside the container, so Docker's port mapping can reach it; the mapping is localhost-only
    assert _flag(head, "--dashboard-host") == "0.0.0.0"
    assert _flag(head, "--dashboard-port") in (None, "8265")
    assert "8265" in _check_ports({"ray-head": services["ray-head"]})["ray-head"]
    text = COMPOSE.read_text()
    assert "no authentication" in text.lower() and "ssh -N -L 8265:127.0.0.1:8265" in text


def test_gpu_worker_reserves_an_nvidia_device_behind_the_gpu_profile(services):
    gpu = services["gpu-worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and (d.get("count") == 1 or d.get("device_ids"))
        for d in devices
    ), devices
    assert _flag(_command(gpu), "--num-gpus") == "1"
    assert gpu["build"]["args"]["BASE_IMAGE"].endswith("-gpu")
    assert gpu.get("profiles") == ["gpu"]
    # everything else starts with a plain `docker compose up`, on machines without a GPU
    assert [name for name, svc in services.items() if svc.get("profiles")] == ["gpu-worker"]
    assert not any("deploy" in svc for name, svc in services.items() if name != "gpu-worker")


def test_all_ray_nodes_mount_the_shared_volume(compose, services):
    mounts = {name: dict(_volume(v)[::-1] for v in services[name].get("volumes", [])) for name in RAY_NODES}
    sources = {name: m.get("/data") for name, m in mounts.items()}
    assert None not in sources.values(), f"a Ray node without /data: {sources}"
    assert len(set(sources.values())) == 1, f"Ray nodes mount different volumes at /data: {sources}"
    assert set(sources.values()) <= set(compose.get("volumes") or {}), "the /data volume must be a declared named volume"


def test_object_store_fits_in_shm(services):
    for name in RAY_NODES:
        svc = services[name]
        shm = _bytes(_default(svc["shm_size"]))
        store = int(_flag(_command(svc), "--object-store-memory"))
        assert store < 0.95 * shm, f"{name}: object store {store} B does not fit /dev/shm {shm} B; Ray would fall back to /tmp"
        env = svc["environment"]
        assert str(env["RAY_USAGE_STATS_ENABLED"]) == "0"
        assert "healthcheck" in svc, name


def test_ray_nodes_reach_the_s3_store(services):
    store = services["minio"]
    assert "healthcheck" in store
    assert services["create-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    for name in RAY_NODES:
        env = services[name]["environment"]
        assert _default(env["AWS_ENDPOINT_URL"]) == "http://minio:9000", name
        assert env["AWS_ACCESS_KEY_ID"] == store["environment"]["MINIO_ROOT_USER"], name
        assert env["AWS_SECRET_ACCESS_KEY"] == store["environment"]["MINIO_ROOT_PASSWORD"], name


def test_ray_images_follow_the_installed_ray_and_python(services):
    py = _python_tag()
    dockerfile = DOCKERFILE.read_text()
    refs = RAY_IMAGE.findall(dockerfile) + [
        RAY_IMAGE.search(svc["build"]["args"]["BASE_IMAGE"]).groups() for name, svc in services.items() if name in RAY_NODES
    ]
    assert len(refs) >= 1 + len(RAY_NODES)
    for version, tag_py, _ in refs:
        assert version == ray.__version__, f"image on Ray {version}, installed Ray is {ray.__version__}"
        assert tag_py == py, f"image on {tag_py}, the project is {py}"
    # the default base (no build arg) is the CPU image; compose picks -gpu for the GPU worker only
    assert re.search(rf"^ARG BASE_IMAGE=rayproject/ray:{re.escape(ray.__version__)}-{py}$", dockerfile, re.M)
    for name in RAY_NODES:
        assert ray.__version__ in _default(services[name]["image"]) and py in _default(services[name]["image"]), name


def test_dockerfile_installs_the_project_under_the_lock():
    text = DOCKERFILE.read_text()
    assert re.search(r"pip install [^\n]*-c requirements\.lock \.(\s|$)", text)
    workdir = re.findall(r"^WORKDIR (\S+)", text, re.M)[-1]
    copied = []
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
            copied.append(src)
    assert {"pyproject.toml", "requirements.lock", "README.md", "pipeline", "jobs", "conf"} <= set(copied)
    assert workdir == "/home/ray/app"
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "demo-output", ".whl"} <= ignored
    assert not ignored & set(copied), "the Dockerfile copies a path .dockerignore excludes"


@pytest.mark.parametrize("profile", [None, "gpu"])
def test_docker_compose_validates_the_file(profile):
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not on PATH (CI installs it: apt-get install docker-compose)")
    args = [exe, "-f", str(COMPOSE)] + (["--profile", profile] if profile else [])
    check = subprocess.run(args + ["config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    # the file as Compose resolves it (variables interpolated, anchors merged): still localhost-only
    resolved = subprocess.run(args + ["config"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert resolved.returncode == 0, resolved.stderr
    _check_ports(yaml.safe_load(resolved.stdout)["services"])


# --- KubeRay ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def _pods(rayjob) -> dict[str, dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


def _entrypoint(rayjob) -> tuple[str, list[str]]:
    """(job file in the repository, the rest of the arguments) of `pipeline run IMAGE/JOB ...`."""
    tokens = shlex.split(rayjob["spec"]["entrypoint"])
    assert tokens[:2] == ["pipeline", "run"], tokens
    workdir = re.findall(r"^WORKDIR (\S+)", DOCKERFILE.read_text(), re.M)[-1].rstrip("/") + "/"
    job = tokens[2]
    relative = job[len(workdir):] if job.startswith(workdir) else job
    return relative, tokens[3:]


def test_rayjob_is_a_kuberay_rayjob_on_the_installed_ray(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert str(rayjob["spec"]["rayClusterSpec"]["rayVersion"]) == ray.__version__
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True and rayjob["spec"]["ttlSecondsAfterFinished"] > 0
    py = _python_tag()
    for group, pod in _pods(rayjob).items():
        for c in pod["containers"]:
            assert f"{ray.__version__}-{py}" in c["image"], f"{group}: image {c['image']} is not on Ray {ray.__version__} / {py}"


def test_rayjob_entrypoint_runs_a_job_of_this_repository_on_the_cluster(rayjob):
    job, args = _entrypoint(rayjob)
    assert (REPO / job).is_file(), f"the RayJob runs {job}, which is not in the repository"
    assert job.split("/")[0] in re.findall(r"^COPY .*?(\S+) \./\S+$", DOCKERFILE.read_text(), re.M), f"the image has no {job}"
    assert _flag(args, "--address") == "auto", "without --address auto the job starts its own single-node Ray in the head pod"
    # the same arguments, checked by the CLI itself (spec, --set keys, options)
    from click.testing import CliRunner

    from pipeline.cli import main

    dry = CliRunner().invoke(main, ["run", str(REPO / job), *args, "--dry-run"])
    spec = json.loads(dry.stdout)  # printed before the preflight, which needs the cluster's /data
    assert dry.exit_code == 0 or "dataset not found: /data/" in dry.stderr, dry.output
    assert spec["input"].startswith("/data/") and spec["output"].startswith("/data/")
    assert any(stage["num_gpus"] > 0 for stage in spec["stages"]), "the job would not use the GPU the worker group requests"


def test_rayjob_gpu_group_requests_an_nvidia_gpu(rayjob):
    gpu_groups = [
        g["groupName"]
        for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"


def test_rayjob_pods_share_the_data_volume(rayjob):
    pvc = yaml.safe_load(PVC.read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    for group, pod in _pods(rayjob).items():
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        for c in pod["containers"]:
            data = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/data"]
            assert data and claims.get(data[0]) == pvc["metadata"]["name"], f"{group}: /data is not the {pvc['metadata']['name']} PVC"
