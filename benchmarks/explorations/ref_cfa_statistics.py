"""Which way does each REF statistic point on each domain? Image AUROC of every statistic of the signature,
alone, for the source model on its own held-out share, the same model on the target (w/o CFA) and the
adapted model on the target (T1 + TA + DSA, before SFA).

    .venv/bin/python benchmarks/explorations/ref_cfa_statistics.py [--root runs/fleet] [--source-line elpv-mono]
        [--adapted-line elpv-poly] [--source elpv:mono] [--target elpv:poly]

Run it after the README's main job, which publishes both lines. A statistic scores an image by its
largest cell value (the served score is close to that: the mean of the top 1% of pixels) and by its mean
over cells; its direction is "up" or "down" on a domain when both agree. An AUROC under 0.5 means the
statistic is *lower* on defective images. CFA's three alignments match step profiles, subspaces and
moments; none of them can turn a statistic whose direction differs between the domains, and the source
head reads every statistic in the source's direction. Labels are read here only to evaluate. Figures go
to benchmarks/results/ref_cfa_statistics.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

# benchmarks/ (the shared _common and the main benchmarks) and this folder (the other explorations)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import RESULTS, save  # noqa: E402

from ray_ad import registry  # noqa: E402
from ray_ad.data import Sample, load_samples, split_calibration  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.methods.ref_cfa.fields import COMPONENTS  # noqa: E402
from ray_ad.methods.ref_cfa.model import REFCFA  # noqa: E402
from ray_ad.metrics import auroc  # noqa: E402


@torch.no_grad()
def statistic_aurocs(detector: REFCFA, samples: list[Sample], cache_dir: str) -> dict[str, tuple[float, float]]:
    """{statistic: (AUROC of the cell max, AUROC of the cell mean)} plus the served head score."""
    labels = np.array([s.label for s in samples])
    features = detector.extract_features(samples, Runtime(cache_dir=cache_dir), desc="features")
    fields = detector.domain_fields(features)
    _, stats = detector.signature(fields)
    cells = detector.grid**2
    columns = {f"E^att_{x}": stats.E[:, i] for i, x in enumerate(COMPONENTS)}
    columns |= {f"NS^att_{x}": stats.NS[:, i] for i, x in enumerate(COMPONENTS)}
    columns["DV"] = stats.DV
    out = {"head (served image score)": (auroc(detector.score_fields(fields).numpy(), labels), float("nan"))}
    for name, values in columns.items():
        per_image = values.detach().cpu().float().reshape(-1, cells)
        out[name] = (auroc(per_image.amax(1).numpy(), labels), auroc(per_image.mean(1).numpy(), labels))
    return out


def _direction(source: tuple[float, float], adapted: tuple[float, float]) -> str:
    """'flips' when max and mean agree on each side and the sides disagree; 'unclear' when max and
    mean disagree on a side."""
    sides = []
    for values in (source, adapted):
        ups = {value > 0.5 for value in values}
        if len(ups) > 1:
            return "unclear"
        sides.append(ups.pop())
    return "same" if sides[0] == sides[1] else "**flips**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/fleet")
    parser.add_argument("--source-line", default="elpv-mono")
    parser.add_argument("--adapted-line", default="elpv-poly")
    parser.add_argument("--source", default="elpv:mono", help="the source's labelled data (its held-out share)")
    parser.add_argument("--target", default="elpv:poly", help="labelled target data; its test split is scored")
    parser.add_argument("--cache-dir", default=str(RESULTS / "cache"))
    args = parser.parse_args()
    source_model, source_version = registry.load_current(args.root, args.source_line, device="auto")
    adapted_model, adapted_version = registry.load_current(args.root, args.adapted_line, device="auto")
    for name, model in ((args.source_line, source_model), (args.adapted_line, adapted_model)):
        if not isinstance(model, REFCFA):
            sys.exit(f"{name} is not a REF+CFA model")
    if not adapted_model.adapted:
        sys.exit(f"{args.adapted_line} ({adapted_version}) is not an adapted model")
    # The same hashed share train_detector holds out of the source's labelled images.
    _, held_out = split_calibration([s for s in load_samples(args.source) if s.label in (0, 1)], 0.1)
    target_test = [s for s in load_samples(args.target, "test") if s.label in (0, 1)]
    columns = {
        f"source model on {args.source} (held out)": statistic_aurocs(source_model, held_out, args.cache_dir),
        f"source model on {args.target} (w/o CFA)": statistic_aurocs(source_model, target_test, args.cache_dir),
        f"adapted model on {args.target} (before SFA)": statistic_aurocs(adapted_model, target_test, args.cache_dir),
    }
    names = list(columns)
    lines = [f"Image AUROC of each statistic alone, cell max / cell mean ({args.source_line} {source_version}, "
             f"{args.adapted_line} {adapted_version}). Under 0.5: lower on defective images.", "",
             "| statistic | " + " | ".join(names) + " | direction source -> adapted |",
             "|---|" + "---:|" * len(names) + "---|"]
    for row in columns[names[0]]:
        cells = [columns[n][row] for n in names]
        text = [f"{a:.3f}" if np.isnan(b) else f"{a:.3f} / {b:.3f}" for a, b in cells]
        direction = "" if row.startswith("head") else _direction(cells[0], cells[2])
        lines.append(f"| {row} | " + " | ".join(text) + f" | {direction} |")
    table = "\n".join(lines)
    print(table)
    save("ref_cfa_statistics", {"source_version": source_version, "adapted_version": adapted_version,
                                "columns": columns}, table)


if __name__ == "__main__":
    main()
