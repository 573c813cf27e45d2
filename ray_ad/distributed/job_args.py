"""Flags shared by the ``jobs/`` entry points (each job adds its own)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ray_ad.config import apply_overrides, load_file


def add_common(parser: argparse.ArgumentParser, training: bool = True) -> None:
    parser.add_argument("--root", required=True,
                        help="storage root URI (local folder or s3://bucket/prefix) holding models/, jobs/, ray_train/")
    parser.add_argument("--address", help="Ray address to join (default: RAY_ADDRESS, else start a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray started by this job (default: all)")
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    parser.add_argument("--cache-dir", help="local folder to cache backbone features in")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    if training:
        parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
        parser.add_argument("--gpus", action="store_true", help="one GPU per Ray Train worker")
        parser.add_argument("--cpus-per-worker", type=float, default=1,
                            help="CPUs (and torch threads) per Ray Train worker (default 1)")
        parser.add_argument("--checkpoint-every", type=int, default=100,
                            help="score-net steps between Ray Train checkpoints (default 100)")
        parser.add_argument("--max-failures", type=int, default=3,
                            help="worker failures Ray Train recovers from (default 3)")
        parser.add_argument("--feature-actors", type=int, default=0,
                            help="Ray Data actors for backbone features (default 0: in the job's driver)")


def config_overrides(config_file: str | None, sets: list[str] | None) -> dict[str, Any]:
    overrides = load_file(config_file) if config_file else {}
    return apply_overrides(overrides, sets or [])


def train_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {"workers": args.workers, "use_gpu": args.gpus, "cpus_per_worker": args.cpus_per_worker,
            "checkpoint_every": args.checkpoint_every,
            "max_failures": args.max_failures, "feature_actors": args.feature_actors}


def setup(args: argparse.Namespace) -> None:
    """S3 endpoint first (it must reach the Ray workers' environment), then Ray."""
    from ray_ad import storage
    from ray_ad.distributed.runtime import cluster_summary, init_ray

    if args.s3_endpoint:
        storage.configure_s3(endpoint_url=args.s3_endpoint)
    init_ray(args.address, args.num_cpus)
    print(f"Ray: {cluster_summary()}")


def run(args: argparse.Namespace, body: Callable[[], None]) -> int:
    """S3 + Ray setup, then ``body``; an input error ends as one ``error: ...`` line and exit code 2."""
    from ray_ad.errors import RayADError

    try:
        setup(args)
        body()
    except RayADError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
