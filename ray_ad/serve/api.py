"""The HTTP API: the FastAPI routes and the ``FleetAPI`` ingress deployment.

    GET  /healthz                      liveness
    GET  /v1/lines                     the lines this token may read
    GET  /v1/lines/{line}              current version, threshold, metrics
    POST /v1/lines/{line}/detect       raw image bytes or a JSON batch -> score, is_anomaly, threshold,
                                       model_version per image (?heatmap=true adds a PNG overlay, base64)
    POST /v1/lines/{line}/references   the line's token (or admin): a nagl reference set (JSON: normal
                                       images, abnormal images with masks) -> a new version, served at once
    POST /v1/lines/{line}/adapt        admin: {"target", "source_line"} -> job_id (Ray Jobs API)
    GET  /v1/jobs/{job_id}             admin: Ray job state + the job's status object
    POST /v1/landing/poll              admin: one landing-zone pass now

The ingress resolves a line to its CURRENT version (re-read every ``poll_s`` seconds), so a newly
published version is served without a restart; the model id ``<line>@<version>`` routes each request
to a ``LineScorer`` replica that holds that model (Serve model multiplexing). A request already routed
to the old id finishes on the old model. A CURRENT that does not load falls back to the line's last
good version. Tokens are checked here (``ray_ad.serve.auth``), bodies decoded here
(``ray_ad.serve.requests``), and every answer is counted in ``LineMetrics``.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route signatures' real types
# (a string annotation of ``Request`` is not resolved through Serve's class wrapper).
import asyncio
import json
import logging
import time
from typing import Any

import numpy as np
import ray.exceptions
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_ad import registry, storage
from ray_ad.bundle import METRICS_FILE
from ray_ad.errors import ConfigError, DataError, RayADError
from ray_ad.serve.auth import AccessDenied, Tokens
from ray_ad.serve.config import ServiceConfig
from ray_ad.serve.metrics import LineMetrics
from ray_ad.serve.requests import BadRequest, images_from_body, read_body, references_from_body

log = logging.getLogger(__name__)

api = FastAPI(title="ray_ad fleet service", version="1",
              description="Anomaly detection per product line; models from the ray_ad registry.")

# A scorer process that dies (the OOM killer) or cannot be reached: the request answers 500 and the
# next one tries again; only an error raised by the model itself marks a version as not loading.
_INFRASTRUCTURE_ERRORS = (ray.exceptions.RayActorError,)  # ActorDiedError, ActorUnavailableError

RETRY_FAILED_S = 60.0  # a version that did not load is tried again after this long, not per request


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (e.g. a line name with '/' in it) answer in the same {"error": ...} shape."""
    return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"}, status_code=exc.status_code)


def _checked_name(kind: str, value: str) -> str:
    """A line or job id from the URL must be a plain name (no path characters): else 400."""
    try:
        return registry.check_name(kind, value)
    except ConfigError as exc:
        raise BadRequest(400, str(exc)) from exc


def _allowed(tokens: Tokens, line: str, header: str | None) -> bool:
    try:
        tokens.check_line(line, header)
    except AccessDenied:
        return False
    return True


def _respond(make: Any) -> Any:
    """``make()``, with input errors as their 4xx and other ray_ad errors as 503, in the {"error"} shape."""
    try:
        return make()
    except BadRequest as exc:  # AccessDenied included
        return JSONResponse({"error": str(exc)}, status_code=exc.status)
    except RayADError as exc:
        return JSONResponse({"error": str(exc)}, status_code=503)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class FleetAPI:
    def __init__(self, scorer: Any, watcher: Any, config: ServiceConfig) -> None:
        self.scorer, self.watcher, self.root, self.poll_s = scorer, watcher, config.root, config.poll_s
        self.tokens = config.load_tokens()
        self.limits = config.limits
        self._versions: dict[str, tuple[float, str]] = {}
        # model id -> (checked at, input size or None, why it cannot serve, when, as UTC text): each
        # version is loaded once, and a version that failed is tried again only after RETRY_FAILED_S.
        self._checked: dict[str, tuple[float, int | None, str | None, str]] = {}
        self.metrics = LineMetrics()

    def _current(self, line: str) -> str:
        """CURRENT of ``line``, re-read at most every ``poll_s`` seconds."""
        cached = self._versions.get(line)
        if cached and time.monotonic() - cached[0] < self.poll_s:
            return cached[1]
        version = registry.current_version(self.root, line)
        if version is None:
            raise BadRequest(404, f"unknown line {line!r}: nothing is published under it")
        self._versions[line] = (time.monotonic(), version)
        return version

    def _public(self, message: str) -> str:
        """An error message fit for a client: no server paths (the storage root becomes <root>)."""
        for root in {self.root, storage.absolute(self.root)}:
            message = message.replace(root.rstrip("/"), "<root>")
        return message

    async def _check(self, line: str, version: str) -> tuple[int | None, str | None, str]:
        """(input size, None, when checked) when ``line@version`` loads and scores, else (None, the
        reason, when checked)."""
        model_id = f"{line}@{version}"
        cached = self._checked.get(model_id)
        if cached and (cached[2] is None or time.monotonic() - cached[0] < RETRY_FAILED_S):
            return cached[1], cached[2], cached[3]
        try:
            size, error = await self.scorer.options(multiplexed_model_id=model_id).ready.remote(), None
        except _INFRASTRUCTURE_ERRORS:
            raise  # a replica that died or could not be reached says nothing about the model: not cached
        except Exception as exc:  # noqa: BLE001 - whatever stops the model from loading or scoring
            cause = getattr(exc, "cause", None) or exc
            size, error = None, self._public(f"{type(cause).__name__}: {cause}".splitlines()[0])
        checked = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._checked[model_id] = (time.monotonic(), size, error, checked)
        return size, error, checked

    async def _serving(self, line: str) -> tuple[str, int, dict[str, Any]]:
        """The version to serve ``line`` with: CURRENT when it loads, else the line's last good version
        (the line is then degraded). 503 when neither can serve."""
        current = self._current(line)
        size, error, checked = await self._check(line, current)
        health: dict[str, Any] = {"current": current, "degraded": error is not None, "error": error,
                                  "current_checked": checked}
        if error is None:
            self.metrics.degraded(line, False)
            return current, int(size), health
        fallback = registry.last_good_version(self.root, line)
        self.metrics.degraded(line, True)
        if fallback and fallback != current:
            fallback_size, fallback_error, _ = await self._check(line, fallback)
            if fallback_error is None:
                return fallback, int(fallback_size), health
        raise BadRequest(503, f"line {line!r} cannot be served: version {current} does not load ({error})"
                              + ("" if fallback and fallback != current else "; no earlier version has served"))

    def _guard(self, request: Request, line: str) -> None:
        self.tokens.check_line(_checked_name("line", line), request.headers.get("authorization"))

    @api.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/lines")
    def lines(self, request: Request) -> Any:
        header = request.headers.get("authorization")

        def readable() -> dict[str, list[str]]:
            self.tokens.check_known(header)  # 401 without a token, 403 for one the service never issued
            return {"lines": [line for line in registry.list_lines(self.root) if _allowed(self.tokens, line, header)]}
        return _respond(readable)

    @api.get("/v1/lines/{line}")
    async def line_info(self, line: str, request: Request) -> Any:
        """The version that serves the line (its last good one when CURRENT does not load: then
        ``degraded`` is true, with the reason), CURRENT, method, threshold and metrics."""
        try:
            self._guard(request, line)
            version, _, health = await self._serving(line)
            uri = registry.version_uri(self.root, line, version)
            config = json.loads(storage.read_text(storage.join(uri, "config.json")))
            metrics = json.loads(storage.read_text(storage.join(uri, METRICS_FILE)))
        except BadRequest as exc:
            return JSONResponse({"error": self._public(str(exc))}, status_code=exc.status)
        except RayADError as exc:
            return JSONResponse({"error": self._public(str(exc))}, status_code=503)
        return {"line": line, "version": version, **health, "method": config["method"],
                "threshold": config["state"]["threshold"], "versions": registry.list_versions(self.root, line),
                "metrics": {k: v for k, v in metrics.items() if not isinstance(v, dict)}}

    @api.post("/v1/lines/{line}/references")
    async def references(self, line: str, request: Request) -> Any:
        """Publish ``line``'s nagl reference set (no training) and serve it from the next request on.

        The model is the current version of ``model_line`` (default: the line itself, to replace its
        references); the token must grant both lines. Bad images, a missing or mis-sized mask, or no
        normal image: 4xx and nothing published.
        """
        from ray_ad.methods.nagl.references import publish_references

        try:
            self._guard(request, line)
            body = await read_body(request.headers.get("content-length"), request.stream(), self.limits.max_bytes)
            model_line, normal, abnormal = await asyncio.to_thread(references_from_body, body, self.limits)
            model_line = model_line or line
            if model_line != line:
                self._guard(request, model_line)
            version = registry.current_version(self.root, model_line)
            if version is None:
                raise BadRequest(404, f"model line {model_line!r} has no published model to take the references")
            model_uri = registry.version_uri(self.root, model_line, version)
            try:
                published = await asyncio.to_thread(publish_references, self.root, line, model_uri, normal, abnormal)
            except DataError as exc:
                raise BadRequest(422, str(exc)) from exc
            self._versions.pop(line, None)  # serve the new version from the next request on
        except BadRequest as exc:
            return JSONResponse({"error": self._public(str(exc))}, status_code=exc.status)
        except RayADError as exc:
            return JSONResponse({"error": self._public(str(exc))}, status_code=503)
        return {"line": line, "version": published, "model": f"{model_line}@{version}",
                "references": {"normal": len(normal), "abnormal": len(abnormal)}}

    @api.post("/v1/lines/{line}/adapt")
    async def adapt(self, line: str, request: Request) -> Any:
        """Admin: adapt ``source_line``'s current model to the images at ``target`` as line ``line``."""
        from ray_ad.job_status import adapt_job_id, target_key
        from ray_ad.serve.landing import adapt_argv

        try:
            self.tokens.check_admin(request.headers.get("authorization"))
            _checked_name("line", line)
            try:
                body = json.loads(await request.body() or b"null")
            except json.JSONDecodeError as exc:
                raise BadRequest(400, f"malformed JSON body: {exc}") from exc
            if not isinstance(body, dict) or not isinstance(body.get("target"), str) \
                    or not isinstance(body.get("source_line"), str):
                raise BadRequest(400, 'the body must be JSON {"target": URI, "source_line": LINE}')
            version = registry.current_version(self.root, body["source_line"])
            if version is None:
                raise BadRequest(404, f"source line {body['source_line']!r} has no published model")
            job_id = adapt_job_id(line, body["source_line"], version, target_key(body["target"]))
            await self.watcher.submit.remote(job_id, adapt_argv(line, body["source_line"], body["target"], self.root))
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return {"job_id": job_id}

    @api.get("/v1/jobs/{job_id}")
    async def job(self, job_id: str, request: Request) -> Any:
        """Admin: the Ray job's state and the status object the adaptation job writes."""
        from ray_ad.job_status import read_job_status

        try:
            self.tokens.check_admin(request.headers.get("authorization"))
            ray_info = await self.watcher.job.remote(_checked_name("job id", job_id))
            status = read_job_status(self.root, job_id)
            if ray_info is None and status is None:
                raise BadRequest(404, f"no job {job_id!r}")
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return {"job_id": job_id, "ray": ray_info, "status": status}

    @api.post("/v1/landing/poll")
    async def poll_landing(self, request: Request) -> Any:
        """Admin: one landing-zone pass now (the watcher also polls on its own)."""
        try:
            self.tokens.check_admin(request.headers.get("authorization"))
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return {"events": await self.watcher.poll.remote()}

    @api.post("/v1/lines/{line}/detect")
    async def detect(self, line: str, request: Request, heatmap: bool = False) -> Any:
        started = time.perf_counter()
        try:
            self._guard(request, line)
            version, size, _ = await self._serving(line)
            body = await read_body(request.headers.get("content-length"), request.stream(), self.limits.max_bytes)
            # Decoding and resizing in a worker thread (PIL releases the GIL): the event loop keeps
            # reading and routing the other requests meanwhile.
            images = await asyncio.to_thread(images_from_body, body, request.headers.get("content-type"),
                                             self.limits, size)
            handle = self.scorer.options(multiplexed_model_id=f"{line}@{version}")
            rows = await asyncio.gather(*[handle.score.remote(np.asarray(image), heatmap) for _, image in images])
        except BadRequest as exc:  # AccessDenied included
            self.metrics.request(line, exc.status, started)
            return JSONResponse({"error": self._public(str(exc))}, status_code=exc.status)
        except RayADError as exc:
            self.metrics.request(line, 503, started)
            return JSONResponse({"error": self._public(f"line {line!r} cannot be served: {exc}")}, status_code=503)
        except Exception as exc:  # noqa: BLE001 - counted and answered in the same shape; details stay in logs
            self.metrics.request(line, 500, started)
            log.warning(f"detect on {line!r} failed: {type(exc).__name__}: {exc}")
            return JSONResponse({"error": f"internal error while scoring on line {line!r}"}, status_code=500)
        self.metrics.request(line, 200, started, rows, version)
        return {"line": line, "results": [{"name": name, **row} for (name, _), row in zip(images, rows)]}
