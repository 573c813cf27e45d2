"""A plain epsilon-prediction training loop for score networks over cached features.

Kept free of Ray so that the local CLI, the tests and the Ray Train worker run the same code.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ray_ad.diffusion import NoiseSchedule


@dataclass
class TrainConfig:
    steps: int = 2000  # the training budget, in optimiser steps
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    augment: int = 1  # dihedral variants of each training image (1 = none, up to 8)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def epsilon_loss(net: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """|| eps - eps_theta(x_t, t) ||^2 with t ~ U{0..T-1}   (DDPM objective, OSD-IRF Eq. 4)."""
    t = torch.randint(0, schedule.T, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    x_t = schedule.add_noise(x0, noise, t)  # Eq. 2 / 6
    return (net(x_t, t) - noise).pow(2).mean()


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for ema_p, p in zip(ema.parameters(), net.parameters()):
        ema_p.lerp_(p.detach(), 1 - decay)


def train_score_net(
    net: nn.Module,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    config: TrainConfig,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> tuple[nn.Module, list[float]]:
    """Train ``net`` on normalised features ``x0`` ``[N, C, H, W]``; returns (EMA net, loss curve)."""
    net.to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="train score net", disable=not progress)
    for step in bar:
        index = torch.randint(0, x0.shape[0], (config.batch_size,), generator=generator)
        batch = x0[index].to(device)
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step, config)
        loss = epsilon_loss(net, schedule, batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        optimiser.step()
        ema_update(ema, net, config.ema_decay if step >= config.warmup_steps else 0.0)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    net.eval()
    return ema, losses
