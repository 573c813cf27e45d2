"""Does averaging the source as is with a target memory beat either alone? Score-level ensembles of the
adaptation candidates, normalised by unlabeled scores only.

    .venv/bin/python benchmarks/explorations/adaptation_ensemble.py --task magnetic_tile-shift --seeds 0 [--name NAME]

The source line never saw the landing's defects; a memory of a contaminated landing learnt some of
them as normal but knows the new domain's normal look. Their errors may differ. Each candidate's
image scores are put in robust standard units of its own scores of the untouched held-out landed
images (median, 1.4826 x MAD: a third of them may be defects), and an ensemble is the mean of those.
Nothing reads a label until the figures: gate AUROC (the job's synthetic gate set) and, afterwards,
test image AUROC and F1-max on the task's labelled test split. Candidates and split exactly as
``benchmarks/adaptation.py`` builds them (gate seed = seed). Figures go to
benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import machine, save  # noqa: E402
from adaptation import TASKS, landing, source_model  # noqa: E402

from ray_ad.adaptation.gate import score_arrays, split_landing  # noqa: E402
from ray_ad.adaptation.promote import adapt_candidates, build_gate_set, split_overrides  # noqa: E402
from ray_ad.data import load_samples  # noqa: E402
from ray_ad.evaluation import run_detector  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.metrics import auroc, f1_max  # noqa: E402

CANDIDATES = "candidates=[source,target_memory,target_memory_all]"


def robust_units(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    centre = np.median(reference)
    spread = 1.4826 * np.median(np.abs(reference - centre))
    return (scores - centre) / max(spread, 1e-12)


def run(task: str, seed: int, method: str, cache_dir: str) -> dict[str, dict[str, float]]:
    source_domain, target_domain = TASKS[task]
    target = landing(target_domain, cache_dir)
    runtime = Runtime(False, cache_dir)
    source = source_model("patchcore" if task == "magnetic_tile-shift" else method, source_domain, seed, cache_dir)
    config, _ = split_overrides([CANDIDATES, f"gate.seed={seed}"])
    images = [s.path for s in load_samples(target, "landing")]
    outcome = adapt_candidates(source, target, images, config, runtime=runtime)
    fit_part, held_out = split_landing(images, config.gate)
    gate_set = build_gate_set(source, target, held_out, config, runtime, fit_part)
    test = load_samples(target, "test")
    scores = {}
    for name, detector in outcome.candidates.items():
        untouched = score_arrays(detector, gate_set.untouched)
        scores[name] = {"untouched": untouched, "negatives": untouched[gate_set.clean],
                        "positives": score_arrays(detector, gate_set.positives),
                        "test": run_detector(detector, test, progress=False).scores}
    labels = np.array([s.label for s in test])  # read only from here on
    rows = {}
    names = list(scores)
    combos = [(n,) for n in names] + [c for r in (2, 3) for c in itertools.combinations(names, r)]
    for combo in combos:
        unit = {part: {k: robust_units(v, scores[part]["untouched"]) for k, v in scores[part].items()}
                for part in combo}
        mixed = {k: np.mean([unit[part][k] for part in combo], axis=0) for k in ("negatives", "positives", "test")}
        gate = auroc(np.r_[mixed["positives"], mixed["negatives"]],
                     np.r_[np.ones(len(mixed["positives"])), np.zeros(len(mixed["negatives"]))])
        rows[" + ".join(combo)] = {"gate_auroc": gate, "image_auroc": auroc(mixed["test"], labels),
                                   "image_f1max": f1_max(mixed["test"], labels)}
        print(task, seed, " + ".join(combo), rows[" + ".join(combo)], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="magnetic_tile-shift", choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--source-method", default="ref_cfa")
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    parser.add_argument("--name", default="adaptation_ensemble")
    args = parser.parse_args()
    results = {}
    for seed in args.seeds:  # saved after every seed
        results[seed] = run(args.task, seed, args.source_method, args.cache_dir)
        report(args, results)


def report(args: argparse.Namespace, results: dict[int, dict[str, dict[str, float]]]) -> None:
    lines = [f"Score-level ensembles on {args.task} (each candidate in robust units of its untouched held-out "
             "scores; mean of those). Gate AUROC (labels of the synthetic gate set only), then test image "
             "AUROC and F1-max (test labels read after the ensembles were formed).", "",
             "| seed | detector | gate AUROC | image AUROC | F1-max |", "|---|---|---:|---:|---:|"]
    for seed, rows in results.items():
        lines += [f"| {seed} | {name} | {r['gate_auroc']:.3f} | {r['image_auroc']:.3f} | {r['image_f1max']:.3f} |"
                  for name, r in rows.items()]
    save(args.name, {"machine": machine(), "task": args.task, "results": results}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
