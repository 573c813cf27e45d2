"""The DDPM noise schedule, taken from diffusers (linear betas, T = 1000 by default)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


class NoiseSchedule:
    """Holds beta_t and alpha_bar_t (``alphas_cumprod``) of a diffusers ``DDPMScheduler``."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
    ) -> None:
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
        )
        self.T = num_train_timesteps
        self.betas = self.scheduler.betas.float()
        self.alphas_cumprod = self.scheduler.alphas_cumprod.float()

    def alpha_bar(self, t: torch.Tensor | int, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.alphas_cumprod.to(device)[t]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (DDPM forward marginal, OSD-IRF Eq. 2/6)."""
        alpha_bar = self.alpha_bar(t, x0.device).view(-1, *([1] * (x0.dim() - 1)))
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
