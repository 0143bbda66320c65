"""Actor pools sized from the cluster: what ``pool_size``/``num_cpus``/``threads`` left unset (auto) become.

A job file need not know the machine it runs on. Resolved when Ray is up (``resolve_resources``
with the cluster's per-node CPUs and its GPUs), for each stage:

* **GPU stage** (``num_gpus > 0``): ``pool_size`` = GPUs // ``num_gpus`` (at least 1);
  ``num_cpus`` = its share of the spare CPUs per actor, at most 1.
* **CPU stage**: one actor per core of the stage's share of the cores, each with one torch thread
  (for the small detectors and images this project runs, N actors x 1 thread beat 1 actor x N
  threads: see bench/README.md), at most ``MAX_AUTO_CPU_ACTORS`` actors (each holds its own model;
  beyond that, actors get more threads instead). ``num_cpus`` per actor is the stage's share of the
  spare CPUs divided by the pool: a fraction, so that the pool never reserves every CPU.

"Spare" CPUs are the cluster's CPUs less room, on every node, for one shard-reading task and one
decode task (``read_num_cpus + decode.num_cpus``): if the actors reserved every CPU, Ray would never
schedule those tasks and the job would hang with idle actors. Several stages share the spare CPUs
and the cores equally. Whatever the job sets explicitly is kept as it is; a stage with an explicit
``num_cpus`` and an auto ``pool_size`` gets as many actors as fit its share, and threads
``ceil(num_cpus)`` as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config.spec import JobSpec, StageSpec

MAX_AUTO_CPU_ACTORS = 8


@dataclass(frozen=True)
class StageResources:
    pool_size: int
    num_cpus: float
    threads: int  # torch threads per actor

    def describe(self) -> str:
        threads = "thread" if self.threads == 1 else "threads"
        return f"{self.pool_size} x {self.threads} {threads} ({self.num_cpus:g} CPU each)"


def cluster_shape() -> tuple[list[float], float, dict[str, float]]:
    """(CPUs of each alive node, total GPUs, total of every resource) of the connected Ray cluster."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    totals: dict[str, float] = {}
    for resources in nodes:
        for name, amount in resources.items():
            totals[name] = totals.get(name, 0.0) + float(amount)
    return [float(r.get("CPU", 0.0)) for r in nodes], totals.get("GPU", 0.0), totals


def _down(value: float) -> float:
    """Round down to 2 decimals (a reservation must never add up to more than is there), at least 0.01."""
    return max(0.01, math.floor(value * 100 + 1e-6) / 100)


def resolve_resources(
    job: JobSpec, node_cpus: list[float], gpus: float, totals: dict[str, float] | None = None
) -> list[StageResources]:
    """Each stage's pool size, CPUs per actor and threads per actor on a cluster of this shape.

    ``totals``: the cluster's custom resources; an auto pool of a stage that asks for some (e.g.
    ``{worker_node: 1}``) has no more actors than they allow.
    """
    cpu_nodes = [c for c in node_cpus if c > 0] or [1.0]
    cores = sum(max(1, int(c)) for c in cpu_nodes)
    room = (job.read_num_cpus + job.decode.num_cpus) * len(cpu_nodes)
    stages = job.stages
    share_cpus = max(0.0, sum(cpu_nodes) - room) / len(stages)
    share_cores = max(1, cores // len(stages))
    resolved = [_resolve_stage(stage, share_cpus, share_cores, gpus) for stage in stages]
    return [_fit_custom(stage, res, totals or {}) for stage, res in zip(stages, resolved)]


def _fit_custom(stage: StageSpec, res: StageResources, totals: dict[str, float]) -> StageResources:
    if stage.pool_size or not stage.resources:
        return res
    fits = [int(totals.get(name, 0.0) / amount + 1e-9) for name, amount in stage.resources.items() if amount > 0]
    pool = max(1, min([res.pool_size, *fits]))
    if pool == res.pool_size:
        return res
    num_cpus = res.num_cpus if stage.num_cpus is not None or stage.num_gpus > 0 else _down(res.num_cpus * res.pool_size / pool)
    threads = res.threads if stage.threads or stage.num_cpus is not None or stage.num_gpus > 0 else res.threads * res.pool_size // pool
    return StageResources(pool, num_cpus, max(1, threads))


def _resolve_stage(stage: StageSpec, share_cpus: float, share_cores: int, gpus: float) -> StageResources:
    if stage.num_gpus > 0:
        pool = stage.pool_size or (max(1, int(gpus / stage.num_gpus + 1e-9)) if gpus else 1)
        num_cpus = stage.num_cpus if stage.num_cpus is not None else _down(min(1.0, share_cpus / pool))
        return StageResources(pool, num_cpus, stage.threads or max(1, math.ceil(num_cpus)))
    if stage.num_cpus is not None:
        if stage.pool_size:
            pool = stage.pool_size
        elif stage.num_cpus > 0:
            pool = max(1, min(share_cores, int(share_cpus / stage.num_cpus + 1e-9)))
        else:
            pool = min(share_cores, MAX_AUTO_CPU_ACTORS)
        return StageResources(pool, stage.num_cpus, stage.threads or max(1, math.ceil(stage.num_cpus)))
    pool = stage.pool_size or min(share_cores, MAX_AUTO_CPU_ACTORS)
    return StageResources(pool, _down(share_cpus / pool), stage.threads or max(1, share_cores // pool))
