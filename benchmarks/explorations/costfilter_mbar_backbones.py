"""Is the backbone what keeps CostFilter-AD's matching cost weak? M-bar alone on each shipped backbone.

    .venv/bin/python benchmarks/explorations/costfilter_mbar_backbones.py \
        [--backbones tf_efficientnet_lite0 tf_efficientnet_lite1 tf_efficientnet_lite2] [--name NAME]

For each backbone, with the filter's default features (stages 1-3, ``local_pool [3, 11]``, 16 x 16 grid)
and the filter's defaults N = 4, D = 16, a bank of 64 seeded-random training normals: M-bar (the mean over
layers of each cell's nearest-template cost, Sec. 3.2, no network) on magnetic_tile's test split, and
beside it the Gaussian base (per-position whitened Gaussian) on the same features. Pixel AUROC, AU-PRO and
image AUROC (top-250 mean). A diagnostic that reads the test labels: it sets no default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import DEFAULT_MAGNETIC_TILE, RESULTS, require_dataset, save, splits  # noqa: E402

from ray_ad import metrics  # noqa: E402
from ray_ad.backbones import BackboneConfig  # noqa: E402
from ray_ad.backbones.extractor import FeatureExtractor  # noqa: E402
from ray_ad.data.images import load_image  # noqa: E402
from ray_ad.evaluation import compute_metrics, run_detector  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime, upsample_map  # noqa: E402
from ray_ad.methods.costfilter.templates import TemplateBank  # noqa: E402
from ray_ad.methods.costfilter.volume import cost_volume, initial_map, split_layers  # noqa: E402

N, D, BANK, TOP = 4, 16, 64, 250


@torch.no_grad()
def features(extractor: FeatureExtractor, samples: list, batch: int = 16) -> torch.Tensor:
    out = []
    for i in range(0, len(samples), batch):
        images = [load_image(s.path) for s in samples[i : i + batch]]
        out.append(extractor(extractor.preprocessor.batch(images)))
    return torch.cat(out)


@torch.no_grad()
def m_bar_maps(extractor: FeatureExtractor, train: list, test: list, seed: int = 0) -> np.ndarray:
    chosen = np.random.default_rng(seed).choice(len(train), BANK, replace=False)
    channels = list(extractor.layer_channels)
    bank = TemplateBank(features(extractor, [train[i] for i in chosen]), channels)
    query = features(extractor, test)
    maps = []
    for i in range(0, len(query), 16):
        q = query[i : i + 16]
        templates = bank.gather(bank.nearest(q, N))
        volume = cost_volume(split_layers(q, channels), split_layers(templates, channels), D)
        maps.append(upsample_map(initial_map(volume).mean(1), extractor.config.image_size, 4.0))
    return torch.cat(maps).numpy()


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
        backbone = BackboneConfig(name=name, layers=(1, 2, 3), grid_size=16, local_pool=(3, 11))
        base = build_detector("gaussian", method_config("gaussian", {
            "backbone": vars(backbone) | {"layers": [1, 2, 3], "local_pool": [3, 11]},
            "normalisation": {"kind": "position_whiten", "ridge": 0.01}}))
        base.fit(train, calibration, runtime)
        results = run_detector(base, test, progress=False)
        base_row = compute_metrics(results)
        pixel_rows = (results.labels == 0) | results.has_mask
        maps = m_bar_maps(FeatureExtractor(backbone), train, test)
        top = np.sort(maps.reshape(len(maps), -1), axis=1)[:, -TOP:].mean(1)
        m_row = {**metrics.pixel_metrics(maps[pixel_rows], results.masks[pixel_rows]),
                 "image_auroc": metrics.auroc(top, results.labels)}
        report[name] = {"gaussian": base_row, "m_bar": m_row}
        for label, row in (("Gaussian base", base_row), ("M-bar alone", m_row)):
            lines.append(f"| {name} | {label} | {row['pixel_auroc']:.4f} | {row['pixel_aupro']:.4f} | "
                         f"{row['image_auroc']:.4f} |")
        print(lines[-2], lines[-1], sep="\n", flush=True)
    save(args.name, report, "\n".join(lines))


if __name__ == "__main__":
    main()
