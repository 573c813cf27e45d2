"""The ``Watcher`` deployment: the landing-zone watcher (``ray_ad.serve.landing``) on a timer, with the
Ray Jobs API (``ray_ad.serve.jobs_api``) to submit and follow adaptation jobs.

The ingress reaches it for ``POST /v1/landing/poll``, ``POST /v1/lines/{line}/adapt`` and
``GET /v1/jobs/{job_id}``; a pass that fails is kept for the replica's health check.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from ray import serve

from ray_ad.serve.config import ServiceConfig


@serve.deployment(ray_actor_options={"num_cpus": 0}, num_replicas=1)
class Watcher:
    """Polls ``<root>/landing/`` every ``landing_interval_s`` and submits adaptation jobs.

    One replica is enough; a second one (or a restart) is harmless: job ids are deterministic.
    """

    def __init__(self, config: ServiceConfig) -> None:
        from ray_ad.serve.jobs_api import RayJobs
        from ray_ad.serve.landing import LandingWatcher

        self.jobs = RayJobs(config.jobs_address)
        # The admin token keys the opt-in that lets a batch land into a line that already serves.
        admin = config.load_tokens().admin
        self.watcher = LandingWatcher(config.root, self.jobs.submit, self.jobs.state, config.default_source, admin,
                                      config.skip_unreadable)
        self.interval_s = config.landing_interval_s
        self.last_error: str | None = None
        self._lock = threading.Lock()  # one pass at a time: the timer thread and POST /v1/landing/poll
        if self.interval_s > 0:
            threading.Thread(target=self._loop, name="landing-watcher", daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval_s)
            self._poll()

    def _poll(self) -> list[dict[str, Any]]:
        with self._lock:
            try:
                events = self.watcher.poll_once()
            except Exception as exc:  # noqa: BLE001 - any failure must reach the health check, not end the loop
                self.last_error = f"{type(exc).__name__}: {exc}"
                return [{"event": "error", "error": self.last_error}]
            self.last_error = None
            return events

    async def poll(self) -> list[dict[str, Any]]:
        """One pass now (what ``POST /v1/landing/poll`` triggers); errors are kept for the health check."""
        return await asyncio.to_thread(self._poll)

    async def submit(self, job_id: str, argv: list[str]) -> None:
        await asyncio.to_thread(self.jobs.submit, job_id, argv)

    async def job(self, job_id: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.jobs.info, job_id)

    def check_health(self) -> None:
        if self.last_error:
            raise RuntimeError(f"landing watcher: {self.last_error}")
