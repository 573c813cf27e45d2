"""CostFilter-AD (Zhang et al., ICML 2025) as a plug-in over a base detector.

Read top to bottom: the base detector (trained here, or loaded from its bundle) keeps its own map;
a bank of normal training images supplies templates; the filter learns, on synthetic anomalies, to
turn the cost volume of a query against its N templates (Sec. 3.2) into a clean anomaly map
(Sec. 3.3-3.4). At inference the filtered map is blended with the base's map (``fusion``, as the
authors' code does) and the image score is the mean of the map's top pixels (Sec. 3.4).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ray_ad.config import to_dict
from ray_ad.data import Sample
from ray_ad.data.images import load_image
from ray_ad.errors import ConfigError
from ray_ad.methods.base import Detector, Prediction, Runtime, check_tensor_keys, upsample_map
from ray_ad.methods.costfilter.config import MEMORY_BASES, SUPPORTED_BASES, CostFilterConfig
from ray_ad.methods.costfilter.network import CostFilterNet, Matching, filter_forward
from ray_ad.methods.costfilter.pool import BaseMap, SyntheticPool, build_pool
from ray_ad.methods.costfilter.templates import TemplateBank
from ray_ad.methods.costfilter.training import train_filter
from ray_ad.training import loss_summary

log = logging.getLogger(__name__)


@dataclass
class FitParts:
    """What ``CostFilter.prepare`` made for the filter's training and for ``finish``."""

    base_info: dict[str, Any]
    pool: SyntheticPool
    calibration_images: list[torch.Tensor]
    calibration_base: list[Prediction]
    pool_images: int  # distinct normal images the pool was made from


@dataclass
class PoolPart:
    """Images the synthetic pool is made from, and (for a base-guided filter) a call that returns the
    ``images -> scaled base cell maps`` function for them, made only when their part of the pool is."""

    samples: list[Sample]
    base_maps: Callable[[], BaseMap] | None

    def base_map(self) -> BaseMap | None:
        return None if self.base_maps is None else self.base_maps()


def pool_shares(total: int, sizes: list[int]) -> list[int]:
    """``total`` pool items split over parts in proportion to their image counts (largest remainders)."""
    exact = [total * size / sum(sizes) for size in sizes]
    counts = [int(value) for value in exact]
    for k in sorted(range(len(sizes)), key=lambda k: counts[k] - exact[k])[: total - sum(counts)]:
        counts[k] += 1
    return counts


def normal_level(values: list[torch.Tensor], stride: int = 1) -> float:
    """The 0.99 quantile of a base's maps or scores on normal images (of every ``stride``-th value: maps
    are too large for ``torch.quantile``)."""
    return max(float(torch.quantile(torch.cat(values).flatten()[::stride], 0.99)), 1e-12)


def _build_base(config: CostFilterConfig) -> Detector:
    from ray_ad.methods import build_detector, method_config  # the registry lists this method too

    values = {**config.base.config, "device": config.device}
    return build_detector(config.base.method, method_config(config.base.method, values))


class CostFilter(Detector):
    method = "costfilter"
    # Bundles saved before these options were fitted with the filter's own M-bar guidance only, on
    # unpooled features, and scored images by the top pixels of the final map.
    STORED_DEFAULTS = {"filter.base_guidance": False, "backbone.local_pool": 1, "image_score": "map_top"}

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
        self.base_score_scale = 1.0  # the same for the base's image scores

    def _check_base_input(self, base: Detector) -> None:
        """Base and filter read the same preprocessed tensor, so they must agree on what it is."""
        mine, theirs = self.preprocessor, base.preprocessor
        if (mine.size, mine.mean, mine.std) != (theirs.size, theirs.mean, theirs.std):
            raise ConfigError(
                f"the base {base.method} model expects images of {theirs.size} px normalised with mean {theirs.mean}, "
                f"std {theirs.std}; the filter's backbone {mine.size} px, mean {mine.mean}, std {mine.std}: "
                "give both the same image_size and a backbone of the same normalisation"
            )
        if self.uses_reconstructions:
            if not base.reconstructs:
                raise ConfigError(f"template_source=reconstruction needs a base that reconstructs its features "
                                  f"(osd_irf); the base is a {base.method} model")
            if not self._reads_filter_features(base):
                raise ConfigError("template_source=reconstruction matches the base's reconstructions against the "
                                  f"filter's features: give the base the filter's backbone config "
                                  f"({to_dict(self.config.backbone)}), not {to_dict(base.config.backbone)}")

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

    @property
    def shares_features(self) -> bool:
        """Whether the base reads exactly the filter's features (then one backbone pass serves both)."""
        return self._reads_filter_features(self.base)

    def _reads_filter_features(self, base: Detector) -> bool:
        return base.scores_features and to_dict(base.config.backbone) == to_dict(self.config.backbone)

    @property
    def uses_reconstructions(self) -> bool:
        return self.config.template_source == "reconstruction"

    def templates_for(self, query: torch.Tensor, reconstruction: torch.Tensor | None = None) -> torch.Tensor:
        """A query's N templates ``[B, N, C, H', W']``: the N nearest bank images, or with reconstruction
        templates the N - 1 nearest and the base's reconstruction of the query last (``reconstruction``
        when the caller already has it)."""
        n = self.config.templates
        if not self.uses_reconstructions:
            return self.bank.gather(self.bank.nearest(query, n))
        if reconstruction is None:
            reconstruction = self.base.reconstruct_features(query)
        reconstruction = reconstruction[:, None].to(query.dtype)
        if n == 1:
            return reconstruction
        return torch.cat([self.bank.gather(self.bank.nearest(query, n - 1)), reconstruction], dim=1)

    @property
    def base_guided(self) -> bool:
        return self.config.filter.base_guidance

    def filter_map(self, query: torch.Tensor, templates: torch.Tensor, base_cells: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``M [B, H', W']`` (and class logits) of query features against template features ``[B, N, C, H', W']``
        (and the base's cell map, for a base-guided filter)."""
        return filter_forward(self.filter, self.matching, query, templates, base_cells)  # Eqs. 1-4

    def base_cells(self, base_map: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """The base's pixel map ``[B, S, S]`` -> its cell map ``[B, H', W']`` on the filter's grid, divided by
        ``scale`` (default: the line base's normal level)."""
        grid = self.config.backbone.grid_size
        scale = self.base_map_scale if scale is None else scale
        return F.adaptive_avg_pool2d(base_map[:, None].to(self.device) / scale, grid)[:, 0]

    def fit(self, train: list[Sample], calibration: list[Sample], runtime: Runtime | None = None) -> dict[str, Any]:
        runtime, cfg = runtime or Runtime(), self.config
        parts = self.prepare(train, calibration, runtime)
        trainer = runtime.filter_trainer or train_filter  # in this process, or on Ray Train
        self.filter, losses = trainer(self.filter, parts.pool, self.bank, self.matching, cfg.train, cfg.loss,
                                      self.device, cfg.seed, runtime.progress)
        return self.finish(parts, losses)

    def prepare(self, train: list[Sample], calibration: list[Sample], runtime: Runtime) -> FitParts:
        """Everything before the filter trains: the base, the template bank, the scales, the synthetic pool
        (``fleet.train_fleet_filter`` prepares several lines this way, then trains one filter for all)."""
        cfg = self.config
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
        calibration_images = self._batches(calibration)
        calibration_base = self._fit_base_scale(calibration_images)  # first: a base-guided filter trains on scaled maps
        t = cfg.train
        parts = [PoolPart(train, None)]
        if self.base_guided:
            parts = self._pool_parts(train, calibration, calibration_images, rng, runtime)
        bank_index = {s.path: k for k, s in enumerate(bank_samples)}
        # Reconstruction templates come from the line's own base, the one that makes them at inference (an
        # OSD-IRF base is a fitted density, whose maps pool_base "auto" also takes from the line's base).
        reconstruct = self.base.reconstruct_features if self.uses_reconstructions else None
        pools = [build_pool(self.extractor, [s.path for s in part.samples], bank_index, count, t.anomaly_probability,
                            t.opacity, list(t.fill_sources), t.loss_size, rng, self.device, runtime.progress,
                            part.base_map(), reconstruct)
                 for part, count in zip(parts, pool_shares(t.pool_size, [len(part.samples) for part in parts]))]
        return FitParts(base_info, SyntheticPool.concat(pools), calibration_images, calibration_base,
                        sum(len(part.samples) for part in parts))

    def _pool_parts(self, train: list[Sample], calibration: list[Sample], calibration_images: list[torch.Tensor],
                    rng: np.random.Generator, runtime: Runtime) -> list[PoolPart]:
        """The pool's source images and, for each part of them, how the base's scaled cell maps are made."""
        pool_base = self.config.train.pool_base
        if pool_base == "auto":
            pool_base = "held_out" if self.base.method in MEMORY_BASES else "same"
        if pool_base == "same" or len(train) < 4:
            return [PoolPart(train, lambda: lambda images, _: self.base_cells(self.base.predict(images).anomaly_map))]
        if pool_base == "leave_one_out":
            self._check_leave_one_out()
            return [PoolPart(train, lambda: lambda images, made_from: self.base_cells(
                self.base.predict_without(images, made_from).anomaly_map))]
        order = rng.permutation(len(train))
        if pool_base == "held_out":
            half = len(train) // 2
            fit_rows, pool_rows = [sorted(order[:half])], [sorted(order[half:])]
        else:  # cross_fit: each fold's images are mapped by a base fitted on the other folds
            folds = min(self.config.train.pool_folds, len(train) // 2)  # a fold must offer the pool 2 images
            pool_rows = [sorted(fold) for fold in np.array_split(order, folds)]
            fit_rows = [sorted(set(range(len(train))) - set(rows)) for rows in pool_rows]
        return [PoolPart([train[i] for i in rows],
                         self._other_base(rows_fit, train, calibration, calibration_images, runtime, k, len(pool_rows)))
                for k, (rows, rows_fit) in enumerate(zip(pool_rows, fit_rows))]

    def _check_leave_one_out(self) -> None:
        if self.base.method not in MEMORY_BASES:
            raise ValueError(f"train.pool_base 'leave_one_out' needs a memory base ({', '.join(MEMORY_BASES)}), "
                             f"got base.method {self.base.method!r}")
        if self.config.base.model:
            raise ValueError(f"train.pool_base 'leave_one_out' needs the base fitted in this call (it reads which "
                             f"training image each memory cell came from); base.model {self.config.base.model!r} "
                             "is a saved bundle, so use held_out or cross_fit with it")

    def _other_base(self, rows: list[int], train: list[Sample], calibration: list[Sample],
                    calibration_images: list[torch.Tensor], runtime: Runtime, part: int, parts: int
                    ) -> Callable[[], Callable[[torch.Tensor], torch.Tensor]]:
        """A deferred fit of a base of the line's kind on ``train[rows]``: called when its part of the pool is
        made, so one such base is held at a time. Its maps come on its own normal level."""

        def fitted() -> Callable[[torch.Tensor], torch.Tensor]:
            from ray_ad.methods import build_detector  # the registry lists this method too

            log.info("pool base %d/%d: a %s base fitted on %d of %d training images", part + 1, parts,
                     self.base.method, len(rows), len(train))
            other = build_detector(self.base.method, to_dict(self.base.config))
            other.fit([train[i] for i in rows], calibration, runtime.quiet())
            with torch.no_grad():
                scale = normal_level([other.predict(batch).anomaly_map for batch in calibration_images], stride=7)
            return lambda images, _: self.base_cells(other.predict(images).anomaly_map, scale)

        return fitted

    def finish(self, parts: FitParts, losses: list[float]) -> dict[str, Any]:
        """After the filter trained: the threshold, and what the fit reports."""
        self._fit_threshold(parts.calibration_images, parts.calibration_base)
        return {"base": parts.base_info, **loss_summary(losses, "filter_"), "steps": len(losses),
                "template_bank": len(self.bank), "pool": len(parts.pool), "pool_images": parts.pool_images,
                "pool_anomalous": int((parts.pool.masks.flatten(1).amax(1) > 0).sum())}

    def _batches(self, normals: list[Sample]) -> list[torch.Tensor]:
        if not normals:
            raise ValueError("calibration needs at least one held-out normal image")
        return [self.preprocessor.batch([load_image(s.path) for s in normals[i : i + 8]])
                for i in range(0, len(normals), 8)]

    @torch.no_grad()
    def _fit_base_scale(self, images: list[torch.Tensor]) -> list[Prediction]:
        """The 0.99 quantiles of the base's map and image score on held-out normal images: dividing by them
        puts the base on the filter's [0, 1] scale (for fusion and base guidance). Returns the base's
        predictions of ``images``, so they are made once."""
        predictions = [self.base.predict(batch) for batch in images]
        self.base_map_scale = normal_level([p.anomaly_map for p in predictions], stride=7)
        self.base_score_scale = normal_level([p.pred_score.float() for p in predictions])
        return predictions

    @torch.no_grad()
    def _fit_threshold(self, images: list[torch.Tensor], base: list[Prediction]) -> None:
        scores = torch.cat([self._predict(batch, prediction).pred_score for batch, prediction in zip(images, base)])
        self.set_threshold_from(scores.numpy(), self.config.threshold_quantile)

    def calibrate(self, normals: list[Sample]) -> None:
        """The base map's scale, then the threshold, from held-out normal images."""
        images = self._batches(normals)
        self._fit_threshold(images, self._fit_base_scale(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        return self._predict(images)

    def _predict(self, images: torch.Tensor, base: Prediction | None = None) -> Prediction:
        """The prediction, with the base's prediction of ``images`` when the caller already has it."""
        images = images.to(self.device)
        cfg = self.config
        fusion = cfg.fusion
        query = self.extractor(images)
        reconstruction = None
        if base is None and self.uses_reconstructions:  # the base reads these features (checked at build)
            base, reconstruction = self.base.predict_and_reconstruct(query)
        elif base is None and (fusion > 0 or self.base_guided):
            # Same backbone config: the base scores these very features instead of extracting them again.
            base = self.base.predict_features(query) if self.shares_features else self.base.predict(images)
        base_cells = self.base_cells(base.anomaly_map) if self.base_guided else None
        templates = self.templates_for(query, reconstruction)
        if self.device.type == "cpu" and query.shape[0] == 1:
            # PyTorch sends single-sample 3D convolutions of this size to a slow native CPU kernel
            # (5x slower than its oneDNN path, which it uses from two samples on): score a pair.
            pair = None if base_cells is None else base_cells.expand(2, *base_cells.shape[1:])
            cell_map = self.filter_map(query.expand(2, *query.shape[1:]),
                                       templates.expand(2, *templates.shape[1:]), pair)[0][:1]
        else:
            cell_map = self.filter_map(query, templates, base_cells)[0]
        filtered = upsample_map(cell_map, self.image_size, cfg.map_sigma)
        anomaly_map = (1 - fusion) * filtered
        if fusion > 0:
            anomaly_map = anomaly_map + fusion * base.anomaly_map.to(self.device) / self.base_map_scale
        if cfg.image_score == "map_top" or fusion == 0:
            score = self._top_mean(anomaly_map)  # Sec. 3.4: mean of the top pixels
        else:
            score = (1 - fusion) * self._top_mean(filtered) + fusion * base.pred_score.to(self.device).float() / (
                self.base_score_scale)
        return Prediction(score.cpu(), anomaly_map.cpu())

    def _top_mean(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.flatten(1).topk(self.config.score_top_pixels, dim=1).values.mean(1)

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
        return {**super().state(), "base_map_scale": self.base_map_scale, "base_score_scale": self.base_score_scale,
                "base": self.base.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.base_map_scale = float(state["base_map_scale"])
        self.base_score_scale = float(state.get("base_score_scale", 1.0))  # absent before image_score "fused"
        self.base.load_state(state["base"])
