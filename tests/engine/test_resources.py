"""Actor pools derived from the cluster (pipeline.engine.resources): auto sizes, explicit ones kept."""

import json

import pytest

from pipeline.config.load import ConfigError
from pipeline.engine.jobfile import load_job
from pipeline.engine.resources import StageResources, cluster_shape, resolve_resources
from pipeline.engine.runner import run_job
from pipeline.data.shards import list_shards, read_shard
from tests.conftest import FAST_DETECT, REPO

DETECT = REPO / "jobs" / "detect.yaml"


def job(*overrides: str, path=DETECT):
    return load_job(path, overrides=list(overrides), input="in", output="out")


def room(j) -> float:
    return j.read_num_cpus + j.decode.num_cpus


def test_shipped_detect_job_leaves_pool_and_cpus_to_the_cluster():
    stage = job().stages[0]
    assert (stage.pool_size, stage.num_cpus, stage.threads) == (None, None, None)
    assert stage.stage_kwargs([])["threads"] is None  # derived by the runner, not at preflight


def test_auto_on_two_cpus_is_two_single_thread_actors_with_room_for_read_and_decode():
    j = job()
    (res,) = resolve_resources(j, [2.0], 0)
    assert res == StageResources(pool_size=2, num_cpus=0.62, threads=1)
    assert res.pool_size * res.num_cpus + room(j) <= 2.0  # read/decode tasks always find a CPU


@pytest.mark.parametrize("cpus,pool,threads", [(1.0, 1, 1), (4.0, 4, 1), (16.0, 8, 2), (64.0, 8, 8)])
def test_auto_scales_with_cores_and_never_reserves_every_cpu(cpus, pool, threads):
    j = job()
    (res,) = resolve_resources(j, [cpus], 0)
    assert (res.pool_size, res.threads) == (pool, threads)
    assert res.pool_size * res.num_cpus + room(j) <= cpus + 1e-9 and res.num_cpus > 0


def test_room_is_left_on_every_node():
    j = job()
    (res,) = resolve_resources(j, [1.0, 1.0], 0)
    assert res.pool_size == 2 and res.threads == 1
    assert res.num_cpus + room(j) <= 1.0  # one actor per node still leaves a read and a decode task room


def test_explicit_settings_are_kept():
    j = job("stages.detect.pool_size=3", "stages.detect.num_cpus=0.3", "stages.detect.threads=2")
    assert resolve_resources(j, [2.0], 0) == [StageResources(3, 0.3, 2)]
    # An explicit pool with auto CPUs: the pool shares the spare CPUs and the cores.
    assert resolve_resources(job("stages.detect.pool_size=1"), [2.0], 0) == [StageResources(1, 1.25, 2)]
    # Explicit CPUs with an auto pool: as many actors as fit, threads ceil(num_cpus) as before.
    assert resolve_resources(job("stages.detect.num_cpus=0.5"), [2.0], 0) == [StageResources(2, 0.5, 1)]
    assert resolve_resources(job("stages.detect.num_cpus=1.5"), [8.0], 0) == [StageResources(4, 1.5, 2)]
    assert job("stages.detect.num_cpus=1.5").stages[0].stage_kwargs([])["threads"] == 2


def test_gpu_stage_gets_one_actor_per_gpu_share():
    (res,) = resolve_resources(job("stages.detect.num_gpus=0.5"), [8.0], 2)
    assert res == StageResources(pool_size=4, num_cpus=1.0, threads=1)
    (res,) = resolve_resources(job("stages.detect.num_gpus=1"), [2.0], 1)
    assert res.pool_size == 1 and res.num_cpus + room(job()) <= 2.0


def test_auto_pool_fits_custom_resources():
    j = job("stages.detect.resources={\"worker_node\": 1}")
    (res,) = resolve_resources(j, [1.0, 4.0], 0, {"CPU": 5.0, "worker_node": 2.0})
    assert res.pool_size == 2 and res.threads == 2  # not 5 actors: only 2 fit the labelled node
    (res,) = resolve_resources(job("stages.detect.resources={\"worker_node\": 1}", "stages.detect.pool_size=3"), [4.0], 0, {"worker_node": 2.0})
    assert res.pool_size == 3  # explicit: kept


def test_stages_of_a_chain_share_the_cpus():
    j = job(path=REPO / "jobs" / "rcnn_chain.yaml")
    j.stages[0].num_cpus = j.stages[1].num_cpus = None
    j.stages[0].pool_size = j.stages[1].pool_size = None
    resources = resolve_resources(j, [2.0], 0)
    assert [r.pool_size for r in resources] == [1, 1]
    assert sum(r.pool_size * r.num_cpus for r in resources) + room(j) <= 2.0


def test_auto_is_accepted_in_job_files_and_anything_else_refused(tmp_path):
    assert job("stages.detect.pool_size=auto", "stages.detect.num_cpus=auto").stages[0].pool_size is None
    with pytest.raises(ConfigError, match="pool_size"):
        job("stages.detect.pool_size=many")
    with pytest.raises(ConfigError, match="num_cpus"):
        job("stages.detect.num_cpus=-1")


@pytest.mark.ray
def test_auto_pool_job_completes_on_two_cpu_ray(ray_local, synth_ds, tmp_path):
    """The 2-CPU Ray of the tests: auto gives 2 actors x 1 thread and the read/decode tasks still run."""
    node_cpus, gpus, totals = cluster_shape()
    assert (node_cpus, gpus, totals["CPU"]) == ([2.0], 0, 2.0)
    out = str(tmp_path / "out")
    overrides = [f"stages.detect.{k}={json.dumps(v)}" for k, v in FAST_DETECT.items()]
    j = load_job(DETECT, overrides=overrides, input=synth_ds, output=out)
    summary = run_job(j, progress=False)
    assert summary["actors"] == "detect: 2 x 1 thread (0.62 CPU each)"
    assert summary["rows_out"] == 24 and summary["error_rows"] == 0
    assert sum(read_shard(p).num_rows for p in list_shards(out)) == 24
