"""Helpers that test modules share (test modules import from here or conftest, never from each other):
HTTP calls to a local service, PNG bytes, the exported Prometheus metrics, and a tiny detector."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

import numpy as np
from PIL import Image


def call(url: str, body: bytes | None = None, token: str | None = None, content_type: str = "image/png"):
    """(HTTP status, decoded JSON body) of a GET (no body) or POST to the service."""
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if body is not None:
        request.add_header("Content-Type", content_type)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def exported_metrics(ray_module) -> dict[tuple[str, frozenset], float]:  # noqa: ANN001 - the ray module
    """What Ray's metrics agent exports to Prometheus now: (sample name, labels) -> value, summed over replicas."""
    from prometheus_client.parser import text_string_to_metric_families

    port = ray_module._private.worker.global_worker.node.metrics_export_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "ray_ad_" not in sample.name:
                continue
            keep = frozenset((k, v) for k, v in sample.labels.items() if k in ("line", "status", "version", "le"))
            values[(sample.name, keep)] = values.get((sample.name, keep), 0.0) + sample.value
    return values


def metric(values: dict, suffix: str, **labels: str) -> float:
    """The sum of the exported samples whose name ends with ``suffix`` and that carry ``labels``."""
    wanted = set(labels.items())
    return sum(v for (name, keys), v in values.items() if name.endswith(suffix) and wanted <= keys)


def random_bank_patchcore(seed: int):
    """A 64 px PatchCore whose memory bank is 10 random vectors and threshold ``seed``: loads, scores and
    publishes in milliseconds (registry and service plumbing tests, not detection quality)."""
    import torch

    from ray_ad.methods import build_detector, method_config

    config = {"backbone": {"image_size": 64, "grid_size": 4, "layers": [1]}, "bank_fraction": 1.0,
              "device": "cpu", "seed": seed}
    detector = build_detector("patchcore", method_config("patchcore", config))
    generator = torch.Generator().manual_seed(seed)
    detector.bank = torch.randn(10, detector.extractor.out_channels, generator=generator)
    detector.threshold = float(seed)
    return detector


def load_job(name: str):  # noqa: ANN201 - a module
    """A ``jobs/<name>.py`` script as a module (the jobs folder is no package)."""
    import importlib
    import sys
    from pathlib import Path

    jobs = str(Path(__file__).resolve().parents[1] / "jobs")
    sys.path.insert(0, jobs)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(jobs)


def pairwise_auroc(scores: dict[str, float], anomalous: set[str]) -> float:
    """Image AUROC by counting pairs (ties count one half): the share of (anomalous, normal) pairs whose
    anomalous image scores higher. Written out here so a test does not check a metric with itself."""
    positives = [v for k, v in scores.items() if k in anomalous]
    negatives = [v for k, v in scores.items() if k not in anomalous]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))
