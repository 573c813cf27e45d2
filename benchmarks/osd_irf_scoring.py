"""Re-score a trained OSD-IRF bundle under each scoring choice, without retraining.

    .venv/bin/python benchmarks/osd_irf_scoring.py --model benchmarks/results/runs/osd_irf
                                                   [--t 150 250 500]

For every timestep t, IRF Gaussian (standard N(0, I) or fitted) and image-score terms of Eq. 9, the
network is refitted/recalibrated on the training split (cheap: one call per image) and evaluated on the
test split. Prints and saves ``benchmarks/results/osd_irf_scoring.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MAGNETIC_TILE, RESULTS, save, splits  # noqa: E402

from ray_ad.bundle import load_bundle  # noqa: E402
from ray_ad.evaluation import compute_metrics, run_detector  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.report import format_table  # noqa: E402

KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(RESULTS / "runs" / "osd_irf"))
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--t", nargs="*", type=int, default=[150, 250, 500])
    parser.add_argument("--cache-dir", default=str(RESULTS / "cache"))
    args = parser.parse_args()
    detector = load_bundle(args.model)
    train, calibration, test = splits(args.data)
    rows = {}
    for t, gaussian in itertools.product(args.t, ("standard", "fitted")):
        detector.config.irf_gaussian = gaussian
        detector.retarget(t, train, calibration, Runtime(cache_dir=args.cache_dir))
        for terms in ("diff+nll", "diff", "nll"):
            detector.config.score_terms = terms
            name = f"t={t} {gaussian} {terms}"
            rows[name] = compute_metrics(run_detector(detector, test, progress=False))
            print(format_table({name: rows[name]}, KEYS), flush=True)
        detector.config.score_terms = "diff+nll"
    table = format_table(rows, KEYS)
    print(table)
    save("osd_irf_scoring", {"model": args.model, "rows": rows}, "```\n" + table + "\n```")


if __name__ == "__main__":
    main()
