"""CostFilter-AD's ablations on magnetic_tile (Gaussian base), over filter seeds, in one table.

    .venv/bin/python benchmarks/costfilter_ablations.py run [--seeds 1 2] [--only no_rcsa ...]
    .venv/bin/python benchmarks/costfilter_ablations.py table

``run`` runs ``costfilter.py --bases gaussian`` once per ablation (a config change of the defaults) for the
given seeds, each saved as ``results/costfilter_ablation_<name>[_seeds<S>].{json,md}``. ``table`` merges
every saved run of each ablation (seeds from several runs pooled: one row per ablation, mean ± std over
all its seeds) beside the defaults' row (``results/costfilter.json``), and saves
``results/costfilter_ablations.{json,md}``. Runs made with the same seed twice would be counted twice:
give each run its own seeds. Every row says the matching depth D and the training steps it ran at (the
default D changed from 32 to 16 after most ablations were run, the steps from 600 to the paper's 2,560
after all of them), and seeds run at a different D or budget are never pooled.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, save  # noqa: E402

ABLATIONS = {
    "no_rcsa": ["filter.rcsa=false"],  # Eq. 3b-c off
    "no_sg": ["filter.spatial_guidance=false"],  # the query features' guidance stream off
    "no_mg": ["filter.matching_guidance=false"],  # M-bar's guidance off (the base's map still guides)
    "one_template": ["templates=1"],  # N = 1
    "depth16": ["matching_depth=16"],  # D = 16 (run while 32 was the default; 16 is the default now)
    "depth32": ["matching_depth=32"],  # D = 32, our first default
    "eq5_loss": ["loss.mse=0"],  # Eq. 5 alone: without the MSE term the authors' code adds
    "paper_filter": ["filter.base_guidance=false"],  # the paper's filter: no base guidance
    # Eq. 5's terms one at a time (run at D = 16, the defaults since the loss ablations were added)
    "no_ssim": ["loss.ssim=0"],  # without L_SSIM
    "no_soft_iou": ["loss.soft_iou=0"],  # without L_SoftIoU
    "no_focal": ["loss.focal=0"],  # without L_Focal (SSIM, soft-IoU and MSE still train the map)
}
KEYS = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro", "model_seconds_per_image")


def run(names: list[str], seeds: list[int]) -> None:
    script = Path(__file__).resolve().parent / "costfilter.py"
    suffix = "" if seeds == [0] else "_seeds" + "".join(str(s) for s in seeds)
    for name in names:
        overrides = [arg for value in ABLATIONS[name] for arg in ("--set", value)]
        command = [sys.executable, str(script), "--bases", "gaussian", "--overlays", "0", "--seeds",
                   *map(str, seeds), *overrides, "--name", f"costfilter_ablation_{name}{suffix}"]
        print(f"ablation {name}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True)


def runs_of(name: str) -> list[dict]:
    """Every seed's figures of ablation ``name`` from its saved runs (the files named after it)."""
    rows = []
    for path in sorted(RESULTS.glob(f"costfilter_ablation_{name}*.json")):
        stem = path.stem.removeprefix("costfilter_ablation_")
        if stem != name and not stem.startswith(f"{name}_seeds"):
            continue  # another ablation whose name starts with this one's
        report = json.loads(path.read_text())
        if report.get("overrides") != ABLATIONS[name]:
            raise SystemExit(f"error: {path} ran {report.get('overrides')}, not {name}'s {ABLATIONS[name]}")
        setting = setting_of(report)
        if rows and setting != {key: rows[0][key] for key in setting}:
            raise SystemExit(f"error: {path} ran at {setting}, other runs of {name} at "
                             f"{ {key: rows[0][key] for key in setting} }: re-run them at one setting")
        rows += [{**seed, **setting} for seed in report["bases"]["gaussian"]["filtered"]]
    return rows


def setting_of(report: dict) -> dict[str, int]:
    """The matching depth D and training steps a saved run used (every run saved its CostFilter config)."""
    config = report["bases"]["gaussian"]["config"]
    return {"matching_depth": int(config["matching_depth"]), "steps": int(config["train"]["steps"])}


def table() -> None:
    saved_defaults = json.loads((RESULTS / "costfilter.json").read_text())
    defaults = saved_defaults["bases"]["gaussian"]
    default_rows = [{**seed, **setting_of(saved_defaults)} for seed in defaults["filtered"]]
    rows = {"defaults (costfilter.json)": default_rows, **{name: runs_of(name) for name in ABLATIONS}}
    lines = ["# CostFilter-AD ablations, Gaussian base, magnetic_tile (mean ± std over the filter seeds run)", "",
             "| filter | D | steps | seeds | " + " | ".join(KEYS) + " |", "|---|---:|---:|---:|" + "---:|" * len(KEYS),
             "| gaussian base (no filter) | - | - | - | "
             + " | ".join(f"{defaults['base'][k]:.4f}" for k in KEYS) + " |"]
    report = {}
    for name, seeds in rows.items():
        if not seeds:
            lines.append(f"| {name} | - | - | 0 | " + " | ".join("-" for _ in KEYS) + " |")
            continue
        summary = {k: (float(np.mean([s[k] for s in seeds])), float(np.std([s[k] for s in seeds]))) for k in KEYS}
        depth, steps = seeds[0]["matching_depth"], seeds[0]["steps"]
        report[name] = {"seeds": len(seeds), "matching_depth": depth, "steps": steps,
                        "overrides": ABLATIONS.get(name, []), "summary": summary}
        lines.append(f"| {name} | {depth} | {steps} | {len(seeds)} | "
                     + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in summary.values()) + " |")
    text = "\n".join(lines)
    print(text)
    save("costfilter_ablations", report, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "table"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=list(ABLATIONS), default=list(ABLATIONS))
    args = parser.parse_args()
    if args.action == "run":
        run(args.only, args.seeds)
    table()


if __name__ == "__main__":
    main()
