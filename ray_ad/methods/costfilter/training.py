"""Training the cost-volume filter on the synthetic pool: a plain, seeded, resumable loop (Eq. 5).

Ray-free, like the score networks' loop: ``state_dict`` holds everything needed to continue
bit-for-bit (what a Ray Train checkpoint would store).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ray_ad.methods.costfilter.config import FilterTrainConfig
from ray_ad.methods.costfilter.loss import LossWeights, costfilter_loss
from ray_ad.methods.costfilter.pool import SyntheticPool
from ray_ad.methods.costfilter.templates import TemplateBank
from ray_ad.progress import progress as progress_bar

# (query features [B, C, H, W], template features [B, N, C, H, W]) -> (M [B, H, W], class logits or None)
FilterForward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


class FilterLoop:
    """Adam with the authors' betas, cosine decay to 10% of the peak learning rate (the authors halve it
    on loss plateaus per epoch; a fixed schedule keeps runs comparable across budgets)."""

    def __init__(self, net: torch.nn.Module, forward: FilterForward, pool: SyntheticPool, bank: TemplateBank,
                 templates: int, config: FilterTrainConfig, weights: LossWeights, device: torch.device,
                 seed: int) -> None:
        self.net, self.forward, self.pool, self.bank = net, forward, pool, bank
        self.templates, self.config, self.weights, self.device = templates, config, weights, device
        self.optimiser = torch.optim.Adam(net.parameters(), lr=config.lr, betas=(0.9, 0.98))
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.losses: list[float] = []

    def lr_at(self, step: int) -> float:
        progress = step / max(1, self.config.steps)
        return self.config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def run(self, progress: bool = True) -> list[float]:
        cfg = self.config
        bar = progress_bar(desc="train cost filter", total=cfg.steps, initial=self.step, enabled=progress, unit="steps")
        self.net.train()
        while self.step < cfg.steps:
            index = torch.randint(0, len(self.pool), (cfg.batch_size,), generator=self.generator)
            chosen = self.bank.random(self.pool.sources[index], self.templates, self.generator)
            query = self.pool.features[index].to(self.device)
            anomaly_map, _ = self.forward(query, self.bank.gather(chosen))
            # The map at loss resolution against the mask's share per pixel (pool.py).
            predicted = F.interpolate(anomaly_map[:, None], size=cfg.loss_size, mode="bilinear",
                                      align_corners=False)[:, 0]
            loss, _ = costfilter_loss(predicted, self.pool.masks[index].to(self.device), self.weights)
            for group in self.optimiser.param_groups:
                group["lr"] = self.lr_at(self.step)
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            self.optimiser.step()
            self.losses.append(loss.item())
            self.step += 1
            bar.update(1)
            if self.step % 20 == 0:
                bar.set_postfix(loss=f"{sum(self.losses[-20:]) / len(self.losses[-20:]):.4f}")
        bar.close()
        self.net.eval()
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
