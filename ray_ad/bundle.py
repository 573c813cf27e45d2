"""Model bundles: everything a detector needs at inference, at any fsspec URI.

A bundle is a folder::

    weights.safetensors   every learned tensor (score network, feature statistics, memory bank ...)
    metrics.json          evaluation figures (may be empty)
    config.json           method, full config, calibration state, preprocessing, and the size and
                          SHA-256 of the two files above

``config.json`` is written last, so a reader that finds it finds a complete bundle; the checksums make
a truncated or tampered file fail loudly instead of serving garbage.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ray_ad import storage
from ray_ad.config import set_dotted, to_dict
from ray_ad.errors import BundleError, RayADError
from ray_ad.methods import METHODS, Detector, build_detector, method_config

FORMAT = "ray_ad.bundle"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"


def _digest(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def save_bundle(detector: Detector, uri: str, metrics: dict[str, Any] | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in detector.tensors().items()}
    weights = save_safetensors(tensors)
    metrics_bytes = json.dumps(metrics or {}, indent=2, sort_keys=True).encode()
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": detector.method,
        "config": to_dict(detector.config),
        "state": detector.state(),
        "preprocessing": {
            "image_size": detector.image_size,
            "mean": list(detector.extractor.mean),
            "std": list(detector.extractor.std),
            "backbone": detector.config.backbone.name,
            "weights": detector.config.backbone.weight_source,
        },
        "files": {WEIGHTS_FILE: _digest(weights), METRICS_FILE: _digest(metrics_bytes)},
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights)
    storage.write_bytes(storage.join(uri, METRICS_FILE), metrics_bytes)
    storage.write_text(storage.join(uri, CONFIG_FILE), json.dumps(config, indent=2))  # last: the commit


def read_bundle_config(uri: str) -> dict[str, Any]:
    config_uri = storage.join(uri, CONFIG_FILE)
    try:
        text = storage.read_text(config_uri)
    except RayADError as exc:
        raise BundleError(f"no model bundle at {uri}: cannot read {CONFIG_FILE} ({exc})") from exc
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"bundle {uri}: {CONFIG_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise BundleError(f"bundle {uri}: {CONFIG_FILE} is not a ray_ad bundle config")
    if config.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"bundle {uri}: format version {config.get('format_version')!r} is not supported "
            f"(this ray_ad reads version {FORMAT_VERSION})"
        )
    for key in ("method", "config", "state", "files"):
        if key not in config:
            raise BundleError(f"bundle {uri}: {CONFIG_FILE} lacks {key!r}")
    return config


def _read_checked(uri: str, name: str, expected: dict[str, Any]) -> bytes:
    try:
        data = storage.read_bytes(storage.join(uri, name))
    except RayADError as exc:
        raise BundleError(f"bundle {uri} is incomplete: {exc}") from exc
    actual = _digest(data)
    if actual["bytes"] != expected.get("bytes"):
        raise BundleError(
            f"bundle {uri}: {name} is {actual['bytes']} bytes, expected {expected.get('bytes')} (truncated?)"
        )
    if actual["sha256"] != expected.get("sha256"):
        raise BundleError(f"bundle {uri}: {name} does not match its checksum (tampered or corrupt)")
    return data


def read_metrics(uri: str) -> dict[str, Any]:
    config = read_bundle_config(uri)
    data = _read_checked(uri, METRICS_FILE, config["files"].get(METRICS_FILE, {}))
    return json.loads(data)


def with_stored_defaults(method: str, stored: dict[str, Any]) -> dict[str, Any]:
    """A copy of a bundle's stored config with the method's ``STORED_DEFAULTS`` filled in where absent."""
    out = copy.deepcopy(stored)
    defaults = METHODS[method][0].STORED_DEFAULTS if method in METHODS else {}  # unknown: build_detector says so
    for dotted, value in defaults.items():  # a section the bundle lacks altogether gets the default too
        set_dotted(out, dotted, value, replace=False)
    return out


def load_bundle(uri: str, device: str | None = None) -> Detector:
    """Rebuild a detector from its bundle alone; any inconsistency raises ``BundleError``."""
    config = read_bundle_config(uri)
    weights = _read_checked(uri, WEIGHTS_FILE, config["files"].get(WEIGHTS_FILE, {}))
    try:
        tensors = load_safetensors(weights)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt data
        raise BundleError(f"bundle {uri}: cannot decode {WEIGHTS_FILE} ({exc})") from exc
    method_cfg = with_stored_defaults(config["method"], config["config"])
    if device is not None:
        method_cfg["device"] = device
    try:
        detector = build_detector(config["method"], method_config(config["method"], method_cfg))
        detector.load_tensors(tensors)
        detector.load_state(config["state"])
    except RayADError as exc:
        raise BundleError(f"bundle {uri}: {exc}") from exc
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise BundleError(f"bundle {uri} does not match its config: {exc}") from exc
    return detector
