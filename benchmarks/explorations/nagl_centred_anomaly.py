"""NAGL's S_a measured from each query's median cell, applied to trained generalists at scoring time only.

    .venv/bin/python benchmarks/explorations/nagl_centred_anomaly.py --target elpv:poly \
        --models runs/nagl_models_paired/mt-elpv-seed0 runs/nagl_models_paired/mt-elpv-seed1 ... [--name NAME]

AFL's proxies P^ are weighted sums of the query's own features (V_2 = F^q), so S_a's level over a whole
image follows how alike that image's cells are. This scores a target with the generalists as trained
(``centre_anomaly_map`` off) twice per reference draw: S = (S_n + S_a) / 2 as the paper fuses, and with
S_a less its median cell per image (``scoring.centred_anomaly_score``, +0.5 so that S stays near [0, 1];
a constant changes no AUROC). Settings N1+A1 and N4+A1, 5 draws, as ``benchmarks/nagl.py`` draws them.
Reading an evaluation target's labels, it can choose nothing: a variant is chosen on the held-out
``procedural-mt`` task (NAGL README). Figures go to benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import DEFAULT_MAGNETIC_TILE, machine, save  # noqa: E402
from nagl import Target, anomaly_map, draw_and_search, figures, resolve  # noqa: E402

from ray_ad.bundle import load_bundle  # noqa: E402
from ray_ad.methods.nagl.scoring import centred_anomaly_score, fused_map, top_mean  # noqa: E402

VARIANTS = ("as trained", "S_a centred at scoring")


@torch.no_grad()
def score(target: Target, detectors: list, normal: int, draw: int) -> dict[str, list[dict[str, float]]]:
    """{variant: [figures per generalist]} for one draw of ``normal`` normal references and one abnormal."""
    drawn = draw_and_search(target, detectors[0], normal, draw)
    out: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    for detector in detectors:
        S_a = anomaly_map(detector, drawn)  # as trained: these generalists do not centre (checked in main)
        top = detector.config.top_fraction
        for variant, S in zip(VARIANTS, (fused_map(drawn.S_n, S_a),
                                         fused_map(drawn.S_n, centred_anomaly_score(S_a) + 0.5))):
            out[variant].append(figures(target, drawn.keep, S, top_mean(S, top), detector))
    return out


def over_draws(draws: list[dict[str, list[dict[str, float]]]], variant: str) -> dict[str, dict[str, float]]:
    """One variant's figures over the draws: per figure, the mean over draws and seeds and the spread of
    the per-seed means (``draws``: one ``{variant: [figures per generalist]}`` per draw)."""
    grid = {key: np.array([[f[key] for f in draw[variant]] for draw in draws]) for key in draws[0][variant][0]}
    return {key: {"mean": float(v.mean()), "seed_std": float(v.mean(0).std())} for key, v in grid.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="elpv:mono, elpv:poly or magnetic_tile")
    parser.add_argument("--models", nargs="+", required=True, help="trained NAGL bundles (one per seed)")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--cache-dir", default="/tmp/ray_ad_nagl_cache")
    parser.add_argument("--name", default="nagl_centred_anomaly")
    args = parser.parse_args()
    detectors = [load_bundle(uri) for uri in args.models]
    if any(d.config.centre_anomaly_map for d in detectors):
        sys.exit("error: these generalists already centre S_a (centre_anomaly_map); score them with benchmarks/nagl.py")
    target = Target(resolve(args.target, str(DEFAULT_MAGNETIC_TILE))[0], detectors[0], args.cache_dir)
    report: dict = {"machine": machine(), "target": args.target, "models": args.models, "rows": {}}
    lines = [f"NAGL on {args.target}, {len(detectors)} generalist(s), {args.draws} draws: mean (spread over seeds)", "",
             "| variant | setting | image AUROC | ± seeds | pixel AUROC |", "|---|---|---:|---:|---:|"]
    for normal in (1, 4):
        draws = [score(target, detectors, normal, draw) for draw in range(args.draws)]
        for variant in VARIANTS:
            row = over_draws(draws, variant)
            report["rows"][f"{variant} N{normal}+A1"] = row
            pixel = f"{row['pixel_auroc']['mean']:.4f}" if "pixel_auroc" in row else "-"
            lines.append(f"| {variant} | N{normal}+A1 | {row['image_auroc']['mean']:.4f} | "
                         f"{row['image_auroc']['seed_std']:.4f} | {pixel} |")
            print(lines[-1], flush=True)
    save(args.name, report, "\n".join(lines))


if __name__ == "__main__":
    main()
