"""How many of the other landed images must match a cell for mutual scoring to call it normal? On
magnetic_tile (the development set that is no elpv adaptation target).

    .venv/bin/python benchmarks/explorations/target_memory_fraction.py [--fractions 0.1 0.3 0.5 0.7] [--name NAME]

Mutual scoring averages the lowest ``fraction`` of a cell's nearest distances to 64 other landed images.
A defect kind that recurs in more than that fraction of the batch then vouches for itself: with a third
of a landing defective and 0.3 (the default, never varied until this), a crack finds enough other cracks
to score as normal. A larger fraction asks for matches in more images; it must stay under the normal
images' share, or normal cells are compared with defects too. Per fraction: how well the images' largest
mutual scores rank the landed images (flag AUROC, reads the landing's labels: development set only),
the images the default rule drops (3 sigma above the normal mode), the landing's defect share the two
Gaussians give (true share printed), and the memory without the dropped images (``match_images=2``):
image AUROC, F1-max and F1 at the share threshold on the scored half. Landing and split as in
``target_memory_drop.py``. Figures go to benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import DEFAULT_MAGNETIC_TILE, machine, save  # noqa: E402
from target_memory_kth_image import image_scores, kept_memory  # noqa: E402
from unlabeled_thresholds import dev_landing  # noqa: E402

from ray_ad.adaptation.mutual import mutual_scores  # noqa: E402
from ray_ad.adaptation.threshold import fit_two_gaussians  # noqa: E402
from ray_ad.methods.target_memory.model import drop_mask  # noqa: E402
from ray_ad.metrics import auroc, decision_metrics, f1_max  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.3, 0.5, 0.7])
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    parser.add_argument("--name", default="target_memory_fraction")
    args = parser.parse_args()
    dev = dev_landing(args.data, args.cache_dir)
    cfg = dev.memory.config
    label_of = {s.path: s.label for s in dev.landed}
    landed_labels = np.array([label_of[p] for p in dev.fit_part])
    labels = np.array([s.label for s in dev.scored])
    rows = {}
    for fraction in args.fractions:
        tick = time.perf_counter()
        image_mutual = mutual_scores(dev.landed_cells, fraction, cfg.mutual_references, cfg.seed).amax(1)
        dropped = drop_mask(image_mutual, "z", 3.0)
        share = fit_two_gaussians(image_mutual.numpy()).share
        keep = ~dropped
        bank, owners = kept_memory(dev.landed_cells, keep)
        test, held = (image_scores(q, bank, owners, 2) for q in (dev.scored_cells, dev.held_cells))
        threshold = float(np.quantile(held, 1 - share)) if share > 0 else float(held.max())
        row = {"flag_auroc": auroc(image_mutual.numpy(), landed_labels), "dropped": int(dropped.sum()),
               "dropped_defective": int(landed_labels[dropped.numpy()].sum()), "share": share,
               "true_share": float(landed_labels.mean()), "image_auroc": auroc(test, labels),
               "image_f1max": f1_max(test, labels), "f1": decision_metrics(test, labels, threshold)["f1"],
               "seconds": time.perf_counter() - tick}
        rows[f"{fraction:g}"] = row
        print(fraction, row, flush=True)
    lines = [f"Mutual-scoring fraction: {len(dev.fit_part)} landed images to fit on "
             f"({int(landed_labels.sum())} defective), {len(dev.scored)} scored ({int(labels.sum())} defective)", "",
             "| fraction | flag AUROC (landed) | dropped (defective) | share fitted (true) | memory image AUROC "
             "| F1-max | F1 at the share threshold |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['flag_auroc']:.3f} | {r['dropped']} ({r['dropped_defective']}) | {r['share']:.2f} "
              f"({r['true_share']:.2f}) | {r['image_auroc']:.3f} | {r['image_f1max']:.3f} | {r['f1']:.3f} |"
              for name, r in rows.items()]
    save(args.name, {"machine": machine(), "data": args.data, "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
