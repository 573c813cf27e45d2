"""Train one CostFilter-AD fleet filter for several product lines on Ray Train and publish every line.

    python jobs/train_fleet.py --line tiles=s3://bucket/tiles --line cells=elpv:mono --root s3://bucket/fleet \
        [--set base.method=gaussian ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train_fleet.py ...

Each line gets its own base detector (``base.method``, trained on its data), its own templates and
threshold, and a copy of the one filter trained on all the lines' normal images (the paper's unified
model, with the class-aware adaptor). Every line lands in <root>/models/<line>/<version>/ under the
same version, published only after all of them are trained.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from ray_ad.distributed.job_args import add_common, config_overrides, run, train_flags
from ray_ad.progress import configure_logging


def parse_line(value: str) -> tuple[str, str]:
    name, sep, data = value.partition("=")
    if not sep or not name or not data:
        raise argparse.ArgumentTypeError(f"--line takes NAME=DATA_URI, got {value!r}")
    return name, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--line", action="append", type=parse_line, required=True, metavar="NAME=DATA",
                        help="a product line and its training data URI (at least two)")
    parser.add_argument("--config", help="YAML/JSON file with CostFilter-AD config values (shared by the lines)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--version", help="version name to publish (default: a new time-stamped one)")
    add_common(parser)
    args = parser.parse_args(argv)
    lines = dict(args.line)
    if len(lines) < 2 or len(lines) != len(args.line):
        parser.error(f"--line: give at least two lines with distinct names, got {[name for name, _ in args.line]}")
    configure_logging()

    def body() -> None:
        from ray_ad.distributed.lines import train_fleet_lines

        train_fleet_lines(lines, args.root, config_overrides(args.config, args.set), version=args.version,
                          progress=not args.quiet, cache_dir=args.cache_dir, **train_flags(args))

    return run(args, body)


if __name__ == "__main__":
    sys.exit(main())
