"""REF + CFA: residual evolution fields, and cross-domain field alignment to an unlabeled target.

Four stages, as in the paper:

- S1 ``fit_source_score_net``: a DDPM score network on the source's normal features;
- S2 ``fit_detector``: REF of every labelled source image -> Field Transformer g_phi + head f_psi,
  trained with L_S = L_sup + lambda_stat L_stat + lambda_sp L_sp; the source calibration anchors;
- T1 ``fit_target_score_net``: a score network on the unlabeled target images (anomalies included);
- T2 ``fit_alignment``: CFA (temporal, directional, second-order) without any target label.

``adapt`` runs T1 + T2 and turns the detector into the adapted model (source g_phi, f_psi + target
score network + alignment transforms), which is saved and served like any other bundle.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ray_ad.backbones import BackboneConfig
from ray_ad.data import ImageDataset, Sample
from ray_ad.data.images import load_image, to_tensor
from ray_ad.data.synthetic import synthesize_anomaly
from ray_ad.diffusion import NoiseSchedule, ScoreNetConfig, build_score_net
from ray_ad.errors import ConfigError, DataError
from ray_ad.methods.base import Detector, Prediction, check_tensor_keys, upsample_map
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
    warped_timesteps,
    whiten_recolor,
)
from ray_ad.methods.ref_cfa.fields import (
    COMPONENTS,
    FieldConfig,
    FieldSequence,
    field_statistics,
    reverse_residuals,
    summarise_steps,
    uniform_weights,
)
from ray_ad.methods.ref_cfa.network import DetectionHead, FieldTransformer
from ray_ad.normalisation import FeatureNormaliser, NormalisationConfig
from ray_ad.training import TrainConfig, epsilon_loss, loss_summary, per_sample_epsilon_loss

LOG_EPS = 1e-6


@dataclass
class HeadConfig:
    d_model: int = 64
    heads: int = 4
    layers: int = 1
    embed_dim: int = 16
    hidden: int = 64
    steps: int = 600
    batch_images: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lambda_stat: float = 0.05  # weight of the stationarity/energy regulariser on normal patches
    lambda_sp: float = 0.05  # weight of the TV spatial prior
    # "auto": pixel masks where present, image labels otherwise, synthetic anomalies when the source
    # has no anomalous image at all; "mask" / "image" / "synthetic" force one kind.
    supervision: Literal["auto", "mask", "image", "synthetic"] = "auto"
    synthetic_ratio: float = 0.5  # synthetic anomalies per normal training image (synthetic supervision)

    def __post_init__(self) -> None:
        if self.supervision not in ("auto", "mask", "image", "synthetic"):
            raise ValueError(f"head.supervision must be auto, mask, image or synthetic, got {self.supervision!r}")
        if self.steps < 1 or self.batch_images < 1:
            raise ValueError(f"head.steps and head.batch_images must be >= 1, got {self.steps}, {self.batch_images}")


@dataclass
class CFAConfig:
    temporal: bool = True  # TA
    directional: bool = True  # DSA
    second_order: bool = True  # SFA
    rank: int = 8  # r of the top-r singular subspaces of stacked M
    ridge: float = 1e-4  # added to covariance eigenvalues before whitening
    # SFA: share of target cells left out of the target moments as outliers (0 = all cells, the paper)
    sfa_trim: float = 0.0
    # Statistic-direction alignment (ours, not the paper's; see the README): flip each signature
    # statistic whose direction on the unlabeled target differs from the source's.
    statistic_directions: bool = False
    # What witnesses a statistic's direction on the target, without labels: "tail" (the heavier tail of
    # its distribution over the target images) or "synthetic" (the way it moves in the cells where a
    # synthetic anomaly is pasted into target images, paired with the same cells before).
    direction_witness: Literal["tail", "synthetic"] = "tail"
    witness_images: int = 64  # target images that get a synthetic anomaly (direction_witness=synthetic)
    # TA applied by interpolating the stored per-step quantities between the target's steps ("resample",
    # which gives step 0 a change and a turn that never occur on the source), or by running the target
    # chain at the warped diffusion timesteps ("timesteps"; see align.warped_timesteps).
    temporal_mode: Literal["resample", "timesteps"] = "resample"
    ridge_relative: bool = False  # SFA ridge = ridge x each covariance's mean eigenvalue (not absolute)
    # Input alignment (ours): the target's g_phi inputs (tokens and log energies per step) matched per
    # coordinate to the source normals' median and spread, so the frozen, non-linear g_phi sees inputs
    # on the scale it was trained on. SFA only aligns what comes out of it.
    input_alignment: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.sfa_trim < 1:
            raise ValueError(f"cfa.sfa_trim must be in [0, 1), got {self.sfa_trim}")
        if self.direction_witness not in ("tail", "synthetic"):
            raise ValueError(f"cfa.direction_witness must be tail or synthetic, got {self.direction_witness!r}")
        if self.witness_images < 1:
            raise ValueError(f"cfa.witness_images must be >= 1, got {self.witness_images}")
        if self.temporal_mode not in ("resample", "timesteps"):
            raise ValueError(f"cfa.temporal_mode must be resample or timesteps, got {self.temporal_mode!r}")


TARGET_INITS = ("scratch", "source", "source_frozen")


@dataclass
class REFCFAConfig:
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(grid_size=16))
    score_net: ScoreNetConfig = field(default_factory=ScoreNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # both score networks (S1 and T1)
    # Each domain's features are normalised with that domain's own statistics (the target's from its
    # unlabeled images): per channel, or whitened per grid position (ray_ad/normalisation.py).
    normalisation: NormalisationConfig = field(default_factory=NormalisationConfig)
    fields: FieldConfig = field(default_factory=FieldConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    cfa: CFAConfig = field(default_factory=CFAConfig)
    # T1 starts from a fresh initialisation ("scratch", the paper's "train a target score network"),
    # from the source score network ("source": fine-tuning), or is S1 itself, untrained on the target
    # but re-standardised on the target's features ("source_frozen"); benchmarks measure all three.
    target_init: Literal["source", "scratch", "source_frozen"] = "scratch"
    # Robust T1 (label-free): share of the target images with the highest denoising loss under the first
    # T1 that a second pass leaves out (the target holds defects; S1 saw normals only). 0 = one pass.
    target_trim: float = 0.0
    top_p: float = 1.0  # image score = mean of the top p% pixels of the map
    map_sigma: float = 4.0
    threshold_quantile: float = 0.99
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 0 < self.top_p <= 100:
            raise ValueError(f"top_p is a percentage in (0, 100], got {self.top_p}")
        if not 0 < self.threshold_quantile <= 1:
            raise ValueError(f"threshold_quantile must be in (0, 1], got {self.threshold_quantile}")
        if self.train.t_max and max(self.fields.timesteps) >= self.train.t_max:
            raise ValueError(f"fields.timesteps reach t = {max(self.fields.timesteps)}, outside the trained range "
                             f"train.t_max = {self.train.t_max}")
        if not 0 <= self.target_trim < 1:
            raise ValueError(f"target_trim must be in [0, 1), got {self.target_trim}")
        if self.target_init not in TARGET_INITS:
            raise ValueError(f"target_init must be one of {', '.join(TARGET_INITS)}; got {self.target_init!r}")


@dataclass
class _Domain:
    """A score network with the feature normalisation it was trained under."""

    net: nn.Module
    normaliser: FeatureNormaliser

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        return self.normaliser(features)


class REFCFA(Detector):
    method = "ref_cfa"
    uses_labels = True  # the source stage trains on labelled normal and anomalous images
    STORED_DEFAULTS = {"fields.last_reference": "previous"}  # bundles from before that option

    def __init__(self, config: REFCFAConfig) -> None:
        super().__init__(config)
        self.schedule = NoiseSchedule()
        channels, grid = self.extractor.out_channels, config.backbone.grid_size
        self.channels, self.grid = channels, grid
        self.timesteps = torch.tensor(config.fields.timesteps)
        self.source = self._new_domain(config.seed)
        self.target: _Domain | None = None
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
        # Alignment, identity until ``fit_alignment`` runs.
        self.positions = torch.arange(k, dtype=torch.float32)  # psi: target step for each source step
        self.rotation = torch.eye(channels)  # DSA rotation R
        self.align_a = torch.eye(signature_dim)  # SFA whiten-recolor z' = A z + b
        self.align_b = torch.zeros(signature_dim)
        self.input_a: torch.Tensor | None = None  # input alignment x' = a x + b, [K, F] each (None: off)
        self.input_b: torch.Tensor | None = None
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

    def _new_domain(self, seed: int) -> _Domain:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build_score_net(self.config.score_net, self.channels, self.grid).to(self.device).eval()
        return _Domain(net, self._normaliser())

    def _normaliser(self) -> FeatureNormaliser:
        return FeatureNormaliser(self.config.normalisation, self.channels, self.grid).to(self.device)

    # ---------------------------------------------------------------- fields
    def _features(self, samples: list[Sample], cache_dir: str | None, progress: bool, desc: str) -> torch.Tensor:
        return self.extract_features(samples, cache_dir=cache_dir, progress=progress, desc=desc)

    @torch.no_grad()
    def fields(
        self, domain: _Domain, x0: torch.Tensor, basis: torch.Tensor | None, progress: bool = False,
        grams: bool = False, desc: str = "fields", timesteps: list[int] | None = None,
    ) -> tuple[FieldSequence, dict[str, torch.Tensor]]:
        """REF of normalised features ``x0`` [B, C, G, G] (K score-net calls per image).

        With ``grams``, also the Gram matrices X X^T of the stacked R and M vectors (over cells and steps).
        ``timesteps`` runs the chain at other timesteps than the configured ones (TA over diffusion time).
        """
        chain = self.timesteps.tolist() if timesteps is None else list(timesteps)
        parts, gram = [], {"R": torch.zeros(self.channels, self.channels, dtype=torch.float64),
                           "M": torch.zeros(self.channels, self.channels, dtype=torch.float64)}
        basis = None if basis is None else basis.to(self.device)
        for chunk in tqdm(x0.split(32), desc=desc, disable=not progress, leave=False):
            steps = list(reverse_residuals(domain.net, self.schedule, chunk.to(self.device), chain,
                                            self.config.fields.last_reference))
            if grams:
                for step in steps:
                    for name in ("R", "M"):
                        cells = getattr(step, name).permute(0, 2, 3, 1).reshape(-1, self.channels).double()
                        gram[name] += (cells.T @ cells).cpu()
            parts.append(summarise_steps(steps, basis, self.grid))
        return FieldSequence.cat(parts), gram

    # ---------------------------------------------------------------- signature (Eqs. 6-9)
    def _scalars(self, fields: FieldSequence, weights: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if self.raw:
            return torch.log(fields.energy[:, :, 0].mean(1, keepdim=True) + LOG_EPS), None
        stats = field_statistics(fields, weights, self.config.fields.ridge)  # Eqs. 6-8
        parts = [torch.log(stats.E[:, self.components] + LOG_EPS), torch.log(stats.NS[:, self.components] + LOG_EPS)]
        if COMPONENTS.index("M") in self.components:
            parts.append(stats.DV[:, None])
        return torch.cat(parts, 1), stats

    def signature(self, fields: FieldSequence) -> tuple[torch.Tensor, Any]:
        """z(P) = [h(P); E^att_X; NS^att_X; DV] (Eq. 9), statistics standardised by source normals."""
        device = self.device
        if self.raw:
            # Ablation "w/o REF": the head sees the raw residual R (its projection and energy) averaged
            # over the steps; no Field Transformer, no stationarity statistics.
            scalars, _ = self._scalars(fields, uniform_weights(fields.energy.shape[1]))
            z = torch.cat([fields.tokens[:, :, 0].mean(1), (scalars - self.stat_mean) / self.stat_std], 1)
            return z.to(device), None
        inputs = self.g_phi_inputs(fields).to(device)
        if self.adapted and self.input_a is not None:
            inputs = inputs * self.input_a.to(device) + self.input_b.to(device)  # input alignment (ours)
        alpha, h = self.g_phi(inputs, self.timesteps)
        scalars, stats = self._scalars(_to(fields, device), alpha)  # adaptive E^att, NS^att, DV (Eq. 8)
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
            # SFA (and the statistic flips when enabled); the identity with both off.
            z = z @ self.align_a.to(z.device).T + self.align_b.to(z.device)
        return self.f_psi(z)  # Eq. 9: y_hat(P) = sigmoid(f_psi(z(P)))

    # ---------------------------------------------------------------- inference
    def _domain_fields(self, x0_raw: torch.Tensor) -> FieldSequence:
        if not self.adapted:
            return self.fields(self.source, self.source.normalise(x0_raw), self.basis)[0]
        positions = self.positions if self.config.cfa.temporal else None
        return self.aligned_fields(self.target, self.target.normalise(x0_raw), self.target_basis(), positions)

    def aligned_fields(
        self, domain: _Domain, x0: torch.Tensor, basis: torch.Tensor, positions: torch.Tensor | None,
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
        """Token bases for target fields (R, M, Q): DSA rotates the target's M into the source's
        orientation subspace before projection (R^T B for M); R and Q keep the source basis."""
        if not self.config.cfa.directional:
            return self.basis
        return torch.stack([self.basis, self.rotation.to(self.device).T @ self.basis, self.basis])

    def image_scores(self, probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell probabilities [B, G, G] -> (image score = mean of the top p% pixels, pixel map)."""
        anomaly_map = upsample_map(probabilities, self.image_size, self.config.map_sigma)
        flat = anomaly_map.flatten(1)
        k = max(1, round(flat.shape[1] * self.config.top_p / 100))
        return flat.topk(k, dim=1).values.mean(1), anomaly_map  # Eq. 12: A(u) by upsampling; top-p% mean

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        features = self.extractor(images.to(self.device))
        logits = self.patch_logits(self._domain_fields(features))
        probabilities = torch.sigmoid(logits).view(-1, self.grid, self.grid)
        score, anomaly_map = self.image_scores(probabilities)
        return Prediction(score.cpu(), anomaly_map.cpu())

    # ---------------------------------------------------------------- S1: source score network
    def fit(
        self,
        train: list[Sample],
        calibration: list[Sample],
        progress: bool = True,
        cache_dir: str | None = None,
    ) -> dict[str, Any]:
        """S1 + S2 on labelled source samples ``train``; ``calibration`` normals set the threshold."""
        normals = [s for s in train if s.label == 0]
        if not normals:
            raise DataError("ref_cfa needs normal (label 0) source images to train the source score network")
        if any(s.label not in (0, 1) for s in train):
            raise DataError("ref_cfa source samples must be labelled 0 (normal) or 1 (anomalous)")
        info = self.fit_source_score_net(normals, progress, cache_dir)
        info.update(self.fit_detector(train, progress, cache_dir))
        self.calibrate(calibration, progress, cache_dir)
        return info

    def fit_source_score_net(self, normals: list[Sample], progress: bool, cache_dir: str | None) -> dict[str, Any]:
        features = self._features(normals, cache_dir, progress, "source features")
        self.source, losses = self._train_domain(features, progress, "source")
        self.fit_source_basis(normals, progress, cache_dir)
        return loss_summary(losses, "source_")

    def fit_source_basis(self, normals: list[Sample], progress: bool, cache_dir: str | None) -> None:
        """Token basis B and U_S from the REF of the source normals (after S1)."""
        features = self._features(normals, cache_dir, progress, "source features")
        x0 = self.source.normalise(features.to(self.device))
        # Token basis: principal directions of the normal R fields, whitened so tokens have unit scale.
        _, gram = self.fields(self.source, x0, None, progress, grams=True, desc="source normal fields")
        count = len(normals) * self.grid**2 * len(self.config.fields.timesteps)
        eigenvalues, eigenvectors = torch.linalg.eigh(gram["R"] / count)
        order = eigenvalues.argsort(descending=True)[: self.config.fields.token_dim]
        if len(order) < self.config.fields.token_dim:
            raise ConfigError(
                f"fields.token_dim={self.config.fields.token_dim} exceeds the {self.channels} feature channels"
            )
        self.basis = (eigenvectors[:, order] / eigenvalues[order].clamp_min(1e-8).sqrt()).float().to(self.device)
        self.u_source = top_left_singular(gram["M"], self.config.cfa.rank).to(self.device)  # U_S

    def domain_tensors(self, role: Literal["source", "target"]) -> dict[str, torch.Tensor]:
        """One domain's score network and feature standardisation (to reuse a trained S1 or T1)."""
        return {k: v for k, v in self.tensors().items() if k.startswith(f"{role}_")}

    def load_domain_tensors(self, role: Literal["source", "target"], tensors: dict[str, torch.Tensor]) -> None:
        domain = self._new_domain(self.config.seed + (0 if role == "source" else 1))
        domain.net.load_state_dict({k[len(f"{role}_net."):]: v for k, v in tensors.items() if "_net." in k})
        domain.normaliser.load_tensors(tensors, f"{role}_")
        setattr(self, role, domain)

    def _train_domain(self, features: torch.Tensor, progress: bool, name: str) -> tuple[_Domain, list[float]]:
        domain = self._new_domain(self.config.seed + (0 if name == "source" else 1))
        domain.normaliser.fit(features)
        if name == "target" and self.config.target_init == "source":
            domain.net.load_state_dict(self.source.net.state_dict())
        x0 = domain.normalise(features.to(self.device))
        net, losses = self.score_net_trainer(
            domain.net, x0, self.schedule, self.config.train, self.device, self.config.seed, progress
        )
        return _Domain(net, domain.normaliser), losses

    def training_step(self, x0: torch.Tensor) -> torch.Tensor:
        return epsilon_loss(self.source.net, self.schedule, x0)  # S1 / T1 objective

    # ---------------------------------------------------------------- S2: g_phi and f_psi
    def _synthetic(self, normals: list[Sample], progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthetic anomalies from normal images: (features, cell targets [n, G, G])."""
        count = max(1, round(len(normals) * self.config.head.synthetic_ratio))
        rng = np.random.default_rng(self.config.seed)
        _, features, targets = self._paste_anomalies([s.path for s in normals], count, rng, progress)
        return features, targets

    def _paste_anomalies(
        self, paths: list[str], count: int, rng: np.random.Generator, progress: bool, originals: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``count`` synthetic anomalies pasted into images of ``paths`` (donors drawn from the same list):
        (features of the images as they were, when ``originals``; features with the anomaly; cell targets)."""
        size = self.image_size
        before, features, targets = [], [], []
        for _ in tqdm(range(count), desc="synthetic anomalies", disable=not progress, leave=False):
            i, j = rng.integers(0, len(paths), 2)
            image = np.asarray(load_image(paths[i]).resize((size, size), Image.BILINEAR))
            donor = np.asarray(load_image(paths[j]).resize((size, size), Image.BILINEAR))
            anomalous, mask = synthesize_anomaly(image, donor, rng)
            pair = [anomalous, image] if originals else [anomalous]
            tensors = torch.stack([to_tensor(Image.fromarray(a), size, self.extractor.mean, self.extractor.std)
                                   for a in pair])
            with torch.no_grad():
                out = self.extractor(tensors.to(self.device)).cpu()
            features.append(out[:1])
            if originals:
                before.append(out[1:])
            targets.append(self._cell_fraction(torch.from_numpy(mask.astype(np.float32))[None]))
        return (torch.cat(before) if originals else None), torch.cat(features), torch.cat(targets)

    @torch.no_grad()
    def synthetic_directions(
        self, domain: _Domain, basis: torch.Tensor, paths: list[str], positions: torch.Tensor | None,
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
            cache["witness"] = self._paste_anomalies(paths, self.config.cfa.witness_images, rng, progress,
                                                     originals=True)
        originals, anomalous, targets = cache["witness"]
        statistics = []
        for features in (originals, anomalous):
            fields = self.aligned_fields(domain, domain.normalise(features.to(self.device)), basis, positions)
            statistics.append(self._signatures(fields)[:, -self._scalar_dim():])
        inside = targets.flatten() >= 0.5  # cells at least half covered by the pasted anomaly
        if not inside.any():
            raise DataError("no cell is half covered by a synthetic anomaly; raise cfa.witness_images")
        return paired_directions(statistics[0][inside], statistics[1][inside])

    def _cell_fraction(self, masks: torch.Tensor) -> torch.Tensor:
        """Pixel masks [n, S, S] -> anomalous area fraction per cell [n, G, G] (soft patch labels)."""
        return F.adaptive_avg_pool2d(masks[:, None].float(), self.grid)[:, 0]

    def _supervision(
        self, train: list[Sample], progress: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: cell targets [n, G, G], whether they are known [n], image labels [n]."""
        mode = self.config.head.supervision
        labels = torch.tensor([s.label for s in train], dtype=torch.float32)
        known = labels == 0  # every cell of a normal image is normal
        targets = torch.zeros(len(train), self.grid, self.grid)
        with_masks = [i for i, s in enumerate(train) if s.label == 1 and s.mask_path]
        if mode == "mask" and not with_masks:
            raise ConfigError("head.supervision=mask but no anomalous source image has a pixel mask")
        if mode in ("auto", "mask") and with_masks:
            dataset = ImageDataset([train[i] for i in with_masks], self.image_size, self.extractor.mean,
                                   self.extractor.std)
            for row, i in enumerate(tqdm(with_masks, desc="source masks", disable=not progress, leave=False)):
                targets[i] = self._cell_fraction(dataset[row]["mask"])[0]
                known[i] = True
        return targets, known, labels

    def fit_detector(
        self, train: list[Sample], progress: bool = True, cache_dir: str | None = None,
        cache: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """S2: REF of the labelled source images, then g_phi and f_psi under L_S."""
        cfg = self.config
        cache = {} if cache is None else cache
        targets, known, labels = self._supervision(train, progress)
        if "source_fields" not in cache:
            features = self._features(train, cache_dir, progress, "source features")
            no_anomalies = not bool((labels == 1).any())
            synthetic = cfg.head.supervision == "synthetic" or (cfg.head.supervision == "auto" and no_anomalies)
            if synthetic:
                extra, extra_targets = self._synthetic([s for s in train if s.label == 0], progress)
                features = torch.cat([features, extra])
                cache["synthetic_targets"] = extra_targets
            x0 = self.source.normalise(features.to(self.device))
            cache["source_fields"], _ = self.fields(self.source, x0, self.basis, progress, desc="source fields")
        fields: FieldSequence = cache["source_fields"]
        if "synthetic_targets" in cache:
            extra_targets = cache["synthetic_targets"]
            targets = torch.cat([targets, extra_targets])
            known = torch.cat([known, torch.ones(len(extra_targets), dtype=torch.bool)])
            labels = torch.cat([labels, torch.ones(len(extra_targets))])
        normal_rows = _image_rows(torch.nonzero(labels == 0).flatten(), self.grid)
        self._fit_statistics(fields.index(normal_rows))
        losses = self._train_head(fields, targets, known, labels, progress)
        z = self._signatures(fields)  # every source cell, once: the anchors and the directions share it
        # Source calibration anchors: mean and covariance of the normal patch signatures.
        self.anchor_mean, self.anchor_cov = z[normal_rows].mean(0), covariance(z[normal_rows])
        self.source_directions = source_directions(self._image_statistics(z), labels)
        self.profile_source = torch.from_numpy(residual_profile(fields.index(normal_rows).energy[:, :, 0])).float()
        if not self.raw:
            self._fit_input_anchors(fields.index(normal_rows))
        return {"head_loss_first": losses[0], "head_loss_last": float(np.mean(losses[-50:])),
                "source_images": len(train), "synthetic_images": int(len(labels) - len(train))}

    @torch.no_grad()
    def fit_input_anchors(self, normals: list[Sample], progress: bool = True, cache_dir: str | None = None) -> None:
        """The source-normal median and spread of g_phi's inputs, for a source model trained before they
        were recorded (``fit_detector`` records them); needs the source's normal images."""
        if self.raw:
            raise ConfigError("cfa.input_alignment needs the Field Transformer; fields.representation=raw has none")
        features = self._features(normals, cache_dir, progress, "source features")
        fields, _ = self.fields(self.source, self.source.normalise(features.to(self.device)), self.basis, progress,
                                desc="source normal fields")
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
    def _signatures(self, fields: FieldSequence) -> torch.Tensor:
        """z(P) of every cell of ``fields`` (before any alignment), in chunks, on the CPU."""
        chunks = torch.arange(len(fields)).split(8192)
        return torch.cat([self.signature(fields.index(rows))[0].cpu() for rows in chunks])

    def _image_statistics(self, z: torch.Tensor) -> torch.Tensor:
        """Per image, the mean over its cells of each standardised statistic of signatures z [images, n]."""
        return z[:, -self._scalar_dim():].reshape(-1, self.grid**2, self._scalar_dim()).mean(1)

    def _fit_statistics(self, normal_fields: FieldSequence) -> None:
        """Standardisation of the signature's statistics, from normal source cells (fixed w_t, Eqs. 6-7)."""
        weights = uniform_weights(normal_fields.energy.shape[1])
        scalars, stats = self._scalars(normal_fields, weights)
        self.stat_mean, self.stat_std = scalars.mean(0), scalars.std(0).clamp_min(1e-6)
        if stats is not None:
            self.stat_scale = torch.stack([stats.E.mean(0), stats.NS.mean(0)]).clamp_min(1e-6)

    def _train_head(
        self, fields: FieldSequence, targets: torch.Tensor, known: torch.Tensor, labels: torch.Tensor,
        progress: bool,
    ) -> list[float]:
        cfg = self.config.head
        params = list(self.f_psi.parameters()) + ([] if self.raw else list(self.g_phi.parameters()))
        optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        generator = torch.Generator().manual_seed(self.config.seed)
        cells = self.grid**2
        top_k = max(1, round(cells * self.config.top_p / 100))
        positives = (targets[known] > 0.5).sum().item()
        negatives = known.sum().item() * cells - positives
        pos_weight = torch.tensor(min(20.0, negatives / max(positives, 1)))
        losses: list[float] = []
        self.g_phi.train()
        self.f_psi.train()
        bar = tqdm(range(cfg.steps), desc="train g_phi, f_psi", disable=not progress)
        for step in bar:
            index = torch.randint(0, len(labels), (min(cfg.batch_images, len(labels)),), generator=generator)
            batch = fields.index(_image_rows(index, self.grid))
            z, stats = self.signature(batch)
            logits = self.f_psi(z).view(-1, self.grid, self.grid)
            y_hat = torch.sigmoid(logits)
            # L_sup: patch BCE where cell labels are known, image BCE through the top-p pooling elsewhere.
            b_known, b_targets = known[index].to(self.device), targets[index].to(self.device)
            b_labels = labels[index].to(self.device)
            loss_patch = (
                F.binary_cross_entropy_with_logits(logits[b_known], b_targets[b_known], pos_weight=pos_weight)
                if b_known.any() else logits.sum() * 0
            )
            pooled = y_hat.flatten(1).topk(top_k, dim=1).values.mean(1).clamp(1e-6, 1 - 1e-6)
            loss_image = F.binary_cross_entropy(pooled, b_labels)
            loss = loss_patch + loss_image
            if stats is not None and cfg.lambda_stat > 0:
                # L_stat: energy and non-stationarity of normal patches (unitless: / source-normal means).
                normal = (b_targets.flatten() <= 0.5) & b_known.repeat_interleave(self.grid**2)
                scale = self.stat_scale.to(self.device)
                l_stat = (stats.E[normal] / scale[0]).mean() + (stats.NS[normal] / scale[1]).mean()
                loss = loss + cfg.lambda_stat * l_stat
            # L_sp: total-variation spatial prior on the patch probability map.
            tv = (y_hat[:, 1:] - y_hat[:, :-1]).abs().mean() + (y_hat[:, :, 1:] - y_hat[:, :, :-1]).abs().mean()
            loss = loss + cfg.lambda_sp * tv  # Eq. 10: L_S = L_sup + lambda_stat L_stat + lambda_sp L_sp
            for group in optimiser.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            losses.append(loss.item())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        self.g_phi.eval()
        self.f_psi.eval()
        return losses

    @torch.no_grad()
    def calibrate(self, normals: list[Sample], progress: bool = True, cache_dir: str | None = None) -> None:
        """Threshold = quantile of the image scores of held-out source normals."""
        if not normals:
            raise DataError("ref_cfa calibration needs at least one held-out normal source image")
        features = self._features(normals, cache_dir, progress, "calibration features")
        scores = torch.cat([self._score_features(chunk) for chunk in features.split(32)])
        self.set_threshold_from(scores.numpy(), self.config.threshold_quantile)

    def _score_features(self, features: torch.Tensor) -> torch.Tensor:
        return self._score_fields(self._domain_fields(features.to(self.device)))

    def _score_fields(self, fields: FieldSequence) -> torch.Tensor:
        probabilities = torch.sigmoid(self.patch_logits(fields)).view(-1, self.grid, self.grid)
        return self.image_scores(probabilities)[0].cpu()

    # ---------------------------------------------------------------- T1 + T2: adaptation
    def adapt(
        self, target_images: list[str], progress: bool = True, cache_dir: str | None = None,
        cache: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Adapt to an unlabeled target domain given only its image URIs (no label or mask exists here)."""
        if not target_images:
            raise DataError("adaptation needs at least one target image")
        self._check_rank()  # before the expensive T1, not after
        self._check_directions()
        cache = {} if cache is None else cache  # T1 and T2 share the target's backbone features
        info = self.fit_target_score_net(target_images, progress, cache_dir, cache)
        info.update(self.fit_alignment(target_images, progress, cache_dir, cache))
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

    def _target_features(
        self, target_images: list[str], cache_dir: str | None, progress: bool, cache: dict[str, Any]
    ) -> torch.Tensor:
        if "target_features" not in cache:
            samples = [Sample(path, -1, None, "target", "target", "unknown") for path in target_images]
            cache["target_features"] = self._features(samples, cache_dir, progress, "target features")
        return cache["target_features"]

    def fit_target_score_net(
        self, target_images: list[str], progress: bool = True, cache_dir: str | None = None,
        cache: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """T1: a score network on the target images as they come (anomalies included).

        With ``target_trim`` > 0 (robust T1), a second T1 is trained, from the same initialisation and
        budget, on the target images without the ``target_trim`` share that the first one denoises worst:
        defects are what a network trained mostly on normal cells fits least. No label is read.
        """
        features = self._target_features(target_images, cache_dir, progress, {} if cache is None else cache)
        if self.config.target_init == "source_frozen":
            # S1 as T1, normalised by the target's own feature statistics: no target training at all.
            self.target = _Domain(copy.deepcopy(self.source.net), self._normaliser().fit(features))
            return {"target_images": len(target_images), "target_training_steps": 0}
        self.target, losses = self._train_domain(features, progress, "target")
        info = {**loss_summary(losses, "target_"), "target_images": len(target_images)}
        if self.config.target_trim > 0:
            image_loss = per_sample_epsilon_loss(self.target.net, self.schedule,
                                                 self.target.normalise(features.to(self.device)),
                                                 self.timesteps.tolist(), self.config.seed)
            kept_count = max(1, round(len(image_loss) * (1 - self.config.target_trim)))
            kept = image_loss <= torch.kthvalue(image_loss, kept_count).values
            self.target, losses = self._train_domain(features[kept], progress, "target")
            info.update({**loss_summary(losses, "target_pass2_"), "target_images_kept": int(kept.sum())})
        return info

    @torch.no_grad()
    def fit_alignment(
        self, target_images: list[str], progress: bool = True, cache_dir: str | None = None,
        cache: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """T2: fit TA, DSA and SFA (those enabled in ``cfa``) on the target's unlabeled REF.

        ``cache`` (optional) keeps the target's fields between calls for the same source model and
        target network, so that alignment ablations do not recompute them.
        """
        if self.target is None:
            raise RuntimeError("fit_alignment needs the target score network: run fit_target_score_net first")
        self._check_rank()
        cfa = self.config.cfa
        if cfa.input_alignment and self.input_center is None:
            raise ConfigError("cfa.input_alignment needs the source-normal spread of g_phi's inputs, which this "
                              "source model predates: retrain it, or call fit_input_anchors with its normals")
        cache = {} if cache is None else cache
        self.input_a = self.input_b = None  # nothing of an earlier fit may shape this one's signatures
        x0 = self.target.normalise(self._target_features(target_images, cache_dir, progress, cache).to(self.device))
        if "target_pass1" not in cache:
            fields, gram = self.fields(self.target, x0, None, progress, grams=True, desc="target fields (1/2)")
            cache["target_pass1"] = (residual_profile(fields.energy[:, :, 0]), top_left_singular(gram["M"], cfa.rank))
        profile_target, u_target = cache["target_pass1"]
        info: dict[str, Any] = {}
        # Eq. 11, TA: psi matches the target's mean residual profile to the source's.
        k = len(self.config.fields.timesteps)
        self.positions = (
            temporal_reparameterisation(profile_target, self.profile_source.double().numpy())
            if cfa.temporal else torch.arange(k, dtype=torch.float32)
        )
        info["ta_profile_gap_before"] = float(np.abs(profile_target - self.profile_source.numpy()).mean())
        # Eq. 11, DSA: orthogonal Procrustes between the top-r subspaces of stacked M (U_T -> U_S).
        u_target = u_target.to(self.device)
        identity = torch.eye(self.channels)
        self.rotation = subspace_rotation(u_target, self.u_source).cpu() if cfa.directional else identity
        info["dsa_subspace_distance_before"] = subspace_distance(u_target, self.u_source)
        info["dsa_subspace_distance_after"] = subspace_distance(self.rotation.to(self.device) @ u_target, self.u_source)
        # Eq. 11, SFA: whiten-recolor the target signatures onto the source's normal anchors (min. of CORAL).
        positions = self.positions if cfa.temporal else None
        key = ("target_fields", cfa.directional, cfa.temporal and cfa.temporal_mode,
               None if positions is None else tuple(positions.tolist()))
        if key not in cache:
            cache[key] = self.aligned_fields(self.target, x0, self.target_basis(), positions, progress,
                                             desc="target fields (2/2)")
        fields = cache[key]
        info["ta_profile_gap_after"] = float(
            np.abs(residual_profile(fields.energy[:, :, 0]) - self.profile_source.numpy()).mean())
        if cfa.input_alignment:
            # Input alignment: each coordinate of g_phi's input moved onto the source normals' median and
            # spread, robustly (the target's defects are a minority of its cells).
            target_center, target_scale = robust_moments(self._input_sample(fields))
            self.input_a = self.input_scale / target_scale
            self.input_b = self.input_center - self.input_a * target_center
            info["input_scale_ratio_median"] = float(self.input_a.median())
        z = self._signatures(fields)
        flip = torch.ones(z.shape[1])
        if cfa.statistic_directions:
            self._check_directions()
            if cfa.direction_witness == "synthetic":
                target = self.synthetic_directions(self.target, self.target_basis(), target_images, positions,
                                                   progress, cache)
            else:
                target = tail_directions(self._image_statistics(z))
            flip[-self._scalar_dim():] = self.source_directions * target  # -1 where the directions differ
            info["target_directions"] = [int(v) for v in target]
            info["statistics_flipped"] = int((flip < 0).sum())
            z = z * flip
        info["sfa_coral_before"] = coral_loss(z, self.anchor_cov)
        if cfa.second_order:
            self.align_a, self.align_b = whiten_recolor(z, self.anchor_mean, self.anchor_cov, cfa.ridge, cfa.sfa_trim,
                                                        relative=cfa.ridge_relative)
        else:
            self.align_a, self.align_b = torch.eye(z.shape[1]), torch.zeros(z.shape[1])
        self.align_a = self.align_a * flip  # A diag(flip): the flips happen before SFA
        info["sfa_coral_after"] = coral_loss(z @ self.align_a.T + self.align_b, self.anchor_cov)
        # No target labels: the threshold is the same quantile of the target's own image scores.
        images = len(fields) // self.grid**2
        scores = torch.cat([self._score_fields(fields.images(i, i + 32)) for i in range(0, images, 32)])
        self.set_threshold_from(scores.numpy(), self.config.threshold_quantile)
        self.diagnostics = info
        return info

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
            out.update(positions=self.positions,
                       rotation=self.rotation, align_a=self.align_a, align_b=self.align_b)
            if self.input_a is not None:
                out.update(input_a=self.input_a, input_b=self.input_b)
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.target is None and any(k.startswith("target_net.") for k in tensors):
            self.target = self._new_domain(self.config.seed + 1)  # an adapted bundle
        if "source_directions" in tensors:  # absent from bundles older than the direction alignment
            self.source_directions = tensors["source_directions"].cpu()
        # Optional: absent from bundles older than the input alignment, or adapted without it.
        for name in ("input_center", "input_scale", "input_a", "input_b"):
            setattr(self, name, tensors[name].cpu() if name in tensors else None)
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
            for name in ("positions", "rotation", "align_a", "align_b"):
                setattr(self, name, tensors[name].cpu())

    def state(self) -> dict[str, Any]:
        return {**super().state(), "adapted": self.adapted, "diagnostics": self.diagnostics}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.diagnostics = dict(state.get("diagnostics", {}))


def _image_rows(images: torch.Tensor, grid: int) -> torch.Tensor:
    """Row indices of every cell of the given images in a FieldSequence."""
    cells = grid * grid
    return (images[:, None] * cells + torch.arange(cells)[None]).flatten()


def _to(fields: FieldSequence, device: torch.device) -> FieldSequence:
    tokens = None if fields.tokens is None else fields.tokens.to(device)
    energy, change, turn = fields.energy.to(device), fields.change.to(device), fields.turn.to(device)
    return FieldSequence(energy, change, turn, tokens, fields.grid)
