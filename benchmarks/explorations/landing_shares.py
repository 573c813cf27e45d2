"""How well the landing's defect share (what threshold rule ``share`` flags) is estimated without labels,
on the elpv landings of ``benchmarks/adaptation.py``.

    .venv/bin/python benchmarks/explorations/landing_shares.py [--seeds 0 1 2]

For each elpv domain and gate seed: the share ``TargetMemory.landing_share`` fits to the fit part's
mutual scores (what ``jobs/adapt_target.py`` computes), beside the true shares read from elpv's labels
afterwards: defective cells, and defective plus ambiguous cells (elpv's 0.33 / 0.67 defect
probabilities, which land too). Figures go to benchmarks/results/landing_shares.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import machine, save  # noqa: E402

from ray_ad.adaptation.gate import GateConfig, split_landing  # noqa: E402
from ray_ad.data import Sample, load_samples  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    args = parser.parse_args()
    rows = []
    for domain in ("poly", "mono"):
        landed = load_samples(f"elpv:{domain}?layout=landing", "landing")
        for seed in args.seeds:
            fit_part = split_landing([s.path for s in landed], GateConfig(seed=seed))[0]
            memory = build_detector("target_memory", method_config("target_memory", {}))
            fitted = memory.landing_share([Sample(p, -1) for p in fit_part], Runtime(False, args.cache_dir))
            # Labels are read from here on, for the comparison only.
            label = {s.path: s.label for s in landed}
            labels = [label[p] for p in fit_part]
            rows.append({"domain": domain, "seed": seed, "fit_part": len(fit_part), "fitted_share": fitted,
                         "defective": sum(v == 1 for v in labels) / len(labels),
                         "defective_or_ambiguous": sum(v != 0 for v in labels) / len(labels)})
            print(rows[-1], flush=True)
    lines = ["| landing | gate seed | images fitted on | share fitted (no labels) | defective | "
             "defective or ambiguous |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| elpv {r['domain']} | {r['seed']} | {r['fit_part']} | {r['fitted_share']:.3f} | "
              f"{r['defective']:.3f} | {r['defective_or_ambiguous']:.3f} |" for r in rows]
    save("landing_shares", {"machine": machine(), "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
