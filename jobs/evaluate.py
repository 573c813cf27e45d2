"""Evaluate a line's model from the registry on labelled data; image metrics computed over Ray Data.

    python jobs/evaluate.py --line tiles --data s3://bucket/tiles --root s3://bucket/fleet [--version V]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/evaluate.py ...

Scores every image of --split on an actor pool (as jobs/score_batch.py does), prints image AUROC, AP
and F1-max, and writes them to <root>/evaluations/<line>/<version>/<name>.json (or --json).
For pixel metrics and heatmaps use `ray-ad evaluate --model <root>/models/<line>/<version>`.
"""

import argparse
import json
import sys

import _bootstrap  # noqa: F401

from ray_ad.distributed.job_args import add_common, run
from ray_ad.progress import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--line", required=True, help="product line to evaluate")
    parser.add_argument("--version", help="version to evaluate (default: the line's CURRENT)")
    parser.add_argument("--data", required=True, help="labelled dataset URI (MVTec folder, manifest, elpv:...)")
    parser.add_argument("--split", default="test", help="split to evaluate on (default test)")
    parser.add_argument("--name", default="evaluation", help="name of the metrics file (default evaluation)")
    parser.add_argument("--json", help="metrics JSON URI (default <root>/evaluations/<line>/<version>/<name>.json)")
    parser.add_argument("--actors", type=int, default=1, help="scoring actors (default 1)")
    parser.add_argument("--gpus", action="store_true", help="one GPU per actor")
    add_common(parser, training=False)
    args = parser.parse_args(argv)
    configure_logging()  # the library's INFO lines (stages, progress) into the job's log

    def body() -> None:
        from ray_ad.distributed.batch import evaluate_line

        metrics, uri = evaluate_line(args.root, args.line, args.data, args.split, args.version, args.json,
                                     args.name, args.actors, args.gpus)
        print(json.dumps(metrics, indent=2))
        print(f"wrote {uri}")

    return run(args, body)


if __name__ == "__main__":
    sys.exit(main())
