"""Joining a Ray cluster or starting embedded local Ray, set up the way jobs want it."""

from __future__ import annotations

import logging
import os

import pipeline
from pipeline.config.spec import JobSpec

def ensure_ray(job: JobSpec) -> bool:
    """Join ``ray.address`` or start embedded local Ray; returns True if we started it."""
    import ray
    from ray.data import DataContext
    from ray.util.debug import log_once

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts images, not blocks
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True  # a failed job reports the stage's error, not Ray's wrapper
    log_once("ray_data_progress_manager_disabled")  # mark Ray's "progress bars disabled" notice as shown
    # Ray's INFO lines ("Started a local Ray instance", "execution finished in ...") say nothing the
    # progress bar and the summary do not; warnings and errors still show.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return start_ray(job.ray.address, job.ray.num_cpus)


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address`` or start embedded local Ray (``num_cpus``: its CPUs, default
    all); returns True if we started it. Nothing happens when Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        # Ship this package's code with the job so cluster workers run the same version as the
        # driver (their Python environment must still have the dependencies installed). A job
        # submitted through the Job API already carries it in its runtime_env.
        submitted = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        runtime_env = None if submitted else {"py_modules": [os.path.dirname(pipeline.__file__)]}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
    else:
        # address="local": always a new embedded instance, never a cluster someone started here.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    return True
