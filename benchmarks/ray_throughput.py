"""Throughput on Ray: score-net training with 1 and 2 Ray Train workers, backbone features with 1 and 2
Ray Data actors, against the same work done in one local process.

    .venv/bin/python benchmarks/ray_throughput.py [--steps 150] [--images 96] [--num-cpus N]

Training: the score network of configs/ref_cfa_cpu.yaml (DiT h128 d4) on elpv:mono backbone features
(16x16 grid), global batch 32, with 1 worker x 1 CPU, 2 workers x 1 CPU and 1 worker x 2 CPUs (Ray
caps a worker's torch threads at its CPUs); images/s counted by the workers from their first to
their last step (start-up excluded) and, separately, the wall time of the whole ``fit``.
Features: tf_efficientnet_lite0 at 256 px over ``--images`` elpv images, decode included, wall time
of the whole pass. Figures go to benchmarks/results/ray_throughput.{json,md}. On a GPU machine
(``--gpu``) each worker/actor takes one GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, save  # noqa: E402
from ray_ad.backbones import FeatureExtractor  # noqa: E402
from ray_ad.config import load_file  # noqa: E402
from ray_ad.data import load_samples  # noqa: E402
from ray_ad.diffusion import NoiseSchedule, build_score_net  # noqa: E402
from ray_ad.features import extract_features  # noqa: E402
from ray_ad.methods import method_config  # noqa: E402
from ray_ad.training import ScoreNetLoop, TrainConfig  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ref_cfa_cpu.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per run (default 150)")
    parser.add_argument("--images", type=int, default=96, help="images for feature extraction (default 96)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker / actor")
    args = parser.parse_args()

    from ray_ad.distributed.batch import RayFeatureBackend
    from ray_ad.distributed.runtime import cluster_summary, init_ray
    from ray_ad.distributed.train import RayScoreNetTrainer, RayTrainSettings

    config = method_config("ref_cfa", load_file(str(CONFIG)))
    samples = load_samples("elpv:mono")[: args.images]
    extractor = FeatureExtractor(config.backbone)
    init_ray(num_cpus=args.num_cpus)
    print(f"Ray: {cluster_summary()}")
    import ray

    cpus_available = int(ray.cluster_resources().get("CPU", 1))
    rows: dict[str, dict[str, float]] = {}

    # ---------------------------------------------------------------- features
    threads = torch.get_num_threads()
    start = time.perf_counter()
    features = extract_features(extractor, samples, progress=False)
    seconds = time.perf_counter() - start
    rows[f"features, local process ({threads} threads)"] = {"images_per_s": len(samples) / seconds}
    for actors in (1, 2):
        backend = RayFeatureBackend(actors=actors, use_gpu=args.gpu)
        start = time.perf_counter()
        pooled = backend(config.backbone, samples, 1, False)
        seconds = time.perf_counter() - start
        rows[f"features, {actors} Ray Data actor(s) x 1 CPU"] = {"images_per_s": len(samples) / seconds}
        torch.testing.assert_close(pooled, features, rtol=1e-3, atol=1e-3)

    # ---------------------------------------------------------------- training
    x0 = (features - features.mean((0, 2, 3), keepdim=True)) / features.std((0, 2, 3), keepdim=True)
    train = TrainConfig(steps=args.steps, batch_size=config.train.batch_size, warmup_steps=10)

    def fresh_net() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_score_net(config.score_net, x0.shape[1], x0.shape[-1])

    loop = ScoreNetLoop(fresh_net(), NoiseSchedule(), train, "cuda" if args.gpu else "cpu", seed=0)
    start = time.perf_counter()
    loop.run(x0, progress=False)
    local_s = time.perf_counter() - start
    rows[f"training, local process ({threads} threads)"] = {
        "images_per_s": args.steps * train.batch_size / local_s, "wall_s": local_s,
    }
    with tempfile.TemporaryDirectory() as folder:
        for workers, cpus in ((1, 1), (2, 1), (1, 2)):
            if workers * cpus > cpus_available:
                continue
            trainer = RayScoreNetTrainer(RayTrainSettings(
                workers=workers, use_gpu=args.gpu, cpus_per_worker=cpus, storage_path=folder,
                name=f"bench{workers}x{cpus}", checkpoint_every=args.steps,
            ))
            start = time.perf_counter()
            trainer(fresh_net(), x0, NoiseSchedule(), train, seed=0, progress=False)
            wall = time.perf_counter() - start
            rows[f"training, {workers} Ray Train worker(s) x {cpus} CPU"] = {
                "images_per_s": trainer.last_result.metrics["images_per_s"], "wall_s": wall,
            }

    lines = ["| run | images/s | wall s (incl. start-up) |", "|---|---:|---:|"]
    for name, values in rows.items():
        wall = f"{values['wall_s']:.1f}" if "wall_s" in values else "-"
        lines.append(f"| {name} | {values['images_per_s']:.1f} | {wall} |")
    table = "\n".join(lines)
    header = (f"Ray throughput ({machine()['cpu_count']} CPU, {'GPU' if args.gpu else 'CPU only'}): "
              f"{args.steps} steps x batch {train.batch_size}, {len(samples)} images\n\n")
    print(header + table)
    save("ray_throughput" + ("_gpu" if args.gpu else ""), {"machine": machine(), "args": vars(args), "rows": rows},
         header + table)


if __name__ == "__main__":
    main()
