"""CostFilter-AD's filter trained on Ray Train: the library's ``FilterLoop``, data-parallel and checkpointed.

``RayFilterTrainer`` has the ``FilterTrainer`` signature, so ``CostFilter.fit`` runs it when it comes in
the ``Runtime`` (``Runtime(filter_trainer=RayFilterTrainer(...))``). Per worker: the filter
(DistributedDataParallel when there are several workers), the whole template bank, a shard
``pool[rank::world]`` of the synthetic pool and ``batch_size / world`` queries per step. Checkpoints,
resuming and failures work as for the score networks (``ray_ad.distributed.train``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from ray_ad.distributed.train import RayTrainSettings, _report, fit_and_read_state, resume, run_config
from ray_ad.methods.costfilter.config import FilterTrainConfig
from ray_ad.methods.costfilter.loss import LossWeights
from ray_ad.methods.costfilter.network import Matching
from ray_ad.methods.costfilter.pool import SyntheticPool
from ray_ad.methods.costfilter.templates import TemplateBank
from ray_ad.methods.costfilter.training import FilterLoop
from ray_ad.progress import configure_logging

log = logging.getLogger(__name__)


def filter_worker(config: dict[str, Any]) -> None:
    """The per-worker train function (runs inside each Ray Train worker)."""
    configure_logging()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    matching: Matching = config["matching"]
    train: FilterTrainConfig = config["train"]
    pool: SyntheticPool = ray.get(config["pool"]).shard(rank, world)
    bank: TemplateBank = ray.get(config["bank"]).to(device)
    model = ray.train.torch.prepare_model(config["net"])  # moves to the device; DDP when world > 1
    per_worker = dataclasses.replace(train, batch_size=max(1, train.batch_size // world))
    loop = FilterLoop(getattr(model, "module", model), pool, bank, matching, per_worker, config["weights"], device,
                      config["seed"] + rank, model=model)
    resume(loop, rank)
    start_step, started = loop.step, time.perf_counter()
    batch = per_worker.batch_size * world

    def after_step(current: FilterLoop) -> None:
        if current.step % config["checkpoint_every"] == 0:
            _report(current, rank, started, start_step, batch, what="cost filter")

    loop.run(progress=False, callback=after_step, every=1)
    if loop.step % config["checkpoint_every"] != 0 or loop.step == start_step:
        _report(loop, rank, started, start_step, batch, final=True, what="cost filter")


class RayFilterTrainer:
    """A ``FilterTrainer`` that runs the loop on Ray Train workers and returns the trained filter."""

    def __init__(self, settings: RayTrainSettings, callbacks: list[Any] | None = None) -> None:
        self.settings = settings
        self.callbacks = callbacks or []
        self.calls = 0
        self.last_result: Any = None

    def run_name(self) -> str:
        return f"{self.settings.name}-filter{self.calls}"

    def __call__(self, net: nn.Module, pool: SyntheticPool, bank: TemplateBank, matching: Matching,
                 config: FilterTrainConfig, weights: LossWeights, device: torch.device | str = "cpu", seed: int = 0,
                 progress: bool = True) -> tuple[nn.Module, list[float]]:
        s = self.settings
        self.calls += 1
        trainer = ray.train.torch.TorchTrainer(
            filter_worker,
            train_loop_config={
                "net": net.cpu(), "pool": ray.put(pool), "bank": ray.put(bank.cpu_copy()),
                "matching": matching, "train": config, "weights": weights, "seed": seed,
                "checkpoint_every": s.checkpoint_every,
            },
            scaling_config=ray.train.ScalingConfig(num_workers=s.workers, use_gpu=s.use_gpu,
                                                   resources_per_worker={"CPU": s.cpus_per_worker}),
            run_config=run_config(s, self.run_name(), self.callbacks),
        )
        if progress:
            log.info(f"Ray Train: the cost filter on {s.workers} worker(s){' with GPU' if s.use_gpu else ''}, "
                     f"run {self.run_name()} under {s.storage_path}")
        self.last_result, state = fit_and_read_state(trainer)
        net.load_state_dict(state["net"])
        if progress:
            log.info(f"Ray Train: cost filter {state['step']} steps, loss {self.last_result.metrics['loss']:.4f}")
        return net.to(device).eval(), state["losses"].tolist()
