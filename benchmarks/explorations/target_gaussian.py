"""A per-position Gaussian fitted on the landing itself: which cells, which drop, how much trimming?

    .venv/bin/python benchmarks/explorations/target_gaussian.py [--task magnetic_tile-shift] [--seeds 0 1 2]
        [--pools 1 3,11] [--drops none source mutual consensus auto self cross] [--trims 0 0.1 0.25] [--name NAME]

The target memory is a kNN over the landed cells: one landed defect in the bank vouches for a test
defect like it, so it must drop what is defective first. A density (the ``gaussian`` detector: each
grid position's mean and whitening, PaDiM's Gaussian) averages a minority of defects into its mean and
covariance instead, and a trimmed fit (``trim``: each position refitted on the cells nearest its
current fit, MCD's concentration step) leaves the outlying ones out. Variants, each on the source
line's backbone network, weights and input size:
- cells: lite0 stages 1-3 on a 16 x 16 grid, raw (pool 1) or at two context sizes (pool 3,11);
- drop: none, or the source line's top share of the landed images (the target memory's default drop),
  or the same share by another referee: the images' largest mutual cell scores (``mutual``, independent of
  the source's training) or the mean of each image's ranks under the source and the mutual scores
  (``consensus``); ``auto``: the source's drop when its scores of the landed images separate into two
  Gaussians at least as far apart (Ashman's D) as the mutual scores do, else the consensus drop (as
  ``TargetMemoryConfig.drop_referee`` makes each);
  or the Gaussian as its own referee: fitted after the source's drop, it scores every landed image (``self``:
  in sample; ``cross``: each half of the kept images by a fit on the other half) and the landing's share
  of its highest is dropped instead before the refit;
- trim: share of each position's cells left out of the refit (2 rounds).
A tenth of the kept images (every tenth) calibrates the Gaussian's score terms; it is fitted on the
rest. Landing and split as ``benchmarks/adaptation.py`` makes them (gate seed = seed). Labels are read
only for the figures: image AUROC and F1-max on the task's test split, and F1 at the threshold the
adaptation would ship (rule ``share`` on the held-out landed images' scores, the landing's share).
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
from adaptation import TASKS, landing, source_model  # noqa: E402
from source_referee_drop import save_report  # noqa: E402

from ray_ad.adaptation.gate import GateConfig, split_landing  # noqa: E402
from ray_ad.adaptation.target_gaussian import CALIBRATION_EVERY  # noqa: E402
from ray_ad.adaptation.threshold import unlabeled_threshold  # noqa: E402
from ray_ad.data import Sample, load_samples  # noqa: E402
from ray_ad.evaluation import run_detector  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime, on_source_backbone  # noqa: E402
from ray_ad.methods.target_memory import TargetMemory, TargetMemoryConfig  # noqa: E402
from ray_ad.methods.target_memory.model import top_share  # noqa: E402
from ray_ad.metrics import auroc, decision_metrics, f1_max  # noqa: E402


def gaussian_on(source, pool: tuple[int, ...], trim: float, seed: int):
    """The ``gaussian`` detector with these cells and trim, on the source's backbone network and input size."""
    config = method_config("gaussian", {"backbone": {"layers": [1, 2, 3], "grid_size": 16,
                                                     "local_pool": list(pool) if len(pool) > 1 else pool[0]},
                                        "trim": trim, "seed": seed})
    return build_detector("gaussian", on_source_backbone(config, source))


def scores_of(detector, features: torch.Tensor) -> np.ndarray:
    return torch.cat([detector.predict_features(part).pred_score for part in features.split(64)]).numpy()


def fitted(source, pool, seed, features: torch.Tensor, kept: torch.Tensor, trim: float = 0.0):
    """A Gaussian fitted on ``features[kept]`` but every CALIBRATION_EVERY-th, which calibrate it (as the
    adaptation's fit_target_gaussian splits them)."""
    every = torch.arange(len(kept)) % CALIBRATION_EVERY == 0
    detector = gaussian_on(source, pool, trim, seed)
    detector.fit_features(features[kept[~every]])
    detector.calibrate_features(features[kept[every]])
    return detector


def second_drop(source, pool, seed, features: torch.Tensor, first: torch.Tensor, share: float,
                how: str) -> torch.Tensor:
    """The Gaussian as its own referee: fit on what the source's drop keeps, score every landed image
    (``self``: in sample; ``cross``: each half of the kept images by a fit on the other half, the dropped
    ones by both halves' mean), and drop the landing's share of the highest."""
    kept = torch.nonzero(~first).flatten()
    if how == "self":
        scores = torch.as_tensor(scores_of(fitted(source, pool, seed, features, kept), features))
    else:
        halves = (kept[0::2], kept[1::2])
        by_half = [torch.as_tensor(scores_of(fitted(source, pool, seed, features, half), features))
                   for half in halves]
        scores = (by_half[0] + by_half[1]) / 2
        scores[halves[0]] = by_half[1][halves[0]]
        scores[halves[1]] = by_half[0][halves[1]]
    return top_share(scores, share)


def run(args: argparse.Namespace, seed: int) -> dict:
    source_domain, target_domain = TASKS[args.task]
    target = landing(target_domain, args.cache_dir)
    runtime = Runtime(False, args.cache_dir)
    source = source_model("patchcore" if args.task.startswith("magnetic_tile") else args.source_method,
                          source_domain, seed, args.cache_dir)
    samples = load_samples(target, "landing")
    fit_part, held_out = split_landing([s.path for s in samples], GateConfig(seed=seed))
    landed, held = [Sample(p, -1) for p in fit_part], [Sample(p, -1) for p in held_out]
    test = load_samples(target, "test")
    tick = time.perf_counter()
    memory = TargetMemory.from_source(source, TargetMemoryConfig())
    cells = memory.read_landing(landed, runtime)
    share = memory.landing_share(landed, runtime, cells)
    referee = run_detector(source, landed, progress=False).scores
    # The referees' drops as the adaptation job makes them (TargetMemory.kept_images, rule "share").
    drops = {"none": torch.zeros(len(landed), dtype=torch.bool)}
    for name in ("source", "mutual", "consensus", "auto"):
        judge = TargetMemory.from_source(source, TargetMemoryConfig(drop_referee=name, drop_image_rule="share"))
        keep, used = judge.kept_images(cells, referee)
        drops[name] = ~keep
        print(f"{args.task} seed {seed}: drop {name}: {used}", flush=True)
    seconds = time.perf_counter() - tick
    print(f"{args.task} seed {seed}: share {share:.3f}; referees read in {seconds:.0f} s", flush=True)
    label = {s.path: s.label for s in samples}
    landed_labels = np.array([label[p] for p in fit_part])  # for the figures only
    test_labels = np.array([s.label for s in test])
    rows = {}
    for pool in args.pools:
        reader = gaussian_on(source, pool, 0.0, seed)
        features = {name: reader.extract_features(part, runtime, desc=name)
                    for name, part in (("landed", landed), ("held", held), ("test", test))}
        for drop in args.drops:
            if drop in ("self", "cross"):
                drops[drop] = second_drop(source, pool, seed, features["landed"], drops["source"], share, drop)
            kept = torch.nonzero(~drops[drop]).flatten()
            for trim in args.trims:
                tick = time.perf_counter()
                detector = fitted(source, pool, seed, features["landed"], kept, trim)
                test_scores = scores_of(detector, features["test"])
                threshold = unlabeled_threshold(scores_of(detector, features["held"]), rule="share", share=share)
                name = f"pool {','.join(map(str, pool))}, drop {drop}, trim {trim:g}"
                rows[name] = {
                    "image_auroc": auroc(test_scores, test_labels), "image_f1max": f1_max(test_scores, test_labels),
                    "f1_shipped": decision_metrics(test_scores, test_labels, threshold)["f1"],
                    "dropped": int(drops[drop].sum()),
                    "dropped_defective": int(landed_labels[drops[drop].numpy()].sum()),
                    "seconds": time.perf_counter() - tick}
                print(args.task, seed, name, {k: round(v, 3) for k, v in rows[name].items()}, flush=True)
    return {"rows": rows, "share": share, "landed": len(landed), "landed_defective": int((landed_labels == 1).sum())}


def report(args: argparse.Namespace, results: dict) -> None:
    names = list(next(iter(results.values()))["rows"])
    seeds = list(results)
    source = "patchcore" if args.task.startswith("magnetic_tile") else args.source_method
    lines = [f"A per-position Gaussian fitted on the landing ({args.task}; source {source}); image AUROC "
             "on the test split (F1-max; F1 at the shipped share threshold)", "",
             "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean AUROC | mean F1-max |",
             "|---|" + "---:|" * (len(seeds) + 2)]
    for name in names:
        cells = [results[s]["rows"][name] for s in seeds]
        figures = " | ".join(f"{c['image_auroc']:.3f} ({c['image_f1max']:.3f}; {c['f1_shipped']:.2f})" for c in cells)
        means = [np.mean([c[key] for c in cells]) for key in ("image_auroc", "image_f1max")]
        lines.append(f"| {name} | {figures} | {means[0]:.3f} | {means[1]:.3f} |")
    save_report(args, results, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="magnetic_tile-shift", choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--pools", nargs="+", default=["1", "3,11"])
    parser.add_argument("--drops", nargs="+", default=["none", "source"],
                        choices=["none", "source", "mutual", "consensus", "auto", "self", "cross"])
    parser.add_argument("--trims", nargs="+", type=float, default=[0.0, 0.1, 0.25])
    parser.add_argument("--source-method", default="ref_cfa")
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    parser.add_argument("--name", default="target_gaussian")
    args = parser.parse_args()
    args.pools = [tuple(int(k) for k in pool.split(",")) for pool in args.pools]
    results = {}
    for seed in args.seeds:  # saved after every seed
        results[seed] = run(args, seed)
        report(args, results)


if __name__ == "__main__":
    main()
