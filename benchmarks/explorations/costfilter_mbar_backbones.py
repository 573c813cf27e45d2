"""Is the backbone what keeps CostFilter-AD's matching cost weak? M-bar alone on each shipped backbone.

    .venv/bin/python benchmarks/explorations/costfilter_mbar_backbones.py \
        [--backbones tf_efficientnet_lite0 tf_efficientnet_lite1 tf_efficientnet_lite2] [--name NAME]

For each backbone, with the filter's default features (stages 1-3, ``local_pool [3, 11]``, 16 x 16 grid)
and the filter's defaults N = 4, D = 16, a bank of 64 seeded-random training normals: M-bar (the mean over
layers of each cell's nearest-template cost, Sec. 3.2, no network) on magnetic_tile's test split, and
beside it the Gaussian base (per-position whitened Gaussian) on the same features. Pixel AUROC, AU-PRO and
image AUROC (the base's own score; M-bar's top-250 mean). A diagnostic that reads the test labels: it sets no default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import DEFAULT_MAGNETIC_TILE, RESULTS, require_dataset, save, splits  # noqa: E402
from costfilter_components import test_set  # noqa: E402

from ray_ad import metrics  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Detector, Runtime, upsample_map  # noqa: E402
from ray_ad.methods.costfilter.templates import TemplateBank  # noqa: E402
from ray_ad.methods.costfilter.volume import cost_volume, initial_map, split_layers  # noqa: E402

N, D, BANK, TOP = 4, 16, 64, 250


@torch.no_grad()
def m_bar_maps(base: Detector, bank_features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """M-bar of every query against its N nearest bank images, as a pixel map (the filter's ``upsample_map``)."""
    channels = list(base.extractor.layer_channels)
    bank = TemplateBank(bank_features, channels)
    maps = []
    for i in range(0, len(query), 16):
        q = query[i : i + 16]
        templates = bank.gather(bank.nearest(q, N))
        volume = cost_volume(split_layers(q, channels), split_layers(templates, channels), D)
        maps.append(upsample_map(initial_map(volume).mean(1), base.image_size, base.config.map_sigma))
    return torch.cat(maps)


def scored(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, scores: np.ndarray | None = None) -> dict:
    """Pixel metrics of the maps; image AUROC of ``scores`` (default: each map's top-250 mean)."""
    if scores is None:
        scores = np.sort(maps.reshape(len(maps), -1), axis=1)[:, -TOP:].mean(1)
    return {**metrics.pixel_metrics(maps, masks), "image_auroc": metrics.auroc(scores, labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--backbones", nargs="+",
                        default=["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
    parser.add_argument("--name", default="costfilter_mbar_backbones")
    args = parser.parse_args()
    require_dataset(args.data)
    train, calibration, test = splits(args.data)
    runtime = Runtime(cache_dir=str(RESULTS / "cache"))
    report, lines = {}, ["| backbone | map | pixel AUROC | AU-PRO | image AUROC |", "|---|---|---:|---:|---:|"]
    for name in args.backbones:
        base = build_detector("gaussian", method_config("gaussian", {
            "backbone": {"name": name, "layers": [1, 2, 3], "grid_size": 16, "local_pool": [3, 11]},
            "normalisation": {"kind": "position_whiten", "ridge": 0.01}}))
        base.fit(train, calibration, runtime)
        # One backbone pass per image serves both maps: the base scores the same features M-bar matches.
        chosen = np.random.default_rng(0).choice(len(train), BANK, replace=False)
        bank_features = base.extract_features([train[i] for i in chosen], runtime, desc="bank")
        query = base.extract_features(test, runtime, desc="test")
        _, masks, labels = test_set(test, base.image_size)
        predictions = [base.predict_features(query[i : i + 16]) for i in range(0, len(query), 16)]
        base_maps, base_scores = (torch.cat([getattr(p, key) for p in predictions]).numpy()
                                  for key in ("anomaly_map", "pred_score"))
        rows = {"Gaussian base": scored(base_maps, masks, labels, base_scores),  # the base's own image score
                "M-bar alone": scored(m_bar_maps(base, bank_features, query).numpy(), masks, labels)}
        report[name] = {"gaussian": rows["Gaussian base"], "m_bar": rows["M-bar alone"]}
        for label, row in rows.items():
            lines.append(f"| {name} | {label} | {row['pixel_auroc']:.4f} | {row['pixel_aupro']:.4f} | "
                         f"{row['image_auroc']:.4f} |")
        print(*lines[-2:], sep="\n", flush=True)
    save(args.name, report, "\n".join(lines))


if __name__ == "__main__":
    main()
