"""The explicit method registry: name -> (detector class, config class). No import side effects."""

from __future__ import annotations

from typing import Any

from ray_ad.config import from_dict
from ray_ad.errors import ConfigError
from ray_ad.methods.base import Detector, Prediction
from ray_ad.methods.costfilter import CostFilter, CostFilterConfig
from ray_ad.methods.gaussian import GaussianConfig, GaussianDetector
from ray_ad.methods.nagl import NAGL, NAGLConfig
from ray_ad.methods.osd_irf import OSDIRF, OSDIRFConfig
from ray_ad.methods.patchcore import PatchCore, PatchCoreConfig
from ray_ad.methods.ref_cfa import REFCFA, REFCFAConfig
from ray_ad.methods.target_memory import TargetMemory, TargetMemoryConfig

METHODS: dict[str, tuple[type[Detector], type]] = {
    "costfilter": (CostFilter, CostFilterConfig),
    "gaussian": (GaussianDetector, GaussianConfig),
    "nagl": (NAGL, NAGLConfig),
    "osd_irf": (OSDIRF, OSDIRFConfig),
    "patchcore": (PatchCore, PatchCoreConfig),
    "ref_cfa": (REFCFA, REFCFAConfig),
    "target_memory": (TargetMemory, TargetMemoryConfig),
}


def method_config(method: str, data: dict[str, Any] | None = None) -> Any:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    return from_dict(METHODS[method][1], data or {})


def build_detector(method: str, config: Any) -> Detector:
    detector_cls, config_cls = METHODS[method]
    if not isinstance(config, config_cls):
        config = method_config(method, config)
    return detector_cls(config)


__all__ = ["METHODS", "Detector", "Prediction", "build_detector", "method_config"]
