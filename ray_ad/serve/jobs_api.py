"""Adaptation jobs through the Ray Jobs API, with the job id as the submission id (so at most once)."""

from __future__ import annotations

import shlex
from typing import Any

from ray_ad import storage

RAY_TO_STATE = {"PENDING": "running", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed",
                "STOPPED": "failed"}


class RayJobs:
    """``submit(job_id, argv)`` and ``state(job_id)`` for ``LandingWatcher`` and the adapt endpoint."""

    def __init__(self, address: str = "http://127.0.0.1:8265") -> None:
        self.address = address
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:  # created lazily: the dashboard may start after this replica
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address)
        return self._client

    def submit(self, job_id: str, argv: list[str]) -> None:
        env = storage.environment_for_workers()
        try:
            self.client.submit_job(entrypoint=shlex.join(argv), submission_id=job_id,
                                   runtime_env={"env_vars": env} if env else None)
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise  # a duplicate is the point of deterministic ids; anything else is a real failure

    def state(self, job_id: str) -> str | None:
        try:
            status = self.client.get_job_status(job_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return None
            raise
        return RAY_TO_STATE.get(str(status.value if hasattr(status, "value") else status), "running")

    def info(self, job_id: str) -> dict[str, Any] | None:
        try:
            details = self.client.get_job_info(job_id)
        except RuntimeError:
            return None
        return {"ray_status": str(details.status.value), "message": details.message,
                "entrypoint": details.entrypoint}
