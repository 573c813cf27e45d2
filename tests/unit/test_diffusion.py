import pytest
import torch
from diffusers import DDPMScheduler

from ray_ad.diffusion import DiT, NoiseSchedule, ScoreNetConfig, build_score_net
from ray_ad.training import TrainConfig, lr_at, per_sample_epsilon_loss, train_score_net


def test_schedule_is_the_linear_ddpm_schedule():
    schedule = NoiseSchedule()
    betas = torch.linspace(1e-4, 0.02, 1000)
    assert torch.allclose(schedule.betas, betas)
    assert torch.allclose(schedule.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-5)
    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    expected = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").add_noise(x0, noise, t)
    assert torch.allclose(schedule.add_noise(x0, noise, t), expected, atol=1e-6)


def test_dit_starts_as_the_zero_map_and_keeps_shape():
    net = DiT(in_channels=6, grid_size=4, hidden=32, depth=2, heads=2)
    out = net(torch.randn(2, 6, 4, 4), torch.tensor([3, 700]))
    assert out.shape == (2, 6, 4, 4) and torch.count_nonzero(out) == 0


def test_unet_variant_has_the_same_interface():
    net = build_score_net(ScoreNetConfig(kind="unet", unet_channels=(16, 32)), in_channels=6, grid_size=8)
    assert net(torch.randn(2, 6, 8, 8), torch.tensor([1, 2])).shape == (2, 6, 8, 8)


@pytest.mark.slow  # trains a score network
def test_training_learns_the_noise_of_a_low_dimensional_distribution():
    # Data on a 1-D line in 4 channels: a network that learns the score beats the zero prediction (loss 1).
    torch.manual_seed(0)
    direction = torch.tensor([1.0, -1.0, 0.5, 0.0])
    x0 = (torch.randn(512, 1, 1, 1) * direction.view(1, 4, 1, 1)).expand(512, 4, 2, 2).contiguous()
    net = DiT(in_channels=4, grid_size=2, hidden=32, depth=1, heads=2)
    config = TrainConfig(steps=250, batch_size=64, lr=3e-3, warmup_steps=10, ema_decay=0.9)
    _, losses = train_score_net(net, x0, NoiseSchedule(), config, progress=False)
    assert sum(losses[-30:]) / 30 < 0.75 * sum(losses[:10]) / 10


def test_learning_rate_warms_up_then_decays():
    config = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
    assert lr_at(0, config) == 0.1 and lr_at(9, config) == 1.0
    assert lr_at(99, config) < 0.2 and lr_at(50, config) < 1.0


def test_t_max_limits_the_trained_timesteps_and_osd_irf_refuses_t_outside_them():
    import pytest

    from ray_ad.errors import ConfigError
    from ray_ad.methods import method_config
    from ray_ad.training import epsilon_loss

    seen: list[torch.Tensor] = []

    def recording_net(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return torch.zeros_like(x_t)

    for _ in range(50):
        epsilon_loss(recording_net, NoiseSchedule(), torch.randn(64, 2, 2, 2), t_max=300)
    t = torch.cat(seen)
    assert t.max() < 300 and t.min() >= 0 and t.max() >= 290  # the whole range [0, 300), nothing above
    config = {"train": {"t_max": 300}, "t": 150}
    assert method_config("osd_irf", config).t == 150
    with pytest.raises(ConfigError, match="t = 500 lies outside the trained range"):
        method_config("osd_irf", {**config, "t": 500})
    with pytest.raises(ConfigError, match="inversion runs the network up to t = 999"):
        method_config("osd_irf", {**config, "scoring": "inversion"})
    with pytest.raises(ConfigError, match="fields.timesteps reach t = 400"):
        method_config("ref_cfa", {"train": {"t_max": 300}, "fields": {"timesteps": [400, 50]}})
    with pytest.raises(ConfigError, match="train.t_max must be in"):
        method_config("osd_irf", {"train": {"t_max": -1}})


def test_gaussian_skip_starts_as_the_exact_denoiser_of_standard_normal_data():
    from ray_ad.diffusion import GaussianSkip

    schedule = NoiseSchedule()
    net = build_score_net(ScoreNetConfig(hidden=32, depth=1, heads=2, gaussian_skip=True), in_channels=4, grid_size=4)
    assert isinstance(net, GaussianSkip)
    torch.manual_seed(0)
    x0 = torch.randn(4096, 4, 4, 4)
    for t in (50, 500):
        alpha_bar = schedule.alpha_bar(t)
        noise = torch.randn_like(x0)
        steps = torch.full((len(x0),), t)
        with torch.no_grad():
            loss = (net(schedule.add_noise(x0, noise, steps), steps) - noise).pow(2).mean()
        # E[eps | x_t] = sqrt(1 - alpha_bar) x_t leaves Var(eps | x_t) = alpha_bar: the Gaussian's minimum loss.
        assert abs(loss.item() - alpha_bar.item()) < 0.01
        # OSD-IRF's mean-path input sqrt(alpha_bar) x_0 gives IRF = sqrt(alpha_bar (1 - alpha_bar)) x_0.
        with torch.no_grad():
            irf = net(alpha_bar.sqrt() * x0[:2], torch.full((2,), t))
        assert torch.allclose(irf, (alpha_bar * (1 - alpha_bar)).sqrt() * x0[:2], atol=1e-5)


def test_per_sample_loss_of_the_exact_denoiser_of_zero_data_is_its_closed_form():
    """eps_theta(x, t) = x / sigma_t is exact for x0 = 0; a sample at x0 = c costs alpha_bar c^2 / sigma_t^2."""
    schedule = NoiseSchedule()

    class ZeroDataDenoiser(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return x / (1 - schedule.alpha_bar(t)).sqrt().view(-1, 1, 1, 1)

    x0 = torch.zeros(5, 2, 3, 3)
    x0[3] = 0.5
    timesteps = [100, 400]
    losses = per_sample_epsilon_loss(ZeroDataDenoiser(), schedule, x0, timesteps, seed=0, batch_size=2)
    alpha_bar = torch.stack([schedule.alpha_bar(t) for t in timesteps])
    expected = (alpha_bar * 0.25 / (1 - alpha_bar)).mean()
    torch.testing.assert_close(losses[3], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(losses[[0, 1, 2, 4]], torch.zeros(4), atol=1e-5, rtol=0)
