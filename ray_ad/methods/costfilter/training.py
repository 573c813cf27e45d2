"""Training the cost-volume filter on the synthetic pool: a plain, seeded, resumable loop (Eq. 5).

Ray-free, like the score networks' loop: ``state_dict`` holds everything needed to continue
bit-for-bit, which is what a Ray Train checkpoint stores (``ray_ad.distributed.filter_train`` runs this
loop on Ray Train workers through the same ``FilterTrainer`` signature as ``train_filter`` below).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ray_ad.methods.costfilter.config import FilterTrainConfig
from ray_ad.methods.costfilter.loss import LossWeights, costfilter_loss
from ray_ad.methods.costfilter.network import Matching, filter_forward
from ray_ad.methods.costfilter.pool import SyntheticPool
from ray_ad.methods.costfilter.templates import TemplateBank
from ray_ad.progress import progress as progress_bar


class FilterLoop:
    """Adam with the authors' betas, cosine decay to 10% of the peak learning rate (the authors halve it
    on loss plateaus per epoch; a fixed schedule keeps runs comparable across budgets).

    ``model`` is what the forward/backward pass runs on: the filter itself, or its DistributedDataParallel
    wrapper on a Ray Train worker (each worker then draws its batch share from its own shard of the pool).
    """

    def __init__(self, net: nn.Module, pool: SyntheticPool, bank: TemplateBank, matching: Matching,
                 config: FilterTrainConfig, weights: LossWeights, device: torch.device | str, seed: int,
                 model: nn.Module | None = None) -> None:
        self.net, self.model = net.to(device), model if model is not None else net
        self.pool, self.bank, self.matching = pool, bank, matching
        self.config, self.weights, self.device = config, weights, torch.device(device)
        self.optimiser = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=(0.9, 0.98))
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.losses: list[float] = []

    def lr_at(self, step: int) -> float:
        progress = step / max(1, self.config.steps)
        return self.config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def train_step(self) -> float:
        cfg = self.config
        index = torch.randint(0, len(self.pool), (cfg.batch_size,), generator=self.generator)
        classes = None if self.pool.classes is None else self.pool.classes[index]  # a fleet: each item's line
        chosen = self.bank.random(self.pool.sources[index], self.matching.templates, self.generator, classes)
        query = self.pool.features[index].to(self.device)
        base_map = None if self.pool.base_maps is None else self.pool.base_maps[index].to(self.device)
        templates = self.bank.gather(chosen)
        if self.pool.reconstructions is not None:  # the base's reconstruction of the query is its last template
            templates[:, -1] = self.pool.reconstructions[index].to(templates.device)
        anomaly_map, class_logits = filter_forward(self.model, self.matching, query, templates, base_map)
        # The map at loss resolution against the mask's share per pixel (pool.py).
        predicted = F.interpolate(anomaly_map[:, None], size=cfg.loss_size, mode="bilinear", align_corners=False)
        loss, _ = costfilter_loss(predicted[:, 0], self.pool.masks[index].to(self.device), self.weights,
                                  class_logits, None if classes is None else classes.to(self.device))  # Eq. 5
        for group in self.optimiser.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        return loss.item()

    def run(self, progress: bool = True, callback: Callable[[FilterLoop], None] | None = None,
            every: int = 0) -> list[float]:
        """Train from ``self.step`` to the budget; ``callback(self)`` after every ``every``-th step."""
        bar = progress_bar(desc="train cost filter", total=self.config.steps, initial=self.step, enabled=progress,
                           unit="steps")
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


class FilterTrainer(Protocol):
    """Trains the filter on a pool against a template bank; returns (trained filter, loss curve).

    ``train_filter`` runs in this process; ``ray_ad.distributed.filter_train.RayFilterTrainer`` runs the
    same ``FilterLoop`` on Ray Train workers. The method only ever sees this signature.
    """

    def __call__(self, net: nn.Module, pool: SyntheticPool, bank: TemplateBank, matching: Matching,
                 config: FilterTrainConfig, weights: LossWeights, device: torch.device | str = "cpu", seed: int = 0,
                 progress: bool = True) -> tuple[nn.Module, list[float]]: ...


def train_filter(net: nn.Module, pool: SyntheticPool, bank: TemplateBank, matching: Matching,
                 config: FilterTrainConfig, weights: LossWeights, device: torch.device | str = "cpu", seed: int = 0,
                 progress: bool = True) -> tuple[nn.Module, list[float]]:
    """The default ``FilterTrainer``: the loop in this process."""
    loop = FilterLoop(net, pool, bank, matching, config, weights, device, seed)
    return net.eval(), loop.run(progress)
