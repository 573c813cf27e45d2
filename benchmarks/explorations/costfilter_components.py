"""Where CostFilter-AD's signal sits: each component map of one fitted filter, scored on its own.

    .venv/bin/python benchmarks/explorations/costfilter_components.py [--base gaussian|patchcore] \
        [--seed 0] [--set key=value ...] [--name NAME]

Fits the base (the Gaussian reference by default; the bases of ``benchmarks/costfilter.py``) and one
filter over it, then
scores, from one pass, the base's map, the filter's map alone (Eq. 4, fusion 0), M-bar alone (the
layers' mean nearest-template cost, no network) and the blends (1 - w) * filter + w * base for
w in {0.25, 0.5, 0.75}: pixel AUROC, AU-PRO and the image AUROC of each map's top-250 mean. Two
sets: ``synthetic`` (the held-out calibration normals, every second one with a pasted synthetic
anomaly, seeded; no real label) and ``test`` (magnetic_tile's test split). This is a diagnostic that
reads the test labels and says so: a default picked from its ``test`` rows is no longer evaluated
independently on magnetic_tile. Figures go to benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import DEFAULT_MAGNETIC_TILE, RESULTS, require_dataset, save, splits  # noqa: E402
from costfilter import base_config, fits_base_in_call  # noqa: E402

from ray_ad import metrics  # noqa: E402
from ray_ad.bundle import save_bundle  # noqa: E402
from ray_ad.config import apply_overrides  # noqa: E402
from ray_ad.data.images import load_image  # noqa: E402
from ray_ad.data.synthetic import pasted_anomaly  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime, upsample_map  # noqa: E402
from ray_ad.methods.costfilter.model import CostFilter  # noqa: E402
from ray_ad.methods.costfilter.volume import cost_volume, initial_map, split_layers  # noqa: E402

BLENDS = (0.25, 0.5, 0.75)


@torch.no_grad()
def component_maps(detector: CostFilter, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pixel maps of one batch: the base's (scaled), the filter's alone and M-bar's alone."""
    query = detector.extractor(images)
    templates = detector.bank.gather(detector.bank.nearest(query, detector.config.templates))
    channels = list(detector.layer_channels)
    volume = cost_volume(split_layers(query, channels), split_layers(templates, channels),
                         detector.config.matching_depth)
    base_map = detector.base.predict(images).anomaly_map
    base_cells = detector.base_cells(base_map) if detector.base_guided else None
    filtered = detector.filter_map(query, templates, base_cells)[0]
    size, sigma = detector.image_size, detector.config.map_sigma
    return {"base": base_map / detector.base_map_scale, "filter": upsample_map(filtered, size, sigma),
            "m_bar": upsample_map(initial_map(volume).mean(1), size, sigma)}


def score_set(detector: CostFilter, images: list[Image.Image], masks: np.ndarray, labels: np.ndarray) -> dict:
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(images), 8):
        for key, value in component_maps(detector, detector.preprocessor.batch(images[i : i + 8])).items():
            parts.setdefault(key, []).append(value.numpy())
    maps = {key: np.concatenate(value) for key, value in parts.items()}
    variants = {"base": maps["base"], "filter alone": maps["filter"], "M-bar alone": maps["m_bar"]}
    variants |= {f"blend w={w}": (1 - w) * maps["filter"] + w * maps["base"] for w in BLENDS}
    out = {}
    for name, values in variants.items():
        top = np.sort(values.reshape(len(values), -1), axis=1)[:, -detector.config.score_top_pixels:].mean(1)
        out[name] = {**metrics.pixel_metrics(values, masks), "image_auroc": metrics.auroc(top, labels)}
        print(name, {k: round(v, 4) for k, v in out[name].items()}, flush=True)
    return out


def synthetic_set(samples: list, size: int, seed: int) -> tuple[list[Image.Image], np.ndarray, np.ndarray]:
    """Every second held-out normal with a pasted anomaly (its donor: the next image)."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i, sample in enumerate(samples):
        image = np.asarray(load_image(sample.path).resize((size, size), Image.Resampling.BILINEAR))
        mask = np.zeros((size, size), dtype=bool)
        if i % 2 == 0:
            donor = np.asarray(load_image(samples[(i + 1) % len(samples)].path).resize(
                (size, size), Image.Resampling.BILINEAR))
            image, mask, _ = pasted_anomaly(image, donor, rng)
        images.append(Image.fromarray(image))
        masks.append(mask)
    masks_array = np.stack(masks)
    return images, masks_array, masks_array.reshape(len(masks), -1).any(1).astype(int)


def test_set(samples: list, size: int) -> tuple[list[Image.Image], np.ndarray, np.ndarray]:
    images, masks = [], []
    for sample in samples:
        images.append(load_image(sample.path))
        mask = (load_image(sample.mask_path).convert("L").resize((size, size), Image.Resampling.NEAREST)
                if sample.mask_path else None)
        masks.append(np.asarray(mask) > 127 if mask is not None else np.zeros((size, size), dtype=bool))
    return images, np.stack(masks), np.array([s.label for s in samples])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--base", default="gaussian", choices=("gaussian", "patchcore"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="override a CostFilter config value")
    parser.add_argument("--name", default="costfilter_components")
    args = parser.parse_args()
    require_dataset(args.data)
    train, calibration, test = splits(args.data)
    runtime = Runtime(cache_dir=str(RESULTS / "cache"))
    method, values = base_config(args.base)
    overrides = apply_overrides({"seed": args.seed}, args.set)
    if fits_base_in_call(overrides):
        overrides["base"] = {"method": method, "config": values}
    else:
        base_uri = RESULTS / "runs" / f"costfilter_components_base_{args.base}"
        base = build_detector(method, method_config(method, values))
        base.fit(train, calibration, runtime)
        save_bundle(base, str(base_uri))
        overrides["base"] = {"model": str(base_uri)}
    detector = build_detector("costfilter", method_config("costfilter", overrides))
    detector.fit(train, calibration, runtime)
    size = detector.image_size
    report = {"base": args.base, "overrides": args.set, "seed": args.seed,
              "synthetic": score_set(detector, *synthetic_set(calibration, size, 123)),
              "test": score_set(detector, *test_set(test, size))}
    lines = [f"CostFilter-AD components, {args.base} base, seed {args.seed}, overrides {args.set or 'none'}", "",
             "| set | map | pixel AUROC | AU-PRO | image AUROC (top-250 mean) |", "|---|---|---:|---:|---:|"]
    for part in ("synthetic", "test"):
        for name, row in report[part].items():
            lines.append(f"| {part} | {name} | {row['pixel_auroc']:.4f} | {row['pixel_aupro']:.4f} | "
                         f"{row['image_auroc']:.4f} |")
    print("\n".join(lines))
    save(args.name, report, "\n".join(lines))


if __name__ == "__main__":
    main()
