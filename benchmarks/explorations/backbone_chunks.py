"""Backbone time per image on CPU against the number of images per pass.

    .venv/bin/python benchmarks/explorations/backbone_chunks.py [--config FILE] [--images 128] [--repeats 3] \
        [--name NAME]

Times the frozen feature extractor of an OSD-IRF config (default: the magnetic_tile recipe) on random
images of its input size, in passes of 1, 2, 4, 8, 16 and 32 images, and the extractor's own
``forward`` (which splits CPU batches into ``cpu_chunk_images``). Each figure is the best of
``--repeats`` runs over ``--images`` images, after one warm-up pass per size. The point: the early
stages' activations fall out of the CPU caches for large passes, so small passes are faster per
image. Figures go to benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# benchmarks/ (the shared _common and the main benchmarks) and this folder (the other explorations)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import machine, save  # noqa: E402
from magnetic_tile import CONFIGS  # noqa: E402

from ray_ad.backbones import FeatureExtractor  # noqa: E402
from ray_ad.config import load_file  # noqa: E402
from ray_ad.methods import method_config  # noqa: E402

PASS_SIZES = (1, 2, 4, 8, 16, 32)


@torch.no_grad()
def milliseconds_per_image(run, images: torch.Tensor, size: int, repeats: int) -> float:
    run(images[:size])  # warm-up: oneDNN picks its kernels for this shape
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for part in images.split(size):
            run(part)
        best = min(best, (time.perf_counter() - start) / len(images))
    return 1000 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIGS / "osd_irf_magnetic_tile.yaml"))
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="backbone_chunks")
    args = parser.parse_args()
    config = method_config("osd_irf", load_file(args.config))
    extractor = FeatureExtractor(config.backbone)
    side = config.backbone.image_size
    images = torch.randn(args.images, 3, side, side, generator=torch.Generator().manual_seed(0))

    rows = {f"{size} per pass": milliseconds_per_image(extractor._grid_features, images, size, args.repeats)
            for size in PASS_SIZES}
    # What the library runs: batches of 16 (the evaluation's loader) split into cpu_chunk_images.
    rows[f"forward on batches of 16 (chunks of {extractor.cpu_chunk_images})"] = milliseconds_per_image(
        extractor, images, 16, args.repeats)
    lines = [f"{config.backbone.name} stages {list(config.backbone.layers)}, {side} px, pools "
             f"{list(config.backbone.pool_sizes)}, {torch.get_num_threads()} threads; ms per image:", "",
             "| images per pass | ms / image |", "|---|---:|",
             *(f"| {label} | {value:.2f} |" for label, value in rows.items())]
    text = "\n".join(lines)
    print(text)
    save(args.name, {"ms_per_image": rows, "backbone": config.backbone.name, "image_size": side,
                     "machine": machine()}, text)


if __name__ == "__main__":
    main()
