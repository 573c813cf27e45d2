"""Episodic training of RM and AFL: a plain, seeded, resumable loop (Ray-free).

``state_dict`` holds everything needed to continue bit-for-bit; that is what a Ray Train checkpoint
stores (``ray_ad.distributed.episode_train`` runs this loop on Ray Train workers through the same
``EpisodeTrainer`` signature as ``train_episodes`` below).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from ray_ad.methods.nagl.config import EpisodeConfig, NAGLLossWeights
from ray_ad.methods.nagl.episodes import DomainPool, sample_episodes
from ray_ad.methods.nagl.loss import nagl_loss
from ray_ad.methods.nagl.network import MapScoring, NAGLNet, branch_maps
from ray_ad.methods.nagl.scoring import fused_map, top_mean
from ray_ad.progress import progress as progress_bar


class EpisodeLoop:
    """AdamW, the learning rate divided by 10 at each of ``config.lr_drops`` (the authors' step schedule).

    ``model`` is what the forward/backward pass runs on: the network itself, or its DistributedDataParallel
    wrapper on a Ray Train worker (each worker then draws its own episodes from its own seed).
    """

    def __init__(self, net: NAGLNet, pools: list[DomainPool], config: EpisodeConfig, weights: NAGLLossWeights,
                 scoring: MapScoring, device: torch.device | str, seed: int, model: nn.Module | None = None) -> None:
        self.net, self.model = net.to(device), model if model is not None else net
        self.pools, self.config, self.weights, self.scoring = pools, config, weights, scoring
        self.device = torch.device(device)
        self.optimiser = torch.optim.AdamW(self.model.parameters(), lr=config.lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.losses: list[float] = []

    def lr_at(self, step: int) -> float:
        drops = sum(step >= share * self.config.steps for share in self.config.lr_drops)
        return self.config.lr * 0.1**drops

    def train_step(self) -> float:
        batch = sample_episodes(self.pools, self.config, self.generator).to(self.device)
        S_n, S_a = branch_maps(self.model, batch.F_q, batch.normal_refs, batch.F_a, batch.M_a,
                               standardise=self.scoring.standardise, unmasked_region=self.scoring.unmasked_region,
                               centre_anomaly=self.scoring.centre_anomaly_map)
        S = fused_map(S_n, S_a)
        loss, _ = nagl_loss(S, top_mean(S, self.scoring.top_fraction), batch.M_q, batch.y_q, self.weights, S_a)
        for group in self.optimiser.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        return loss.item()

    def run(self, progress: bool = True, callback: Callable[[EpisodeLoop], None] | None = None,
            every: int = 0) -> list[float]:
        """Train from ``self.step`` to the budget; ``callback(self)`` after every ``every``-th step."""
        bar = progress_bar(desc="train NAGL (episodes)", total=self.config.steps, initial=self.step,
                           enabled=progress, unit="steps")
        self.model.train()
        while self.step < self.config.steps:
            self.losses.append(self.train_step())
            self.step += 1
            bar.update(1)
            if self.step % 20 == 0:
                bar.set_postfix(loss=f"{sum(self.losses[-20:]) / len(self.losses[-20:]):.4f}")
            if callback is not None and every > 0 and self.step % every == 0:
                callback(self)
        bar.close()
        self.model.eval()
        return self.losses

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "optimiser": self.optimiser.state_dict(), "step": self.step,
                "losses": torch.tensor(self.losses, dtype=torch.float64), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.step = int(state["step"])
        self.losses = state["losses"].tolist()
        self.generator.set_state(state["generator"])


class EpisodeTrainer(Protocol):
    """Trains NAGL's network on domain pools; returns (trained network, loss curve).

    ``train_episodes`` runs in this process; ``ray_ad.distributed.episode_train.RayEpisodeTrainer`` runs the
    same ``EpisodeLoop`` on Ray Train workers. The method only ever sees this signature.
    """

    def __call__(self, net: NAGLNet, pools: list[DomainPool], config: EpisodeConfig, weights: NAGLLossWeights,
                 scoring: MapScoring, device: torch.device | str = "cpu", seed: int = 0,
                 progress: bool = True) -> tuple[NAGLNet, list[float]]: ...


def train_episodes(net: NAGLNet, pools: list[DomainPool], config: EpisodeConfig, weights: NAGLLossWeights,
                   scoring: MapScoring, device: torch.device | str = "cpu", seed: int = 0,
                   progress: bool = True) -> tuple[NAGLNet, list[float]]:
    """The default ``EpisodeTrainer``: the loop in this process."""
    loop = EpisodeLoop(net, pools, config, weights, scoring, device, seed)
    return net.eval(), loop.run(progress)


__all__ = ["EpisodeLoop", "EpisodeTrainer", "train_episodes"]
