"""Train a product line's detector on Ray Train, evaluate it, publish it to the registry.

    python jobs/train_source.py --line tiles --method osd_irf --data s3://bucket/tiles --root s3://bucket/fleet
    python jobs/train_source.py --line tiles --select --data s3://bucket/tiles --root s3://bucket/fleet  # recipe chosen
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train_source.py ...

The bundle lands in <root>/models/<line>/<version>/ and <root>/models/<line>/CURRENT is pointed at it
only after it is complete and loads. Re-running with the same --version resumes its training.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from ray_ad.distributed.job_args import add_common, config_overrides, run, train_flags
from ray_ad.methods import METHODS
from ray_ad.progress import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--line", required=True, help="product line name (lower-case letters, digits, - and _)")
    recipe = parser.add_mutually_exclusive_group(required=True)
    recipe.add_argument("--method", choices=sorted(METHODS))
    recipe.add_argument("--select", nargs="?", const="", metavar="CANDIDATES",
                        help="train the candidate recipes of this YAML file (default configs/select.yaml) and publish "
                             "the one a label-free validation ranks first (held-out normals + pasted defects)")
    parser.add_argument("--data", required=True, action="append",
                        help="training data URI: MVTec folder, Parquet manifest, elpv:... (nagl: repeat it to train "
                             "one generalist on several source domains)")
    parser.add_argument("--config", help="YAML/JSON file with method config values")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--version", help="version name to publish (default: a new time-stamped one)")
    add_common(parser)
    args = parser.parse_args(argv)
    configure_logging()  # the library's INFO lines (stages, progress) into the job's log

    def body() -> None:
        from ray_ad.distributed.lines import train_line

        data = args.data if len(args.data) > 1 else args.data[0]
        train_line(args.line, args.method, data, args.root, config_overrides(args.config, args.set),
                   version=args.version, progress=not args.quiet, cache_dir=args.cache_dir, select=args.select,
                   **train_flags(args))

    return run(args, body)


if __name__ == "__main__":
    sys.exit(main())
