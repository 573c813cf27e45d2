"""REF+CFA as the paper has it, and with each correction a review against the paper asked for.

    .venv/bin/python benchmarks/explorations/ref_cfa_corrections.py [--tasks mono-poly poly-mono] [--seeds 0]
        [--target-nets scratch robust oracle] [--source-set KEY=VALUE ...] [--name NAME]

For each elpv task and seed, on the landing layout of ``benchmarks/adaptation.py`` (the same cached
source model, the same fit part of the landed batch, the same gate set held out of it):

- three target score networks T1: ``scratch`` (the default: every landed image of the fit part,
  defects included), ``robust`` (``target_trim``: a second pass without the fifth of the images the
  first T1 denoises worst; label-free) and ``oracle`` (the landed images *labelled* normal only: a
  diagnostic that reads labels, to separate "two networks" from "two domains"; never a candidate);
- for each T1, the alignment variants: the paper's CFA (TA by interpolating stored steps, absolute SFA
  ridge), TA over diffusion time, no TA, a relative SFA ridge, the g_phi input alignment, all three
  corrections together, and w/o SFA;
- for each: the gate's label-free score (what ``jobs/adapt_target.py`` would rank by), then, read
  afterwards, image AUROC and F1-max on the target's test split;
- the flip table: the image AUROC of each REF statistic alone on the target's test split, through S1
  (the source model as is) and through each T1 (adapted, before SFA), against its direction on the
  source's own held-out images. Under 0.5: the statistic is lower on defective cells.

``--source-set`` changes the source model's config (and so T1's, which starts from it), e.g.
``normalisation.kind=position_whiten score_net.gaussian_skip=true`` for score networks that start from
the Gaussian answer in whitened units and learn only what lies beyond it; such a source is trained
once and cached like the default one.

Figures go to benchmarks/results/ref_cfa_corrections[_NAME].{json,md}, rewritten after every T1.
About 15 CPU-minutes per T1 on 2 cores (twice that for ``robust``), with the sources cached.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr
from torch import nn

# benchmarks/ (the shared _common and the main benchmarks) and this folder (the other explorations)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import RESULTS, machine, save  # noqa: E402
from adaptation import TASKS, landing, source_model  # noqa: E402
from ref_cfa_statistics import statistic_aurocs  # noqa: E402

from ray_ad.adaptation.gate import gate_score, split_landing  # noqa: E402
from ray_ad.adaptation.promote import build_gate_set, split_overrides  # noqa: E402
from ray_ad.data import load_samples, split_calibration  # noqa: E402
from ray_ad.diffusion import GaussianSkip  # noqa: E402
from ray_ad.evaluation import compute_metrics, run_detector  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.methods.ref_cfa.model import REFCFA  # noqa: E402
from ray_ad.training import per_sample_epsilon_loss  # noqa: E402

ROBUST_TRIM = 0.2
VARIANTS: dict[str, dict[str, object]] = {
    "paper CFA (TA resample, absolute ridge)": {},
    "TA over diffusion time": {"temporal_mode": "timesteps"},
    "no TA": {"temporal": False},
    "relative SFA ridge (1e-2)": {"ridge_relative": True, "ridge": 1e-2},
    "g_phi input alignment": {"input_alignment": True},
    "all three corrections": {"temporal_mode": "timesteps", "ridge_relative": True, "ridge": 1e-2,
                              "input_alignment": True},
    "w/o SFA": {"second_order": False},
}


def target_net(source: REFCFA, kind: str, fit_part: list[str], labelled_normals: list[str], cache_dir: str,
               cache: dict) -> tuple[REFCFA, dict]:
    detector = copy.deepcopy(source)
    detector.config.target_trim = ROBUST_TRIM if kind == "robust" else 0.0
    images = labelled_normals if kind == "oracle" else fit_part
    tick = time.perf_counter()
    # The oracle's features (normals only) must not stand in for the fit part's in the alignment's cache.
    info = detector.fit_target_score_net(images, Runtime(progress=False, cache_dir=cache_dir),
                                         cache={} if kind == "oracle" else cache)
    info["seconds"] = time.perf_counter() - tick
    detector.config.target_trim = 0.0
    return detector, info


def run(task: str, seed: int, kinds: list[str], cache_dir: str, results: dict, name: str,
        source_overrides: list[str], variants: list[str]) -> None:
    source_domain, target_domain = TASKS[task]
    target = landing(target_domain, cache_dir)
    tick = time.perf_counter()
    source: REFCFA = source_model("ref_cfa", source_domain, seed, cache_dir, source_overrides)
    source_seconds = time.perf_counter() - tick
    labelled = [s for s in load_samples(f"elpv:{source_domain}") if s.label in (0, 1)]
    source_train, source_held_out = split_calibration(labelled, 0.1)  # as train_detector held it out
    if source.input_center is None:  # a cached source older than the input alignment
        normals = [s for s in source_train if s.label == 0]
        source.fit_input_anchors(normals, Runtime(progress=False, cache_dir=cache_dir))
    landed = load_samples(target, "landing")
    adapt_config = split_overrides([f"gate.seed={seed}"])[0]  # the job's gate, as benchmarks/adaptation.py runs it
    gate_config = adapt_config.gate
    fit_part, held_out = split_landing([s.path for s in landed], gate_config)
    fit_set = set(fit_part)
    labelled_normals = [s.path for s in landed if s.path in fit_set and s.label == 0]  # oracle T1 only
    gate_set = build_gate_set(source, target, held_out, adapt_config, Runtime(progress=False, cache_dir=cache_dir))
    test = [s for s in load_samples(target, "test") if s.label in (0, 1)]
    out = results.setdefault(task, {}).setdefault(str(seed), {"rows": {}, "target_nets": {}, "flips": {}})
    held_out_normals = [s for s in source_held_out if s.label == 0]
    out["source"] = {"overrides": source_overrides, "seconds_to_load_or_train": source_seconds,
                     "held_out_denoising_loss": denoising_loss(source, held_out_normals, cache_dir)}
    print(f"{task} seed {seed} | source: {out['source']}", flush=True)
    out["flips"]["source model on its held-out images"] = statistic_aurocs(source, source_held_out, cache_dir)
    out["flips"]["S1 on the target (w/o CFA)"] = statistic_aurocs(source, test, cache_dir)
    source_row = {**_scores(source, test), "gate_auroc": gate_score(source, gate_set, gate_config)["gate_auroc"]}
    out["rows"]["source as is"] = source_row
    print(f"{task} seed {seed} | source as is: {source_row}", flush=True)
    for kind in kinds:
        cache: dict = {}
        adapted, info = target_net(source, kind, fit_part, labelled_normals, cache_dir, cache)
        out["target_nets"][kind] = info
        print(f"{task} seed {seed} | T1 {kind}: {info}", flush=True)
        paper = adapted.config.cfa
        for variant in variants:
            overrides = VARIANTS[variant]
            adapted.config.cfa = dataclasses.replace(paper, **overrides)
            tick = time.perf_counter()
            alignment = adapted.fit_alignment(fit_part, Runtime(progress=False, cache_dir=cache_dir), cache=cache)
            row = {**_scores(adapted, test), "gate_auroc": gate_score(adapted, gate_set, gate_config)["gate_auroc"],
                   "seconds": time.perf_counter() - tick, "diagnostics": alignment}
            out["rows"][f"T1 {kind}, {variant}"] = row
            print(f"{task} seed {seed} | T1 {kind}, {variant}: AUROC {row['image_auroc']:.3f} "
                  f"gate {row['gate_auroc']:.3f}", flush=True)
            if variant == "w/o SFA":  # the statistics as the head reads them, before SFA
                out["flips"][f"T1 {kind} on the target (TA + DSA, before SFA)"] = statistic_aurocs(
                    adapted, test, cache_dir)
        adapted.config.cfa = paper
        names = [n for n in out["rows"] if "oracle" not in n]  # the gate ranks candidates only
        gate_values = [out["rows"][n]["gate_auroc"] for n in names]
        test_values = [out["rows"][n]["image_auroc"] for n in names]
        out["gate_spearman"] = float(spearmanr(gate_values, test_values).statistic) if len(names) > 2 else None
        save(f"ref_cfa_corrections{name}", {"machine": machine(), "results": results}, table(results))


class _Zero(nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def denoising_loss(detector: REFCFA, normals: list, cache_dir: str) -> dict[str, float]:
    """S1's mean denoising loss on ``normals`` (the source's held-out normals) at the field timesteps,
    beside the loss of the N(0, I) denoiser (eps = sqrt(1 - alpha_bar_t) x_t) on the same noise draws.
    An S1 at that reference's loss is in the "Gaussian regime": what it predicts is the Gaussian's
    answer in its domain's standardisation, and every REF statistic a quadratic form of x0."""
    features = detector.extract_features(normals, Runtime(progress=False, cache_dir=cache_dir), desc="features")
    x0 = detector.source.normalise(features.to(detector.device))
    steps = detector.timesteps.tolist()
    gaussian = GaussianSkip(_Zero(), detector.schedule).to(detector.device)
    return {"s1": float(per_sample_epsilon_loss(detector.source.net, detector.schedule, x0, steps).mean()),
            "gaussian_n01": float(per_sample_epsilon_loss(gaussian, detector.schedule, x0, steps).mean())}


def _scores(detector, test) -> dict[str, float]:
    metrics = compute_metrics(run_detector(detector, test, progress=False))
    return {k: metrics[k] for k in ("image_auroc", "image_f1max")}


def table(results: dict) -> str:
    lines = []
    for task, seeds in results.items():
        for seed, out in seeds.items():
            source = out.get("source", {})
            loss = source.get("held_out_denoising_loss")
            lines += [f"### {task.replace('-', ' -> ')}, seed {seed}", "",
                      f"Source config overrides: {source.get('overrides') or 'none'}. "
                      + (f"S1's denoising loss on the source's held-out normals at the field timesteps: "
                         f"{loss['s1']:.3f} (the N(0, I) denoiser's: {loss['gaussian_n01']:.3f})." if loss else ""),
                      "",
                      "| model | image AUROC | F1-max | gate AUROC (label-free) |", "|---|---:|---:|---:|"]
            for row_name, row in out["rows"].items():
                lines.append(f"| {row_name} | {row['image_auroc']:.3f} | {row['image_f1max']:.2f} | "
                             f"{row['gate_auroc']:.3f} |")
            rho = out.get("gate_spearman")
            lines += ["", f"Gate Spearman with test AUROC over the label-free rows: "
                          f"{'n/a' if rho is None else f'{rho:.2f}'}", ""]
            nets = out["target_nets"]
            if nets:
                lines += ["| T1 | images | loss first | loss last | second pass loss last | seconds |",
                          "|---|---:|---:|---:|---:|---:|"]
                for kind, info in nets.items():
                    second = info.get("target_pass2_loss_last")
                    images = info.get("target_images_kept", info.get("target_images"))
                    lines.append(f"| {kind} | {images} | {info['target_loss_first']:.3f} | "
                                 f"{info['target_loss_last']:.3f} | {'' if second is None else f'{second:.3f}'} | "
                                 f"{info['seconds']:.0f} |")
                lines.append("")
            flips = out["flips"]
            columns = list(flips)
            lines += ["Image AUROC of each statistic alone (cell max), test split of the target except the first "
                      "column. **bold**: the other side of 0.5 from the source's own held-out images.", "",
                      "| statistic | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
            for statistic in flips[columns[0]]:
                if statistic.startswith("head"):
                    continue
                reference = flips[columns[0]][statistic][0]
                cells = []
                for column in columns:
                    value = flips[column][statistic][0]
                    flipped = column != columns[0] and (value > 0.5) != (reference > 0.5)
                    cells.append(f"**{value:.3f}**" if flipped else f"{value:.3f}")
                lines.append(f"| {statistic} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["mono-poly", "poly-mono"], choices=["mono-poly", "poly-mono"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--target-nets", nargs="+", default=["scratch", "robust", "oracle"],
                        choices=["scratch", "robust", "oracle"])
    parser.add_argument("--source-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the source model's config (trained and cached per config)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                        help="alignment variants to run (default: all; 'w/o SFA' also gives T1's flip column)")
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    name = f"_{args.name}" if args.name else ""
    results: dict = {}
    for task in args.tasks:
        for seed in args.seeds:
            run(task, seed, args.target_nets, args.cache_dir, results, name, args.source_set, args.variants)
    print(table(results))
    print(f"figures in {RESULTS}/ref_cfa_corrections{name}.md")


if __name__ == "__main__":
    main()
