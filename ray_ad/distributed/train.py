"""Score networks trained on Ray Train: the library's ``ScoreNetLoop``, data-parallel and checkpointed.

``RayScoreNetTrainer`` has the ``ScoreNetTrainer`` signature, so any method that trains a score network
(OSD-IRF, REF's source and target networks) runs on Ray when it comes in the ``Runtime`` passed to
``fit``/``adapt`` (``Runtime(score_net_trainer=RayScoreNetTrainer(...))``); the method code does not
change. Per worker: the network (DistributedDataParallel when there are several workers), a shard
``x0[rank::world]`` of the training features, and ``batch_size / world`` images per step, so the
global batch and the learning-rate schedule match local training. With one worker the run is the
local loop, step for step.

Checkpoints (weights, EMA, optimiser, step, losses, RNG) are reported to ``storage_path`` (local or
``s3://``) every ``checkpoint_every`` steps; after a worker dies, Ray Train restarts the group
(``FailureConfig``) and the loop continues from the latest checkpoint the Train controller has
registered: at most one interval is lost (plus the controller's 2 s report-collection period).
Re-running with the same ``name`` and ``storage_path`` resumes a run too (Train V2 has no ``restore``).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from ray_ad import storage
from ray_ad.diffusion import NoiseSchedule
from ray_ad.errors import ConfigError
from ray_ad.progress import configure_logging
from ray_ad.training import ScoreNetLoop, TrainConfig

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
DRILL_GRACE_S = 3.0


@dataclass
class RayTrainSettings:
    workers: int = 1
    use_gpu: bool = False
    # CPUs reserved per worker; Ray caps each worker's torch threads at this (OMP_NUM_THREADS).
    cpus_per_worker: float = 1
    storage_path: str = "runs/ray_train"  # URI: local folder or s3://bucket/prefix
    name: str = "score-net"  # run name; the same name + storage path resumes
    checkpoint_every: int = 100  # steps between checkpoints (the most a failure can cost)
    max_failures: int = 3
    # Fault drill: kill the last worker (SIGKILL) when it reaches this step, in a run that did not
    # start from a checkpoint. Used by the tests to show recovery; never set in production.
    kill_worker_at_step: int | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")


def _rank_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def _report(loop: Any, rank: int, started: float, start_step: int, batch_size: int,
            final: bool = False, what: str = "score net") -> None:
    """Report metrics and a checkpoint from every rank (``report`` is a barrier across workers)."""
    elapsed = max(time.perf_counter() - started, 1e-9)
    metrics = {
        "step": loop.step,
        "loss": float(sum(loop.losses[-20:]) / max(1, len(loop.losses[-20:]))),
        "images_per_s": (loop.step - start_step) * batch_size / elapsed,
        "started_from_step": start_step,  # > 0 after a resume from a checkpoint
        "final": final,
    }
    if rank == 0:  # progress in the job's log (workers have no progress bar)
        log.info(f"{what} step {loop.step}/{loop.config.steps}  loss {metrics['loss']:.4f}  "
                 f"{metrics['images_per_s']:.1f} images/s")
    with tempfile.TemporaryDirectory() as folder:
        state = loop.state_dict()
        rng = {k: state.pop(k) for k in ("generator", "torch_rng", "cuda_rng") if k in state}
        torch.save(rng, os.path.join(folder, _rank_file(rank)))
        if rank == 0:
            torch.save(state, os.path.join(folder, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def resume(loop: Any, rank: int) -> ray.train.Checkpoint | None:
    """Continue ``loop`` (a ``ScoreNetLoop`` or ``FilterLoop``) from Ray Train's latest checkpoint, if any."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, STATE_FILE), weights_only=False)
            rank_file = os.path.join(folder, _rank_file(rank))
            if os.path.exists(rank_file):  # the same world size: continue this rank's random streams
                state.update(torch.load(rank_file, weights_only=False))
            else:
                state["generator"] = loop.generator.get_state()
                state["torch_rng"] = torch.get_rng_state()
        loop.load_state_dict(state)
    return checkpoint


def run_config(settings: RayTrainSettings, name: str, callbacks: list[Any]) -> ray.train.RunConfig:
    """Where a run checkpoints (local or s3://), how often it may fail, how many checkpoints it keeps."""
    fs, path = storage.arrow_filesystem(settings.storage_path)
    return ray.train.RunConfig(
        name=name, storage_path=path, storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        callbacks=callbacks or None,
    )


def fit_and_read_state(trainer: ray.train.torch.TorchTrainer) -> tuple[Any, dict[str, Any]]:
    """Run ``trainer`` to the end; (its result, the loop state of its last checkpoint)."""
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        return result, torch.load(os.path.join(folder, STATE_FILE), weights_only=False)


def score_net_worker(config: dict[str, Any]) -> None:
    """The per-worker train function (runs inside each Ray Train worker)."""
    configure_logging()  # a worker process of its own: its progress lines reach the job's log via stdout
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    train_config: TrainConfig = config["train"]
    x0: torch.Tensor = ray.get(config["x0"])
    shard = x0[rank::world]
    net: nn.Module = config["net"]
    model = ray.train.torch.prepare_model(net)  # moves to the device; DDP when world > 1
    loop = ScoreNetLoop(getattr(model, "module", model), NoiseSchedule(), train_config, device,
                        config["seed"] + rank, model=model)
    checkpoint = resume(loop, rank)
    start_step, started = loop.step, time.perf_counter()
    per_worker_batch = max(1, train_config.batch_size // world)
    kill_at = config["kill_worker_at_step"] if checkpoint is None else None

    def after_step(current: ScoreNetLoop) -> None:
        if current.step % config["checkpoint_every"] == 0:
            _report(current, rank, started, start_step, per_worker_batch * world)
        if current.step == kill_at and rank == world - 1:
            # The fault drill: this worker dies mid-interval. The Train controller collects reports
            # every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s), so wait for one collection, as the
            # seconds of real training steps would, before dying.
            time.sleep(DRILL_GRACE_S)
            os.kill(os.getpid(), signal.SIGKILL)

    loop.run(shard, batch_size=per_worker_batch, progress=False, callback=after_step, every=1)
    if loop.step % config["checkpoint_every"] != 0 or loop.step == start_step:
        _report(loop, rank, started, start_step, per_worker_batch * world, final=True)


class RayScoreNetTrainer:
    """A ``ScoreNetTrainer`` that runs the loop on Ray Train workers and returns the EMA network."""

    def __init__(self, settings: RayTrainSettings, callbacks: list[Any] | None = None) -> None:
        self.settings = settings
        self.callbacks = callbacks or []
        self.calls = 0
        self.last_result: Any = None

    def run_name(self) -> str:
        return f"{self.settings.name}-net{self.calls}"

    def __call__(
        self, net: nn.Module, x0: torch.Tensor, schedule: NoiseSchedule, config: TrainConfig,
        device: torch.device | str = "cpu", seed: int = 0, progress: bool = True,
    ) -> tuple[nn.Module, list[float]]:
        if config.steps == 0:  # the network as built (e.g. the Gaussian reference): nothing to distribute
            return net.to(device).eval(), []
        s = self.settings
        self.calls += 1
        trainer = ray.train.torch.TorchTrainer(
            score_net_worker,
            train_loop_config={
                "net": net.cpu(), "x0": ray.put(x0.detach().cpu()), "train": config, "seed": seed,
                "checkpoint_every": s.checkpoint_every, "kill_worker_at_step": s.kill_worker_at_step,
            },
            scaling_config=ray.train.ScalingConfig(num_workers=s.workers, use_gpu=s.use_gpu,
                                                   resources_per_worker={"CPU": s.cpus_per_worker}),
            run_config=run_config(s, self.run_name(), self.callbacks),
        )
        if progress:
            log.info(f"Ray Train: {s.workers} worker(s){' with GPU' if s.use_gpu else ''}, run {self.run_name()} "
                  f"under {s.storage_path}")
        result, state = fit_and_read_state(trainer)
        self.last_result = result
        net.load_state_dict(state["ema"])
        if progress:
            log.info(f"Ray Train: {state['step']} steps, loss {result.metrics['loss']:.4f}, "
                  f"{result.metrics['images_per_s']:.1f} images/s")
        return net.to(device).eval(), state["losses"].tolist()
