"""OSD-IRF vs InvAD-style multi-step inversion vs a PatchCore-style baseline on magnetic_tile.

    .venv/bin/python benchmarks/magnetic_tile.py [--set key=value ...] [--cache-dir DIR]

Trains OSD-IRF once (config: benchmarks/configs/osd_irf_magnetic_tile.yaml), scores the test split with
one-step IRF scoring and with DDIM inversion on the same network, fits the nearest-neighbour baseline on
the same backbone, times the backbone alone, and prints/saves one table with every metric, seconds per
image and the speed ratios, all measured in this one run. With whitened features
(``normalisation.kind: position_whiten``) it also scores the Gaussian reference, the ``gaussian`` detector on
the same features: what OSD-IRF computes when the network's residual r is 0 (PaDiM's Mahalanobis
distance, no network call), so the table shows what the trained score network adds and what the
one-step call costs over the closed form. A second table gives pixel AUROC per
defect type and each type's share of the anomalous pixels, and a third splits pixel AUROC by where the
normal pixels come from: normal images, or the normal part of defective images. ``--model URI`` scores
a saved OSD-IRF bundle (e.g. the last run's ``--save-model``) instead of training one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_MAGNETIC_TILE,
    auroc_against,
    backbone_seconds_per_image,
    machine,
    require_dataset,
    save,
    splits,
)

from ray_ad.bundle import load_bundle, save_bundle  # noqa: E402
from ray_ad.config import apply_overrides, load_file, to_dict  # noqa: E402
from ray_ad.evaluation import Results, compute_metrics, run_detector  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.metrics import auroc  # noqa: E402
from ray_ad.report import METRIC_KEYS, format_table  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"


def pixel_auroc_per_defect(results: Results) -> dict[str, dict[str, float]]:
    """Pixel AUROC of each defect type (its images + every normal image) and its share of anomalous pixels."""
    kinds = np.array([Path(p).parent.name for p in results.paths])
    normal = results.labels == 0
    anomalous_pixels = results.masks[~normal].sum()
    out = {}
    for kind in sorted(set(kinds) - {"good"}):
        rows = normal | (kinds == kind)
        out[kind] = {"pixel_auroc": auroc(results.maps[rows].ravel(), results.masks[rows].ravel()),
                     "share_of_anomalous_pixels": float(results.masks[kinds == kind].sum() / anomalous_pixels)}
    return out


def pixel_auroc_by_negatives(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Anomalous pixels against the pixels of normal images, and against the normal pixels of defective
    images: a map that is high over a whole defective image separates the first, not the second."""
    normal = labels == 0
    positives = maps[masks]
    return {"vs_normal_images": auroc_against(positives, maps[normal].ravel()),
            "vs_normal_pixels_of_defective_images": auroc_against(positives, maps[~normal][~masks[~normal]])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--config", default=str(CONFIGS / "osd_irf_magnetic_tile.yaml"))
    parser.add_argument("--patchcore-config", default=str(CONFIGS / "patchcore_magnetic_tile.yaml"))
    parser.add_argument("--set", action="append", default=[], help="override an OSD-IRF config value")
    parser.add_argument("--cache-dir", default=str(Path(__file__).resolve().parent / "results" / "cache"))
    parser.add_argument("--name", default="magnetic_tile")
    parser.add_argument("--save-model", default=str(Path(__file__).resolve().parent / "results" / "runs" / "osd_irf"),
                        help="where to save the trained OSD-IRF bundle (re-score it later with --model)")
    parser.add_argument("--model", help="score this saved OSD-IRF bundle instead of training one (--config is "
                                        "then read from the bundle)")
    args = parser.parse_args()
    require_dataset(args.data)

    train, calibration, test = splits(args.data)
    rows, extra = {}, {}

    if args.model:
        osd = load_bundle(args.model)
        osd_config = osd.config
        extra["osd_irf_model"] = args.model
    else:
        osd_config = method_config("osd_irf", apply_overrides(load_file(args.config), args.set))
        osd = build_detector("osd_irf", osd_config)
        start = time.perf_counter()
        extra["osd_irf_fit"] = osd.fit(train, calibration, Runtime(cache_dir=args.cache_dir))
        extra["osd_irf_fit_seconds"] = time.perf_counter() - start
        save_bundle(osd, args.save_model)
    multi = f"inversion ({osd_config.inversion_steps} steps)"
    per_defect, by_negatives = {}, {}
    for mode, label in (("one_step", "osd_irf (1 step)"), ("inversion", multi)):
        osd.set_scoring(mode)
        results = run_detector(osd, test)
        rows[label] = compute_metrics(results)
        per_defect[label] = pixel_auroc_per_defect(results)
        by_negatives[label] = pixel_auroc_by_negatives(results.maps, results.masks, results.labels)

    if osd_config.normalisation.kind == "position_whiten":
        # The closed-form Gaussian (the `gaussian` detector: no DiT call): OSD-IRF's ranking when r = 0.
        reference = build_detector("gaussian", method_config("gaussian", {
            "backbone": to_dict(osd_config.backbone), "normalisation": to_dict(osd_config.normalisation),
            "score_terms": osd_config.score_terms, "map_sigma": osd_config.map_sigma,
            "threshold_quantile": osd_config.threshold_quantile, "device": osd_config.device}))
        reference.fit(train, calibration, Runtime(cache_dir=args.cache_dir))
        label = "gaussian reference (r = 0: whitening only, no network call)"
        results = run_detector(reference, test)
        rows[label] = compute_metrics(results)
        per_defect[label] = pixel_auroc_per_defect(results)
        by_negatives[label] = pixel_auroc_by_negatives(results.maps, results.masks, results.labels)

    patchcore = build_detector("patchcore", method_config("patchcore", load_file(args.patchcore_config)))
    start = time.perf_counter()
    patchcore.fit(train, calibration, Runtime(cache_dir=args.cache_dir))
    extra["patchcore_fit_seconds"] = time.perf_counter() - start
    results = run_detector(patchcore, test)
    rows["patchcore (kNN)"] = compute_metrics(results)
    per_defect["patchcore (kNN)"] = pixel_auroc_per_defect(results)
    by_negatives["patchcore (kNN)"] = pixel_auroc_by_negatives(results.maps, results.masks, results.labels)

    backbone_s = backbone_seconds_per_image(osd, test)
    one, inv = rows["osd_irf (1 step)"], rows[multi]
    ratios = {
        "multi_step_over_one_step": inv["model_seconds_per_image"] / one["model_seconds_per_image"],
        "multi_step_over_one_step_end_to_end": inv["seconds_per_image"] / one["seconds_per_image"],
        "one_step_over_backbone_alone": one["model_seconds_per_image"] / backbone_s,
    }
    table = format_table(rows, METRIC_KEYS + ("model_seconds_per_image",))
    first = next(iter(per_defect.values()))  # the shares depend on the masks only, not on the detector
    kinds = list(first)
    defect_table = "\n".join([
        "pixel AUROC per defect type (its images + all normal images); share of all anomalous pixels:",
        "",
        "| | " + " | ".join(kinds) + " |",
        "|---|" + "---:|" * len(kinds),
        "| share of anomalous pixels | " + " | ".join(f"{first[k]['share_of_anomalous_pixels']:.1%}" for k in kinds)
        + " |",
        *(f"| {label} | " + " | ".join(f"{per_defect[label][k]['pixel_auroc']:.3f}" for k in kinds) + " |"
          for label in per_defect),
    ])
    negatives_table = "\n".join([
        "pixel AUROC of all anomalous pixels against the normal pixels of normal images / of defective images:",
        "",
        "| | vs normal images | vs normal pixels of defective images |",
        "|---|---:|---:|",
        *(f"| {label} | {v['vs_normal_images']:.3f} | {v['vs_normal_pixels_of_defective_images']:.3f} |"
          for label, v in by_negatives.items()),
    ])
    lines = [
        table,
        "",
        f"backbone alone: {backbone_s:.4f} s/image",
        f"speed: one-step is {ratios['multi_step_over_one_step']:.2f}x faster than multi-step (model time), "
        f"{ratios['multi_step_over_one_step_end_to_end']:.2f}x end to end incl. decoding",
        f"one-step costs {ratios['one_step_over_backbone_alone']:.2f}x the backbone alone",
        "",
        defect_table,
        "",
        negatives_table,
    ]
    report = "\n".join(lines)
    print(report)
    save(args.name, {"rows": rows, "per_defect": per_defect, "pixel_auroc_by_negatives": by_negatives,
                     "ratios": ratios, "backbone_seconds_per_image": backbone_s,
                     "osd_irf_config": to_dict(osd_config),
                     "extra": extra, "machine": machine()}, "```\n" + report + "\n```")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
