"""NAGL's two maps fused in the normal references' own units, applied to trained generalists at scoring time.

    .venv/bin/python benchmarks/explorations/nagl_calibrated_fusion.py --target magnetic_tile \
        --models runs/nagl_pmt_paired/procedural-mt-seed0 runs/nagl_pmt_paired/procedural-mt-seed1 [--name NAME]

The paper fuses S = S_n + S_a, which weighs the two maps by their raw ranges. Off the source domain the
two need not be on one scale: S_a's level can swing from image to image as much as S_n's top cells do
(the NAGL README's diagnosis on poly). Here each map is put in units of its own spread on the line's
normal references, which every line has and which hold no defect: each normal reference is scored
against the other K - 1 (S_n from its nearest cell among theirs; S_a from its residual to them and the
proxies RM mined), and S = (S_n - mu_n) / sigma_n + (S_a - mu_a) / sigma_a over those cells. A map that
varies a lot on normal images then counts for less. It needs K >= 2, so only N4+A1 is scored; the
paper's fusion beside it. 5 draws, as ``benchmarks/nagl.py`` draws them. A variant is chosen on the
held-out ``procedural-mt`` task (NAGL README), so run this on magnetic_tile with those generalists
first. Figures go to benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import DEFAULT_MAGNETIC_TILE, machine, save  # noqa: E402
from nagl import Target, anomaly_map, draw_and_search, figures, resolve  # noqa: E402
from nagl_centred_anomaly import over_draws  # noqa: E402

from ray_ad.bundle import load_bundle  # noqa: E402
from ray_ad.methods.nagl.scoring import (  # noqa: E402
    anomaly_guided_score,
    fused_map,
    normal_guided_score,
    residual,
    standardised,
    top_mean,
)

VARIANTS = ("paper: S_n + S_a", "calibrated on the normal references", "S_n alone")


@torch.no_grad()
def reference_maps(detector, statistics, references: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S_n and S_a ``[K, N]`` of each normal reference scored against the other K - 1."""
    normal = detector._normal_cells
    normal = standardised(statistics, normal)[0] if statistics else normal
    per_image = normal[0].view(references, -1, normal.shape[-1])
    S_n, S_a = [], []
    for k in range(references):
        others = torch.cat([per_image[j] for j in range(references) if j != k])[None]
        res, s_n = residual(per_image[k][None], others)
        S_n.append(normal_guided_score(s_n)[0])
        query = per_image[k][None]
        S_a.append(anomaly_guided_score(query, detector.net(res, query, detector._P_tilde))[0])
    return torch.stack(S_n), torch.stack(S_a)


@torch.no_grad()
def score(target: Target, detectors: list, draw: int, references: int) -> dict[str, list[dict[str, float]]]:
    drawn = draw_and_search(target, detectors[0], references, draw)
    out: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    for detector in detectors:
        S_a = anomaly_map(detector, drawn)  # also sets the draw's references (and RM's proxies) on it
        ref_n, ref_a = reference_maps(detector, drawn.statistics, references)
        calibrated = (drawn.S_n - ref_n.mean()) / ref_n.std() + (S_a - ref_a.mean()) / ref_a.std()
        top = detector.config.top_fraction
        for variant, S in zip(VARIANTS, (fused_map(drawn.S_n, S_a), calibrated, drawn.S_n)):
            out[variant].append(figures(target, drawn.keep, S, top_mean(S, top), detector))
        print(f"draw {draw}: sigma_n {ref_n.std():.4f} sigma_a {ref_a.std():.4f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="elpv:mono, elpv:poly or magnetic_tile")
    parser.add_argument("--models", nargs="+", required=True, help="trained NAGL bundles (one per seed)")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--references", type=int, default=4, help="K normal references (at least 2)")
    parser.add_argument("--cache-dir", default="/tmp/ray_ad_nagl_cache")
    parser.add_argument("--name", default="nagl_calibrated_fusion")
    args = parser.parse_args()
    if args.references < 2:
        parser.error("--references must be at least 2: each normal reference is scored against the others")
    detectors = [load_bundle(uri) for uri in args.models]
    if any(d.config.centre_anomaly_map for d in detectors):
        sys.exit("error: these generalists centre S_a (centre_anomaly_map); this exploration scores the default")
    target = Target(resolve(args.target, str(DEFAULT_MAGNETIC_TILE))[0], detectors[0], args.cache_dir)
    report: dict = {"machine": machine(), "target": args.target, "models": args.models, "rows": {}}
    setting = f"N{args.references}+A1"
    lines = [f"NAGL on {args.target}, {len(detectors)} generalist(s), {args.draws} draws, {setting}: "
             "mean (spread over seeds)", "",
             "| fusion | image AUROC | ± seeds | pixel AUROC |", "|---|---:|---:|---:|"]
    draws = [score(target, detectors, draw, args.references) for draw in range(args.draws)]
    for variant in VARIANTS:
        row = over_draws(draws, variant)
        report["rows"][f"{variant} {setting}"] = row
        pixel = f"{row['pixel_auroc']['mean']:.4f}" if "pixel_auroc" in row else "-"
        lines.append(f"| {variant} | {row['image_auroc']['mean']:.4f} | {row['image_auroc']['seed_std']:.4f} | "
                     f"{pixel} |")
        print(lines[-1], flush=True)
    save(args.name, report, "\n".join(lines))


if __name__ == "__main__":
    main()
