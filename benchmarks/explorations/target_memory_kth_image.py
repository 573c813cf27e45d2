"""Does a test cell need matches in several landed images to count as normal? On magnetic_tile (the
development set that is no elpv adaptation target).

    .venv/bin/python benchmarks/explorations/target_memory_kth_image.py [--ks 1 2 3 5 8] [--memories ...] [--name NAME]

A memory of a contaminated landing keeps some defects, and a test defect then finds its nearest match
in a landed defect of the same kind: the memory vouches for it. Scoring a cell by its distance to the
k-th *distinct landed image* that matches it (the nearest cell of the k-th nearest image) asks that
what looks normal recur in k images, as mutual scoring does for the landed images themselves, while
a rare normal structure seen in k images still matches. k = 1 is PatchCore's nearest cell.

Landing and split as in ``target_memory_drop.py``; the memories: every image kept, the default
(images at 3 sigma dropped), the images of the upper of two Gaussians dropped
(``drop_image_rule=mixture``), and for scale the landed normals alone (reads labels). Image AUROC and
F1-max on the scored half, and F1 at the ``share`` threshold (the landing's mutual share, as a
quantile of the held-out images' scores). Figures go to benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import DEFAULT_MAGNETIC_TILE, machine, save  # noqa: E402
from unlabeled_thresholds import dev_landing  # noqa: E402

from ray_ad.adaptation.mutual import kth_image_distance  # noqa: E402
from ray_ad.adaptation.threshold import fit_two_gaussians  # noqa: E402
from ray_ad.methods.target_memory.model import drop_mask  # noqa: E402
from ray_ad.metrics import auroc, decision_metrics, f1_max  # noqa: E402

MEMORIES = ("every image", "z=3 dropped", "mixture dropped", "labelled normals only")


def image_scores(queries: torch.Tensor, bank: torch.Tensor, owners: torch.Tensor, k: int) -> np.ndarray:
    flat = queries.reshape(-1, queries.shape[-1])
    return kth_image_distance(flat, bank, owners, k).view(len(queries), -1).amax(1).numpy()


def kept_memory(landed_cells: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory of the landed images ``keep`` selects (a mask or indices): every cell of theirs, and
    which of them (0, 1, ... in their order) each cell came from, as ``image_scores`` takes them."""
    kept = landed_cells[keep]
    return kept.reshape(-1, kept.shape[-1]), torch.arange(len(kept)).repeat_interleave(kept.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 2, 3, 5, 8])
    parser.add_argument("--memories", nargs="+", default=list(MEMORIES), choices=MEMORIES)
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    parser.add_argument("--name", default="target_memory_kth_image")
    args = parser.parse_args()
    dev = dev_landing(args.data, args.cache_dir)
    landed, scored, fit_part, mutual = dev.landed, dev.scored, dev.fit_part, dev.mutual
    landed_cells, held_cells, scored_cells = dev.landed_cells, dev.held_cells, dev.scored_cells
    labels = np.array([s.label for s in scored])
    share = fit_two_gaussians(mutual.numpy()).share
    normal = {s.path for s in landed if s.label == 0}
    memories = {"every image": torch.ones(len(fit_part), dtype=torch.bool), "z=3 dropped": ~drop_mask(mutual, "z", 3.0),
                "mixture dropped": ~drop_mask(mutual, "mixture"),
                # For scale only (reads the landing's labels): what k costs a memory with no defect in it.
                "labelled normals only": torch.tensor([p in normal for p in fit_part])}
    rows = {}
    for memory_name, keep in ((name, memories[name]) for name in args.memories):
        bank, owners = kept_memory(landed_cells, keep)
        for k in args.ks:
            tick = time.perf_counter()
            test, held = (image_scores(queries, bank, owners, k) for queries in (scored_cells, held_cells))
            threshold = float(np.quantile(held, 1 - share))
            decision = decision_metrics(test, labels, threshold)
            row = {"image_auroc": auroc(test, labels), "image_f1max": f1_max(test, labels), "f1": decision["f1"],
                   "seconds": time.perf_counter() - tick}
            rows[f"{memory_name}, k={k}"] = row
            print(memory_name, k, row, flush=True)
    lines = [f"Target memory, k-th distinct landed image: {len(fit_part)} landed images to fit on, "
             f"{len(scored)} scored ({int(labels.sum())} defective); landing share {share:.2f}", "",
             "| memory, k | image AUROC | F1-max | F1 at the share threshold |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['image_auroc']:.3f} | {r['image_f1max']:.3f} | {r['f1']:.3f} |"
              for name, r in rows.items()]
    save(args.name, {"machine": machine(), "data": args.data, "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
