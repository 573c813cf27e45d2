"""Which cells should the target memory compare? Neighbourhood sizes on magnetic_tile (the development set
that is no elpv adaptation target).

    .venv/bin/python benchmarks/explorations/target_memory_cells.py [--pools 3 1 5 1,3,5] [--name NAME]

The memory's cells average each backbone cell over a 3 x 3 neighbourhood (``local_pool: 3``). MuSc (Li
et al., ICLR 2024) aggregates at several degrees (1, 3, 5): a thin crack is a one-cell structure that a
3 x 3 average dilutes, a large stain one that a single cell cannot see. ``local_pool`` takes several
sizes (``1,3,5``: the cells of each size side by side, so the L2 distance sums the sizes' distances).

Landing and split as in ``target_memory_kth_image.py``; per cell setting: the memory of every landed
image of the fit part (the ``target_memory_all`` candidate; no drop, so no referee is involved) and,
for scale, the landed normals alone (reads labels), both scored by the second distinct landed image
(``match_images=2``, the default). Image AUROC and F1-max on the scored half.
Figures go to benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import DEFAULT_MAGNETIC_TILE, contaminated_landing, machine, save  # noqa: E402
from target_memory_kth_image import image_scores, kept_memory  # noqa: E402

from ray_ad.adaptation.gate import GateConfig, split_landing  # noqa: E402
from ray_ad.adaptation.mutual import cells  # noqa: E402
from ray_ad.data import Sample, load_samples  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.metrics import auroc, f1_max  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--pools", nargs="+", default=["3", "1", "5", "1,3,5"],
                        help="local_pool settings; several sizes comma-separated")
    parser.add_argument("--k", type=int, default=2, help="match_images")
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    parser.add_argument("--name", default="target_memory_cells")
    args = parser.parse_args()
    landed, scored = contaminated_landing(load_samples(args.data))
    fit_part, _ = split_landing([s.path for s in landed], GateConfig())
    normal = {s.path for s in landed if s.label == 0}
    labels = np.array([s.label for s in scored])
    keeps = {"every landed image": torch.ones(len(fit_part), dtype=torch.bool),
             "landed normals only (reads labels)": torch.tensor([p in normal for p in fit_part])}
    runtime, rows = Runtime(False, args.cache_dir), {}
    for setting in args.pools:
        sizes = [int(size) for size in setting.split(",")]
        pool = sizes[0] if len(sizes) == 1 else sizes
        memory = build_detector("target_memory", method_config("target_memory", {"backbone": {"local_pool": pool}}))
        landed_cells = cells(memory.extract_features([Sample(p, -1) for p in fit_part], runtime, desc="landed"))
        scored_cells = cells(memory.extract_features(scored, runtime, desc="scored"))
        for memory_name, keep in keeps.items():
            tick = time.perf_counter()
            bank, owners = kept_memory(landed_cells, keep)
            scores = image_scores(scored_cells, bank, owners, args.k)
            row = {"image_auroc": auroc(scores, labels), "image_f1max": f1_max(scores, labels),
                   "channels": int(landed_cells.shape[-1]), "seconds": time.perf_counter() - tick}
            rows[f"local_pool {setting}, {memory_name}"] = row
            print(setting, memory_name, row, flush=True)
    lines = [f"Target memory cells: {len(fit_part)} landed images to fit on, {len(scored)} scored "
             f"({int(labels.sum())} defective); k = {args.k}", "",
             "| cells, memory | channels | image AUROC | F1-max | search s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['channels']} | {r['image_auroc']:.3f} | {r['image_f1max']:.3f} | {r['seconds']:.0f} |"
              for name, r in rows.items()]
    save(args.name, {"machine": machine(), "data": args.data, "k": args.k, "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
