"""The promotion gate's decision rule, replayed on every recorded adaptation run.

    .venv/bin/python benchmarks/adaptation_gate_replay.py [RESULTS.json ...] [--candidates NAME ...]
        [--name adaptation_gate_replay]

A gate score depends on the held-out images and the candidates, not on the rule that picks among the
scores, so a change to ``gate.choose`` can be measured on the gate scores that ``benchmarks/adaptation.py``
saved, without rebuilding a candidate. For every run (task x seed) and every gate treatment recorded
(the job's own gate, and each ``--gate-variants`` treatment), this applies today's ``choose`` (margin
0.01, candidates in the fixed preference order) and reads, from the test labels saved beside the scores, the
pick's distance to the best candidate and to the source as is. ``--candidates`` replays a job that
builds only those candidates (the others' recorded rows still count for "best", so a candidate left
out that would have been better shows as a loss). Runs that appear in several files
(same task, seed and treatment) are listed once, from the last file given.
Figures go to benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, save  # noqa: E402

from ray_ad.adaptation.gate import GateConfig, choose  # noqa: E402
from ray_ad.adaptation.promote import CANDIDATES  # noqa: E402

DEFAULT_FILES = ("adaptation_memories", "adaptation_memories_suspects", "adaptation_memories_suspects_positive",
                 "adaptation_memories_suspects_positive_s12", "adaptation_tile_shift",
                 "adaptation_tile_shift_suspects_positive")
JOB_GATE = "suspects rank as negatives"  # the job's default gate (no suspects looked for)


def replay(rows: dict, gate_auroc: dict[str, float], margin: float, candidates: list[str] | None = None) -> dict:
    names = [name for name in CANDIDATES if name in gate_auroc]
    built = [name for name in names if candidates is None or name in candidates]
    winner, _ = choose({name: {"gate_auroc": gate_auroc[name]} for name in built}, None, margin)
    best = max(names, key=lambda name: rows[name]["image_auroc"])
    return {"pick": winner, "best": best, "pick_minus_best": rows[winner]["image_auroc"] - rows[best]["image_auroc"],
            "pick_minus_source": rows[winner]["image_auroc"] - rows["source"]["image_auroc"],
            "gate_auroc": {name: gate_auroc[name] for name in names}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", default=[str(RESULTS / f"{name}.json") for name in DEFAULT_FILES])
    parser.add_argument("--candidates", nargs="+", choices=CANDIDATES,
                        help="the candidates the replayed job builds (default: every one recorded)")
    parser.add_argument("--name", default="adaptation_gate_replay")
    args = parser.parse_args()
    margin = GateConfig().margin
    runs: dict[tuple[str, int, str], dict] = {}
    for path in args.files:
        results = json.loads(Path(path).read_text())["results"]
        for task, seeds in results.items():
            for seed, run in seeds.items():
                treatments = {JOB_GATE: {n: r["gate_auroc"] for n, r in run["rows"].items() if "gate_auroc" in r}}
                for variant, entry in (run.get("gate_variants") or {}).items():
                    treatments[variant] = entry["gate_auroc"]
                for variant, gate_auroc in treatments.items():
                    runs[(task, int(seed), variant)] = {"file": Path(path).name,
                                                        **replay(run["rows"], gate_auroc, margin, args.candidates)}
    built = "every recorded candidate" if args.candidates is None else ", ".join(args.candidates)
    lines = [f"Today's `choose` (margin {margin}, order {', '.join(CANDIDATES)}) on the recorded gate scores; "
             f"candidates built: {built} (best: of every recorded row)", "",
             "| task | seed | gate treatment | gate AUROC | pick | best by test labels | pick - best | pick - source |",
             "|---|---:|---|---|---|---|---:|---:|"]
    for (task, seed, variant), entry in sorted(runs.items()):
        scores = ", ".join(f"{n} {v:.3f}" for n, v in entry["gate_auroc"].items())
        lines.append(f"| {task} | {seed} | {variant} | {scores} | {entry['pick']} | {entry['best']} | "
                     f"{entry['pick_minus_best']:+.3f} | {entry['pick_minus_source']:+.3f} |")
    lines.append("")
    for variant in sorted({key[2] for key in runs}):
        elpv = [entry for (task, _, v), entry in runs.items() if v == variant and task != "magnetic_tile-shift"]
        within = sum(entry["pick_minus_best"] >= -0.02 for entry in elpv)
        worst = min(entry["pick_minus_source"] for entry in elpv)
        lines.append(f"- {variant}: the pick is the best or within 2 points of it in {within} of {len(elpv)} "
                     f"recorded elpv runs; its worst gain over the source as is {worst:+.3f}")
        for task in sorted({key[0] for key in runs if key[2] == variant}):
            gains = [entry["pick_minus_source"] for (t, _, v), entry in runs.items() if v == variant and t == task]
            lines.append(f"  - {task}: mean gain of the pick over the source as is {np.mean(gains):+.3f} "
                         f"over {len(gains)} runs")
    text = "\n".join(lines)
    runs_by_key = {" / ".join(map(str, key)): value for key, value in runs.items()}
    save(args.name, {"margin": margin, "candidates": args.candidates, "runs": runs_by_key}, text)
    print(text)


if __name__ == "__main__":
    main()
