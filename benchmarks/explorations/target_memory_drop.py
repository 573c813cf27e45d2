"""Which landed images the target memory should drop, on magnetic_tile (the development set that is no
elpv adaptation target): the image mutual scores are computed once, then each drop rule builds its
memory from the same features and scores the same images.

    .venv/bin/python benchmarks/explorations/target_memory_drop.py [--data URI] [--name NAME]

Landing as in ``target_memory_contamination.py`` (magnetic_tile's train normals and a hashed half of
its test images, defects included), split as ``jobs/adapt_target.py`` splits it: the gate's held-out
images give each memory its shipped threshold (``threshold.unlabeled_threshold``, the default rule and
shape); the other half of the test images is scored. Rules:

- ``none``: every image kept;
- ``z=3`` (the default): images whose largest mutual cell score is 3 robust spreads above the normal mode;
- ``mixture``: two Gaussians fitted by EM to the images' largest mutual cell scores (as the
  threshold's ``mixture`` shape does); the images more likely under the upper one are dropped;
- ``share=q``: the top q of the images by that score, for scale.

Image AUROC, F1-max, and precision / recall / F1 at the shipped threshold. Figures go to
benchmarks/results/<name>.{json,md}.
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
from unlabeled_thresholds import dev_landing, image_scores  # noqa: E402

from ray_ad.adaptation.threshold import unlabeled_threshold  # noqa: E402
from ray_ad.methods.target_memory.model import drop_mask  # noqa: E402
from ray_ad.metrics import auroc, decision_metrics, f1_max  # noqa: E402

RULES = ("none", "z=3", "mixture", "share=0.1", "share=0.2", "share=0.3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--rules", nargs="+", default=list(RULES))
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    parser.add_argument("--name", default="target_memory_drop")
    args = parser.parse_args()
    dev = dev_landing(args.data, args.cache_dir)
    fit_part, held_out, scored, mutual = dev.fit_part, dev.held_out, dev.scored, dev.mutual
    landed_cells, held_cells, scored_cells = dev.landed_cells, dev.held_cells, dev.scored_cells
    defective = {s.path for s in dev.landed if s.label == 1}
    labels = np.array([s.label for s in scored])
    cfg = dev.memory.config
    rows = {}
    for rule in args.rules:
        tick = time.perf_counter()
        if rule == "none":
            drop = torch.zeros(len(mutual), dtype=torch.bool)
        elif rule.startswith("share="):
            drop = mutual >= torch.quantile(mutual, 1 - float(rule.split("=")[1]))
        else:
            drop = drop_mask(mutual, "mixture" if rule == "mixture" else "z", 3.0)
        bank = landed_cells[~drop].reshape(-1, landed_cells.shape[-1])
        # The threshold of the rule these figures were first taken with (two Gaussians, expected F1);
        # today's default, "share", is compared in unlabeled_thresholds.py.
        threshold = unlabeled_threshold(image_scores(held_cells, bank), cfg.false_alarm_rate, "f1",
                                        shape=cfg.threshold_shape)
        scores = image_scores(scored_cells, bank)
        dropped = [p for p, d in zip(fit_part, drop.tolist()) if d]
        row = {"dropped": len(dropped), "dropped_defective": len(set(dropped) & defective),
               "image_auroc": auroc(scores, labels), "image_f1max": f1_max(scores, labels),
               **{k: v for k, v in decision_metrics(scores, labels, threshold).items()
                  if k in ("precision", "recall", "f1")}, "seconds": time.perf_counter() - tick}
        rows[rule] = row
        print(rule, row, flush=True)
    landed_defective = len(set(fit_part) & defective)
    lines = [f"Target memory drop rules: {len(fit_part)} landed images to fit on ({landed_defective} defective), "
             f"{len(held_out)} held out for the threshold, {len(scored)} scored ({int(labels.sum())} defective)", "",
             "| drop rule | dropped (defective) | image AUROC | F1-max | "
             "F1 at the earlier `f1` rule's threshold (P / R) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {rule} | {r['dropped']} ({r['dropped_defective']}) | {r['image_auroc']:.3f} | {r['image_f1max']:.3f} "
              f"| {r['f1']:.3f} ({r['precision']:.2f} / {r['recall']:.2f}) |" for rule, r in rows.items()]
    save(args.name, {"machine": machine(), "data": args.data, "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
