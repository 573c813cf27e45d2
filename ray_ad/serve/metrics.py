"""The service's own Prometheus metrics per line (``LineMetrics``), next to Serve's ``ray_serve_*``.

Ray's metrics agent exports them with Ray's ``ray_`` prefix: ``ray_ray_ad_requests_total{line,status}``,
``ray_ray_ad_images_total{line}``, ``ray_ray_ad_anomalies_total{line}``,
``ray_ray_ad_detect_latency_ms{line}``, ``ray_ray_ad_model_version{line,version}`` and
``ray_ray_ad_line_degraded{line}``. The ingress (``ray_ad.serve.api``) holds one ``LineMetrics``.
"""

from __future__ import annotations

import threading
import time
from typing import Any


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
