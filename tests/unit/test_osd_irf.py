import math

import numpy as np
import pytest
import torch
from torch import nn

from ray_ad.data import load_samples
from ray_ad.evaluation import compute_metrics, run_detector
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime
from tests.conftest import make_mvtec, tiny_osd_irf_config


class GaussianScore(nn.Module):
    """The exact epsilon of data x_0 ~ N(0, I): eps*(x_t, t) = sqrt(1 - alpha_bar_t) x_t. Counts calls."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.alphas_cumprod = alphas_cumprod
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone()))
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x


@pytest.fixture
def detector():
    det = build_detector("osd_irf", method_config("osd_irf", tiny_osd_irf_config()))
    det.score_net = GaussianScore(det.schedule.alphas_cumprod)
    return det


def test_one_step_irf_is_one_call_on_the_mean_path_input(detector):
    x0 = torch.randn(2, 5, 3, 3)
    delta = detector.inverse_residual_field(x0)
    (x_in, t_in), = detector.score_net.calls  # exactly one score-net call
    a = detector.schedule.alphas_cumprod[250]
    assert torch.equal(t_in, torch.tensor([250, 250]))
    assert torch.allclose(x_in, a.sqrt() * x0)  # Eq. 7: mu(x_t) = sqrt(alpha_bar_t) x_0
    assert torch.allclose(delta, (1 - a).sqrt() * a.sqrt() * x0)


def test_noisy_state_irf_is_one_call_per_fixed_draw_and_independent_of_the_batch(detector):
    detector.config.irf_input, detector.config.irf_draws = "noisy", 3
    x0 = torch.randn(4, 5, 3, 3)
    fields = detector.inverse_residual_fields(x0)
    assert fields.shape == (3, 4, 5, 3, 3) and len(detector.score_net.calls) == 3
    a = detector.schedule.alphas_cumprod[250]
    eps = detector.irf_noise(x0)  # the same draws for every image
    for k, (x_in, t_in) in enumerate(detector.score_net.calls):
        assert torch.equal(t_in, torch.full((4,), 250))
        assert torch.allclose(x_in, a.sqrt() * x0 + (1 - a).sqrt() * eps[k])  # Eq. 6
    assert torch.allclose(detector.inverse_residual_fields(x0[2:3])[:, 0], fields[:, 2])
    # The exact Gaussian denoiser leaves no residual over the Gaussian part.
    gaussian, residual = detector.irf_split(x0)
    assert torch.allclose(gaussian, fields) and residual.abs().max() < 1e-6
    with pytest.raises(ValueError, match="irf_input"):
        method_config("osd_irf", tiny_osd_irf_config(irf_input="sampled"))


def test_ddim_inversion_matches_its_closed_form(detector):
    # With the exact Gaussian score, each DDIM inversion step maps x -> (sqrt(a_next a) + sqrt((1-a_next)(1-a))) x.
    detector.config.inversion_steps = 3
    x0 = torch.randn(1, 4, 2, 2)
    latent = detector.ddim_inversion(x0)
    assert len(detector.score_net.calls) == 3
    factor = 1.0
    ts = [0, 333, 666, 999]
    ab = detector.schedule.alphas_cumprod
    for now, nxt in zip(ts[:-1], ts[1:]):
        factor *= (ab[nxt] * ab[now]).sqrt() + ((1 - ab[nxt]) * (1 - ab[now])).sqrt()
    assert torch.allclose(latent, factor * x0, atol=1e-5)


def test_score_map_and_image_terms_by_hand(detector):
    delta = torch.zeros(1, 2, 2, 2)
    delta[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # one cell with |Delta| = 5
    a_hat, s_diff, s_nll = detector.raw_scores(delta)
    assert torch.allclose(a_hat, torch.tensor([[[5.0, 0.0], [0.0, 0.0]]]))  # Eq. 8
    assert s_diff.item() == pytest.approx(5.0)  # Eq. 10: max - min
    assert s_nll.item() == pytest.approx(0.5 * 25 + 0.5 * 8 * math.log(2 * math.pi))  # Eq. 11 (Gaussian NLL)


def test_scores_are_min_max_normalised_per_term(detector):
    detector.calibration["one_step"] = {"diff_min": 1.0, "diff_max": 3.0, "nll_min": 10.0, "nll_max": 20.0}
    s = detector._combine(torch.tensor([2.0]), torch.tensor([20.0]), "one_step")
    assert s.item() == pytest.approx(0.5 + 1.0)  # Eq. 9


@pytest.mark.slow  # fits a detector
@pytest.mark.parametrize("seed", [0, 1])
def test_end_to_end_on_generated_images_finds_the_defects(tmp_path, seed):
    samples = load_samples(str(make_mvtec(tmp_path / "data", n_train=16, n_good=8, n_bad=8, seed=seed)))
    # Split by file name, not by split_calibration's hash of the full path: tmp_path differs per run.
    normals = sorted((s for s in samples if s.split == "train"), key=lambda s: s.path)
    train, calibration = normals[:12], normals[12:]
    test = [s for s in samples if s.split == "test"]
    torch.manual_seed(seed)
    det = build_detector("osd_irf", method_config("osd_irf", tiny_osd_irf_config()))
    info = det.fit(train, calibration, Runtime(progress=False))
    assert info["loss_last"] < info["loss_first"]
    results = run_detector(det, test, progress=False)
    metrics = compute_metrics(results)
    # Bright 16x16 squares on a striped texture: the trained IRF must rank them above the normals.
    # (This 150-step network scores 0.84 / 0.95 image AUROC for seeds 0 / 1; pixel AUROC 0.93 / 0.91.)
    assert metrics["image_auroc"] >= 0.8
    assert metrics["pixel_auroc"] >= 0.85
    assert results.maps.shape == (16, 64, 64)
    assert np.isfinite(det.threshold)
    # Both scoring modes are calibrated and can be switched on the same network.
    det.set_scoring("inversion")
    assert det.threshold == det.calibration["inversion"]["threshold"] != det.calibration["one_step"]["threshold"]
    inverted = run_detector(det, test, progress=False).scores
    assert not np.allclose(inverted, results.scores)  # another latent, another score


def test_fitted_irf_gaussian_standardises_the_training_irfs(detector):
    detector.config.irf_gaussian = "fitted"
    x0 = torch.randn(64, 5, 3, 3) * 2 + 1
    detector.fit_irf_gaussian(x0)
    z = detector.latent(x0, "one_step")
    assert torch.allclose(z.mean(0), torch.zeros_like(z[0]), atol=1e-5)
    assert torch.allclose(z.std(0), torch.ones_like(z[0]), atol=1e-4)
    # The inversion baseline keeps InvAD's standard Gaussian.
    detector.config.irf_gaussian = "standard"
    detector.fit_irf_gaussian(x0)
    assert torch.equal(detector.latent(x0, "one_step"), detector.inverse_residual_field(x0))


@pytest.mark.slow  # fits a detector
def test_untrained_gaussian_skip_on_whitened_features_scores_the_mahalanobis_distance(tmp_path):
    """The Gaussian reference: 0 training steps, whitened features -> A_hat = c * Mahalanobis distance per cell."""
    samples = load_samples(str(make_mvtec(tmp_path / "data", n_train=24, n_good=4, n_bad=4, seed=3)))
    normals = sorted((s for s in samples if s.split == "train"), key=lambda s: s.path)
    config = tiny_osd_irf_config(normalisation={"kind": "position_whiten", "ridge": 0.05})
    config["score_net"]["gaussian_skip"] = True
    config["train"]["steps"] = 0
    det = build_detector("osd_irf", method_config("osd_irf", config))
    info = det.fit(normals[:20], normals[20:], Runtime(progress=False))
    assert info["steps"] == 0 and info["loss_first"] is None
    test = [s for s in samples if s.split == "test"]
    features = det.extract_features(test, Runtime(progress=False))
    a_hat, _, _ = det.raw_scores(det.latent(det.normalise(features), "one_step"))
    # By hand: the Mahalanobis distance of every test cell under its position's (ridged) training Gaussian.
    train = det.extract_features(normals[:20], Runtime(progress=False)).double()
    alpha_bar = det.schedule.alphas_cumprod[det.config.t].double()
    for i, j in [(0, 0), (3, 5), (7, 7)]:
        cells = train[:, :, i, j]
        sigma = torch.cov(cells.T)
        sigma = sigma + 0.05 * sigma.diagonal().mean() * torch.eye(len(sigma), dtype=torch.float64)
        delta = features[:, :, i, j].double() - cells.mean(0)
        mahalanobis = (delta @ torch.linalg.solve(sigma, delta.T)).diagonal().sqrt()
        assert torch.allclose(a_hat[:, i, j].double(), (alpha_bar * (1 - alpha_bar)).sqrt() * mahalanobis, rtol=1e-3)
