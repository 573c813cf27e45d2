"""NAGL (Normal-Abnormal Guided Generalist anomaly detection, NeurIPS 2025) as a ray_ad detector.

A generalist: ``fit`` trains RM and AFL episodically on labelled source domains (``train`` samples,
grouped by their ``domain``); a line then scores with its own reference set (``set_references``: K
normal images, abnormal images with masks), no training. A bundle stores the network and, when set,
the reference set, so one generalist serves many lines, each a bundle with its references.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from ray_ad.data import Sample
from ray_ad.data.images import normalise_pixels
from ray_ad.errors import DataError, RayADError
from ray_ad.methods.base import Detector, Prediction, Runtime, check_tensor_keys, upsample_map
from ray_ad.methods.nagl.config import NAGLConfig
from ray_ad.methods.nagl.episodes import build_domain_pool, cell_mask
from ray_ad.methods.nagl.network import MapScoring, NAGLNet, score_maps
from ray_ad.methods.nagl.references import TENSOR_KEYS, ReferenceSet
from ray_ad.methods.nagl.scoring import (
    abnormal_residual,
    cells,
    nearest_normal,
    normal_guided_score,
    reference_statistics,
    similarity,
    standardised,
    top_mean,
)
from ray_ad.methods.nagl.training import train_episodes
from ray_ad.training import loss_summary

log = logging.getLogger(__name__)

BRANCHES = ("nagl", "normal", "naive")  # what scores: the full method, S_n alone, S_n + abnormal NN (setting iii)


class NoReferences(RayADError):
    """The NAGL model has no reference set to score against."""


class NAGL(Detector):
    method = "nagl"
    uses_labels = True  # fit() trains on labelled (masked) source images
    uses_references = True  # scores against a reference set (set_references), not a fitted memory
    scores_features = True  # predict_features: a benchmark scores cached features under many reference draws

    def __init__(self, config: NAGLConfig) -> None:
        super().__init__(config)
        self.config: NAGLConfig = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.net = NAGLNet(self.extractor.out_channels, config.proxies, config.heads, config.mask_value,
                               config.proxy_init_std, config.key_positions)
        self.net = self.net.to(self.device).eval()
        self.references: ReferenceSet | None = None
        self.branch = "nagl"
        self.threshold = config.decision_threshold
        self.scoring = MapScoring(config.top_fraction, config.standardise, config.unmasked_region,
                                  config.centre_anomaly_map)
        self._normal_cells: torch.Tensor | None = None  # [1, K*N, C]
        self._abnormal_cells: torch.Tensor | None = None  # [1, A*N, C] and their masks [1, A*N]
        self._abnormal_masks: torch.Tensor | None = None
        self._P_tilde: torch.Tensor | None = None  # RM's residual proxies for the reference set, [1, M, C]

    # ---------------------------------------------------------------- training (the generalist)
    def fit(self, train: list[Sample], calibration: list[Sample], runtime: Runtime | None = None) -> dict[str, Any]:
        """Episodic training on the labelled source images ``train``, one pool per ``Sample.domain``.
        ``calibration`` is not used: a line's decision comes with its references (``decision_threshold``)."""
        runtime = runtime or Runtime()
        domains: dict[str, list[Sample]] = defaultdict(list)
        for sample in train:
            domains[sample.domain or "source"].append(sample)
        rng = np.random.default_rng(self.config.seed)
        pools = [build_domain_pool(self.extractor, name, samples, self.config.train, rng, self.device, runtime.progress)
                 for name, samples in sorted(domains.items())]
        for pool in pools:
            log.info(f"NAGL episodes: domain {pool.name}: {len(pool.normal)} normal, "
                     f"{len(pool.abnormal)} abnormal images")
        trainer = runtime.episode_trainer or train_episodes
        self.net, losses = trainer(self.net, pools, self.config.train, self.config.loss, self.scoring,
                                   self.device, self.config.seed, runtime.progress)
        self.net = self.net.to(self.device).eval()
        if self.references is not None:
            self.set_references(self.references)  # the proxies come from the trained RM
        return {"domains": [pool.name for pool in pools], "steps": len(losses), **loss_summary(losses)}

    # ---------------------------------------------------------------- a line's references
    @torch.no_grad()
    def set_references(self, references: ReferenceSet) -> None:
        """Score from now on against ``references`` (features and RM's proxies computed once here)."""
        size, grid = self.image_size, self.config.backbone.grid_size
        if references.normal.shape[-1] != size or references.normal.shape[-2] != size:
            raise DataError(f"reference images are {list(references.normal.shape[-2:])} pixels; this model takes "
                            f"{size}x{size}")

        def features(pixels: torch.Tensor) -> torch.Tensor:
            images = normalise_pixels(pixels, self.extractor.mean, self.extractor.std).to(self.device)
            return cells(self.extractor(images).float()).flatten(0, 1)[None]  # [1, count * N, C]

        self.references = references
        self._normal_cells = features(references.normal)
        self._abnormal_cells = self._abnormal_masks = self._P_tilde = None
        if len(references.abnormal):
            self._abnormal_cells = features(references.abnormal)
            normal, F_a = self._normal_cells, self._abnormal_cells
            if self.config.standardise:
                normal, F_a = standardised(reference_statistics(normal), normal, F_a)
            M_a = cell_mask(references.masks, grid).to(self.device)  # [A, N], as given
            # Res(F^a, F^n), and the region of a whole-image mask estimated (0: it stays the whole image)
            res_a, M_a = abnormal_residual(F_a, normal, M_a, self.config.unmasked_region)
            self._abnormal_masks = M_a.flatten()[None]
            self._P_tilde = self.net.mine(F_a, res_a, self._abnormal_masks, grid * grid)  # RM, once per reference set

    def set_branch(self, branch: str) -> None:
        """What scores: ``nagl`` (S_n and S_a), ``normal`` (S_n alone: the kNN with the same normal
        references) or ``naive`` (S_n and the similarity to the nearest abnormal-reference defect cell:
        the paper's setting iii, references combined in feature space)."""
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
        self.branch = branch

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        self._check_references()
        return self.predict_features(torch.cat([self.extractor(chunk.to(self.device)) for chunk in images.split(8)]))

    def _check_references(self) -> None:
        if self._normal_cells is None:
            raise NoReferences("this NAGL model has no reference set: add one with `ray-ad references add` "
                               "(or POST /v1/lines/{line}/references) before scoring")

    @torch.no_grad()
    def predict_features(self, features: torch.Tensor) -> Prediction:
        self._check_references()
        grid = self.config.backbone.grid_size
        scores, maps = [], []
        for chunk in features.split(8):  # the similarity to K*N reference cells grows with the batch
            F_q = cells(chunk.to(self.device).float())
            S, s = self._score(F_q)
            scores.append(s.cpu())
            maps.append(upsample_map(S.view(-1, grid, grid), self.image_size, self.config.map_sigma).cpu())
        return Prediction(torch.cat(scores), torch.cat(maps))

    def _score(self, F_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.branch == "naive" and self._abnormal_cells is not None:
            normal, abnormal = self._normal_cells, self._abnormal_cells
            if self.config.standardise:
                normal, abnormal, F_q = standardised(reference_statistics(normal), normal, abnormal, F_q)
            s_n = nearest_normal(F_q, normal.expand(len(F_q), -1, -1))[0]
            defect_cells = abnormal[:, self._abnormal_masks[0] > 0]
            s_abnormal = similarity(F_q, defect_cells.expand(len(F_q), -1, -1)).amax(-1)
            S = (normal_guided_score(s_n) + s_abnormal) / 2
            return S, top_mean(S, self.config.top_fraction)
        net = self.net if self.branch == "nagl" and self._P_tilde is not None else None
        return score_maps(net, F_q, self._normal_cells, top_fraction=self.config.top_fraction, P_tilde=self._P_tilde,
                          standardise=self.config.standardise, centre_anomaly=self.config.centre_anomaly_map)

    # ---------------------------------------------------------------- what a bundle stores
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"net.{name}": value for name, value in self.net.state_dict().items()}
        if self.references is not None:
            out.update(self.references.tensors())
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        net_keys = {f"net.{name}" for name in self.net.state_dict()}
        has_references = any(key in tensors for key in TENSOR_KEYS)
        check_tensor_keys(net_keys | (set(TENSOR_KEYS) if has_references else set()), tensors)
        self.net.load_state_dict({key[4:]: tensors[key] for key in net_keys})
        self.net = self.net.to(self.device).eval()
        self.references = None
        self._normal_cells = None
        if has_references:
            self.set_references(ReferenceSet.from_tensors(tensors))

    def state(self) -> dict[str, Any]:
        return {"threshold": self.threshold,
                "references": None if self.references is None else self.references.shots}

    def load_state(self, state: dict[str, Any]) -> None:
        self.threshold = float(state["threshold"])


__all__ = ["BRANCHES", "NAGL", "NoReferences"]
