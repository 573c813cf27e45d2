"""REF residuals and statistics on cases with closed forms, and the CFA alignment transforms."""

import numpy as np
import pytest
import torch
from torch import nn

from ray_ad.diffusion import NoiseSchedule
from ray_ad.methods.ref_cfa.align import (
    coral_loss,
    covariance,
    orthogonal_procrustes,
    paired_directions,
    robust_moments,
    source_directions,
    subspace_distance,
    subspace_rotation,
    tail_directions,
    temporal_reparameterisation,
    top_left_singular,
    trimmed_moments,
    warped_timesteps,
    whiten_recolor,
)
from ray_ad.methods.ref_cfa.fields import (
    FieldConfig,
    FieldSequence,
    ResidualStep,
    field_statistics,
    reverse_residuals,
    summarise_steps,
    uniform_weights,
)

SCHEDULE = NoiseSchedule()


class GaussianScore(nn.Module):
    """Exact epsilon for data x_0 ~ N(0, I): eps*(x_t, t) = sqrt(1 - alpha_bar_t) x_t. Counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        a = SCHEDULE.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x


class Scripted(nn.Module):
    """Returns prescribed predictions, one per call (broadcast over the batch and cells)."""

    def __init__(self, outputs: list[list[float]]) -> None:
        super().__init__()
        self.outputs = [torch.tensor(o, dtype=torch.float32).view(1, -1, 1, 1) for o in outputs]
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.outputs[self.calls].expand_as(x)
        self.calls += 1
        return out


def test_residuals_of_the_exact_gaussian_score_have_closed_forms():
    timesteps = [400, 250, 100]
    x0 = torch.randn(2, 3, 4, 4)
    net = GaussianScore()
    steps = list(reverse_residuals(net, SCHEDULE, x0, timesteps))
    assert net.calls == len(timesteps) + 1  # K reverse steps, and v_K at the last projection
    a = [SCHEDULE.alphas_cumprod[t] for t in timesteps]
    c = 1.0  # the chain's state is y_k = sqrt(a_k) c_k x0 with c_{k+1} = c_k a_k
    for k, step in enumerate(steps):
        sigma = (1 - a[k]).sqrt()
        assert torch.allclose(step.R, sigma * a[k].sqrt() * c * x0, atol=1e-6)  # R_bar = eps
        assert torch.allclose(step.Q, a[k].sqrt() * (c - 1) * x0 / sigma, atol=1e-6)  # drift from the mean path
        assert torch.allclose(step.M, torch.zeros_like(x0), atol=1e-6)  # R is parallel to the score
        c = c * a[k]


def test_m_is_the_residual_orthogonal_to_the_score_at_the_projection():
    # Call 1 predicts eps = (1, 0), call 2 (at the carried projection) eps = (1, 1), call 3 (v_K, at
    # the last projection) eps = (0, 1).
    net = Scripted([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    steps = list(reverse_residuals(net, SCHEDULE, torch.zeros(1, 2, 1, 1), [300, 100]))
    assert net.calls == 3
    assert torch.allclose(steps[0].R.flatten(), torch.tensor([1.0, 0.0]))
    # M_1 = R_1 - <R_1, v> / ||v||^2 v with v ~ (1, 1): (1, 0) - 0.5 (1, 1) = (0.5, -0.5)
    assert torch.allclose(steps[0].M.flatten(), torch.tensor([0.5, -0.5]))
    # M_2 = R_2 - its part along v_2 ~ (0, 1): (1, 1) - (0, 1) = (1, 0), no longer zero by construction.
    assert torch.allclose(steps[1].M.flatten(), torch.tensor([1.0, 0.0]), atol=1e-6)


def test_the_legacy_last_step_reuses_the_last_score_and_so_has_no_m():
    # Bundles saved before fields.last_reference: the last step's v is the score R_K came from.
    net = Scripted([[1.0, 0.0], [1.0, 1.0]])
    steps = list(reverse_residuals(net, SCHEDULE, torch.zeros(1, 2, 1, 1), [300, 100], "previous"))
    assert net.calls == 2
    assert torch.allclose(steps[1].M.flatten(), torch.zeros(2), atol=1e-6)


def _vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def test_energy_non_stationarity_and_directional_variability_by_hand():
    steps = [
        ResidualStep(R=_vec(1, 0), M=_vec(0, 1), Q=_vec(0, 0)),
        ResidualStep(R=_vec(1, 1), M=_vec(2, 0), Q=_vec(0, 3)),
    ]
    fields = summarise_steps(steps, basis=torch.eye(2), grid=1)
    assert torch.allclose(fields.energy[0], torch.tensor([[1.0, 1.0, 0.0], [2.0, 4.0, 9.0]]))
    assert torch.allclose(fields.change[0], torch.tensor([[0.0, 0.0, 0.0], [1.0, 5.0, 9.0]]))
    assert torch.allclose(fields.turn[0], torch.tensor([0.0, 1.0]))  # M turned by 90 degrees
    assert torch.allclose(fields.tokens[0, 1], torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]]))
    stats = field_statistics(fields, uniform_weights(2), ridge=0.5)
    assert torch.allclose(stats.E[0], torch.tensor([1.5, 2.5, 4.5]))  # sum_t w_t ||X_t||^2
    assert torch.allclose(stats.NS[0], torch.tensor([0.5 / 2.0, 2.5 / 3.0, 4.5 / 5.0]))  # / (E + ridge)
    assert torch.allclose(stats.DV, torch.tensor([0.5]))
    # Attention that puts all weight on the first step sees a stationary, zero-variability cell.
    focused = field_statistics(fields, torch.tensor([[1.0, 0.0]]), ridge=0.5)
    assert torch.allclose(focused.NS[0], torch.zeros(3)) and focused.DV.item() == 0.0


def test_resampling_along_steps_interpolates_linearly():
    energy = torch.tensor([[0.0, 10.0, 20.0]])[..., None].expand(1, 3, 3)
    fields = FieldSequence(energy, torch.zeros(1, 3, 3), torch.tensor([[0.0, 1.0, 2.0]]), None, grid=1)
    out = fields.resample(torch.tensor([0.5, 1.5, 2.0]))
    assert torch.allclose(out.turn, torch.tensor([[0.5, 1.5, 2.0]]))
    assert torch.allclose(out.energy[0, :, 0], torch.tensor([5.0, 15.0, 20.0]))


@pytest.mark.parametrize("bad", [[100, 200], [500], [300, 300], [1000, 10]])
def test_field_config_rejects_bad_timesteps(bad):
    with pytest.raises(ValueError, match="timesteps"):
        FieldConfig(timesteps=tuple(bad))


def _random_rotation(dim: int, scale: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    skew = torch.randn(dim, dim, generator=generator, dtype=torch.float64) * scale
    return torch.linalg.matrix_exp(skew - skew.T)


def test_procrustes_recovers_a_known_rotation():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5, 40, generator=generator, dtype=torch.float64)
    omega = _random_rotation(5, 1.0, 1)
    assert torch.allclose(orthogonal_procrustes(a, omega @ a), omega, atol=1e-8)


def _stacked(dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    spectrum = torch.linspace(3.0, 0.2, dim, dtype=torch.float64)
    return spectrum[:, None] * torch.randn(dim, 400, generator=generator, dtype=torch.float64)


def test_subspace_rotation_undoes_a_rotation_of_the_m_fields():
    dim = 6
    x_source = _stacked(dim, 0)
    rotation = _random_rotation(dim, 0.15, 2)  # the target's M fields are the source's, rotated
    x_target = rotation @ x_source
    # Full rank: the rotation itself is recovered (R = Q^T).
    u_s = top_left_singular(x_source @ x_source.T, dim).double()
    u_t = top_left_singular(x_target @ x_target.T, dim).double()
    assert torch.allclose(subspace_rotation(u_t, u_s), rotation.T, atol=1e-5)
    # Rank r < C: R is orthogonal and maps span(U_T) onto span(U_S).
    u_s, u_t = u_s[:, :2], u_t[:, :2]
    r = subspace_rotation(u_t, u_s)
    assert torch.allclose(r @ r.T, torch.eye(dim, dtype=r.dtype), atol=1e-8)
    assert subspace_distance(u_t, u_s) > 0.05
    assert subspace_distance(r @ u_t, u_s) < 1e-6


def test_whiten_recolor_matches_the_source_covariance():
    generator = torch.Generator().manual_seed(0)
    mixing_s, mixing_t = torch.randn(4, 4, generator=generator), torch.randn(4, 4, generator=generator)
    z_source = torch.randn(5000, 4, generator=generator) @ mixing_s.T + 1.0
    z_target = torch.randn(5000, 4, generator=generator) @ mixing_t.T - 2.0
    mean_s, cov_s = z_source.mean(0), covariance(z_source)
    a, b = whiten_recolor(z_target, mean_s, cov_s, eps=1e-9)
    aligned = z_target @ a.T + b
    assert torch.allclose(covariance(aligned), cov_s, atol=1e-3 * cov_s.abs().max())
    assert torch.allclose(aligned.mean(0), mean_s, atol=1e-4)
    assert coral_loss(aligned, cov_s) < 1e-6 < coral_loss(z_target, cov_s)


def test_relative_ridge_makes_whiten_recolor_unit_free():
    """Signatures on a 1e-3 scale: an absolute ridge of 1e-4 swamps their covariance, a relative one does not."""
    generator = torch.Generator().manual_seed(2)
    z_source = torch.randn(4000, 3, generator=generator) @ torch.randn(3, 3, generator=generator).T
    z_target = torch.randn(4000, 3, generator=generator) @ torch.randn(3, 3, generator=generator).T + 1.0
    mean_s, cov_s = z_source.mean(0), covariance(z_source)
    unit = whiten_recolor(z_target, mean_s, cov_s, eps=1e-4, relative=True)[0]
    small = 1e-3
    scaled = {relative: whiten_recolor(z_target * small, mean_s * small, cov_s * small**2, eps=1e-4,
                                       relative=relative)[0] for relative in (False, True)}
    torch.testing.assert_close(scaled[True], unit, atol=1e-3, rtol=1e-3)  # A is unitless: the same map
    assert (scaled[False] - unit).norm() > 0.5 * unit.norm()


def test_robust_moments_ignore_a_contaminating_minority():
    generator = torch.Generator().manual_seed(3)
    normal = torch.randn(9000, 2, generator=generator) * torch.tensor([1.0, 3.0]) + 5.0
    outliers = torch.full((1000, 2), 100.0)
    x = torch.cat([normal, outliers])
    center, scale = robust_moments(x)
    spread = torch.tensor([1.0, 3.0])
    # A one-sided 10% minority moves the median by 0.14 standard deviations (the 5/9 quantile), the mean by 9.5.
    assert ((center - 5.0).abs() < 0.2 * spread).all() and ((x.mean(0) - 5.0).abs() > 9 * spread.min()).all()
    torch.testing.assert_close(scale, spread, atol=0.0, rtol=0.25)
    assert (x.std(0) > 8 * spread).all()


def test_warped_timesteps_follow_psi_between_the_configured_steps():
    timesteps = torch.tensor([400, 300, 200, 100])
    assert warped_timesteps(torch.arange(4.0), timesteps) == [400, 300, 200, 100]  # identity psi
    assert warped_timesteps(torch.tensor([0.5, 1.25, 2.0, 3.0]), timesteps) == [350, 275, 200, 100]
    # psi clamped at the last step: the chain still moves on, one timestep at a time.
    assert warped_timesteps(torch.tensor([1.0, 3.0, 3.0, 3.0]), timesteps) == [300, 100, 99, 98]


def test_trimmed_moments_ignore_a_contaminating_cluster():
    """A target whose 10% anomalous cells sit far off: trimming recovers the normal cells' moments."""
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(3, 3, generator=generator)
    normal = torch.randn(9000, 3, generator=generator) @ mixing.T
    anomalous = torch.randn(1000, 3, generator=generator) * 0.5 + torch.tensor([8.0, -8.0, 8.0])
    z = torch.cat([normal, anomalous])
    clean_cov = covariance(normal)
    error = {trim: (trimmed_moments(z, trim)[1] - clean_cov).norm() / clean_cov.norm() for trim in (0.0, 0.15)}
    assert error[0.0] > 1.0 and error[0.15] < 0.15  # all cells: the cluster dominates; trimmed: close
    mean, _ = trimmed_moments(z, 0.15)
    assert (mean - normal.mean(0)).norm() < 0.2 < (z.mean(0) - normal.mean(0)).norm()
    a, b = whiten_recolor(z, torch.zeros(3), torch.eye(3), trim=0.15)
    whitened = normal @ a.T + b  # the normal cells come out near N(0, I), not squeezed by the cluster
    assert torch.allclose(covariance(whitened), torch.eye(3), atol=0.3)


def test_temporal_reparameterisation_recovers_a_shift_of_the_profile():
    source = np.exp(-0.3 * np.arange(8.0))  # mean residual falling over the reverse steps
    np.testing.assert_allclose(temporal_reparameterisation(source, source).numpy(), np.arange(8.0), atol=1e-6)
    target = np.exp(-0.3 * (np.arange(8.0) - 1.5))  # the same curve, 1.5 steps later
    positions = temporal_reparameterisation(target, source).numpy()
    np.testing.assert_allclose(positions[:6], np.arange(6.0) + 1.5, atol=0.05)
    assert positions[-1] == pytest.approx(7.0)  # clamped to the last target step
    assert np.all(np.diff(positions) >= 0)  # psi is monotone


def test_source_directions_follow_the_labels():
    labels = torch.tensor([0.0, 0, 0, 1, 1])
    stats = torch.tensor([[1.0, 5.0, 2.0], [2.0, 4.0, 2.0], [1.5, 6.0, 2.0], [9.0, 0.0, 2.0], [8.0, 1.0, 2.0]])
    # up on anomalies, down on anomalies, tied (AUROC 0.5 counts as up)
    assert source_directions(stats, labels).tolist() == [1.0, -1.0, 1.0]
    assert source_directions(stats, torch.zeros(5)).tolist() == [1.0, 1.0, 1.0]  # one class: no evidence


def test_tail_directions_point_at_the_minority():
    """An unlabeled sample, 15% of it shifted: the heavier tail says which way the minority went."""
    generator = torch.Generator().manual_seed(0)
    normal = torch.randn(850, 2, generator=generator)
    minority = torch.randn(150, 2, generator=generator) * 0.5 + torch.tensor([4.0, -4.0])
    directions = tail_directions(torch.cat([normal, minority]))
    assert directions.tolist() == [1.0, -1.0]
    # Up to the sign of the data, nothing else matters: flipping a column flips its direction.
    assert tail_directions(-torch.cat([normal, minority])).tolist() == [-1.0, 1.0]


def test_paired_directions_follow_the_median_change():
    generator = torch.Generator().manual_seed(0)
    before = torch.randn(200, 3, generator=generator)
    change = torch.tensor([0.5, -0.5, 0.0]) + 0.1 * torch.randn(200, 3, generator=generator)
    change[:40, 0] = -5.0  # a fifth of the cells move the other way, far: the median still says up
    assert paired_directions(before, before + change).tolist()[:2] == [1.0, -1.0]
    with pytest.raises(ValueError, match="one shape"):
        paired_directions(before, before[:10])
