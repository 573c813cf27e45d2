"""OSD-IRF: one-step diffusion with inverse residual fields (Zhang et al., arXiv 2604.18393).

Read top to bottom: training is plain DDPM epsilon-prediction on frozen backbone features of normal
images (Eq. 4); scoring calls the score network ONCE, at timestep t, on the mean-path input
sqrt(alpha_bar_t) x_0 (Eq. 7), and turns the resulting inverse residual field into a map (Eq. 8) and an
image score (Eqs. 9-11). InvAD's multi-step DDIM inversion is kept as ``scoring="inversion"`` so the two
can be compared on the same trained network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ray_ad.backbones import BackboneConfig
from ray_ad.data import Sample
from ray_ad.diffusion import NoiseSchedule, ScoreNetConfig, build_score_net
from ray_ad.diffusion.context import ContextNet, check_block, context_residual
from ray_ad.methods.base import Detector, DetectorConfig, Prediction, Runtime, check_tensor_keys, upsample_map
from ray_ad.normalisation import FeatureNormaliser, NormalisationConfig
from ray_ad.progress import progress as show_progress
from ray_ad.training import TrainConfig, loss_summary

SCORING_MODES = ("one_step", "inversion")
SCORE_TERMS = ("diff+nll", "diff", "nll")  # which terms of Eq. 9 an image score adds
# Eq. 7 (the paper's choice), Eq. 6, or ours: each cell predicted from the others (diffusion/context.py)
IRF_INPUTS = ("mean_path", "noisy", "context")


@dataclass
class OSDIRFConfig(DetectorConfig):
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(grid_size=16))
    score_net: ScoreNetConfig = field(default_factory=ScoreNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # What the DDPM's N(0, I) prior is measured against: per-channel standardisation or per-position
    # whitening of the features (see ray_ad/normalisation.py and the README's recipe table).
    normalisation: NormalisationConfig = field(default_factory=NormalisationConfig)
    t: int = 500  # the paper fixes t = 500 for every dataset (Sec. 4.4)
    scoring: Literal["one_step", "inversion"] = "one_step"
    inversion_steps: int = 3  # InvAD baseline: DDIM inversion 0 -> ... -> T-1 in this many calls
    score_terms: Literal["diff+nll", "diff", "nll"] = "diff+nll"  # which terms of Eq. 9 to add
    # The Gaussian the IRF is scored under: "standard" = N(0, I) as in Eq. 11; "fitted" = N(mu, diag sigma^2)
    # per cell and channel, fitted to the IRFs of the training normals (see README).
    irf_gaussian: Literal["standard", "fitted"] = "standard"
    # What the one network call sees: Eq. 7's mean-path input sqrt(alpha_bar_t) x_0 (the paper's), or
    # Eq. 6's noisy state sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, scored once per each of
    # ``irf_draws`` fixed noise draws and averaged (K calls; see README). "context" (ours, not the paper's):
    # the network predicts each cell from the other cells (4 calls), Delta = x_0 - f(context); it needs
    # train.objective: masked_context and no Gaussian skip.
    irf_input: Literal["mean_path", "noisy", "context"] = "mean_path"
    irf_draws: int = 4

    def check_trained_range(self, t: int) -> None:
        if self.train.t_max and t >= self.train.t_max:
            raise ValueError(f"t = {t} lies outside the trained range: train.t_max = {self.train.t_max} (t < t_max)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.t < 1000:
            raise ValueError(f"t must be in [0, 999], got {self.t}")
        self.check_trained_range(self.t)
        if self.scoring == "inversion" and 0 < self.train.t_max < 1000:
            raise ValueError(f"scoring: inversion runs the network up to t = 999; train.t_max = {self.train.t_max} "
                             "leaves it untrained there (use t_max: 0)")
        if self.normalisation.kind == "position_whiten" and self.train.augment > 1:
            raise ValueError("normalisation.kind=position_whiten fits statistics per grid position; dihedral "
                             f"augmentation (train.augment={self.train.augment}) would move features between positions")
        if self.inversion_steps < 1:
            raise ValueError(f"inversion_steps must be >= 1, got {self.inversion_steps}")
        if self.irf_input not in IRF_INPUTS:
            raise ValueError(f"irf_input must be one of {', '.join(IRF_INPUTS)}; got {self.irf_input!r}")
        if self.irf_draws < 1:
            raise ValueError(f"irf_draws must be >= 1, got {self.irf_draws}")
        context = self.irf_input == "context"
        if context != (self.train.objective == "masked_context"):
            raise ValueError(f"irf_input={self.irf_input!r} needs train.objective="
                             f"{'masked_context' if context else 'epsilon'}, got {self.train.objective!r}")
        if context and (self.score_net.gaussian_skip or self.scoring != "one_step"):
            raise ValueError("irf_input=context predicts x_0 at t = 0: set score_net.gaussian_skip=false and "
                             f"scoring=one_step (got gaussian_skip={self.score_net.gaussian_skip}, "
                             f"scoring={self.scoring!r})")
        if context:
            check_block(self.backbone.grid_size, self.train.context_block)


def gaussian_scores(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A_hat, s_diff, s_nll) of a latent ``[B, C, H, W]`` scored under N(0, I): the IRF here, the
    whitened features themselves in the Gaussian detector (``ray_ad.methods.gaussian``)."""
    a_hat = delta.pow(2).sum(dim=1).sqrt()  # Eq. 8: per-cell L2 norm over channels
    s_diff = a_hat.flatten(1).amax(1) - a_hat.flatten(1).amin(1)  # Eq. 10
    # Eq. 11 as printed, -log{sum -1/2 Delta^2}, takes the log of a negative number; we read it as
    # the Gaussian negative log-likelihood of Delta under N(0, I), as in InvAD (see README).
    n = delta[0].numel()
    s_nll = 0.5 * delta.pow(2).flatten(1).sum(1) + 0.5 * n * math.log(2 * math.pi)  # Eq. 11
    return a_hat, s_diff, s_nll


def score_calibration(s_diff: torch.Tensor, s_nll: torch.Tensor) -> dict[str, float]:
    """The min-max constants of Eq. 9's two terms over held-out normal images (for ``combine_scores``)."""
    return {"diff_min": s_diff.min().item(), "diff_max": s_diff.max().item(),
            "nll_min": s_nll.min().item(), "nll_max": s_nll.max().item()}


def combine_scores(s_diff: torch.Tensor, s_nll: torch.Tensor, cal: dict[str, float], terms: str) -> torch.Tensor:
    """Eq. 9, s = s_diff + s_nll, each min-max normalised with held-out normal statistics ``cal``
    (``terms`` keeps one of the two: "diff", "nll")."""
    diff = (s_diff - cal["diff_min"]) / max(cal["diff_max"] - cal["diff_min"], 1e-12)
    nll = (s_nll - cal["nll_min"]) / max(cal["nll_max"] - cal["nll_min"], 1e-12)
    if terms == "diff":
        return diff
    if terms == "nll":
        return nll
    return diff + nll  # Eq. 9


class OSDIRF(Detector):
    method = "osd_irf"
    supports_inversion = True  # set_scoring("inversion"): InvAD's DDIM inversion on the same network
    scores_features = True
    reconstructs = True  # reconstruct_features: its network's estimate of clean features

    def __init__(self, config: OSDIRFConfig) -> None:
        super().__init__(config)
        self.schedule = NoiseSchedule()
        channels, grid = self.extractor.out_channels, config.backbone.grid_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.score_net = build_score_net(config.score_net, channels, grid)
            if config.irf_input == "context":
                self.score_net = ContextNet(self.score_net, channels)
            self.score_net = self.score_net.to(self.device).eval()
        # Backbone features normalised with training-set statistics: stages differ in scale by orders
        # of magnitude, and the DDPM prior assumes data of unit variance.
        self.normaliser = FeatureNormaliser(config.normalisation, channels, grid).to(self.device)
        # The Gaussian of the one-step IRF: N(0, I) unless irf_gaussian == "fitted".
        self.irf_mean = torch.zeros(channels, grid, grid)
        self.irf_std = torch.ones(channels, grid, grid)
        # Min-max normalisation constants of s_diff and s_nll per scoring mode (InvAD), from held-out normals.
        self.calibration: dict[str, dict[str, float]] = {}

    # ---------------------------------------------------------------- training
    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        return self.normaliser(features)

    def fit(self, train: list[Sample], calibration: list[Sample], runtime: Runtime | None = None) -> dict[str, Any]:
        runtime = runtime or Runtime()
        features = self.extract_features(train, runtime, self.config.train.augment, "train features")
        info = self.fit_features(features, len(train), runtime)
        self.calibrate(calibration, runtime)
        return info

    def fit_features(self, features: torch.Tensor, originals: int, runtime: Runtime | None = None) -> dict[str, Any]:
        """Normaliser, score network and IRF Gaussian from training features ``[N, C, G, G]``, of which
        the first ``originals`` are un-augmented (the IRF Gaussian is fitted on those). No calibration."""
        runtime, cfg = runtime or Runtime(), self.config
        self.normaliser.fit(features)
        x0 = self.normalise(features.to(self.device))
        # Eq. 4: DDPM epsilon-prediction, in this process or on Ray Train (whatever the runtime says).
        self.score_net, losses = runtime.score_net_trainer(
            self.score_net, x0, self.schedule, cfg.train, self.device, cfg.seed, runtime.progress
        )
        self.fit_irf_gaussian(x0[:originals])
        return {**loss_summary(losses), "steps": len(losses)}

    @torch.no_grad()
    def fit_irf_gaussian(self, x0: torch.Tensor) -> None:
        """Fit N(mu, diag sigma^2) per cell and channel to the IRFs of normal features (when configured)."""
        channels, grid = self.irf_mean.shape[0], self.irf_mean.shape[-1]
        if self.config.irf_gaussian == "standard":
            self.irf_mean = torch.zeros(channels, grid, grid)
            self.irf_std = torch.ones(channels, grid, grid)
            return
        # Every draw's IRF of every image (one draw on the mean path): the Gaussian each draw is scored under.
        deltas = torch.cat([self.inverse_residual_fields(chunk.to(self.device)).flatten(0, 1)
                            for chunk in x0.split(32)])
        self.irf_mean = deltas.mean(0)
        self.irf_std = deltas.std(0).clamp_min(1e-3)

    def retarget(self, t: int, train: list[Sample], calibration: list[Sample], runtime: Runtime | None = None) -> None:
        """Score at another timestep with the same network: refit the IRF Gaussian and recalibrate."""
        runtime = (runtime or Runtime()).quiet()
        self.config.check_trained_range(t)
        self.config.t = t
        features = self.extract_features(train, runtime)
        self.fit_irf_gaussian(self.normalise(features.to(self.device)))
        self.calibrate(calibration, runtime)

    def use_score_net(self, net: torch.nn.Module, calibration: list[Sample], runtime: Runtime) -> None:
        """Score with ``net`` (e.g. a partly trained EMA network) and recalibrate.

        What a sweep needs to report a validation metric between rounds of training.
        """
        self.score_net = net
        self.calibrate(calibration, runtime.quiet())

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def inverse_residual_field(self, x0: torch.Tensor) -> torch.Tensor:
        """Delta x_t = eps_theta(mu(x_t), t), mu(x_t) = sqrt(alpha_bar_t) x_0   (Eq. 7): one call.
        With ``irf_input: context``: Delta = x_0 - f(context), each cell hidden once (4 calls, ours)."""
        if self.config.irf_input == "context":
            return context_residual(self.score_net, x0, self.config.train.context_block)
        t = self.config.t
        alpha_bar_t = self.schedule.alpha_bar(t, x0.device)
        mu_x_t = alpha_bar_t.sqrt() * x0  # mean-path input, Eq. 7
        return self.score_net(mu_x_t, torch.full((x0.shape[0],), t, device=x0.device))

    @torch.no_grad()
    def reconstruct_features(self, features: torch.Tensor) -> torch.Tensor:
        """The network's estimate of the clean features ``[B, C, G, G]`` of backbone features, in backbone
        feature space: Tweedie's x_0 estimate from the mean-path input of Eq. 7,
        x^_0 = (mu(x_t) - sqrt(1 - alpha_bar_t) Delta x_t) / sqrt(alpha_bar_t) = x_0 - sqrt((1 - alpha_bar_t)
        / alpha_bar_t) Delta x_t; with ``irf_input: context``, f(context) = x_0 - Delta. These are the
        reconstruction-based templates of CostFilter-AD (Sec. 3.2). Under the Gaussian denoiser (r = 0)
        x^_0 = alpha_bar_t x_0: the features shrunk towards each position's training mean."""
        x0 = self.normalise(features.to(self.device))
        return self._reconstruction(x0, self.inverse_residual_field(x0))

    def _reconstruction(self, x0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x^_0 from normalised features and their mean-path IRF, in backbone feature space."""
        if self.config.irf_input == "context":
            return self.normaliser.invert(x0 - delta)
        alpha_bar_t = self.schedule.alpha_bar(self.config.t, x0.device)
        return self.normaliser.invert(x0 - ((1 - alpha_bar_t) / alpha_bar_t).sqrt() * delta)

    @torch.no_grad()
    def predict_and_reconstruct(self, features: torch.Tensor) -> tuple[Prediction, torch.Tensor]:
        """``predict_features`` and ``reconstruct_features`` of the same features. Where the score reads the
        mean-path IRF itself (one-step scoring, ``irf_input`` mean_path or context) one network pass
        serves both, so a CostFilter line with reconstruction templates does not run the network twice."""
        x0 = self.normalise(features.to(self.device))
        delta = self.inverse_residual_field(x0)
        shared = self.config.scoring == "one_step" and self.config.irf_input in ("mean_path", "context")
        return self._prediction(x0, delta[None] if shared else None), self._reconstruction(x0, delta)

    def irf_noise(self, like: torch.Tensor) -> torch.Tensor:
        """Eq. 6's eps: ``irf_draws`` fixed draws ``[K, C, G, G]`` from the config's seed, the same for
        every image, so a score does not depend on the batch or the call."""
        generator = torch.Generator().manual_seed(self.config.seed)
        return torch.randn((self.config.irf_draws, *like.shape[1:]), generator=generator).to(like.device)

    @torch.no_grad()
    def inverse_residual_fields(self, x0: torch.Tensor) -> torch.Tensor:
        """The IRFs ``[K, B, C, G, G]`` the one-step score reads: K = 1 on the mean path (Eq. 7), else one
        per draw, Delta x_t = eps_theta(x_t, t), x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (Eq. 6)."""
        if self.config.irf_input in ("mean_path", "context"):
            return self.inverse_residual_field(x0)[None]
        t = self.config.t
        alpha_bar_t = self.schedule.alpha_bar(t, x0.device)
        timesteps = torch.full((x0.shape[0],), t, device=x0.device)
        return torch.stack([self.score_net(alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps, timesteps)
                            for eps in self.irf_noise(x0)])  # Eq. 6

    @torch.no_grad()
    def irf_split(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each draw's IRF as (Gaussian part, network residual r), both ``[K, B, C, G, G]``.

        The Gaussian part is the exact noise prediction of N(0, I) data at the network's input,
        sqrt(1 - alpha_bar_t) x_t (``gaussian_skip.py``); r = Delta - that is what the trained network
        adds. With the Gaussian skip, r is the inner network's output and r = 0 is the Gaussian detector.
        With ``irf_input: context`` the Gaussian part is x_0 itself and r = -f(context).
        """
        if self.config.irf_input == "context":
            return x0[None], self.inverse_residual_fields(x0) - x0[None]
        t = self.config.t
        alpha_bar_t = self.schedule.alpha_bar(t, x0.device)
        inputs = alpha_bar_t.sqrt() * x0  # Eq. 7's mean path ...
        if self.config.irf_input == "noisy":  # ... or Eq. 6's noisy states, one per draw
            inputs = inputs[None] + (1 - alpha_bar_t).sqrt() * self.irf_noise(x0)[:, None]
        gaussian = (1 - alpha_bar_t).sqrt() * inputs.reshape(-1, *x0.shape)
        return gaussian, self.inverse_residual_fields(x0) - gaussian

    @torch.no_grad()
    def ddim_inversion(self, x0: torch.Tensor) -> torch.Tensor:
        """InvAD's baseline: deterministic DDIM inversion of x_0 to x_T in ``inversion_steps`` calls."""
        steps = self.config.inversion_steps
        timesteps = np.linspace(0, self.schedule.T - 1, steps + 1).round().astype(int)
        x = x0
        for t_now, t_next in zip(timesteps[:-1], timesteps[1:]):
            a_now = self.schedule.alpha_bar(int(t_now), x.device)
            a_next = self.schedule.alpha_bar(int(t_next), x.device)
            eps = self.score_net(x, torch.full((x.shape[0],), int(t_now), device=x.device))
            x0_pred = (x - (1 - a_now).sqrt() * eps) / a_now.sqrt()
            x = a_next.sqrt() * x0_pred + (1 - a_next).sqrt() * eps
        return x

    def latent(self, x0: torch.Tensor, mode: str) -> torch.Tensor:
        """The latent whose typicality under N(0, I) is scored: the standardised mean-path IRF or InvAD's x_T."""
        if mode == "one_step":
            return (self.inverse_residual_field(x0) - self.irf_mean) / self.irf_std
        return self.ddim_inversion(x0)

    def mode_scores(self, x0: torch.Tensor, mode: str, fields: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A_hat, s_diff, s_nll) of normalised features in scoring ``mode``; with Eq. 6's noisy input,
        each draw's IRF is scored under the Gaussian and the three terms are averaged over the draws.
        ``fields``: the one-step IRFs ``[K, B, C, G, G]`` when the caller already has them."""
        if mode != "one_step":
            return self.raw_scores(self.ddim_inversion(x0))
        fields = self.inverse_residual_fields(x0) if fields is None else fields
        per_draw = [self.raw_scores((delta - self.irf_mean) / self.irf_std) for delta in fields]
        return tuple(torch.stack(term).mean(0) for term in zip(*per_draw))  # type: ignore[return-value]

    @staticmethod
    def raw_scores(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A_hat, s_diff, s_nll) of a latent ``[B, C, H, W]`` (Eqs. 8, 10, 11)."""
        return gaussian_scores(delta)

    def _combine(self, s_diff: torch.Tensor, s_nll: torch.Tensor, mode: str) -> torch.Tensor:
        """s = s_diff + s_nll (Eq. 9), each min-max normalised with held-out normal statistics."""
        cal = self.calibration.get(mode)
        if cal is None:
            raise RuntimeError(f"OSD-IRF is not calibrated for scoring mode {mode!r}")
        return combine_scores(s_diff, s_nll, cal, self.config.score_terms)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        return self.predict_features(self.extractor(images.to(self.device)))

    @torch.no_grad()
    def predict_features(self, features: torch.Tensor) -> Prediction:
        return self._prediction(self.normalise(features.to(self.device)))

    def _prediction(self, x0: torch.Tensor, fields: torch.Tensor | None = None) -> Prediction:
        a_hat, s_diff, s_nll = self.mode_scores(x0, self.config.scoring, fields)
        score = self._combine(s_diff, s_nll, self.config.scoring)
        anomaly_map = upsample_map(a_hat, self.image_size, self.config.map_sigma)  # Eq. 8: A = Upsample(A_hat)
        return Prediction(score.cpu(), anomaly_map.cpu())

    @torch.no_grad()
    def calibrate(self, normals: list[Sample], runtime: Runtime | None = None) -> None:
        """Normalisation constants and threshold from held-out normal images, for both modes."""
        if not normals:
            raise ValueError("calibration needs at least one held-out normal image")
        runtime = runtime or Runtime()
        self.calibrate_features(self.extract_features(normals, runtime, desc="calibration features"), runtime.progress)

    @torch.no_grad()
    def calibrate_features(self, features: torch.Tensor, progress: bool = False) -> None:
        """``calibrate`` from the held-out normals' backbone features."""
        x0 = self.normalise(features.to(self.device))
        # The context network predicts x_0 at t = 0 only: InvAD's inversion has nothing to run on.
        for mode in SCORING_MODES if self.config.irf_input != "context" else ("one_step",):
            diffs, nlls = [], []
            for chunk in show_progress(x0.split(16), desc=f"calibrate {mode}", enabled=progress, leave=False):
                _, s_diff, s_nll = self.mode_scores(chunk, mode)
                diffs.append(s_diff)
                nlls.append(s_nll)
            s_diff, s_nll = torch.cat(diffs), torch.cat(nlls)
            self.calibration[mode] = score_calibration(s_diff, s_nll)
            normal_scores = self._combine(s_diff, s_nll, mode).cpu().numpy()
            self.calibration[mode]["threshold"] = float(
                np.quantile(normal_scores, self.config.threshold_quantile)
            )
        self.set_scoring(self.config.scoring)

    def set_scoring(self, mode: str) -> None:
        """Switch between one-step IRF scoring and InvAD's multi-step inversion (same network)."""
        if mode not in SCORING_MODES:
            raise ValueError(f"scoring must be one of {SCORING_MODES}, got {mode!r}")
        if mode == "inversion" and self.config.irf_input == "context":
            raise ValueError("scoring=inversion needs an epsilon-prediction network; this one is irf_input=context")
        self.config.scoring = mode
        if mode in self.calibration:
            self.threshold = self.calibration[mode]["threshold"]

    # ---------------------------------------------------------------- bundle state
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"score_net.{k}": v for k, v in self.score_net.state_dict().items()}
        out.update(self.normaliser.tensors("feature_"))
        out["irf_mean"] = self.irf_mean
        out["irf_std"] = self.irf_std
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        check_tensor_keys(set(self.tensors()), tensors)
        net_state = {k[len("score_net.") :]: v for k, v in tensors.items() if k.startswith("score_net.")}
        self.score_net.load_state_dict(net_state)
        self.normaliser.load_tensors(tensors, "feature_")
        self.irf_mean = tensors["irf_mean"].to(self.device)
        self.irf_std = tensors["irf_std"].to(self.device)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "calibration": self.calibration}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.calibration = {mode: dict(values) for mode, values in state["calibration"].items()}

