"""What each OSD-IRF recipe change buys on magnetic_tile: one trained network per variant.

    .venv/bin/python benchmarks/osd_irf_recipe.py [--variants benchmarks/configs/osd_irf_recipe.yaml]
                                                  [--only NAME ...] [--t 100 250 500]

Each variant is a list of ``key=value`` overrides on top of the variant file's ``base`` config. Every
trained network is scored at each timestep in ``--t`` (scoring is one call, so this is cheap), and each
result row is appended to ``benchmarks/results/osd_irf_recipe.jsonl`` as soon as it exists, so a long run
that is stopped keeps what it measured. The table is printed and saved at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MAGNETIC_TILE, RESULTS, save, splits  # noqa: E402

from ray_ad.config import apply_overrides  # noqa: E402
from ray_ad.evaluation import compute_metrics, run_detector  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.report import format_table  # noqa: E402

KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1max", "fit_seconds", "model_seconds_per_image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--variants", default=str(Path(__file__).resolve().parent / "configs" / "osd_irf_recipe.yaml"))
    parser.add_argument("--only", nargs="*", help="run only these variant names")
    parser.add_argument("--t", nargs="*", type=int, default=[100, 250, 500])
    parser.add_argument("--cache-dir", default=str(RESULTS / "cache"))
    args = parser.parse_args()

    spec = yaml.safe_load(Path(args.variants).read_text())
    base = spec.get("base", {})
    train, calibration, test = splits(args.data)
    log = RESULTS / "osd_irf_recipe.jsonl"
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = {}
    for variant in spec["variants"]:
        name = variant["name"]
        if args.only and name not in args.only:
            continue
        config = method_config("osd_irf", apply_overrides(base, variant.get("set", [])))
        torch.manual_seed(config.seed)
        detector = build_detector("osd_irf", config)
        start = time.perf_counter()
        detector.fit(train, calibration, Runtime(cache_dir=args.cache_dir))
        fit_seconds = time.perf_counter() - start
        for t in args.t:
            detector.retarget(t, train, calibration, Runtime(cache_dir=args.cache_dir))
            metrics = compute_metrics(run_detector(detector, test))
            row = {"variant": name, "t": t, "set": variant.get("set", []), "fit_seconds": fit_seconds, **metrics}
            rows[f"{name} @t={t}"] = row
            with log.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(format_table({f"{name} @t={t}": row}, KEYS), flush=True)
    table = format_table(rows, KEYS)
    print(table)
    save("osd_irf_recipe", {"base": base, "rows": rows}, "```\n" + table + "\n```")


if __name__ == "__main__":
    main()
