"""Does a line's label-free recipe selection pick well? (issue 22)

    .venv/bin/python benchmarks/select_recipe.py [--data magnetic_tile elpv:mono] [--candidates FILE]
        [--name select_recipe]

For each dataset, ``ray_ad.selection.select_detector`` fits every candidate of the candidates file
(default ``configs/select.yaml``) on the training normals less a held-out 20% and ranks them by
pasted-vs-untouched AUROC on that 20%, reading no test image. Afterwards, and only here, every
candidate is scored on the test split: the table gives each one's validation and test figures, the
pick, the best candidate by test image AUROC and the pick's distance to it (the bar: within 1 point).
Spearman of validation against test AUROC across candidates says how well the proxy ranks.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MAGNETIC_TILE, machine, save  # noqa: E402

from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.pipeline import evaluate_split  # noqa: E402
from ray_ad.selection import load_candidates, select_detector  # noqa: E402


def run_dataset(data: str, candidates_uri: str | None, cache_dir: str) -> dict:
    candidates, fraction = load_candidates(candidates_uri)
    start = time.perf_counter()
    selection = select_detector(candidates, data, holdout_fraction=fraction,
                                runtime=Runtime(progress=sys.stderr.isatty(), cache_dir=cache_dir))
    select_seconds = time.perf_counter() - start
    rows = {}
    for name, detector in selection.detectors.items():  # the test split, after the choice
        metrics = evaluate_split(detector, data, "test", progress=False)[1]
        rows[name] = {**selection.metrics["selection"]["candidates"][name],
                      "test_image_auroc": metrics["image_auroc"], "test_pixel_auroc": metrics.get("pixel_auroc")}
        print(f"[{data}] {name}: validation {rows[name]['validation_auroc']:.4f}, test image AUROC "
              f"{metrics['image_auroc']:.4f}", flush=True)
    best = max(rows, key=lambda name: rows[name]["test_image_auroc"])
    pick = selection.winner
    names = list(rows)
    rho = spearmanr([rows[n]["validation_auroc"] for n in names], [rows[n]["test_image_auroc"] for n in names])
    return {"data": data, "rows": rows, "pick": pick, "best": best, "select_seconds": select_seconds,
            "pick_minus_best": rows[pick]["test_image_auroc"] - rows[best]["test_image_auroc"],
            "spearman": float(rho.statistic), "held_out_images": selection.metrics["selection"]["held_out_images"]}


def table(results: list[dict]) -> str:
    lines = []
    for result in results:
        lines += [f"### {result['data']} ({result['held_out_images']} held-out normals; selection took "
                  f"{result['select_seconds']:.0f} s)", "",
                  "| candidate | method | validation AUROC (pasted vs untouched) | test image AUROC "
                  "| test pixel AUROC |",
                  "|---|---|---:|---:|---:|"]
        for name, row in result["rows"].items():
            mark = " **(pick)**" if name == result["pick"] else ""
            pixel = "-" if row["test_pixel_auroc"] is None else f"{row['test_pixel_auroc']:.4f}"
            lines.append(f"| {name}{mark} | {row['method']} | {row['validation_auroc']:.4f} | "
                         f"{row['test_image_auroc']:.4f} | {pixel} |")
        lines += ["", f"pick {result['pick']}, best by test labels {result['best']}: pick - best "
                      f"{100 * result['pick_minus_best']:+.1f} points; Spearman validation vs test "
                      f"{result['spearman']:.2f}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=[str(DEFAULT_MAGNETIC_TILE), "elpv:mono"])
    parser.add_argument("--candidates", help="candidates file (default configs/select.yaml)")
    parser.add_argument("--cache-dir", default="runs/cache")
    parser.add_argument("--name", default="select_recipe")
    args = parser.parse_args(argv)
    results = []
    for data in args.data:
        results.append(run_dataset(data, args.candidates, args.cache_dir))
        save(args.name, {"results": results, "machine": machine()}, table(results))
    print(table(results))
    print("pick within 1 point of the best everywhere:", all(r["pick_minus_best"] > -0.01 for r in results))
    return 0 if np.isfinite([r["pick_minus_best"] for r in results]).all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
