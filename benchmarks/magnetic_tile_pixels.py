"""Where OSD-IRF's magnetic_tile pixel AUROC is lost, and what the map's usual knobs do about it.

    .venv/bin/python benchmarks/magnetic_tile_pixels.py [--set key=value ...] [--model URI] [--name NAME] [--no-knobs]

Scores the test split with the Gaussian reference of the benchmark recipe (``train.steps=0``: the
whitening alone, within 0.003 of the trained network on every pixel figure of
``benchmarks/magnetic_tile.py``) or with a saved OSD-IRF bundle (``--model``), then splits the pooled
pixel AUROC by where the normal pixels come from:

- all anomalous pixels against the unmarked pixels of each defect type's images, and each type's own
  anomalous pixels against its own unmarked pixels (can the map find the defect *within* its tile?);
- all anomalous pixels against the unmarked pixels of defective images, by distance to the mask (is it
  the blur of the map around small defects?);

and measures the map's usual knobs on the same detector: the blur (``map_sigma`` 2 and 8 px against
the recipe's 4) and subtracting each map's own q-quantile (a per-image background: is the loss an
offset of whole defective tiles?). Figures go to benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MAGNETIC_TILE, auroc_against, machine, require_dataset, save, splits  # noqa: E402
from magnetic_tile import CONFIGS, pixel_auroc_by_negatives  # noqa: E402

from ray_ad.bundle import load_bundle  # noqa: E402
from ray_ad.config import apply_overrides, load_file, to_dict  # noqa: E402
from ray_ad.evaluation import Results, run_detector  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.metrics import auroc  # noqa: E402

DISTANCE_BANDS = ((0, 8), (8, 24), (24, 64), (64, None))  # pixels from the nearest marked pixel
BACKGROUND_QUANTILES = (0.05, 0.25, 0.5)


def within_defect_types(results: Results) -> dict[str, dict[str, float]]:
    """Per defect type: all anomalous pixels vs its images' unmarked pixels; its own marked vs unmarked."""
    kinds = np.array([Path(p).parent.name for p in results.paths])
    positives = results.maps[results.masks]
    out = {}
    for kind in sorted(set(kinds) - {"good"}):
        maps, masks = results.maps[kinds == kind], results.masks[kinds == kind]
        out[kind] = {"all_anomalous_vs_its_unmarked": auroc_against(positives, maps[~masks]),
                     "its_marked_vs_its_unmarked": auroc_against(maps[masks], maps[~masks])}
    return out


def by_distance(results: Results) -> dict[str, float]:
    """All anomalous pixels against the unmarked pixels of defective images, by distance to the mask."""
    defective = results.labels == 1
    masks, maps = results.masks[defective], results.maps[defective]
    distance = np.stack([ndimage.distance_transform_edt(~mask) for mask in masks])
    positives = results.maps[results.masks]
    out = {}
    for low, high in DISTANCE_BANDS:
        band = ~masks & (distance > low) & (distance <= (high if high is not None else np.inf))
        out[f"{low}-{high if high is not None else 'inf'} px"] = auroc_against(positives, maps[band])
    return out


def pooled(results: Results) -> float:
    return auroc(results.maps.ravel(), results.masks.ravel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--config", default=str(CONFIGS / "osd_irf_magnetic_tile.yaml"))
    parser.add_argument("--set", action="append", default=[], help="override a config value (after train.steps=0)")
    parser.add_argument("--model", help="score this saved OSD-IRF bundle instead of the Gaussian reference")
    parser.add_argument("--cache-dir", default=str(Path(__file__).resolve().parent / "results" / "cache"))
    parser.add_argument("--name", default="magnetic_tile_pixels")
    parser.add_argument("--no-knobs", action="store_true", help="skip the map_sigma re-scoring (two more passes)")
    args = parser.parse_args()
    require_dataset(args.data)

    train, calibration, test = splits(args.data)
    if args.model:
        detector = load_bundle(args.model)
    else:
        config = method_config("osd_irf", apply_overrides(load_file(args.config), ["train.steps=0", *args.set]))
        detector = build_detector("osd_irf", config)
        detector.fit(train, calibration, Runtime(cache_dir=args.cache_dir))
    results = run_detector(detector, test)
    report = {"pixel_auroc": pooled(results),
              "by_negatives": pixel_auroc_by_negatives(results.maps, results.masks, results.labels),
              "defect_types": within_defect_types(results), "by_distance": by_distance(results)}

    knobs = {f"map_sigma {detector.config.map_sigma:g} (as configured)": report["pixel_auroc"]}
    configured = detector.config
    for sigma in () if args.no_knobs else (2.0, 8.0):
        detector.config = dataclasses.replace(configured, map_sigma=sigma)
        knobs[f"map_sigma {sigma:g}"] = pooled(run_detector(detector, test))
    detector.config = configured
    flat = results.maps.reshape(len(results.maps), -1)
    for q in BACKGROUND_QUANTILES:
        background = np.quantile(flat, q, axis=1)[:, None, None]
        knobs[f"minus each map's {q:g}-quantile"] = pooled(dataclasses.replace(results, maps=results.maps - background))
    report["knobs"] = knobs

    kinds = list(report["defect_types"])
    lines = [
        f"pixel AUROC {report['pixel_auroc']:.4f} ({'model ' + args.model if args.model else 'Gaussian reference'}"
        f"{', ' + ', '.join(args.set) if args.set else ''})",
        f"all anomalous pixels vs normal images' pixels {report['by_negatives']['vs_normal_images']:.3f}, "
        f"vs unmarked pixels of defective images {report['by_negatives']['vs_normal_pixels_of_defective_images']:.3f}",
        "",
        "| | " + " | ".join(kinds) + " |",
        "|---|" + "---:|" * len(kinds),
        "| all anomalous pixels vs this type's unmarked pixels | "
        + " | ".join(f"{report['defect_types'][k]['all_anomalous_vs_its_unmarked']:.3f}" for k in kinds) + " |",
        "| this type's marked vs its unmarked pixels | "
        + " | ".join(f"{report['defect_types'][k]['its_marked_vs_its_unmarked']:.3f}" for k in kinds) + " |",
        "",
        "all anomalous pixels vs unmarked pixels of defective images, by distance to the mask:",
        "",
        "| " + " | ".join(report["by_distance"]) + " |",
        "|" + "---:|" * len(report["by_distance"]),
        "| " + " | ".join(f"{v:.3f}" for v in report["by_distance"].values()) + " |",
        "",
        "pooled pixel AUROC under the map's knobs (same detector):",
        "",
        *(f"- {name}: {value:.4f}" for name, value in knobs.items()),
    ]
    text = "\n".join(lines)
    print(text)
    save(args.name, {**report, "config": to_dict(detector.config), "overrides": args.set, "model": args.model,
                     "machine": machine()}, "```\n" + text + "\n```")


if __name__ == "__main__":
    main()
