"""Threshold rules for an unlabeled, contaminated landing, on magnetic_tile (the development set that is no
elpv adaptation target), for one target memory.

    .venv/bin/python benchmarks/explorations/unlabeled_thresholds.py [--drop z|mixture|none] [--name NAME]

Landing and split as in ``target_memory_drop.py``. Scores the rules can read, none of them labelled:

- ``held-out``: the memory's scores of the gate's held-out landed images (160), what the job uses today;
- ``folds``: every landed image fitted on, scored by a memory of the other folds (5 folds; an image never
  vouches for itself), pooled with the held-out scores: six times as many scores from the same mixture.

Rules: today's (``unlabeled_threshold``, expected-F1 under two Gaussians), the same on the log of the
scores, and ``share``: flag as many images as the fitted mixture says are defective (the quantile at
1 - pi), where precision equals recall. The share can also come from the landing itself, whatever the
candidate: two Gaussians fitted to the largest mutual cell score of every landed image. The
estimated share and the true one of the landing are printed beside each. F1 on the scored half (whose
share of defects differs from the landing's) and on the held-out landed images (labels read only here).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import DEFAULT_MAGNETIC_TILE, contaminated_landing, machine, save  # noqa: E402

from ray_ad.adaptation.gate import GateConfig, split_landing  # noqa: E402
from ray_ad.adaptation.mutual import cells, mutual_scores, nearest_distance  # noqa: E402
from ray_ad.adaptation.threshold import fit_two_gaussians, unlabeled_threshold  # noqa: E402
from ray_ad.data import Sample, load_samples  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Detector, Runtime  # noqa: E402
from ray_ad.methods.target_memory.model import drop_mask  # noqa: E402
from ray_ad.metrics import auroc, decision_metrics, f1_max  # noqa: E402

FOLDS = 5


@dataclass
class DevLanding:
    """magnetic_tile's contaminated landing (``_common.contaminated_landing``), split as the adaptation job
    splits it, with the default target memory's cells of each part and the fit part's image mutual scores."""

    landed: list[Sample]  # labelled: read for the figures only
    scored: list[Sample]
    fit_part: list[str]
    held_out: list[str]
    memory: Detector
    landed_cells: torch.Tensor  # [fit part, L, C]
    held_cells: torch.Tensor
    scored_cells: torch.Tensor
    mutual: torch.Tensor  # [fit part]: each image's largest mutual cell score
    mutual_cells: torch.Tensor  # [fit part, L]: every cell's mutual score


def dev_landing(data: str, cache_dir: str) -> DevLanding:
    landed, scored = contaminated_landing(load_samples(data))
    fit_part, held_out = split_landing([s.path for s in landed], GateConfig())
    memory = build_detector("target_memory", method_config("target_memory", {}))
    cfg, runtime = memory.config, Runtime(False, cache_dir)
    landed_cells = cells(memory.extract_features([Sample(p, -1) for p in fit_part], runtime, desc="landed"))
    held_cells = cells(memory.extract_features([Sample(p, -1) for p in held_out], runtime, desc="held out"))
    scored_cells = cells(memory.extract_features(scored, runtime, desc="scored"))
    tick = time.perf_counter()
    mutual_cells = mutual_scores(landed_cells, cfg.mutual_fraction, cfg.mutual_references, cfg.seed)
    print(f"mutual scores in {time.perf_counter() - tick:.0f} s", flush=True)
    return DevLanding(landed, scored, fit_part, held_out, memory, landed_cells, held_cells, scored_cells,
                      mutual_cells.amax(1), mutual_cells)


def image_scores(features: torch.Tensor, bank: torch.Tensor) -> np.ndarray:
    n, length, channels = features.shape
    return nearest_distance(features.reshape(-1, channels), bank).view(n, length).amax(1).numpy()


def fold_scores(landed: torch.Tensor, keep: torch.Tensor) -> np.ndarray:
    """Each landed image's score against the kept images of the other folds."""
    folds = torch.arange(len(landed)) % FOLDS
    out = np.empty(len(landed))
    for k in range(FOLDS):
        bank = landed[keep & (folds != k)].reshape(-1, landed.shape[-1])
        out[(folds == k).numpy()] = image_scores(landed[folds == k], bank)
        print(f"fold {k + 1}/{FOLDS}", flush=True)
    return out


def share_threshold(scores: np.ndarray) -> tuple[float, float]:
    share = fit_two_gaussians(scores).share
    return float(np.quantile(scores, 1 - share)) if share > 0 else float(scores.max()), share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--drop", choices=("z", "mixture", "none"), default="z")
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    parser.add_argument("--name", default="unlabeled_thresholds")
    args = parser.parse_args()
    dev = dev_landing(args.data, args.cache_dir)
    landed, scored, fit_part, held_out = dev.landed, dev.scored, dev.fit_part, dev.held_out
    landed_cells, held_cells, scored_cells, mutual = dev.landed_cells, dev.held_cells, dev.scored_cells, dev.mutual
    label_of = {s.path: s.label for s in landed}
    keep = torch.ones(len(fit_part), dtype=torch.bool) if args.drop == "none" else ~drop_mask(mutual, args.drop)
    bank = landed_cells[keep].reshape(-1, landed_cells.shape[-1])
    held = image_scores(held_cells, bank)
    test = image_scores(scored_cells, bank)
    folds = fold_scores(landed_cells, keep)
    test_labels = np.array([s.label for s in scored])
    held_labels = np.array([label_of[p] for p in held_out])
    pooled_labels = np.concatenate([held_labels, [label_of[p] for p in fit_part]])
    sources = {"held-out": held, "folds": np.concatenate([held, folds])}
    landing_share = fit_two_gaussians(mutual.numpy()).share
    rows = {}
    for source, values in sources.items():
        true_share = float(held_labels.mean() if source == "held-out" else pooled_labels.mean())
        candidates = {
            "expected F1, two Gaussians (today)": (unlabeled_threshold(values, shape="mixture"), None),
            "expected F1, two Gaussians on log scores": (
                float(np.exp(unlabeled_threshold(np.log(values), shape="mixture"))), None),
            "flag the fitted share": share_threshold(values),
            "flag the fitted share, log scores": (lambda t: (float(np.exp(t[0])), t[1]))(
                share_threshold(np.log(values))),
            "flag the landing's mutual share": (float(np.quantile(values, 1 - landing_share)), landing_share),
        }
        for rule, (threshold, share) in candidates.items():
            on_test = decision_metrics(test, test_labels, threshold)
            on_held = decision_metrics(held, held_labels, threshold)
            rows[f"{source}: {rule}"] = {"threshold": threshold, "fitted_share": share, "true_share": true_share,
                                         "test_f1": on_test["f1"], "test_precision": on_test["precision"],
                                         "test_recall": on_test["recall"], "held_out_f1": on_held["f1"]}
            print(source, rule, rows[f"{source}: {rule}"], flush=True)
    header = (f"Unlabeled thresholds for the target memory (drop: {args.drop}, {len(bank)} bank cells): scored "
              f"image AUROC {auroc(test, test_labels):.3f}, F1-max {f1_max(test, test_labels):.3f} "
              f"({int(test_labels.sum())} of {len(test_labels)} defective); held-out landed F1-max "
              f"{f1_max(held, held_labels):.3f} ({int(held_labels.sum())} of {len(held_labels)} defective)")
    lines = [header, "", "| scores, rule | fitted share (true) | F1 scored (P / R) | F1 held-out |",
             "|---|---:|---:|---:|"]
    for name, r in rows.items():
        share = "-" if r["fitted_share"] is None else f"{r['fitted_share']:.2f}"
        lines.append(f"| {name} | {share} ({r['true_share']:.2f}) | {r['test_f1']:.3f} "
                     f"({r['test_precision']:.2f} / {r['test_recall']:.2f}) | {r['held_out_f1']:.3f} |")
    save(f"{args.name}_{args.drop}", {"machine": machine(), "data": args.data, "drop": args.drop, "rows": rows},
         "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
