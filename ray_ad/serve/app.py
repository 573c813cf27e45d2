"""The Serve application graph, and its entry point for ``serve run`` / ``serve deploy`` configs.

``app_builder`` (``import_path: ray_ad.serve.app:app_builder`` in ``serve_configs/*.yaml``) reads the
config's args into a ``ServiceConfig``; ``build_app`` binds the three deployments to it:

- ``FleetAPI`` (``ray_ad.serve.api``): the HTTP ingress, routes, tokens, fallback, metrics;
- ``LineScorer`` (``ray_ad.serve.scorer``): multiplexed per-line models, batched scoring;
- ``Watcher`` (``ray_ad.serve.watcher``): the landing-zone watcher and the Ray Jobs API.

They are importable from here too (serve configs name deployments by these class names).
"""

from __future__ import annotations

from typing import Any

from ray_ad.serve.api import FleetAPI
from ray_ad.serve.config import APP_ARGS, ScorerOptions, ServiceConfig
from ray_ad.serve.scorer import LineScorer
from ray_ad.serve.watcher import Watcher

__all__ = ["APP_ARGS", "FleetAPI", "LineScorer", "ScorerOptions", "ServiceConfig", "Watcher", "app_builder",
           "build_app"]


def build_app(config: ServiceConfig) -> Any:
    """The Serve application graph: the ingress, the scorer it routes to, the landing watcher.

    ``config.scorer`` overrides the scorer deployment's CPUs, ``max_ongoing_requests`` and replica
    count (serve configs set them per deployment instead).
    """
    if not isinstance(config, ServiceConfig):
        raise TypeError(f"build_app takes a ServiceConfig, got {type(config).__name__}")
    scorer = LineScorer.options(**config.scorer.deployment_options()).bind(config.root)
    return FleetAPI.bind(scorer, Watcher.bind(config), config)


def app_builder(args: dict[str, Any]) -> Any:
    """Entry point for ``serve run`` / ``serve deploy`` configs (``import_path: ray_ad.serve.app:app_builder``).

    ``args``: see ``ServiceConfig.from_args``; an unknown or missing key is an error naming it.
    """
    return build_app(ServiceConfig.from_args(args))
