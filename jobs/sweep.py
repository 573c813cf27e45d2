"""Sweep a method's config with Ray Tune (ASHA early stopping, random or Optuna search).

    python jobs/sweep.py --method osd_irf --data elpv:mono --root runs/fleet \
        --space configs/sweeps/osd_irf_t.yaml --samples 8
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/sweep.py ...

Trials report validation image AUROC from held-out non-test images (never the test split). Results
go to <root>/sweeps/<name>/: Tune's trial folders (`tensorboard --logdir <root>/sweeps/<name>/tune`),
summary.csv, summary.md, sweep.png and best_config.yaml (`ray-ad train --config best_config.yaml`).
See ray_ad/tuning.py for the space file format.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from ray_ad.distributed.job_args import add_common, config_overrides, run
from ray_ad.methods import METHODS
from ray_ad.progress import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--data", required=True, help="dataset URI; only its non-test images are used "
                                                      "(nagl: the source domain, every labelled image)")
    parser.add_argument("--validation-data", help="nagl: a held-out domain to validate on (its non-test normals "
                                                  "and synthetic anomalies with masks; never its test split)")
    parser.add_argument("--space", required=True, help="search space file (YAML/JSON) URI")
    parser.add_argument("--samples", type=int, required=True, help="number of trials")
    parser.add_argument("--name", default="sweep", help="sweep name: results under <root>/sweeps/<name>/")
    parser.add_argument("--config", help="base config file the swept values are applied to")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a base config value")
    parser.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs per trial (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per trial (default 0)")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: as resources allow)")
    parser.add_argument("--seed", type=int, default=0, help="search and validation-set seed (default 0)")
    add_common(parser, training=False)
    args = parser.parse_args(argv)
    configure_logging()  # the library's INFO lines (stages, progress) into the job's log
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")

    def body() -> None:
        from ray_ad.distributed.sweep import run_sweep
        from ray_ad.tuning import load_space

        run_sweep(args.method, args.data, args.root, load_space(args.space), args.samples,
                  config_overrides(args.config, args.set), args.name, args.cpus_per_trial, args.gpus_per_trial,
                  args.max_concurrent, args.cache_dir, args.seed, args.validation_data)

    return run(args, body)


if __name__ == "__main__":
    sys.exit(main())
