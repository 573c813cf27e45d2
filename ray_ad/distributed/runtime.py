"""Starting or joining Ray the same way from every job, test and benchmark."""

from __future__ import annotations

import os

import ray

from ray_ad import storage


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``, set by ``ray job submit``), else start a local Ray.

    The S3 settings of this process travel to every worker through the runtime environment.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = storage.environment_for_workers()
    ray.init(
        address=address,
        num_cpus=None if address else num_cpus,
        runtime_env={"env_vars": env_vars} if env_vars else None,
        log_to_driver=True,
    )


def cluster_summary() -> str:
    resources = ray.cluster_resources()
    return f"{len(ray.nodes())} node(s), {resources.get('CPU', 0):.0f} CPU, {resources.get('GPU', 0):.0f} GPU"
