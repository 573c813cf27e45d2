"""How the target memory turns cell matches into scores, on magnetic_tile (the development set that is no
elpv adaptation target): the distance (L2 as PatchCore, or the cosine in the memory's per-channel standard
units, as NAGL's normal branch scores) and the image score (the largest cell, or the mean of the top
``fraction`` of cells).

    .venv/bin/python benchmarks/explorations/target_memory_scoring.py [--memory drop|all]

The landing is that of ``target_memory_contamination.py``: 826 landed images (18% defective) to fit on,
the other half of the test images scored. One memory is fitted (the default's, or every image with
``--memory all``); every variant scores the same cells against the same bank. Image AUROC and F1-max.
Figures go to benchmarks/results/target_memory_scoring[_all].{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import DEFAULT_MAGNETIC_TILE, contaminated_landing, machine, save  # noqa: E402

from ray_ad.adaptation.gate import GateConfig, split_landing  # noqa: E402
from ray_ad.adaptation.mutual import cells, nearest_distance  # noqa: E402
from ray_ad.data import Sample, load_samples  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.methods.nagl.scoring import top_mean  # noqa: E402
from ray_ad.metrics import auroc, f1_max  # noqa: E402


def standardised_cosine_distance(queries: torch.Tensor, bank: torch.Tensor, mean: torch.Tensor,
                                 spread: torch.Tensor) -> torch.Tensor:
    """1 - cos to the nearest bank cell, both in the bank's per-channel standard units."""
    b = F.normalize((bank - mean) / spread, dim=-1)
    out = []
    for chunk in queries.split(2048):
        q = F.normalize((chunk - mean) / spread, dim=-1)
        out.append(1 - (q @ b.T).amax(1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--memory", choices=("drop", "all"), default="drop")
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    args = parser.parse_args()
    samples = load_samples(args.data)
    landed, scored = contaminated_landing(samples)
    fit_part = split_landing([s.path for s in landed], GateConfig(max_holdout=400))[0]
    overrides = {} if args.memory == "drop" else {"drop_image_z": 1e9}
    memory = build_detector("target_memory", method_config("target_memory", overrides))
    runtime = Runtime(False, args.cache_dir)
    memory.fit([Sample(p, -1) for p in fit_part], [], runtime)
    bank = memory.bank.float()
    queries = cells(memory.extract_features(scored, runtime, desc="scored images")).float()  # [N, L, C]
    labels = np.array([s.label for s in scored])
    n, length, channels = queries.shape
    tick = time.perf_counter()
    l2 = nearest_distance(queries.reshape(-1, channels), bank).view(n, length)
    mean, spread = bank.mean(0), bank.std(0) + 1e-6
    cosine = standardised_cosine_distance(queries.reshape(-1, channels), bank, mean, spread).view(n, length)
    print(f"distances in {time.perf_counter() - tick:.0f} s", flush=True)
    rows = {}
    for distance, cell_scores in (("L2", l2), ("standardised cosine", cosine)):
        for image_score, fraction in (("largest cell", None), ("top 1% mean", 0.01), ("top 5% mean", 0.05)):
            scores = cell_scores.amax(1) if fraction is None else top_mean(cell_scores, fraction)
            rows[f"{distance}, {image_score}"] = {"image_auroc": auroc(scores.numpy(), labels),
                                                  "image_f1max": f1_max(scores.numpy(), labels)}
            print(distance, image_score, rows[f"{distance}, {image_score}"], flush=True)
    lines = [f"Target memory ({args.memory}: {len(bank)} bank cells) on magnetic_tile's contaminated landing, "
             f"{n} scored images", "", "| distance, image score | image AUROC | F1-max |", "|---|---:|---:|"]
    lines += [f"| {name} | {row['image_auroc']:.3f} | {row['image_f1max']:.3f} |" for name, row in rows.items()]
    suffix = "" if args.memory == "drop" else "_all"
    save(f"target_memory_scoring{suffix}", {"machine": machine(), "memory": args.memory, "rows": rows},
         "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
