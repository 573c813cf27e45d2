"""The ``LineScorer`` deployment: a few lines' detectors per replica, batched scoring per model.

The ingress routes each image with the model id ``<line>@<version>`` (Serve model multiplexing); a
replica loads that version's bundle once, probes it, records it as the line's last good version, and
scores the requests for it in ``@serve.batch`` batches with ``score_images`` (``ray_ad.serve.scoring``).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import numpy as np
from ray import serve

from ray_ad import registry, storage
from ray_ad.bundle import load_bundle
from ray_ad.serve.scoring import probe_detector, score_images

log = logging.getLogger(__name__)

MODELS_PER_REPLICA = 4  # detectors a scorer replica keeps loaded (least recently used goes first)


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
            log.warning(f"could not record {model_id} as the last good version: {exc}")
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
        # The ingress sends each image already at the model's input size (uint8, grey or RGB): what
        # crosses between replicas stays small (gRPC caps a message at 4 MiB).
        rows = score_images(detector, images, heatmaps)
        return [_with_version(row, model_id.partition("@")[2]) for row in rows]

    def check_health(self) -> None:
        """Fails (and Serve replaces the replica) when a held model cannot score or the root is unreadable."""
        storage.exists(storage.join(self.root, "models"))
        for model_id, detector in list(self.loaded.items()):
            probe_detector(detector, model_id)


def _with_version(row: dict[str, Any], version: str) -> dict[str, Any]:
    """The row with ``model_version`` after ``threshold`` (and before ``heatmap_png``, as it answered)."""
    heatmap = row.pop("heatmap_png", None)
    row["model_version"] = version
    if heatmap is not None:
        row["heatmap_png"] = heatmap
    return row
