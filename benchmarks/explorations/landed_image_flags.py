"""Which label-free score finds the defective images of a contaminated landing? On magnetic_tile (the
development set that is no elpv adaptation target).

    .venv/bin/python benchmarks/explorations/landed_image_flags.py [--ks 1 2 3 5 10 20] [--name NAME]

The target memory drops the landed images whose mutual score (MuSc: each cell's nearest-cell distance
in 64 random other landed images, the lowest 30% averaged) stands 3 sigma above the images' normal
mode. On this landing those scores separate defective from normal images weakly, and the defects the
drop misses cost the memory most of its gap to a clean one. The alternative scored here: each cell's
distance to the nearest cell of the k-th distinct *other* landed image, over the whole fit part (the
memory's own scoring rule, ``match_images``, with the image itself left out), and the same after a
second pass over the images the first pass kept. For each flag score: its image AUROC over the fit
part (the landing's labels, read for this development figure only), what the default `z` drop then
drops, and the memory built from what is kept, scored on the scored half with k = 2 (image AUROC).
Landing and split as in ``target_memory_drop.py``. Figures go to benchmarks/results/<name>.{json,md}.
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
from target_memory_kth_image import image_scores, kept_memory  # noqa: E402
from unlabeled_thresholds import dev_landing  # noqa: E402

from ray_ad.adaptation.mutual import kth_image_distance  # noqa: E402
from ray_ad.methods.target_memory.model import drop_mask  # noqa: E402
from ray_ad.metrics import auroc  # noqa: E402


def leave_one_out_flags(landed_cells: torch.Tensor, keep: torch.Tensor, k: int) -> np.ndarray:
    """Per fit-part image: its largest cell distance to the k-th distinct other *kept* image."""
    bank = landed_cells[keep].reshape(-1, landed_cells.shape[-1])
    kept_ids = torch.nonzero(keep).flatten()
    owners = kept_ids.repeat_interleave(landed_cells.shape[1])
    flags = np.empty(len(landed_cells))
    for own in (True, False):
        images = torch.nonzero(keep == own).flatten()
        if len(images):
            # A kept image finds itself first (distance 0): the k-th other image is the (k+1)-th distinct one.
            queries = landed_cells[images].reshape(-1, landed_cells.shape[-1])
            distances = kth_image_distance(queries, bank, owners, k + int(own)).view(len(images), -1)
            flags[images.numpy()] = distances.amax(1).numpy()
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 2, 3, 5, 10, 20])
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    parser.add_argument("--name", default="landed_image_flags")
    args = parser.parse_args()
    dev = dev_landing(args.data, args.cache_dir)
    landed_label = {s.path: s.label for s in dev.landed}
    fit_labels = np.array([landed_label[p] for p in dev.fit_part])
    test_labels = np.array([s.label for s in dev.scored])
    everyone = torch.ones(len(dev.fit_part), dtype=torch.bool)

    def memory_row(flags: np.ndarray, seconds: float) -> dict[str, float]:
        keep = ~drop_mask(torch.as_tensor(flags, dtype=torch.float32), "z", 3.0)
        bank, owners = kept_memory(dev.landed_cells, keep)
        test = image_scores(dev.scored_cells, bank, owners, 2)
        dropped = ~keep.numpy()
        return {"flag_auroc": auroc(flags, fit_labels), "dropped": int(dropped.sum()),
                "dropped_defective": int(fit_labels[dropped].sum()), "memory_auroc": auroc(test, test_labels),
                "flag_seconds": seconds}

    rows = {"mutual scores (default)": memory_row(dev.mutual.numpy(), 0.0)}
    print(rows, flush=True)
    for k in args.ks:
        tick = time.perf_counter()
        flags = leave_one_out_flags(dev.landed_cells, everyone, k)
        rows[f"k-th other image, k={k}"] = memory_row(flags, time.perf_counter() - tick)
        print(k, rows[f"k-th other image, k={k}"], flush=True)
        tick = time.perf_counter()
        first_keep = ~drop_mask(torch.as_tensor(flags, dtype=torch.float32), "z", 3.0)
        second = leave_one_out_flags(dev.landed_cells, first_keep, k)
        rows[f"k-th other image, k={k}, second pass"] = memory_row(second, time.perf_counter() - tick)
        print(k, "second", rows[f"k-th other image, k={k}, second pass"], flush=True)
    defective = int(fit_labels.sum())
    lines = [f"Flagging a contaminated landing's defective images (magnetic_tile: {len(dev.fit_part)} landed images "
             f"to fit on, {defective} defective; the memory keeps the images the `z` rule at 3 sigma does not "
             f"drop and scores {len(dev.scored)} test images with match_images = 2)", "",
             "| flag score | flag AUROC (landing labels) | dropped (defective) | memory image AUROC | flag seconds |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['flag_auroc']:.3f} | {r['dropped']} ({r['dropped_defective']}) | "
              f"{r['memory_auroc']:.3f} | {r['flag_seconds']:.0f} |" for name, r in rows.items()]
    save(args.name, {"machine": machine(), "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
