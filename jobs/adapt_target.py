"""Adapt a source line's current model to a new, unlabeled target domain; publish it only if it is better.

    python jobs/adapt_target.py --line poly --source-line mono --target elpv:poly --root runs/fleet
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/adapt_target.py ...

Only the target's image URIs are read (a dataset or any folder of images, e.g. a landing batch). A
share of them is held out; the candidates are built on the rest: the source model as is, a target
memory of the landed images (any source method) and, for ref_cfa sources, REF+CFA. The promotion
gate ranks them on the held-out images with small synthetic defects pasted in (or on the batch's
_acceptance/good and _acceptance/defect images when a quality engineer provided some), and the winner,
with a threshold fitted to the unlabeled held-out scores, is published as a new version of --line only
if it beats the version --line serves by the gate margin (gate.margin; --force publishes anyway).
Otherwise the job records "decision": "kept" and publishes nothing.

The job writes <root>/jobs/<job_id>.json (running -> succeeded | failed; candidates, gate scores,
decision); the id depends on the new line, the source model and the target only, so submitting the
same target again does nothing. With --eval-data, every candidate is evaluated on that labelled data
after the decision, and the table is printed.
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from ray_ad.distributed.job_args import add_common, run, train_flags
from ray_ad.progress import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--line", required=True, help="the new line to publish the adapted model as")
    parser.add_argument("--source-line", required=True,
                        help="line whose CURRENT model is adapted (osd_irf, gaussian, patchcore, ref_cfa or "
                             "target_memory)")
    parser.add_argument("--target", required=True, help="target URI: dataset or folder of images (labels unused)")
    parser.add_argument("--target-split", help="use only this split of a target dataset (default: every image)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="candidates=[...], gate.* (holdout_fraction, margin, false_alarm_rate, seed), "
                             "memory.* (the target memory), gaussian.* (the target Gaussian), or REF+CFA's cfa.*, "
                             "train.*, target_init")
    parser.add_argument("--force", action="store_true",
                        help="publish the gate's winner even when it does not beat the served version")
    parser.add_argument("--eval-data", help="labelled target data to compare before/after on (e.g. elpv:poly)")
    parser.add_argument("--eval-split", default="test", help="split of --eval-data (default test)")
    add_common(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()  # the library's INFO lines (stages, progress) into the job's log

    def body() -> None:
        from ray_ad.distributed.lines import adapt_line

        status = adapt_line(args.line, args.source_line, args.target, args.root, args.target_split, args.set,
                            args.eval_data, args.eval_split, progress=not args.quiet, cache_dir=args.cache_dir,
                            force=args.force, **train_flags(args))
        print(f"job {status['job_id']}: {status['state']}, {status.get('decision')} "
              f"{status['new_line']}/{status['version'] or status.get('served_version')}")

    return run(args, body)


if __name__ == "__main__":
    sys.exit(main())
