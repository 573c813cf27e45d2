"""NAGL's attention modules trained on Ray Train: the library's ``EpisodeLoop``, data-parallel and checkpointed.

``RayEpisodeTrainer`` has the ``EpisodeTrainer`` signature, so ``NAGL.fit`` runs it when it comes in the
``Runtime`` (``Runtime(episode_trainer=RayEpisodeTrainer(...))``). Per worker: the network
(DistributedDataParallel when there are several workers), every domain pool (the episodes' features,
small next to the images they came from), ``batch_size / world`` episodes per step drawn from the
worker's own seed. Checkpoints, resuming and failures work as for the score networks
(``ray_ad.distributed.train``).
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

from ray_ad.distributed.train import RayTrainSettings, _report, fit_and_read_state, resume, run_config
from ray_ad.methods.nagl.config import EpisodeConfig, NAGLLossWeights
from ray_ad.methods.nagl.episodes import DomainPool
from ray_ad.methods.nagl.network import MapScoring, NAGLNet
from ray_ad.methods.nagl.training import EpisodeLoop
from ray_ad.progress import configure_logging

log = logging.getLogger(__name__)


def episode_worker(config: dict[str, Any]) -> None:
    """The per-worker train function (runs inside each Ray Train worker)."""
    configure_logging()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    train: EpisodeConfig = config["train"]
    pools: list[DomainPool] = ray.get(config["pools"])
    model = ray.train.torch.prepare_model(config["net"])  # moves to the device; DDP when world > 1
    per_worker = dataclasses.replace(train, batch_size=max(1, train.batch_size // world))
    loop = EpisodeLoop(getattr(model, "module", model), pools, per_worker, config["weights"], config["scoring"],
                       device, config["seed"] + rank, model=model)
    resume(loop, rank)
    start_step, started = loop.step, time.perf_counter()
    batch = per_worker.batch_size * world

    def after_step(current: EpisodeLoop) -> None:
        if current.step % config["checkpoint_every"] == 0:
            _report(current, rank, started, start_step, batch, what="NAGL episodes")

    loop.run(progress=False, callback=after_step, every=1)
    if loop.step % config["checkpoint_every"] != 0 or loop.step == start_step:
        _report(loop, rank, started, start_step, batch, final=True, what="NAGL episodes")


class RayEpisodeTrainer:
    """An ``EpisodeTrainer`` that runs the loop on Ray Train workers and returns the trained network."""

    def __init__(self, settings: RayTrainSettings, callbacks: list[Any] | None = None) -> None:
        self.settings = settings
        self.callbacks = callbacks or []
        self.calls = 0
        self.last_result: Any = None

    def run_name(self) -> str:
        return f"{self.settings.name}-nagl{self.calls}"

    def __call__(self, net: NAGLNet, pools: list[DomainPool], config: EpisodeConfig, weights: NAGLLossWeights,
                 scoring: MapScoring, device: torch.device | str = "cpu", seed: int = 0,
                 progress: bool = True) -> tuple[NAGLNet, list[float]]:
        s = self.settings
        self.calls += 1
        trainer = ray.train.torch.TorchTrainer(
            episode_worker,
            train_loop_config={
                "net": net.cpu(), "pools": ray.put(pools), "train": config, "weights": weights,
                "scoring": scoring, "seed": seed, "checkpoint_every": s.checkpoint_every,
            },
            scaling_config=ray.train.ScalingConfig(num_workers=s.workers, use_gpu=s.use_gpu,
                                                   resources_per_worker={"CPU": s.cpus_per_worker}),
            run_config=run_config(s, self.run_name(), self.callbacks),
        )
        if progress:
            log.info(f"Ray Train: NAGL's RM and AFL on {s.workers} worker(s){' with GPU' if s.use_gpu else ''}, "
                     f"run {self.run_name()} under {s.storage_path}")
        self.last_result, state = fit_and_read_state(trainer)
        net.load_state_dict(state["net"])
        if progress:
            log.info(f"Ray Train: NAGL {state['step']} steps, loss {self.last_result.metrics['loss']:.4f}")
        return net.to(device).eval(), state["losses"].tolist()
