"""REF + CFA: residual evolution fields, and cross-domain field alignment to an unlabeled target.

Four stages, as in the paper:

- S1 ``fit_source_score_net``: a DDPM score network on the source's normal features;
- S2 ``fit_detector``: REF of every labelled source image -> Field Transformer g_phi + head f_psi,
  trained with L_S = L_sup + lambda_stat L_stat + lambda_sp L_sp; the source calibration anchors;
- T1 ``fit_target_score_net``: a score network on the unlabeled target images (anomalies included);
- T2 ``fit_alignment``: CFA (temporal, directional, second-order) without any target label.

``adapt`` runs T1 + T2 and turns the detector into the adapted model (source g_phi, f_psi + target
score network + alignment transforms), which is saved and served like any other bundle.

This module orchestrates the stages. What they fit, and how it scores, is ``scorer.REFCFAScorer``;
the parts are beside it: ``config``, ``fields`` (REF), ``supervision`` and ``head`` (S2), ``align``
(CFA's closed forms) and ``alignment`` (the fitted transforms).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from ray_ad.data import Sample
from ray_ad.errors import ConfigError, DataError
from ray_ad.methods.base import Runtime
from ray_ad.methods.ref_cfa.align import (
    coral_loss,
    covariance,
    paired_directions,
    residual_profile,
    robust_moments,
    source_directions,
    subspace_distance,
    subspace_rotation,
    tail_directions,
    temporal_reparameterisation,
    top_left_singular,
    whiten_recolor,
)
from ray_ad.methods.ref_cfa.config import REFCFAConfig
from ray_ad.methods.ref_cfa.fields import FieldSequence, image_rows, token_basis, uniform_weights
from ray_ad.methods.ref_cfa.head import train_head
from ray_ad.methods.ref_cfa.scorer import Domain, REFCFAScorer
from ray_ad.methods.ref_cfa.supervision import paste_anomalies, source_supervision, synthetic_supervision
from ray_ad.training import loss_summary, per_sample_epsilon_loss

__all__ = ["REFCFA", "REFCFAConfig"]


class REFCFA(REFCFAScorer):
    # ---------------------------------------------------------------- S1 + S2: the source model
    def fit(self, train: list[Sample], calibration: list[Sample], runtime: Runtime | None = None) -> dict[str, Any]:
        """S1 + S2 on labelled source samples ``train``; ``calibration`` normals set the threshold."""
        runtime = runtime or Runtime()
        normals = [s for s in train if s.label == 0]
        if not normals:
            raise DataError("ref_cfa needs normal (label 0) source images to train the source score network")
        if any(s.label not in (0, 1) for s in train):
            raise DataError("ref_cfa source samples must be labelled 0 (normal) or 1 (anomalous)")
        info = self.fit_source_score_net(normals, runtime)
        info.update(self.fit_detector(train, runtime))
        self.calibrate(calibration, runtime)
        return info

    def fit_source_score_net(self, normals: list[Sample], runtime: Runtime | None = None) -> dict[str, Any]:
        """S1, then the token basis and U_S of its fields (``fit_source_basis``)."""
        runtime = runtime or Runtime()
        features = self.extract_features(normals, runtime, desc="source features")
        losses = self.fit_source_features(features, runtime)
        self.fit_source_basis(normals, runtime)
        return loss_summary(losses, "source_")

    def fit_source_features(self, features: torch.Tensor, runtime: Runtime | None = None) -> list[float]:
        """S1 alone on backbone features [N, C, G, G] of source normals; the per-step losses."""
        self.source, losses = self._train_domain(features, runtime or Runtime(), "source")
        return losses

    def fit_source_basis(self, normals: list[Sample], runtime: Runtime | None = None) -> None:
        """Token basis B and U_S from the REF of the source normals (after S1)."""
        runtime = runtime or Runtime()
        features = self.extract_features(normals, runtime, desc="source features")
        x0 = self.source.normalise(features.to(self.device))
        # Token basis: principal directions of the normal R fields, whitened so tokens have unit scale.
        _, gram = self.fields(self.source, x0, None, runtime.progress, grams=True, desc="source normal fields")
        count = len(normals) * self.grid**2 * len(self.config.fields.timesteps)
        self.basis = token_basis(gram["R"], count, self.config.fields.token_dim).to(self.device)
        self.u_source = top_left_singular(gram["M"], self.config.cfa.rank).to(self.device)  # U_S

    def _train_domain(self, features: torch.Tensor, runtime: Runtime, name: str) -> tuple[Domain, list[float]]:
        domain = self._new_domain(self.config.seed + (0 if name == "source" else 1))
        domain.normaliser.fit(features)
        if name == "target" and self.config.target_init == "source":
            domain.net.load_state_dict(self.source.net.state_dict())
        x0 = domain.normalise(features.to(self.device))
        net, losses = runtime.score_net_trainer(
            domain.net, x0, self.schedule, self.config.train, self.device, self.config.seed, runtime.progress
        )
        return Domain(net, domain.normaliser), losses

    def fit_detector(
        self, train: list[Sample], runtime: Runtime | None = None, cache: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """S2: REF of the labelled source images, then g_phi and f_psi under L_S.

        ``cache`` (optional) keeps the source fields between calls for the same source network and basis.
        """
        runtime, cfg = runtime or Runtime(), self.config
        cache = {} if cache is None else cache
        supervision = source_supervision(train, cfg.head.supervision, self.extractor, self.grid, runtime.progress)
        if "source_fields" not in cache:
            features = self.extract_features(train, runtime, desc="source features")
            no_anomalies = not bool((supervision.labels == 1).any())
            if cfg.head.supervision == "synthetic" or (cfg.head.supervision == "auto" and no_anomalies):
                extra, cache["synthetic_targets"] = synthetic_supervision(
                    self.extractor, [s for s in train if s.label == 0], cfg.head.synthetic_ratio, cfg.seed,
                    self.device, runtime.progress)
                features = torch.cat([features, extra])
            x0 = self.source.normalise(features.to(self.device))
            cache["source_fields"], _ = self.fields(self.source, x0, self.basis, runtime.progress,
                                                    desc="source fields")
        fields: FieldSequence = cache["source_fields"]
        if "synthetic_targets" in cache:
            supervision = supervision.with_synthetic(cache["synthetic_targets"])
        labels = supervision.labels
        normal_rows = image_rows(torch.nonzero(labels == 0).flatten(), self.grid)
        self._fit_statistics(fields.index(normal_rows))
        losses = train_head(self.signature, self.g_phi, self.f_psi, fields, supervision, cfg.head,
                            train_g_phi=not self.raw, top_p=cfg.top_p, stat_scale=self.stat_scale, seed=cfg.seed,
                            device=self.device, progress=runtime.progress)
        z = self.signatures(fields)  # every source cell, once: the anchors and the directions share it
        # Source calibration anchors: mean and covariance of the normal patch signatures.
        self.anchor_mean, self.anchor_cov = z[normal_rows].mean(0), covariance(z[normal_rows])
        self.source_directions = source_directions(self.image_statistics(z), labels)
        self.profile_source = torch.from_numpy(residual_profile(fields.index(normal_rows).energy[:, :, 0])).float()
        if not self.raw:
            self._fit_input_anchors(fields.index(normal_rows))
        return {"head_loss_first": losses[0], "head_loss_last": float(np.mean(losses[-50:])),
                "source_images": len(train), "synthetic_images": int(len(labels) - len(train))}

    def _fit_statistics(self, normal_fields: FieldSequence) -> None:
        """Standardisation of the signature's statistics, from normal source cells (fixed w_t, Eqs. 6-7)."""
        weights = uniform_weights(normal_fields.energy.shape[1])
        scalars, stats = self._scalars(normal_fields, weights)
        self.stat_mean, self.stat_std = scalars.mean(0), scalars.std(0).clamp_min(1e-6)
        if stats is not None:
            self.stat_scale = torch.stack([stats.E.mean(0), stats.NS.mean(0)]).clamp_min(1e-6)

    @torch.no_grad()
    def fit_input_anchors(self, normals: list[Sample], runtime: Runtime | None = None) -> None:
        """The source-normal median and spread of g_phi's inputs, for a source model trained before they
        were recorded (``fit_detector`` records them); needs the source's normal images."""
        if self.raw:
            raise ConfigError("cfa.input_alignment needs the Field Transformer; fields.representation=raw has none")
        runtime = runtime or Runtime()
        features = self.extract_features(normals, runtime, desc="source features")
        fields, _ = self.fields(self.source, self.source.normalise(features.to(self.device)), self.basis,
                                runtime.progress, desc="source normal fields")
        self._fit_input_anchors(fields)

    def _fit_input_anchors(self, normal_fields: FieldSequence) -> None:
        self.input_center, self.input_scale = robust_moments(self._input_sample(normal_fields))

    def _input_sample(self, fields: FieldSequence, rows: int = 50_000) -> torch.Tensor:
        """g_phi inputs of at most ``rows`` cells drawn without replacement (seeded): medians of every cell
        would cost memory and time for no better estimate."""
        generator = torch.Generator().manual_seed(self.config.seed)
        index = torch.randperm(len(fields), generator=generator)[:rows]
        return self.g_phi_inputs(fields.index(index.sort().values))

    @torch.no_grad()
    def calibrate(self, normals: list[Sample], runtime: Runtime | None = None) -> None:
        """Threshold = quantile of the image scores of held-out source normals."""
        if not normals:
            raise DataError("ref_cfa calibration needs at least one held-out normal source image")
        features = self.extract_features(normals, runtime or Runtime(), desc="calibration features")
        scores = torch.cat([self.score_fields(self.domain_fields(chunk.to(self.device)))
                            for chunk in features.split(32)])
        self.set_threshold_from(scores.numpy(), self.config.threshold_quantile)

    # ---------------------------------------------------------------- T1 + T2: adaptation
    def adapt(
        self, target_images: list[str], runtime: Runtime | None = None, cache: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Adapt to an unlabeled target domain given only its image URIs (no label or mask exists here)."""
        if not target_images:
            raise DataError("adaptation needs at least one target image")
        runtime = runtime or Runtime()
        self._check_rank()  # before the expensive T1, not after
        self._check_directions()
        cache = {} if cache is None else cache  # T1 and T2 share the target's backbone features
        info = self.fit_target_score_net(target_images, runtime, cache)
        info.update(self.fit_alignment(target_images, runtime, cache))
        return info

    def _check_rank(self) -> None:
        if self.config.cfa.rank != self.u_source.shape[1]:
            raise ConfigError(
                f"cfa.rank={self.config.cfa.rank} differs from the source model's U_S rank "
                f"{self.u_source.shape[1]}; the rank is fixed when the source model is trained"
            )

    def _check_directions(self) -> None:
        if self.config.cfa.statistic_directions and self.source_directions is None:
            raise ConfigError("cfa.statistic_directions needs the source's statistic directions, which this "
                              "source model predates: retrain it")

    def target_features(
        self, target_images: list[str], runtime: Runtime | None = None, cache: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Backbone features of the target images, kept in ``cache`` (under "target_features") for T1 and T2."""
        cache = {} if cache is None else cache
        if "target_features" not in cache:
            samples = [Sample(path, -1, None, "target", "target", "unknown") for path in target_images]
            cache["target_features"] = self.extract_features(samples, runtime or Runtime(), desc="target features")
        return cache["target_features"]

    def fit_target_score_net(
        self, target_images: list[str], runtime: Runtime | None = None, cache: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """T1: a score network on the target images as they come (anomalies included).

        With ``target_trim`` > 0 (robust T1), a second T1 is trained, from the same initialisation and
        budget, on the target images without the ``target_trim`` share that the first one denoises worst:
        defects are what a network trained mostly on normal cells fits least. No label is read.
        """
        runtime = runtime or Runtime()
        features = self.target_features(target_images, runtime, cache)
        if self.config.target_init == "source_frozen":
            # S1 as T1, normalised by the target's own feature statistics: no target training at all.
            self.target = Domain(copy.deepcopy(self.source.net), self._normaliser().fit(features))
            return {"target_images": len(target_images), "target_training_steps": 0}
        self.target, losses = self._train_domain(features, runtime, "target")
        info = {**loss_summary(losses, "target_"), "target_images": len(target_images)}
        if self.config.target_trim > 0:
            image_loss = per_sample_epsilon_loss(self.target.net, self.schedule,
                                                 self.target.normalise(features.to(self.device)),
                                                 self.timesteps.tolist(), self.config.seed)
            kept_count = max(1, round(len(image_loss) * (1 - self.config.target_trim)))
            kept = image_loss <= torch.kthvalue(image_loss, kept_count).values
            self.target, losses = self._train_domain(features[kept], runtime, "target")
            info.update({**loss_summary(losses, "target_pass2_"), "target_images_kept": int(kept.sum())})
        return info

    @torch.no_grad()
    def fit_alignment(
        self, target_images: list[str], runtime: Runtime | None = None, cache: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """T2: fit TA, DSA and SFA (those enabled in ``cfa``) on the target's unlabeled REF.

        ``cache`` (optional) keeps the target's fields between calls for the same source model and
        target network, so that alignment ablations do not recompute them.
        """
        if self.target is None:
            raise RuntimeError("fit_alignment needs the target score network: run fit_target_score_net first")
        self._check_rank()
        runtime, cfa, alignment = runtime or Runtime(), self.config.cfa, self.alignment
        if cfa.input_alignment and self.input_center is None:
            raise ConfigError("cfa.input_alignment needs the source-normal spread of g_phi's inputs, which this "
                              "source model predates: retrain it, or call fit_input_anchors with its normals")
        cache = {} if cache is None else cache
        alignment.input_a = alignment.input_b = None  # nothing of an earlier fit may shape this one's signatures
        x0 = self.target.normalise(self.target_features(target_images, runtime, cache).to(self.device))
        if "target_pass1" not in cache:
            fields, gram = self.fields(self.target, x0, None, runtime.progress, grams=True,
                                       desc="target fields (1/2)")
            cache["target_pass1"] = (residual_profile(fields.energy[:, :, 0]), top_left_singular(gram["M"], cfa.rank))
        profile_target, u_target = cache["target_pass1"]
        info: dict[str, Any] = {}
        # Eq. 11, TA: psi matches the target's mean residual profile to the source's.
        k = len(self.config.fields.timesteps)
        alignment.positions = (
            temporal_reparameterisation(profile_target, self.profile_source.double().numpy())
            if cfa.temporal else torch.arange(k, dtype=torch.float32)
        )
        info["ta_profile_gap_before"] = float(np.abs(profile_target - self.profile_source.numpy()).mean())
        # Eq. 11, DSA: orthogonal Procrustes between the top-r subspaces of stacked M (U_T -> U_S).
        u_target = u_target.to(self.device)
        identity = torch.eye(self.channels)
        alignment.rotation = subspace_rotation(u_target, self.u_source).cpu() if cfa.directional else identity
        info["dsa_subspace_distance_before"] = subspace_distance(u_target, self.u_source)
        info["dsa_subspace_distance_after"] = subspace_distance(alignment.rotation.to(self.device) @ u_target,
                                                                self.u_source)
        # Eq. 11, SFA: whiten-recolor the target signatures onto the source's normal anchors (min. of CORAL).
        positions = alignment.positions if cfa.temporal else None
        key = ("target_fields", cfa.directional, cfa.temporal and cfa.temporal_mode,
               None if positions is None else tuple(positions.tolist()))
        if key not in cache:
            cache[key] = self.aligned_fields(self.target, x0, self.target_basis(), positions, runtime.progress,
                                             desc="target fields (2/2)")
        fields = cache[key]
        info["ta_profile_gap_after"] = float(
            np.abs(residual_profile(fields.energy[:, :, 0]) - self.profile_source.numpy()).mean())
        if cfa.input_alignment:
            # Input alignment: each coordinate of g_phi's input moved onto the source normals' median and
            # spread, robustly (the target's defects are a minority of its cells).
            target_center, target_scale = robust_moments(self._input_sample(fields))
            alignment.input_a = self.input_scale / target_scale
            alignment.input_b = self.input_center - alignment.input_a * target_center
            info["input_scale_ratio_median"] = float(alignment.input_a.median())
        z = self.signatures(fields)
        flip = torch.ones(z.shape[1])
        if cfa.statistic_directions:
            self._check_directions()
            if cfa.direction_witness == "synthetic":
                target = self.synthetic_directions(self.target, self.target_basis(), target_images, positions,
                                                   runtime.progress, cache)
            else:
                target = tail_directions(self.image_statistics(z))
            flip[-self._scalar_dim():] = self.source_directions * target  # -1 where the directions differ
            info["target_directions"] = [int(v) for v in target]
            info["statistics_flipped"] = int((flip < 0).sum())
            z = z * flip
        info["sfa_coral_before"] = coral_loss(z, self.anchor_cov)
        if cfa.second_order:
            a, alignment.align_b = whiten_recolor(z, self.anchor_mean, self.anchor_cov, cfa.ridge, cfa.sfa_trim,
                                                  relative=cfa.ridge_relative)
        else:
            a, alignment.align_b = torch.eye(z.shape[1]), torch.zeros(z.shape[1])
        alignment.align_a = a * flip  # A diag(flip): the flips happen before SFA
        info["sfa_coral_after"] = coral_loss(z @ alignment.align_a.T + alignment.align_b, self.anchor_cov)
        # No target labels: the threshold is the same quantile of the target's own image scores.
        images = len(fields) // self.grid**2
        scores = torch.cat([self.score_fields(fields.images(i, i + 32)) for i in range(0, images, 32)])
        self.set_threshold_from(scores.numpy(), self.config.threshold_quantile)
        self.diagnostics = info
        return info

    @torch.no_grad()
    def synthetic_directions(
        self, domain: Domain, basis: torch.Tensor, paths: list[str], positions: torch.Tensor | None,
        progress: bool = False, cache: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """+1 / -1 per signature statistic: whether it rises or falls in the cells where a synthetic
        anomaly is pasted into images of ``paths``, read through ``domain``'s network (no label needed).

        ``positions`` resamples the fields along the steps (TA); ``cache`` keeps the pasted pairs
        between calls for the same images.
        """
        cache = {} if cache is None else cache
        if "witness" not in cache:
            rng = np.random.default_rng(self.config.seed + 2)  # apart from the synthetic supervision's draws
            cache["witness"] = paste_anomalies(self.extractor, paths, self.config.cfa.witness_images, rng,
                                               self.device, progress, originals=True)
        originals, anomalous, targets = cache["witness"]
        statistics = []
        for features in (originals, anomalous):
            fields = self.aligned_fields(domain, domain.normalise(features.to(self.device)), basis, positions)
            statistics.append(self.signatures(fields)[:, -self._scalar_dim():])
        inside = targets.flatten() >= 0.5  # cells at least half covered by the pasted anomaly
        if not inside.any():
            raise DataError("no cell is half covered by a synthetic anomaly; raise cfa.witness_images")
        return paired_directions(statistics[0][inside], statistics[1][inside])
