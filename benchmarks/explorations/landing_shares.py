"""How well the landing's defect share (what threshold rule ``share`` flags) is estimated without labels,
on the elpv landings of ``benchmarks/adaptation.py``.

    .venv/bin/python benchmarks/explorations/landing_shares.py [--seeds 0 1 2] [--landings elpv magnetic_tile]

For each elpv domain and gate seed: the share ``TargetMemory.landing_share`` fits to the fit part's
mutual scores (what ``jobs/adapt_target.py`` computes), beside the true shares read from elpv's labels
afterwards: defective cells, and defective plus ambiguous cells (elpv's 0.33 / 0.67 defect
probabilities, which land too). ``magnetic_tile``: the development set's contaminated landing (as in
``target_memory_drop.py``), and the same fit part's normals alone (a clean landing, picked by label).
Figures go to benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import DEFAULT_MAGNETIC_TILE, contaminated_landing, machine, save  # noqa: E402

from ray_ad.adaptation.gate import GateConfig, split_landing  # noqa: E402
from ray_ad.data import Sample, load_samples  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--landings", nargs="+", default=["elpv"], choices=["elpv", "magnetic_tile"])
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    parser.add_argument("--name", default="landing_shares")
    args = parser.parse_args()
    runtime = Runtime(False, args.cache_dir)
    rows = []

    def measure(domain: str, seed: int, fit_part: list[str], label: dict[str, int]) -> None:
        memory = build_detector("target_memory", method_config("target_memory", {}))
        fitted = memory.landing_share([Sample(p, -1) for p in fit_part], runtime)
        # Labels are read from here on, for the comparison only.
        labels = [label[p] for p in fit_part]
        rows.append({"domain": domain, "seed": seed, "fit_part": len(fit_part), "fitted_share": fitted,
                     "defective": sum(v == 1 for v in labels) / len(labels),
                     "defective_or_ambiguous": sum(v != 0 for v in labels) / len(labels)})
        print(rows[-1], flush=True)

    for domain in ("poly", "mono") if "elpv" in args.landings else ():
        landed = load_samples(f"elpv:{domain}?layout=landing", "landing")
        for seed in args.seeds:
            measure(f"elpv {domain}", seed, split_landing([s.path for s in landed], GateConfig(seed=seed))[0],
                    {s.path: s.label for s in landed})
    if "magnetic_tile" in args.landings:
        landed = contaminated_landing(load_samples(str(DEFAULT_MAGNETIC_TILE)))[0]
        label = {s.path: s.label for s in landed}
        fit_part = split_landing([s.path for s in landed], GateConfig())[0]
        measure("magnetic_tile, contaminated", 0, fit_part, label)
        measure("magnetic_tile, its normals only (picked by label)", 0, [p for p in fit_part if label[p] == 0], label)
    lines = ["| landing | gate seed | images fitted on | share fitted (no labels) | defective | "
             "defective or ambiguous |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['domain']} | {r['seed']} | {r['fit_part']} | {r['fitted_share']:.3f} | "
              f"{r['defective']:.3f} | {r['defective_or_ambiguous']:.3f} |" for r in rows]
    save(args.name, {"machine": machine(), "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
