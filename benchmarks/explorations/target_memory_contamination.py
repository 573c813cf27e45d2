"""How the target memory copes with defects among its landed images: the variants its defaults were
chosen from, on magnetic_tile (a development set that is no elpv adaptation target).

    .venv/bin/python benchmarks/explorations/target_memory_contamination.py [--variants NAME ...]

Landed: the 761 train normals and a hashed half of the test images (defects included), of which the
gate's held-out share is set aside as in ``jobs/adapt_target.py``: 826 images to fit on, 18% of them
defective. Scored: the other half of the test images. Each variant is a set of ``memory.*`` overrides;
a clean row fits the same memory on the train normals only, for scale. About 2 CPU-minutes per variant
on 2 cores (the mutual-scoring variant about 6). Figures go to
benchmarks/results/target_memory_contamination.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# benchmarks/ (the shared _common and the main benchmarks) and this folder (the other explorations)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import DEFAULT_MAGNETIC_TILE, contaminated_landing, machine, save  # noqa: E402

from ray_ad.adaptation.gate import GateConfig, split_landing  # noqa: E402
from ray_ad.data import Sample, load_samples  # noqa: E402
from ray_ad.evaluation import run_detector  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.metrics import auroc  # noqa: E402

VARIANTS = {
    "no drop": {"drop_image_z": 1e9},
    "drop images at 5 sigma": {"drop_image_z": 5.0},
    "drop images at 3 sigma (default)": {},
    "drop images at 5 sigma + cells at 10 sigma": {"drop_image_z": 5.0, "drop_cell_z": 10.0},
    "drop images at 5 sigma + cells at 6 sigma": {"drop_image_z": 5.0, "drop_cell_z": 6.0},
    "mutual scoring of new images against 128 landed images": {"scoring": "mutual"},
    "clean: train normals only (default)": {},
    "clean: train normals only, cells dropped at 3 sigma": {"drop_cell_z": 3.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    args = parser.parse_args()
    samples = load_samples(args.data)
    landed, scored = contaminated_landing(samples)
    fit_part = split_landing([s.path for s in landed], GateConfig(max_holdout=400))[0]
    defective = {s.path for s in landed if s.label == 1}
    clean = [s.path for s in samples if s.split == "train"]
    rows = {}
    for name in args.variants:
        tick = time.perf_counter()
        paths = clean if name.startswith("clean") else fit_part
        memory = build_detector("target_memory", method_config("target_memory", VARIANTS[name]))
        info = memory.fit([Sample(p, -1) for p in paths], [], Runtime(False, args.cache_dir))
        results = run_detector(memory, scored, progress=False)
        rows[name] = {"landed": len(paths), "landed_defective": len(set(paths) & defective),
                      "dropped_images": info["dropped_images"],
                      "dropped_defective": len(set(info["dropped_paths"]) & defective),
                      "dropped_cells": info["dropped_cells"], "image_auroc": auroc(results.scores, results.labels),
                      "seconds": time.perf_counter() - tick}
        print(name, rows[name], flush=True)
    lines = ["| variant | landed (defective) | dropped images (defective) | dropped cells | image AUROC |",
             "|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['landed']} ({row['landed_defective']}) | {row['dropped_images']} "
                     f"({row['dropped_defective']}) | {row['dropped_cells']} | {row['image_auroc']:.3f} |")
    save("target_memory_contamination", {"machine": machine(), "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
