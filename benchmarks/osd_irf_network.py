"""What OSD-IRF's score network adds over its own Gaussian reference (issue 22).

    .venv/bin/python benchmarks/osd_irf_network.py [--variants paper_t small_t paper_recipe narrow_deep context]
        [--seeds 0 1 2] [--budgets 300 600 1200] [--set key=value ...] [--toy-only | --no-toy] [--model BUNDLE]
        [--name osd_irf_network]

Every IRF is split into its Gaussian part, the exact noise prediction of N(0, I) data at the
network's input, and the network's residual r (``OSDIRF.irf_split``). With the recipe's whitening and
Gaussian skip, r = 0 is the ``gaussian`` detector, so the split says what training bought.

1. **Toy** (minutes; ``--toy-only --name osd_irf_network_toy`` runs it alone), per seed: the two-mode
   cells of ``ray_ad.data.toy_features``, which a Gaussian cannot describe; image AUROC of the Gaussian
   reference and of a small trained network at t = 500 (the paper's, trained on every t) and at t = 100
   (trained on t < 250); the same for REF's source network S1, read through the E_M of its reverse chain
   alone (no head), untrained (N(0, I)'s denoiser) and trained on t < 250; and the context variant's toy
   (``consistent_tile_split``: odd cells that are N(0, I) per position but belong to another image).
2. **magnetic_tile**: each variant (below, on top of ``configs/osd_irf_magnetic_tile.yaml`` with a
   CPU-sized DiT) is trained once per seed for the largest budget; at each budget the EMA network of
   that step scores the test split. Per budget: image / pixel AUROC of OSD-IRF as configured, of the
   ``gaussian`` reference (the same whitening, r = 0), and of ||r|| alone (its per-cell norm as the
   map, the map's maximum as the image score); Spearman of the image scores, trained against r = 0;
   the same with Eq. 6's noisy-state input averaged over 4 fixed draws. The gap per budget is the
   budget curve: trained minus reference.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MAGNETIC_TILE, machine, save, splits  # noqa: E402

from ray_ad.bundle import load_bundle  # noqa: E402
from ray_ad.config import apply_overrides, load_file  # noqa: E402
from ray_ad.data.toy_features import consistent_tile_split, toy_split  # noqa: E402
from ray_ad.evaluation import run_detector  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime, upsample_map  # noqa: E402
from ray_ad.metrics import auroc  # noqa: E402
from ray_ad.training import ScoreNetLoop  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
# A network 3 seeds x 2 variants can train on 2 CPU cores in an hour (the benchmark's h192 d6 takes 33 min each).
CPU_NETWORK = ["score_net.hidden=128", "score_net.depth=4"]
VARIANTS = {
    "paper_t": ["t=500"],  # the shipped recipe: the paper's t, trained on every t
    "small_t": ["t=100", "train.t_max=250"],  # where the optimal denoiser departs from the linear prior
    # The paper's own recipe on the same (pooled) features: per-channel standardisation, no Gaussian skip,
    # the paper's t = 500; its split still measures the network against N(0, I)'s exact denoiser.
    "paper_recipe": ["t=500", "normalisation.kind=channel", "score_net.gaussian_skip=false"],
    # Cheaper learning per step: small_t on a narrower, deeper net (about half the multiply-adds per step
    # of h128 d4), so the same CPU time buys more steps of the distribution.
    "narrow_deep": ["t=100", "train.t_max=250", "score_net.hidden=64", "score_net.depth=8"],
    # Cross-cell context as the network's job (ours): 2 x 2-cell blocks hidden, predicted from the rest of
    # the grid; Delta = x_0 - f(context), so r = 0 is the same Gaussian reference (ray_ad/diffusion/context.py).
    "context": ["irf_input=context", "train.objective=masked_context", "train.context_block=2",
                "score_net.gaussian_skip=false"],
}


# ------------------------------------------------------------------------------------------ toy
def toy_rows(seed: int = 0) -> dict[str, float]:
    backbone = {"image_size": 64, "grid_size": 4, "layers": [1]}
    gaussian = build_detector("gaussian", method_config("gaussian", {"backbone": backbone, "device": "cpu"}))
    train, calibration, test, labels = toy_split(gaussian.extractor.out_channels, 4, seed=seed)
    gaussian.fit_features(train)
    gaussian.calibrate_features(calibration)
    rows = {"gaussian reference": auroc(gaussian.predict_features(test).pred_score.numpy(), labels.numpy())}
    for name, t, t_max in [("trained, t = 500 (every t)", 500, 0), ("trained, t = 100 (t < 250)", 100, 250)]:
        config = {"backbone": backbone, "device": "cpu", "t": t, "seed": seed,
                  "normalisation": {"kind": "position_whiten"},
                  "score_net": {"hidden": 32, "depth": 2, "heads": 2, "gaussian_skip": True},
                  "train": {"steps": 600, "batch_size": 64, "lr": 1e-3, "warmup_steps": 20, "ema_decay": 0.99,
                            "t_max": t_max}}
        detector = build_detector("osd_irf", method_config("osd_irf", config))
        detector.fit_features(train, len(train), Runtime(progress=False))
        detector.calibrate_features(calibration)
        rows[name] = auroc(detector.predict_features(test).pred_score.numpy(), labels.numpy())
    # REF's source network S1 on the same toy, read without any head: the largest E_M (Eq. 6 of the
    # orthogonal residual M, Eq. 4) of an image's cells. N(0, I)'s denoiser has M = 0.
    for name, steps in [("REF S1 E_M, untrained (Gaussian denoiser)", 0), ("REF S1 E_M, trained (t < 250)", 800)]:
        ref = build_detector("ref_cfa", method_config("ref_cfa", {
            "backbone": backbone, "device": "cpu", "seed": seed,
            "normalisation": {"kind": "position_whiten", "ridge": 0.01},
            "score_net": {"hidden": 32, "depth": 2, "heads": 2, "gaussian_skip": True},
            "train": {"steps": steps, "batch_size": 64, "lr": 1e-3, "warmup_steps": 20, "ema_decay": 0.99,
                      "t_max": 250},
            "fields": {"timesteps": [200, 150, 100, 50], "token_dim": 4}}))
        ref.fit_source_features(train, Runtime(progress=False))
        e_m = ref.source_statistics(test).E[:, 1].view(len(test), -1).amax(1)
        rows[name] = auroc(e_m.numpy(), labels.numpy())
    rows.update(context_toy_rows(seed))
    return rows


def context_toy_rows(seed: int = 0) -> dict[str, float]:
    """The context variant's toy (``consistent_tile_split``): cells that are N(0, I) per position but carry
    another image's shared vector; the Gaussian reference against the context network, trained 400 steps."""
    backbone = {"image_size": 64, "grid_size": 4, "layers": [1]}
    gaussian = build_detector("gaussian", method_config("gaussian", {"backbone": backbone, "device": "cpu"}))
    train, calibration, test, labels = consistent_tile_split(gaussian.extractor.out_channels, 4, seed=seed)
    gaussian.fit_features(train)
    gaussian.calibrate_features(calibration)
    rows = {"odd cells: gaussian reference": auroc(gaussian.predict_features(test).pred_score.numpy(), labels.numpy())}
    config = {"backbone": backbone, "device": "cpu", "seed": seed, "irf_input": "context",
              "normalisation": {"kind": "position_whiten", "ridge": 0.01},
              "score_net": {"hidden": 32, "depth": 2, "heads": 2, "gaussian_skip": False},
              "train": {"steps": 400, "batch_size": 64, "lr": 1e-3, "warmup_steps": 20, "ema_decay": 0.99,
                        "objective": "masked_context", "context_block": 1}}
    detector = build_detector("osd_irf", method_config("osd_irf", config))
    detector.fit_features(train, len(train), Runtime(progress=False))
    detector.calibrate_features(calibration)
    rows["odd cells: context network, trained"] = auroc(detector.predict_features(test).pred_score.numpy(),
                                                        labels.numpy())
    return rows


# -------------------------------------------------------------------------------- magnetic_tile
def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    return auroc(maps.ravel(), masks.ravel())


@torch.no_grad()
def split_scores(detector, test_features: torch.Tensor) -> dict[str, np.ndarray]:
    """Image scores and maps of the detector as configured, and of ||r|| alone, in chunks."""
    scores, maps, r_scores, r_maps = [], [], [], []
    for chunk in test_features.split(16):
        prediction = detector.predict_features(chunk)
        _, residual = detector.irf_split(detector.normalise(chunk.to(detector.device)))
        r_cells = residual.pow(2).sum(2).sqrt().mean(0)  # ||r|| per cell, averaged over the draws
        r_map = upsample_map(r_cells, detector.image_size, detector.config.map_sigma).cpu()
        scores.append(prediction.pred_score.numpy())
        maps.append(prediction.anomaly_map.numpy())
        r_scores.append(r_map.flatten(1).amax(1).numpy())
        r_maps.append(r_map.numpy())
    return {"scores": np.concatenate(scores), "maps": np.concatenate(maps),
            "r_scores": np.concatenate(r_scores), "r_maps": np.concatenate(r_maps)}


def budget_row(detector, features: dict[str, torch.Tensor], reference, labels, masks) -> dict[str, float]:
    row: dict[str, float] = {}
    configured = detector.config.irf_input
    # The context network has one input of its own; the others compare Eq. 7's with Eq. 6's.
    for irf_input in ("context",) if configured == "context" else ("mean_path", "noisy"):
        detector.config.irf_input = irf_input
        detector.fit_irf_gaussian(detector.normalise(features["train"].to(detector.device)))
        detector.calibrate_features(features["calibration"])
        out = split_scores(detector, features["test"])
        prefix = "noisy_" if irf_input == "noisy" else ""
        row[f"{prefix}image_auroc"] = auroc(out["scores"], labels)
        row[f"{prefix}pixel_auroc"] = pixel_auroc(out["maps"], masks)
        row[f"{prefix}r_image_auroc"] = auroc(out["r_scores"], labels)
        row[f"{prefix}r_pixel_auroc"] = pixel_auroc(out["r_maps"], masks)
        row[f"{prefix}spearman_vs_reference"] = float(spearmanr(out["scores"], reference.scores).statistic)
    detector.config.irf_input = configured
    return row


def run_variant(name: str, seed: int, budgets: list[int], base: dict, data: dict, reference) -> list[dict]:
    config = apply_overrides(base, [*CPU_NETWORK, *VARIANTS[name], f"seed={seed}",
                                    f"train.steps={max(budgets)}"])
    detector = build_detector("osd_irf", method_config("osd_irf", config))
    if config["normalisation"] == base["normalisation"]:
        detector.normaliser = data["normaliser"]
    else:  # a variant with its own normalisation fits it on the same training features
        detector.normaliser.fit(data["features"]["train"].to(detector.device))
    x0 = detector.normalise(data["features"]["train"].to(detector.device))
    loop = ScoreNetLoop(detector.score_net, detector.schedule, detector.config.train, detector.device, seed)
    rows, start = [], time.perf_counter()
    for budget in sorted(budgets):
        loop.run(x0, until=budget, progress=sys.stderr.isatty())
        train_seconds = time.perf_counter() - start
        detector.score_net = copy.deepcopy(loop.ema).eval()
        row = {"variant": name, "seed": seed, "steps": budget, "train_seconds": train_seconds,
               "loss_last": float(np.mean(loop.losses[-50:]))}
        row.update(budget_row(detector, data["features"], reference, data["labels"], data["masks"]))
        print(f"[{name} seed {seed} steps {budget}] " + ", ".join(
            f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)), flush=True)
        rows.append(row)
    return rows


def prepare(data_path: str, base: dict, cache_dir: str) -> dict:
    """Features of train / calibration / test once, the Gaussian reference and the test masks."""
    train, calibration, test = splits(data_path)
    gaussian = build_detector("gaussian", method_config("gaussian", {
        "backbone": base["backbone"], "normalisation": base["normalisation"], "map_sigma": base.get("map_sigma", 4.0)}))
    runtime = Runtime(progress=sys.stderr.isatty(), cache_dir=cache_dir)
    features = {split: gaussian.extract_features(samples, runtime, desc=f"{split} features")
                for split, samples in [("train", train), ("calibration", calibration), ("test", test)]}
    gaussian.fit_features(features["train"])
    gaussian.calibrate_features(features["calibration"])
    reference = run_detector(gaussian, test, progress=False)
    # Every variant's normaliser is the same fit on the same features: fit it once, reuse it.
    return {"features": features, "reference": reference, "labels": reference.labels,
            "masks": reference.masks, "normaliser": gaussian.normaliser}


def table(toy: dict[str, list[float]], rows: list[dict], reference: dict[str, float]) -> str:
    lines: list[str] = []
    if toy:
        seeds = len(next(iter(toy.values())))
        lines += [f"## Toy: two-mode cells, anomalies between the modes (image AUROC, mean ± std over {seeds} "
                  "seeds of data and training)", "", "| detector | image AUROC |", "|---|---:|"]
        lines += [f"| {name} | {np.mean(values):.3f} ± {np.std(values):.3f} |" for name, values in toy.items()]
    if not rows:
        return "\n".join(lines)
    lines += [""] * bool(lines) + ["## magnetic_tile: trained vs its r = 0 reference (the `gaussian` detector)", "",
              f"r = 0 reference: image AUROC {reference['image_auroc']:.4f}, pixel AUROC "
              f"{reference['pixel_auroc']:.4f}.", "",
              "| variant | steps | seeds | image AUROC | pixel AUROC | gap image / pixel | ||r|| image / pixel "
              "| Spearman vs r = 0 | noisy input: image / pixel | noisy ||r|| pixel | wall s to this budget |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(r["variant"], r["steps"]) for r in rows}, key=lambda k: (list(VARIANTS).index(k[0]), k[1]))
    for variant, steps in keys:
        group = [r for r in rows if r["variant"] == variant and r["steps"] == steps]

        def stat(key: str, group=group) -> str:
            if any(key not in r for r in group):
                return "—"
            values = np.array([r[key] for r in group])
            return f"{values.mean():.4f} ± {values.std():.4f}" if len(values) > 1 else f"{values[0]:.4f}"

        gap_image = np.mean([r["image_auroc"] for r in group]) - reference["image_auroc"]
        gap_pixel = np.mean([r["pixel_auroc"] for r in group]) - reference["pixel_auroc"]
        lines.append(
            f"| {variant} | {steps} | {len(group)} | {stat('image_auroc')} | {stat('pixel_auroc')} | "
            f"{gap_image:+.4f} / {gap_pixel:+.4f} | {stat('r_image_auroc')} / {stat('r_pixel_auroc')} | "
            f"{stat('spearman_vs_reference')} | {stat('noisy_image_auroc')} / {stat('noisy_pixel_auroc')} | "
            f"{stat('noisy_r_pixel_auroc')} | {np.mean([r['train_seconds'] for r in group]):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budgets", nargs="+", type=int, default=[300, 600, 1200])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cache-dir", default="runs/cache")
    parser.add_argument("--toy-only", action="store_true")
    parser.add_argument("--no-toy", action="store_true", help="magnetic_tile variants only")
    parser.add_argument("--model", help="split the IRF of this saved osd_irf bundle instead of training (its "
                                        "features must be the recipe's: the reference is fitted on those)")
    parser.add_argument("--name", default="osd_irf_network")
    args = parser.parse_args(argv)

    toy: dict[str, list[float]] = {}
    if not args.no_toy:
        per_seed = [toy_rows(seed) for seed in args.seeds]
        toy = {name: [row[name] for row in per_seed] for name in per_seed[0]}
        print("toy:", ", ".join(f"{k} {np.mean(v):.3f}" for k, v in toy.items()), flush=True)
    rows: list[dict] = []
    reference: dict[str, float] = {}
    if not args.toy_only:
        if not Path(args.data).exists():
            sys.exit(f"magnetic_tile not found at {args.data}: pass --data PATH (or --toy-only)")
        base = apply_overrides(load_file(str(CONFIGS / "osd_irf_magnetic_tile.yaml")), args.overrides)
        data = prepare(args.data, base, args.cache_dir)
        reference = {"image_auroc": auroc(data["reference"].scores, data["labels"]),
                     "pixel_auroc": pixel_auroc(data["reference"].maps, data["masks"])}
        print(f"gaussian reference: {reference}", flush=True)
        if args.model:  # a saved bundle, no retraining: its own normaliser, the split of its IRF
            detector = load_bundle(args.model)
            features = {split: detector.extract_features(samples, Runtime(progress=False, cache_dir=args.cache_dir))
                        for split, samples in zip(("train", "calibration", "test"), splits(args.data))}
            row = {"variant": f"bundle {args.model}", "seed": detector.config.seed, "steps": -1,
                   **budget_row(detector, features, data["reference"], data["labels"], data["masks"])}
            print(", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))
            save(args.name, {"toy": toy, "reference": reference, "bundle": row, "machine": machine()},
                 table(toy, [], reference) + "\n\n" + json.dumps(row, indent=1))
            return 0
        for variant in args.variants:
            for seed in args.seeds:
                rows += run_variant(variant, seed, args.budgets, base, data, data["reference"])
                save(args.name, {"toy": toy, "reference": reference, "rows": rows, "machine": machine(),
                                 "cpu_network": CPU_NETWORK, "variants": VARIANTS}, table(toy, rows, reference))
    text = table(toy, rows, reference)
    print(text)
    save(args.name, {"toy": toy, "reference": reference, "rows": rows, "machine": machine(),
                     "cpu_network": CPU_NETWORK, "variants": VARIANTS}, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
