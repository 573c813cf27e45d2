"""CostFilter-AD (Zhang et al., ICML 2025) as a plug-in over a base detector.

Read top to bottom: the base detector (trained here, or loaded from its bundle) keeps its own map;
a bank of normal training images supplies templates; the filter learns, on synthetic anomalies, to
turn the cost volume of a query against its N templates (Sec. 3.2) into a clean anomaly map
(Sec. 3.3-3.4). At inference the filtered map is blended with the base's map (``fusion``, as the
authors' code does) and the image score is the mean of the map's top pixels (Sec. 3.4).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ray_ad.config import to_dict
from ray_ad.data import Sample
from ray_ad.data.images import load_image
from ray_ad.errors import ConfigError
from ray_ad.methods.base import Detector, Prediction, Runtime, check_tensor_keys, upsample_map
from ray_ad.methods.costfilter.config import SUPPORTED_BASES, CostFilterConfig
from ray_ad.methods.costfilter.network import CostFilterNet, Matching, filter_forward
from ray_ad.methods.costfilter.pool import build_pool
from ray_ad.methods.costfilter.templates import TemplateBank
from ray_ad.methods.costfilter.training import train_filter
from ray_ad.training import loss_summary


def _build_base(config: CostFilterConfig) -> Detector:
    from ray_ad.methods import build_detector, method_config  # the registry lists this method too

    values = {**config.base.config, "device": config.device}
    return build_detector(config.base.method, method_config(config.base.method, values))


class CostFilter(Detector):
    method = "costfilter"

    def __init__(self, config: CostFilterConfig) -> None:
        super().__init__(config)
        # With base.model the base comes from that bundle at fit (use_base_bundle); until then this is a
        # placeholder built from base.config, which a saved bundle fills with the base's full config.
        self.base = _build_base(config)
        if not config.base.model:
            self._check_base_input(self.base)
        self.layer_channels = self.extractor.layer_channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            net = CostFilterNet(config.matching_depth, self.layer_channels, config.filter)
            self.filter = net.to(self.device).eval()
        grid = config.backbone.grid_size
        self.bank = TemplateBank(torch.zeros(0, self.extractor.out_channels, grid, grid), self.layer_channels)
        self.base_map_scale = 1.0  # the base's map divided by this sits mostly in [0, 1] on normal images

    def _check_base_input(self, base: Detector) -> None:
        """Base and filter read the same preprocessed tensor, so they must agree on what it is."""
        mine, theirs = self.preprocessor, base.preprocessor
        if (mine.size, mine.mean, mine.std) != (theirs.size, theirs.mean, theirs.std):
            raise ConfigError(
                f"the base {base.method} model expects images of {theirs.size} px normalised with mean {theirs.mean}, "
                f"std {theirs.std}; the filter's backbone {mine.size} px, mean {mine.mean}, std {mine.std}: "
                "give both the same image_size and a backbone of the same normalisation"
            )

    # ---------------------------------------------------------------- the base
    def use_base_bundle(self, uri: str) -> None:
        """Plug into a trained base detector's bundle (its config is then stored in this config)."""
        from ray_ad.bundle import load_bundle  # bundle.py reads the method registry, which lists this method

        base = load_bundle(uri, device=self.config.device)
        if base.method not in SUPPORTED_BASES:
            raise ConfigError(f"base.model {uri} is a {base.method} bundle; CostFilter-AD plugs into "
                              f"{', '.join(SUPPORTED_BASES)} models")
        self._check_base_input(base)
        self.base = base
        self.config.base.method = base.method
        self.config.base.config = to_dict(base.config)

    # ---------------------------------------------------------------- the filter
    @property
    def matching(self) -> Matching:
        cfg = self.config
        return Matching(tuple(self.layer_channels), cfg.templates, cfg.matching_depth)

    def filter_map(self, query: torch.Tensor, templates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``M [B, H', W']`` (and class logits) of query features against template features ``[B, N, C, H', W']``."""
        return filter_forward(self.filter, self.matching, query, templates)  # Eqs. 1-4

    def fit(self, train: list[Sample], calibration: list[Sample], runtime: Runtime | None = None) -> dict[str, Any]:
        runtime, cfg = runtime or Runtime(), self.config
        if cfg.base.model:
            self.use_base_bundle(cfg.base.model)
            base_info: dict[str, Any] = {"model": cfg.base.model}
        else:
            base_info = self.base.fit(train, calibration, runtime)
        if len(train) < 2:
            raise ValueError(f"CostFilter-AD needs at least 2 normal training images, got {len(train)}")
        rng = np.random.default_rng(cfg.seed)
        bank_rows = sorted(rng.permutation(len(train))[: cfg.template_bank].tolist())
        bank_samples = [train[i] for i in bank_rows]
        self.bank = TemplateBank(self.extract_features(bank_samples, runtime, desc="template bank"),
                                 self.layer_channels).to(self.device)
        self.bank.check_count(cfg.templates)
        t = cfg.train
        pool = build_pool(self.extractor, [s.path for s in train], {s.path: k for k, s in enumerate(bank_samples)},
                          t.pool_size, t.anomaly_probability, t.opacity, list(t.fill_sources), t.loss_size, rng,
                          self.device, runtime.progress)
        trainer = runtime.filter_trainer or train_filter  # in this process, or on Ray Train
        self.filter, losses = trainer(self.filter, pool, self.bank, self.matching, t, cfg.loss, self.device,
                                      cfg.seed, runtime.progress)
        self.calibrate(calibration)
        return {"base": base_info, **loss_summary(losses, "filter_"), "steps": len(losses),
                "template_bank": len(self.bank), "pool": len(pool),
                "pool_anomalous": int((pool.masks.flatten(1).amax(1) > 0).sum())}

    @torch.no_grad()
    def calibrate(self, normals: list[Sample]) -> None:
        """The base map's scale, then the threshold, from held-out normal images."""
        if not normals:
            raise ValueError("calibration needs at least one held-out normal image")
        images = [self.preprocessor.batch([load_image(s.path) for s in normals[i : i + 8]])
                  for i in range(0, len(normals), 8)]
        base_maps = [self.base.predict(batch).anomaly_map for batch in images]  # once, for scale and scores
        self.base_map_scale = max(float(torch.quantile(torch.cat(base_maps).flatten()[::7], 0.99)), 1e-12)
        scores = torch.cat([self._predict(batch, maps).pred_score for batch, maps in zip(images, base_maps)])
        self.set_threshold_from(scores.numpy(), self.config.threshold_quantile)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        return self._predict(images)

    def _predict(self, images: torch.Tensor, base_map: torch.Tensor | None = None) -> Prediction:
        """The prediction, with the base's map of ``images`` when the caller already has it."""
        images = images.to(self.device)
        query = self.extractor(images)
        templates = self.bank.gather(self.bank.nearest(query, self.config.templates))
        if self.device.type == "cpu" and query.shape[0] == 1:
            # PyTorch sends single-sample 3D convolutions of this size to a slow native CPU kernel
            # (5x slower than its oneDNN path, which it uses from two samples on): score a pair.
            cell_map = self.filter_map(query.expand(2, *query.shape[1:]),
                                       templates.expand(2, *templates.shape[1:]))[0][:1]
        else:
            cell_map = self.filter_map(query, templates)[0]
        filtered = upsample_map(cell_map, self.image_size, self.config.map_sigma)
        fusion = self.config.fusion
        anomaly_map = (1 - fusion) * filtered
        if fusion > 0:
            if base_map is None:
                base_map = self.base.predict(images).anomaly_map
            anomaly_map = anomaly_map + fusion * base_map.to(self.device) / self.base_map_scale
        top = anomaly_map.flatten(1).topk(self.config.score_top_pixels, dim=1).values
        return Prediction(top.mean(1).cpu(), anomaly_map.cpu())  # Sec. 3.4: mean of the top pixels

    # ---------------------------------------------------------------- what a bundle stores
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"filter.{k}": v for k, v in self.filter.state_dict().items()}
        out["template_bank"] = self.bank.features
        out.update({f"base.{k}": v for k, v in self.base.tensors().items()})
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        filter_keys = {f"filter.{k}" for k in self.filter.state_dict()}
        base = {k[len("base."):]: v for k, v in tensors.items() if k.startswith("base.")}
        own = {k: v for k, v in tensors.items() if not k.startswith("base.")}
        check_tensor_keys(filter_keys | {"template_bank"}, own)
        self.filter.load_state_dict({k[len("filter."):]: v for k, v in tensors.items() if k in filter_keys})
        self.bank = TemplateBank(tensors["template_bank"], self.layer_channels).to(self.device)
        self.bank.check_count(self.config.templates)
        self.base.load_tensors(base)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "base_map_scale": self.base_map_scale, "base": self.base.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.base_map_scale = float(state["base_map_scale"])
        self.base.load_state(state["base"])
