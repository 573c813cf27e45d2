"""Starting or joining Ray the same way from every job, test and benchmark."""

from __future__ import annotations

import json
import os

import ray

from ray_ad import storage

JOB_RUNTIME_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a submitted job


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``, set by ``ray job submit``), else start a local Ray.

    The S3 settings of this process travel to every worker through the runtime environment (for a
    submitted job: through the job's own runtime env, set at submission).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = storage.environment_for_workers()
    # A driver started by `ray job submit` (or the landing watcher) already runs in its job's runtime
    # env, which Ray applies to every worker; Ray refuses a second env that repeats its variables, so
    # only what the job's env lacks (e.g. --s3-endpoint given to the job) is added.
    if JOB_RUNTIME_ENV_VAR in os.environ:
        job_config = json.loads(os.environ[JOB_RUNTIME_ENV_VAR] or "{}")
        job_env = (job_config.get("runtime_env") or {}).get("env_vars") or {}
        env_vars = {k: v for k, v in env_vars.items() if k not in job_env}
    ray.init(
        address=address,
        num_cpus=None if address else num_cpus,
        runtime_env={"env_vars": env_vars} if env_vars else None,
        log_to_driver=True,
    )


def cluster_summary() -> str:
    resources = ray.cluster_resources()
    return f"{len(ray.nodes())} node(s), {resources.get('CPU', 0):.0f} CPU, {resources.get('GPU', 0):.0f} GPU"
