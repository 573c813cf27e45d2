"""The REF+CFA model as it scores: its parts, the path from features to a score, and its bundle tensors.

A cell's score reads the REF of its features under one domain's score network (``Domain``), its
signature z(P) (g_phi over the steps, the REF statistics; Eqs. 6-9) and the head f_psi. A source model
reads the source network; an adapted one the target network, with the fitted ``FieldAlignment``.
``REFCFA`` (``model.py``) adds the four stages that fit all of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ray_ad.diffusion import NoiseSchedule, build_score_net
from ray_ad.methods.base import Detector, Prediction, check_tensor_keys, upsample_map
from ray_ad.methods.ref_cfa.align import warped_timesteps
from ray_ad.methods.ref_cfa.alignment import FieldAlignment
from ray_ad.methods.ref_cfa.config import REFCFAConfig
from ray_ad.methods.ref_cfa.fields import (
    COMPONENTS,
    FieldSequence,
    FieldStatistics,
    field_statistics,
    residual_fields,
    uniform_weights,
)
from ray_ad.methods.ref_cfa.network import DetectionHead, FieldTransformer
from ray_ad.normalisation import FeatureNormaliser

LOG_EPS = 1e-6


@dataclass
class Domain:
    """A score network with the feature normalisation it was trained under (the source's or the target's)."""

    net: nn.Module
    normaliser: FeatureNormaliser

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        return self.normaliser(features)


class REFCFAScorer(Detector):
    """Everything of REF+CFA that a bundle stores and ``predict`` runs; fitting is ``REFCFA``'s."""

    method = "ref_cfa"
    uses_labels = True  # the source stage trains on labelled normal and anomalous images
    STORED_DEFAULTS = {"fields.last_reference": "previous"}  # bundles from before that option

    def __init__(self, config: REFCFAConfig) -> None:
        super().__init__(config)
        self.config: REFCFAConfig = config
        self.schedule = NoiseSchedule()
        channels, grid = self.extractor.out_channels, config.backbone.grid_size
        self.channels, self.grid = channels, grid
        self.timesteps = torch.tensor(config.fields.timesteps)
        self.source = self._new_domain(config.seed)
        self.target: Domain | None = None
        self.components = [COMPONENTS.index(c) for c in config.fields.components]
        k, d = len(config.fields.timesteps), config.fields.token_dim
        self.basis = torch.zeros(channels, d)  # whitened principal directions of R
        self.u_source = torch.zeros(channels, config.cfa.rank)  # U_S of stacked M
        self.profile_source = torch.zeros(k)
        signature_dim = self._signature_dim()
        self.stat_mean = torch.zeros(self._scalar_dim())
        self.stat_std = torch.ones(self._scalar_dim())
        self.stat_scale = torch.ones(2, 3)  # source-normal means of E_X and NS_X (makes L_stat unitless)
        self.anchor_mean = torch.zeros(signature_dim)  # source calibration anchors: normal signatures
        self.anchor_cov = torch.eye(signature_dim)
        # +1 / -1 per statistic: higher / lower on the source's anomalous images (None: not measured,
        # a bundle trained before the statistic-direction alignment existed).
        self.source_directions: torch.Tensor | None = None
        # Median and spread of g_phi's inputs over source-normal cells [K, F] (None: a bundle older than
        # the input alignment); the target's inputs are matched to them (cfa.input_alignment).
        self.input_center: torch.Tensor | None = None
        self.input_scale: torch.Tensor | None = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.g_phi = FieldTransformer(
                len(self.components) * (d + 1), config.head.d_model, config.head.heads, config.head.layers,
                config.head.embed_dim,
            ).to(self.device)
            self.f_psi = DetectionHead(signature_dim, config.head.hidden).to(self.device)
        self.alignment = FieldAlignment.identity(k, channels, signature_dim)  # until ``fit_alignment`` runs
        self.diagnostics: dict[str, float] = {}

    # ---------------------------------------------------------------- shapes
    @property
    def raw(self) -> bool:
        return self.config.fields.representation == "raw"

    @property
    def adapted(self) -> bool:
        return self.target is not None

    def _scalar_dim(self) -> int:
        if self.raw:
            return 1
        return 2 * len(self.components) + (1 if COMPONENTS.index("M") in self.components else 0)

    def _signature_dim(self) -> int:
        if self.raw:
            return self.config.fields.token_dim + 1
        return self.config.head.embed_dim + self._scalar_dim()

    def _new_domain(self, seed: int) -> Domain:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build_score_net(self.config.score_net, self.channels, self.grid).to(self.device).eval()
        return Domain(net, self._normaliser())

    def _normaliser(self) -> FeatureNormaliser:
        return FeatureNormaliser(self.config.normalisation, self.channels, self.grid).to(self.device)

    # ---------------------------------------------------------------- fields
    @torch.no_grad()
    def fields(
        self, domain: Domain, x0: torch.Tensor, basis: torch.Tensor | None, progress: bool = False,
        grams: bool = False, desc: str = "fields", timesteps: list[int] | None = None,
    ) -> tuple[FieldSequence, dict[str, torch.Tensor]]:
        """REF of normalised features ``x0`` [B, C, G, G] (K score-net calls per image).

        With ``grams``, also the Gram matrices X X^T of the stacked R and M vectors (over cells and steps).
        ``timesteps`` runs the chain at other timesteps than the configured ones (TA over diffusion time).
        """
        chain = self.timesteps.tolist() if timesteps is None else list(timesteps)
        return residual_fields(domain.net, self.schedule, x0, chain, basis, self.config.fields.last_reference,
                               self.device, progress, grams, desc)

    def aligned_fields(
        self, domain: Domain, x0: torch.Tensor, basis: torch.Tensor, positions: torch.Tensor | None,
        progress: bool = False, desc: str = "fields",
    ) -> FieldSequence:
        """Fields of ``domain`` with TA applied at step ``positions`` psi (None: no TA), as cfa.temporal_mode says:
        target steps interpolated at psi, or the target chain run at the timesteps t(psi)."""
        if positions is None:
            return self.fields(domain, x0, basis, progress, desc=desc)[0]
        if self.config.cfa.temporal_mode == "timesteps":
            chain = warped_timesteps(positions, self.timesteps)
            return self.fields(domain, x0, basis, progress, desc=desc, timesteps=chain)[0]
        return self.fields(domain, x0, basis, progress, desc=desc)[0].resample(positions)

    def target_basis(self) -> torch.Tensor:
        """Token bases for target fields: the source basis, M's rotated by DSA (``FieldAlignment.token_basis``)."""
        return self.alignment.token_basis(self.basis, self.config.cfa.directional)

    def domain_fields(self, features: torch.Tensor) -> FieldSequence:
        """REF of backbone features [B, C, G, G] (on the model's device) as the model reads them: through
        the source network, or once adapted through the target network with TA and DSA applied."""
        if not self.adapted:
            return self.fields(self.source, self.source.normalise(features), self.basis)[0]
        positions = self.alignment.positions if self.config.cfa.temporal else None
        return self.aligned_fields(self.target, self.target.normalise(features), self.target_basis(), positions)

    @torch.no_grad()
    def source_statistics(self, features: torch.Tensor) -> FieldStatistics:
        """E, NS and DV of every cell under the fixed uniform w_t (Eqs. 6-8), through the source network:
        what S1 alone makes of features [B, C, G, G], before g_phi or any label-trained part.

        Under N(0, I)'s exact denoiser (the Gaussian skip with an untrained network) every residual is a
        multiple of the cell's own normalised feature, so M = 0 up to rounding (and DV, the turn between
        rounding-noise vectors, means nothing): whatever E_M holds, the network learnt
        (``tests/unit/test_network_carries_signal.py``).
        """
        x0 = self.source.normalise(features.to(self.device))
        fields, _ = self.fields(self.source, x0, None)
        return field_statistics(fields, uniform_weights(fields.energy.shape[1]), self.config.fields.ridge)

    # ---------------------------------------------------------------- signature (Eqs. 6-9)
    def _scalars(self, fields: FieldSequence, weights: torch.Tensor) -> tuple[torch.Tensor, FieldStatistics | None]:
        if self.raw:
            return torch.log(fields.energy[:, :, 0].mean(1, keepdim=True) + LOG_EPS), None
        stats = field_statistics(fields, weights, self.config.fields.ridge)  # Eqs. 6-8
        parts = [torch.log(stats.E[:, self.components] + LOG_EPS), torch.log(stats.NS[:, self.components] + LOG_EPS)]
        if COMPONENTS.index("M") in self.components:
            parts.append(stats.DV[:, None])
        return torch.cat(parts, 1), stats

    def signature(self, fields: FieldSequence) -> tuple[torch.Tensor, FieldStatistics | None]:
        """z(P) = [h(P); E^att_X; NS^att_X; DV] (Eq. 9), statistics standardised by source normals."""
        device = self.device
        if self.raw:
            # Ablation "w/o REF": the head sees the raw residual R (its projection and energy) averaged
            # over the steps; no Field Transformer, no stationarity statistics.
            scalars, _ = self._scalars(fields, uniform_weights(fields.energy.shape[1]))
            z = torch.cat([fields.tokens[:, :, 0].mean(1), (scalars - self.stat_mean) / self.stat_std], 1)
            return z.to(device), None
        inputs = self.g_phi_inputs(fields).to(device)
        if self.adapted:
            inputs = self.alignment.inputs(inputs)  # input alignment (ours), when fitted
        alpha, h = self.g_phi(inputs, self.timesteps)
        scalars, stats = self._scalars(fields.to(device), alpha)  # adaptive E^att, NS^att, DV (Eq. 8)
        z = torch.cat([h, (scalars - self.stat_mean.to(device)) / self.stat_std.to(device)], 1)
        return z, stats

    def g_phi_inputs(self, fields: FieldSequence) -> torch.Tensor:
        """What the Field Transformer reads per cell and step: token projections and log energies [N, K, F]."""
        tokens = fields.tokens[:, :, self.components].flatten(2)
        log_energy = torch.log(fields.energy[:, :, self.components] + LOG_EPS)
        return torch.cat([tokens, log_energy], 2)

    def patch_logits(self, fields: FieldSequence) -> torch.Tensor:
        z, _ = self.signature(fields)
        if self.adapted:
            z = self.alignment.signatures(z)  # SFA (and the statistic flips when enabled)
        return self.f_psi(z)  # Eq. 9: y_hat(P) = sigmoid(f_psi(z(P)))

    @torch.no_grad()
    def signatures(self, fields: FieldSequence) -> torch.Tensor:
        """z(P) of every cell of ``fields`` (before SFA), in chunks, on the CPU."""
        chunks = torch.arange(len(fields)).split(8192)
        return torch.cat([self.signature(fields.index(rows))[0].cpu() for rows in chunks])

    def image_statistics(self, z: torch.Tensor) -> torch.Tensor:
        """Per image, the mean over its cells of each standardised statistic of signatures z [images x G^2, D]."""
        return z[:, -self._scalar_dim():].reshape(-1, self.grid**2, self._scalar_dim()).mean(1)

    # ---------------------------------------------------------------- inference
    def image_scores(self, probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell probabilities [B, G, G] -> (image score = mean of the top p% pixels, pixel map)."""
        anomaly_map = upsample_map(probabilities, self.image_size, self.config.map_sigma)
        flat = anomaly_map.flatten(1)
        k = max(1, round(flat.shape[1] * self.config.top_p / 100))
        return flat.topk(k, dim=1).values.mean(1), anomaly_map  # Eq. 12: A(u) by upsampling; top-p% mean

    def score_fields(self, fields: FieldSequence) -> torch.Tensor:
        """Image scores [B] (on the CPU) from the fields of whole images, as ``predict`` scores them."""
        probabilities = torch.sigmoid(self.patch_logits(fields)).view(-1, self.grid, self.grid)
        return self.image_scores(probabilities)[0].cpu()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        features = self.extractor(images.to(self.device))
        logits = self.patch_logits(self.domain_fields(features))
        probabilities = torch.sigmoid(logits).view(-1, self.grid, self.grid)
        score, anomaly_map = self.image_scores(probabilities)
        return Prediction(score.cpu(), anomaly_map.cpu())

    # ---------------------------------------------------------------- bundle state
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"source_net.{k}": v for k, v in self.source.net.state_dict().items()}
        out.update(self.source.normaliser.tensors("source_"))
        out.update(basis=self.basis,
                   u_source=self.u_source, profile_source=self.profile_source, stat_mean=self.stat_mean,
                   stat_std=self.stat_std, stat_scale=self.stat_scale, anchor_mean=self.anchor_mean,
                   anchor_cov=self.anchor_cov)
        if self.source_directions is not None:
            out["source_directions"] = self.source_directions
        if self.input_center is not None:
            out.update(input_center=self.input_center, input_scale=self.input_scale)
        out.update({f"f_psi.{k}": v for k, v in self.f_psi.state_dict().items()})
        if not self.raw:
            out.update({f"g_phi.{k}": v for k, v in self.g_phi.state_dict().items()})
        if self.target is not None:
            out.update({f"target_net.{k}": v for k, v in self.target.net.state_dict().items()})
            out.update(self.target.normaliser.tensors("target_"))
            out.update(self.alignment.tensors())
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.target is None and any(k.startswith("target_net.") for k in tensors):
            self.target = self._new_domain(self.config.seed + 1)  # an adapted bundle
        if "source_directions" in tensors:  # absent from bundles older than the direction alignment
            self.source_directions = tensors["source_directions"].cpu()
        # Optional: absent from bundles older than the input alignment, or adapted without it.
        for name in ("input_center", "input_scale"):
            setattr(self, name, tensors[name].cpu() if name in tensors else None)
        self.alignment.load_inputs(tensors)
        check_tensor_keys(set(self.tensors()), tensors)

        def sub(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.source.normaliser.load_tensors(tensors, "source_")
        self.source.net.load_state_dict(sub("source_net."))
        self.f_psi.load_state_dict(sub("f_psi."))
        if not self.raw:
            self.g_phi.load_state_dict(sub("g_phi."))
        for name in ("basis", "u_source"):
            setattr(self, name, tensors[name].to(self.device))
        for name in ("profile_source", "stat_mean", "stat_std", "stat_scale", "anchor_mean", "anchor_cov"):
            setattr(self, name, tensors[name].cpu())
        if self.target is not None:
            self.target.normaliser.load_tensors(tensors, "target_")
            self.target.net.load_state_dict(sub("target_net."))
            self.alignment.load_transforms(tensors)

    def domain_tensors(self, role: Literal["source", "target"]) -> dict[str, torch.Tensor]:
        """One domain's score network and feature standardisation (to reuse a trained S1 or T1)."""
        return {k: v for k, v in self.tensors().items() if k.startswith(f"{role}_")}

    def load_domain_tensors(self, role: Literal["source", "target"], tensors: dict[str, torch.Tensor]) -> None:
        domain = self._new_domain(self.config.seed + (0 if role == "source" else 1))
        domain.net.load_state_dict({k[len(f"{role}_net."):]: v for k, v in tensors.items() if "_net." in k})
        domain.normaliser.load_tensors(tensors, f"{role}_")
        setattr(self, role, domain)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "adapted": self.adapted, "diagnostics": self.diagnostics}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.diagnostics = dict(state.get("diagnostics", {}))
