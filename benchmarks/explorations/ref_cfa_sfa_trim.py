"""SFA with a trimmed target covariance, on an adapted REF+CFA line: does leaving outlying target
cells out of the whiten-recolor moments help when the unlabeled target holds anomalies?

    .venv/bin/python benchmarks/explorations/ref_cfa_sfa_trim.py [--root runs/fleet] [--line elpv-poly]
        [--target elpv:poly] [--eval elpv:poly] [--trims 0 0.05 0.1 0.2 0.3]

Takes the line's current adapted bundle (the README's main job publishes ``elpv-poly``: mono -> poly,
T1 from scratch), refits only the alignment (closed form; the target fields are computed once) for
each ``cfa.sfa_trim`` and without SFA, and evaluates on the target's labelled test split (labels are
read only here). Figures go to benchmarks/results/ref_cfa_sfa_trim.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

# benchmarks/ (the shared _common and the main benchmarks) and this folder (the other explorations)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import RESULTS, save  # noqa: E402

from ray_ad import registry  # noqa: E402
from ray_ad.data import load_samples  # noqa: E402
from ray_ad.evaluation import compute_metrics, run_detector  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.pipeline import target_image_uris  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/fleet")
    parser.add_argument("--line", default="elpv-poly")
    parser.add_argument("--target", default="elpv:poly", help="the unlabeled target images the line adapted to")
    parser.add_argument("--eval", default="elpv:poly", help="labelled data; its test split is scored")
    parser.add_argument("--trims", nargs="+", type=float, default=[0.0, 0.05, 0.1, 0.2, 0.3])
    args = parser.parse_args()
    detector, version = registry.load_current(args.root, args.line, device="auto")
    if not getattr(detector, "adapted", False):
        sys.exit(f"{args.line} ({version}) is not an adapted REF+CFA model")
    images, test = target_image_uris(args.target), load_samples(args.eval, "test")
    variants = {"w/o SFA": {"second_order": False}, **{f"SFA, trim {t:g}": {"sfa_trim": t} for t in args.trims}}
    cache: dict = {}
    rows = {}
    for label, change in variants.items():
        settings = {"second_order": True, "sfa_trim": 0.0, **change}
        detector.config.cfa = dataclasses.replace(detector.config.cfa, **settings)
        tick = time.perf_counter()
        detector.fit_alignment(images, Runtime(progress=False, cache_dir=str(RESULTS / "cache")), cache=cache)
        metrics = compute_metrics(run_detector(detector, test, progress=False))
        rows[label] = {"image_auroc": metrics["image_auroc"], "image_ap": metrics["image_ap"],
                       "seconds": time.perf_counter() - tick}
        print(f"{label}: image AUROC {metrics['image_auroc']:.3f}, AP {metrics['image_ap']:.3f}", flush=True)
    table = "\n".join([f"{args.line} ({version}), target {args.target}, evaluated on {args.eval} test:", "",
                       "| SFA variant | image AUROC | image AP |", "|---|---:|---:|",
                       *(f"| {k} | {v['image_auroc']:.3f} | {v['image_ap']:.3f} |" for k, v in rows.items())])
    print(table)
    save("ref_cfa_sfa_trim", {"line": args.line, "version": version, "args": vars(args), "rows": rows}, table)


if __name__ == "__main__":
    main()
