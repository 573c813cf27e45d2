"""The Serve application: a FastAPI ingress and a multiplexed, batching per-line scorer.

    GET  /healthz                      liveness
    GET  /v1/lines                     the lines this token may read
    GET  /v1/lines/{line}              current version, threshold, metrics
    POST /v1/lines/{line}/detect       raw image bytes or a JSON batch -> score, is_anomaly, threshold,
                                       model_version per image (?heatmap=true adds a PNG overlay, base64)
    POST /v1/lines/{line}/adapt        admin: {"target", "source_line"} -> job_id (Ray Jobs API)
    GET  /v1/jobs/{job_id}             admin: Ray job state + the job's status object
    POST /v1/landing/poll              admin: one landing-zone pass now

The ingress resolves a line to its CURRENT version (re-read every ``poll_s`` seconds), so a newly
published version is served without a restart; the model id ``<line>@<version>`` routes each request
to a ``LineScorer`` replica that holds that model (Serve model multiplexing). Requests are batched per
model id with ``@serve.batch``. A request already routed to the old id finishes on the old model.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route signatures' real types
# (a string annotation of ``Request`` is not resolved through Serve's class wrapper).
import asyncio
import base64
import io
import json
import threading
import time
import weakref
from typing import Any

import numpy as np
import ray.exceptions
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_ad import registry, storage
from ray_ad.bundle import METRICS_FILE, load_bundle
from ray_ad.data.images import to_tensor
from ray_ad.errors import ConfigError, RayADError
from ray_ad.serve.auth import AccessDenied, Tokens
from ray_ad.serve.requests import BadRequest, Limits, images_from_body

api = FastAPI(title="ray_ad fleet service", version="1",
              description="Anomaly detection per product line; models from the ray_ad registry.")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (e.g. a line name with '/' in it) answer in the same {"error": ...} shape."""
    return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"}, status_code=exc.status_code)


def _overlay_png(image: Image.Image, anomaly_map: np.ndarray) -> str:
    """Base64 PNG: the image with the anomaly map (min-max scaled) as a red overlay."""
    base = np.asarray(image.convert("RGB").resize(anomaly_map.shape[::-1]), dtype=np.float32)
    heat = (anomaly_map - anomaly_map.min()) / max(float(np.ptp(anomaly_map)), 1e-12)
    red = np.zeros_like(base)
    red[..., 0] = 255
    blended = base * (1 - 0.5 * heat[..., None]) + red * 0.5 * heat[..., None]
    buffer = io.BytesIO()
    Image.fromarray(blended.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


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


class LineMetrics:
    """Custom Prometheus metrics per line, next to Serve's own (exported by Ray's metrics agent)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter("ray_ad_requests", "detect requests per line and HTTP status",
                                tag_keys=("line", "status"))
        self.images = Counter("ray_ad_images", "images scored per line", tag_keys=("line",))
        self.anomalies = Counter("ray_ad_anomalies", "images flagged anomalous per line", tag_keys=("line",))
        self.latency = Histogram("ray_ad_detect_latency_ms", "detect request latency per line (ms)",
                                 boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000], tag_keys=("line",))
        self.version = Gauge("ray_ad_model_version", "1 for the version a line serves, 0 for the one it served before",
                             tag_keys=("line", "version"))
        self.degraded_gauge = Gauge("ray_ad_line_degraded",
                                    "1 while a line's CURRENT version does not load and an earlier one serves",
                                    tag_keys=("line",))
        self._degraded: dict[str, bool] = {}
        self._served: dict[str, str] = {}
        # Ray's metrics agent evicts a gauge series that has not been set again within about two export
        # intervals, so the served versions are re-set on a timer, not only when they change.
        threading.Thread(target=self._keep_gauges_alive, name="version-gauge", daemon=True).start()

    def _keep_gauges_alive(self, interval_s: float = 2.0) -> None:
        while True:
            time.sleep(interval_s)
            for line, version in list(self._served.items()):
                self.version.set(1, tags={"line": line, "version": version})
            for line, degraded in list(self._degraded.items()):
                self.degraded_gauge.set(int(degraded), tags={"line": line})

    def degraded(self, line: str, value: bool) -> None:
        if self._degraded.get(line) != value:
            self.degraded_gauge.set(int(value), tags={"line": line})
            self._degraded[line] = value

    def request(self, line: str, status: int, started: float, rows: list[dict[str, Any]] | None = None,
                version: str | None = None) -> None:
        # Only lines the caller was allowed to use become tag values (bounded label cardinality).
        tag = line if status not in (400, 401, 403, 404) else "-"
        self.requests.inc(tags={"line": tag, "status": str(status)})
        self.latency.observe((time.perf_counter() - started) * 1000, tags={"line": tag})
        if rows:
            self.images.inc(len(rows), tags={"line": line})
            flagged = sum(r["is_anomaly"] for r in rows)
            if flagged:  # Counter.inc refuses 0
                self.anomalies.inc(flagged, tags={"line": line})
            self.served(line, version or "")

    def served(self, line: str, version: str) -> None:
        previous = self._served.get(line)
        if previous == version:
            return
        if previous is not None:
            self.version.set(0, tags={"line": line, "version": previous})
        self.version.set(1, tags={"line": line, "version": version})
        self._served[line] = version


def probe_detector(detector: Any, model_id: str) -> None:
    """Score one grey image; raise when the model errors or returns a non-finite score."""
    try:
        image = torch.full((1, 3, detector.image_size, detector.image_size), 0.5)
        with torch.no_grad():
            score = detector.predict(image).pred_score
    except Exception as exc:  # noqa: BLE001 - any failure makes the model unservable
        raise RuntimeError(f"model {model_id} cannot score: {type(exc).__name__}: {exc}") from exc
    if not torch.isfinite(score).all():
        raise RuntimeError(f"model {model_id} gives a non-finite score")


# A scorer process that dies (the OOM killer) or cannot be reached: the request answers 500 and the
# next one tries again; only an error raised by the model itself marks a version as not loading.
_INFRASTRUCTURE_ERRORS = (ray.exceptions.RayActorError,)  # ActorDiedError, ActorUnavailableError

MODELS_PER_REPLICA = 4  # detectors a scorer replica keeps loaded (least recently used goes first)
RETRY_FAILED_S = 60.0  # a version that did not load is tried again after this long, not per request


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class LineScorer:
    """Holds a few lines' detectors (LRU, by model id) and scores batches of images per model."""

    def __init__(self, root: str) -> None:
        self.root = root
        # The models this replica holds now (the multiplexing LRU drops them; weak refs follow it).
        self.loaded: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def get_model(self, model_id: str):
        line, _, version = model_id.partition("@")
        detector = load_bundle(registry.version_uri(self.root, line, version), device="auto")
        probe_detector(detector, model_id)  # never route requests to a model that cannot score
        self.loaded[model_id] = detector
        try:
            registry.record_good(self.root, line, version)  # the line's fallback from now on
        except Exception as exc:  # noqa: BLE001 - serving goes on; the fallback is only not advanced
            print(f"could not record {model_id} as the last good version: {exc}")
        return detector

    async def ready(self) -> int:
        """Load (and probe) the request's model; its input size. The ingress asks this once per version
        before routing images to it, so a version that does not load is found once, not per request."""
        detector = await self.get_model(serve.get_multiplexed_model_id())
        return int(detector.image_size)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score(self, images: list[np.ndarray], heatmaps: list[bool]) -> list[dict[str, Any]]:
        model_id = serve.get_multiplexed_model_id()
        detector = await self.get_model(model_id)
        # The ingress sends each image already at the model's input size (uint8, grey or RGB), so this
        # resize is a no-op and what crosses between replicas stays small (gRPC caps a message at 4 MiB).
        pil = [Image.fromarray(array) for array in images]
        batch = torch.stack([to_tensor(p, detector.image_size, detector.extractor.mean, detector.extractor.std)
                             for p in pil])
        with torch.no_grad():
            prediction = detector.predict(batch)
        out = []
        for i, want_heatmap in enumerate(heatmaps):
            score = float(prediction.pred_score[i])
            row = {"score": score, "is_anomaly": bool(score > detector.threshold),
                   "threshold": float(detector.threshold), "model_version": model_id.partition("@")[2]}
            if want_heatmap:
                row["heatmap_png"] = _overlay_png(pil[i], prediction.anomaly_map[i].numpy())
            out.append(row)
        return out

    def check_health(self) -> None:
        """Fails (and Serve replaces the replica) when a held model cannot score or the root is unreadable."""
        storage.exists(storage.join(self.root, "models"))
        for model_id, detector in list(self.loaded.items()):
            probe_detector(detector, model_id)


@serve.deployment(ray_actor_options={"num_cpus": 0}, num_replicas=1)
class Watcher:
    """Polls ``<root>/landing/`` every ``interval_s`` and submits adaptation jobs (see ray_ad.serve.landing).

    One replica is enough; a second one (or a restart) is harmless: job ids are deterministic.
    """

    def __init__(self, root: str, interval_s: float = 10.0, default_source: dict[str, str] | None = None,
                 jobs_address: str = "http://127.0.0.1:8265", tokens: dict[str, Any] | None = None,
                 token_file: str | None = None, skip_unreadable: bool = False) -> None:
        from ray_ad.serve.jobs_api import RayJobs
        from ray_ad.serve.landing import LandingWatcher

        self.jobs = RayJobs(jobs_address)
        # The admin token keys the opt-in that lets a batch land into a line that already serves.
        admin = (Tokens.from_mapping(tokens, "tokens") if tokens else Tokens.load(token_file)).admin
        self.watcher = LandingWatcher(root, self.jobs.submit, self.jobs.state, default_source, admin,
                                      skip_unreadable)
        self.interval_s = interval_s
        self.last_error: str | None = None
        self._lock = threading.Lock()  # one pass at a time: the timer thread and POST /v1/landing/poll
        if interval_s > 0:
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


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class FleetAPI:
    def __init__(self, scorer: Any, watcher: Any, root: str, tokens: dict[str, Any] | None = None,
                 token_file: str | None = None, poll_s: float = 2.0, max_pixels: int = 4096 * 4096,
                 max_images: int = 64, max_request_pixels: int = Limits.max_request_pixels) -> None:
        self.scorer, self.watcher, self.root, self.poll_s = scorer, watcher, root, poll_s
        self.tokens = Tokens.from_mapping(tokens, "tokens") if tokens else Tokens.load(token_file)
        self.limits = Limits(max_pixels=max_pixels, max_images=max_images, max_request_pixels=max_request_pixels)
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

    async def _body(self, request: Request) -> bytes:
        """The request body, refused with 413 from its Content-Length before it is read, or as soon as a
        body without one grows past the limit."""
        limit = self.limits.max_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadRequest(400, f"Content-Length {declared!r} is not a byte count")
            if int(declared) > limit:
                raise BadRequest(413, f"request body of {int(declared)} bytes is over the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

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
            body = await self._body(request)
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
            print(f"detect on {line!r} failed: {type(exc).__name__}: {exc}")
            return JSONResponse({"error": f"internal error while scoring on line {line!r}"}, status_code=500)
        self.metrics.request(line, 200, started, rows, version)
        return {"line": line, "results": [{"name": name, **row} for (name, _), row in zip(images, rows)]}


def build_app(root: str, tokens: dict[str, Any] | None = None, token_file: str | None = None,
              poll_s: float = 2.0, max_pixels: int = 4096 * 4096, max_images: int = 64,
              landing_interval_s: float = 10.0, default_source: dict[str, str] | None = None,
              jobs_address: str = "http://127.0.0.1:8265", scorer_cpus: float | None = None,
              scorer_max_ongoing: int | None = None, scorer_replicas: int | None = None,
              max_request_pixels: int = Limits.max_request_pixels, skip_unreadable: bool = False) -> Any:
    """The Serve application graph: the ingress, the scorer it routes to, the landing watcher.

    ``scorer_cpus`` overrides the scorer replica's CPUs (Ray caps its torch threads at that) and
    ``scorer_max_ongoing`` its ``max_ongoing_requests`` (which caps a batch, summed over the lines
    it serves), ``scorer_replicas`` its replica count; configs set them per deployment instead.
    """
    options: dict[str, Any] = {}
    if scorer_cpus:
        options["ray_actor_options"] = {"num_cpus": scorer_cpus}
    if scorer_max_ongoing:
        options["max_ongoing_requests"] = scorer_max_ongoing
    if scorer_replicas:
        options["num_replicas"] = scorer_replicas
    scorer = LineScorer.options(**options).bind(root)
    watcher = Watcher.bind(root, landing_interval_s, default_source, jobs_address, tokens, token_file, skip_unreadable)
    return FleetAPI.bind(scorer, watcher, root, tokens, token_file, poll_s, max_pixels, max_images,
                         max_request_pixels)


APP_ARGS = {"root", "token_file", "poll_s", "max_pixels", "max_images", "max_request_pixels", "landing_interval_s",
            "default_source", "jobs_address", "skip_unreadable"}


def app_builder(args: dict[str, Any]) -> Any:
    """Entry point for ``serve run`` / ``serve deploy`` configs (``import_path: ray_ad.serve.app:app_builder``).

    ``args``: ``root`` (required), ``token_file`` (else ``RAY_AD_TOKENS``), ``poll_s``, ``max_pixels``,
    ``max_images``, ``max_request_pixels``, ``landing_interval_s``, ``default_source``, ``jobs_address``,
    ``skip_unreadable`` (landed images that do not decode are left out, named in the batch's manifest,
    instead of rejecting the batch). An unknown or missing key is an error naming it.
    """
    unknown = set(args) - APP_ARGS
    if unknown:
        raise ConfigError(f"unknown application args {sorted(unknown)}; allowed: {sorted(APP_ARGS)}")
    if not args.get("root"):
        raise ConfigError("application args need 'root': the storage root URI holding models/")
    # Local paths are relative to where `serve run` / `serve deploy` builds the app; replicas and the
    # jobs the watcher submits run elsewhere, so they get absolute ones.
    root = storage.absolute(args["root"])
    token_file = storage.absolute(args["token_file"]) if args.get("token_file") else None
    Tokens.load(token_file)  # fail at deploy time, not on the first request
    return build_app(root, None, token_file, float(args.get("poll_s", 2.0)),
                     int(args.get("max_pixels", 4096 * 4096)), int(args.get("max_images", 64)),
                     float(args.get("landing_interval_s", 10.0)), args.get("default_source"),
                     args.get("jobs_address", "http://127.0.0.1:8265"),
                     max_request_pixels=int(args.get("max_request_pixels", Limits.max_request_pixels)),
                     skip_unreadable=bool(args.get("skip_unreadable", False)))
