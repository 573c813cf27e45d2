"""A plain, resumable epsilon-prediction training loop for score networks over cached features.

Kept free of Ray so that the local CLI, the tests and the Ray Train worker run the same code.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from ray_ad.diffusion import NoiseSchedule
from ray_ad.diffusion.context import ContextNet, masked_context_loss
from ray_ad.progress import progress as progress_bar

OBJECTIVES = ("epsilon", "masked_context")


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
    # Train only on t < t_max (0 = every t of the schedule). A detector that scores at one timestep
    # (OSD-IRF) spends its whole budget on the noise levels it will use; see the OSD-IRF README.
    t_max: int = 0
    # What the network learns: DDPM epsilon-prediction (Eq. 4 of OSD-IRF and REF), or, for OSD-IRF's
    # context variant only (ours, ``ray_ad/diffusion/context.py``), hidden cells predicted from the others,
    # hidden in ``context_block`` x ``context_block`` squares.
    objective: Literal["epsilon", "masked_context"] = "epsilon"
    context_block: int = 2

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"train.steps must be >= 0 (0 = the network as initialised), got {self.steps}")
        if not 0 <= self.t_max <= 1000:
            raise ValueError(f"train.t_max must be in [0, 1000] (0 = every timestep), got {self.t_max}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"train.objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if self.context_block < 1:
            raise ValueError(f"train.context_block must be >= 1, got {self.context_block}")


def loss_summary(losses: list[float], prefix: str = "") -> dict[str, float | None]:
    """First loss and mean of the last 50 (None for a network trained 0 steps, e.g. a Gaussian reference)."""
    return {f"{prefix}loss_first": losses[0] if losses else None,
            f"{prefix}loss_last": sum(losses[-50:]) / len(losses[-50:]) if losses else None}


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def epsilon_loss(net: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, t_max: int = 0) -> torch.Tensor:
    """|| eps - eps_theta(x_t, t) ||^2 with t ~ U{0..t_max-1}, t_max = T by default (OSD-IRF Eq. 4)."""
    t = torch.randint(0, t_max or schedule.T, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    x_t = schedule.add_noise(x0, noise, t)  # Eq. 2 / 6
    return (net(x_t, t) - noise).pow(2).mean()


@torch.no_grad()
def per_sample_epsilon_loss(
    net: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, timesteps: list[int], seed: int = 0,
    batch_size: int = 32,
) -> torch.Tensor:
    """Mean || eps - eps_theta(x_t, t) ||^2 of each sample of ``x0`` over ``timesteps``, one seeded noise
    draw per sample and timestep (the same draws for every network, so losses compare across them)."""
    generator = torch.Generator().manual_seed(seed)
    losses = torch.zeros(x0.shape[0])
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        for start in range(0, x0.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            t_batch = torch.full((noise[rows].shape[0],), int(t), device=x0.device)
            x_t = schedule.add_noise(x0[rows], noise[rows], t_batch)
            losses[rows] += (net(x_t, t_batch) - noise[rows]).pow(2).flatten(1).mean(1).cpu() / len(timesteps)
    return losses


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for ema_p, p in zip(ema.parameters(), net.parameters()):
        ema_p.lerp_(p.detach(), 1 - decay)


class ScoreNetTrainer(Protocol):
    """Trains a score network on normalised features; returns (EMA network, loss curve).

    ``train_score_net`` below runs in this process; ``ray_ad.distributed.train.RayScoreNetTrainer``
    runs the same ``ScoreNetLoop`` on Ray Train workers. Methods only ever see this signature.
    """

    def __call__(
        self, net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, config: TrainConfig,
        device: torch.device | str = "cpu", seed: int = 0, progress: bool = True,
    ) -> tuple[nn.Module, list[float]]: ...


class ScoreNetLoop:
    """One resumable epsilon-prediction run: network, EMA copy, optimiser, step, RNG and losses.

    ``state_dict`` captures everything needed to continue bit-for-bit, which is what a Ray Train
    checkpoint stores. ``model`` is what the forward/backward pass runs on: the network itself, or
    its DistributedDataParallel wrapper on a Ray Train worker (gradients are then averaged across
    workers, each sampling its batch share from its own shard of ``x0``).
    """

    def __init__(
        self, net: nn.Module, schedule: NoiseSchedule, config: TrainConfig, device: torch.device | str = "cpu",
        seed: int = 0, model: nn.Module | None = None,
    ) -> None:
        if (config.objective == "masked_context") != isinstance(net, ContextNet):
            raise ValueError(f"train.objective={config.objective!r} does not fit a {type(net).__name__}: "
                             "masked_context trains OSD-IRF's context network (irf_input: context) only")
        self.net = net.to(device).train()
        self.model = model if model is not None else self.net
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.schedule, self.config, self.device = schedule, config, torch.device(device)
        self.optimiser = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(seed)  # batch indices
        torch.manual_seed(seed)  # timesteps and noise
        self.step = 0
        self.losses: list[float] = []

    def run(
        self, x0: torch.Tensor, until: int | None = None, batch_size: int | None = None, progress: bool = True,
        callback: Callable[[ScoreNetLoop], None] | None = None, every: int = 0,
    ) -> None:
        """Train from ``self.step`` up to step ``until`` (default: the whole budget).

        ``callback(self)`` runs after every ``every``-th step (checkpointing, reporting).
        """
        config = self.config
        until = config.steps if until is None else min(until, config.steps)
        batch_size = batch_size or config.batch_size
        bar = progress_bar(desc="train score net", total=until, initial=self.step, enabled=progress, unit="steps")
        self.model.train()
        while self.step < until:
            index = torch.randint(0, x0.shape[0], (batch_size,), generator=self.generator)
            batch = x0[index].to(self.device)
            for group in self.optimiser.param_groups:
                group["lr"] = lr_at(self.step, config)
            if config.objective == "masked_context":
                loss = masked_context_loss(self.model, batch, config.context_block)
            else:
                loss = epsilon_loss(self.model, self.schedule, batch, config.t_max)
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.optimiser.step()
            ema_update(self.ema, self.net, config.ema_decay if self.step >= config.warmup_steps else 0.0)
            self.losses.append(loss.item())
            self.step += 1
            bar.update(1)
            if self.step % 20 == 0:
                bar.set_postfix(loss=f"{sum(self.losses[-20:]) / len(self.losses[-20:]):.4f}")
            if callback is not None and every > 0 and self.step % every == 0:
                callback(self)
        bar.close()
        self.model.eval()

    def state_dict(self) -> dict[str, Any]:
        state = {
            "net": self.net.state_dict(), "ema": self.ema.state_dict(), "optimiser": self.optimiser.state_dict(),
            "step": self.step, "losses": torch.tensor(self.losses, dtype=torch.float64),
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.step = int(state["step"])
        self.losses = state["losses"].tolist()
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)


def train_score_net(
    net: nn.Module,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    config: TrainConfig,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, list[float]]:
    """Train ``net`` on normalised features ``x0`` ``[N, C, H, W]`` in this process.

    Returns (EMA net, loss curve); the default ``ScoreNetTrainer``.
    """
    loop = ScoreNetLoop(net, schedule, config, device, seed)
    loop.run(x0, progress=progress)
    return loop.ema, loop.losses
