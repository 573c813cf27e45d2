"""The unlabeled threshold's shapes (Gaussian or Gumbel normal mode, or two Gaussians by EM) on
magnetic_tile, the development set: a memory of every landed image fitted on a contaminated landing,
thresholds from its held-out landed images (no label read), F1 on the scored half.

    .venv/bin/python benchmarks/explorations/threshold_shapes.py

Landed: the train normals and a hashed half of the test images (as
benchmarks/explorations/target_memory_contamination.py);
the gate's held-out share gives the unlabeled scores; the other half of the test images is scored.
About 5 CPU-minutes on 2 cores. Figures go to benchmarks/results/threshold_shapes.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import skew

# benchmarks/ (the shared _common and the main benchmarks) and this folder (the other explorations)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import DEFAULT_MAGNETIC_TILE, contaminated_landing, machine, save  # noqa: E402

from ray_ad.adaptation.gate import GateConfig, split_landing  # noqa: E402
from ray_ad.adaptation.threshold import RULES, SHAPES, unlabeled_threshold  # noqa: E402
from ray_ad.data import Sample, load_samples  # noqa: E402
from ray_ad.evaluation import run_detector  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.metrics import decision_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    args = parser.parse_args()
    samples = load_samples(args.data)
    landed, scored = contaminated_landing(samples)
    fit_part, held_out = split_landing([s.path for s in landed], GateConfig())
    memory = build_detector("target_memory", method_config("target_memory", {"drop_image_z": None,
                                                                             "bank_size": 8192}))
    memory.fit([Sample(p, -1) for p in fit_part], [], Runtime(False, args.cache_dir))
    unlabeled = run_detector(memory, [Sample(p, -1) for p in held_out], progress=False).scores
    results = run_detector(memory, scored, progress=False)
    rows = {f"{shape} / {rule}": decision_metrics(results.scores, results.labels,
                                                 unlabeled_threshold(unlabeled, 0.01, rule, shape=shape))
            for shape in SHAPES for rule in RULES}
    best = max(decision_metrics(results.scores, results.labels, t)["f1"] for t in np.unique(results.scores))
    normals = results.scores[results.labels == 0]
    lines = [f"Scored: {len(scored)} images, {np.mean(results.labels):.0%} defective; F1 of the best threshold "
             f"{best:.3f}; skewness of the scored normals' scores {skew(normals):.2f}.", "",
             "| shape / rule | threshold | precision | recall | F1 |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {m['threshold']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} |"
              for name, m in rows.items()]
    scores = {"unlabeled": unlabeled.tolist(), "scored": results.scores.tolist(), "labels": results.labels.tolist()}
    save("threshold_shapes", {"machine": machine(), "rows": rows, "best_f1": best, "scores": scores}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
