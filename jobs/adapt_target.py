"""Adapt a source line's current REF+CFA model to a new, unlabeled target domain; publish a new line.

    python jobs/adapt_target.py --line poly --source-line mono --target elpv:poly --root runs/fleet
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/adapt_target.py ...

Only the target's image URIs are read (a dataset or any folder of images, e.g. a landing batch). The
job writes <root>/jobs/<job_id>.json (running -> succeeded | failed with its error); the id depends on
the new line, the source model and the target only, so submitting the same target again does nothing.
With --eval-data, the source model and the adapted one are evaluated on that labelled data, and the
before/after table is printed.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from ray_ad.distributed.job_args import add_common, run, train_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--line", required=True, help="the new line to publish the adapted model as")
    parser.add_argument("--source-line", required=True, help="line whose CURRENT ref_cfa model is adapted")
    parser.add_argument("--target", required=True, help="target URI: dataset or folder of images (labels unused)")
    parser.add_argument("--target-split", help="use only this split of a target dataset (default: every image)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override cfa.*, train.* or target_init (e.g. train.steps=300)")
    parser.add_argument("--eval-data", help="labelled target data to compare before/after on (e.g. elpv:poly)")
    parser.add_argument("--eval-split", default="test", help="split of --eval-data (default test)")
    add_common(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        from ray_ad.distributed.lines import adapt_line

        status = adapt_line(args.line, args.source_line, args.target, args.root, args.target_split, args.set,
                            args.eval_data, args.eval_split, progress=not args.quiet, cache_dir=args.cache_dir,
                            **train_flags(args))
        print(f"job {status['job_id']}: {status['state']}, {status['new_line']}/{status['version']}")

    return run(args, body)


if __name__ == "__main__":
    sys.exit(main())
