"""Does CostFilter-AD gain from more templates at inference than it trained with? (magnetic_tile)

    .venv/bin/python benchmarks/explorations/costfilter_test_templates.py [--base patchcore] [--seed 0] \
        [--templates 4 8 16] [--name NAME]

The authors' code trains with N = 4 templates and matches against more at test (DESIGN.md §1). The
filter reads only the D smallest costs per query cell, so a filter trained at N = 4 can score with any N:
more templates give each normal cell a closer match (a lower cost), which is what M-bar and the volume
carry. One filter is trained at the defaults (N = 4, D = 16) over the named base, then the test split
is scored with each N. Reads magnetic_tile's test labels: an exploration, it sets no default.
Figures go to benchmarks/results/<name>.{json,md} after each N.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import DEFAULT_MAGNETIC_TILE, RESULTS, machine, save, splits  # noqa: E402
from costfilter import base_config  # noqa: E402

from ray_ad.evaluation import compute_metrics, run_detector  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.progress import configure_logging  # noqa: E402

KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--base", default="patchcore", choices=["patchcore", "gaussian"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--templates", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--name", default="costfilter_test_templates")
    args = parser.parse_args()
    configure_logging()
    train, calibration, test = splits(args.data)
    method, values = base_config(args.base)
    detector = build_detector("costfilter", method_config(
        "costfilter", {"base": {"method": method, "config": values}, "seed": args.seed}))
    detector.fit(train, calibration, Runtime(cache_dir=str(RESULTS / "cache")))
    base = compute_metrics(run_detector(detector.base, test, progress=False))
    report = {"machine": machine(), "base_name": args.base, "seed": args.seed, "base": base, "templates": {}}
    lines = [f"CostFilter-AD over {args.base}, trained at N = 4 (seed {args.seed}), scored on magnetic_tile's test "
             "split with N templates", "", "| N at inference | " + " | ".join(KEYS) + " | seconds |",
             "|---|" + "---:|" * (len(KEYS) + 1),
             "| base alone | " + " | ".join(f"{base[k]:.4f}" for k in KEYS) + " | |"]
    for n in args.templates:
        detector.config.templates = n
        start = time.perf_counter()
        figures = compute_metrics(run_detector(detector, test, progress=False))
        report["templates"][n] = {**figures, "seconds": time.perf_counter() - start}
        lines.append(f"| {n} | " + " | ".join(f"{figures[k]:.4f}" for k in KEYS)
                     + f" | {report['templates'][n]['seconds']:.0f} |")
        print(lines[-1], flush=True)
        save(args.name, report, "\n".join(lines))


if __name__ == "__main__":
    main()
