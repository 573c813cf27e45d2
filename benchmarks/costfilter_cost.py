"""What CostFilter-AD costs per image beside its base, and where the filter's time goes.

    .venv/bin/python benchmarks/costfilter_cost.py [--bases gaussian patchcore] [--images 64] [--batch 16]
        [--repeats 5] [--set key=value ...] [--name NAME]

Each base is fitted on magnetic_tile's train normals (the recipes of ``costfilter.py``), and a CostFilter
line over it with a short filter training (``train.steps=20``: the time of a forward pass does not depend
on the filter's weights). Then, on ``--images`` decoded test images in batches of ``--batch`` with no
gradients, every part is timed on its own, batch by batch in turns with the other parts, ``--repeats``
times; a part's figure is each batch's fastest call, summed (``seconds_per_image``):

- ``base model call``: the base's own ``predict`` (its backbone pass and its head);
- ``base + filter model call``: the CostFilter line's ``predict`` (one backbone pass serves both when the
  base reads the filter's features);
- the line's parts: the backbone pass, the base's head on those features, template choice (nearest bank
  images and their features), the cost volume (Eqs. 1-2 with top-D), the 3D U-Net (Eqs. 3-4), and the
  rest (map upsampling, image score, fusion).

"filter adds" is the line's call less the base's call; the issue's cap is the base's own time. On this
project's 2-core virtual machine single passes vary by a factor of several (neighbours on the host), so
run it twice and read both.
Prints and saves ``benchmarks/results/<name>.{json,md}``. Needs ../shared/datasets/magnetic_tile.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MAGNETIC_TILE, machine, require_dataset, save, splits  # noqa: E402
from costfilter import base_config  # noqa: E402

from ray_ad.config import apply_overrides  # noqa: E402
from ray_ad.data import ImageDataset  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.methods.costfilter.volume import cost_volume, initial_map, split_layers  # noqa: E402
from ray_ad.progress import configure_logging  # noqa: E402

FAST_FIT = {"train": {"steps": 20, "pool_size": 32}}


def seconds_per_image(parts: dict[str, Callable[[torch.Tensor], object]], batches: list[torch.Tensor],
                      repeats: int, cuda: bool) -> dict[str, float]:
    """Every part's seconds per image: each batch's fastest of ``repeats`` calls, summed over the batches.

    The parts take turns batch by batch, so neighbouring calls of two parts run under the same load; on a
    shared (virtual) machine a short call's minimum is the figure least disturbed by the neighbours.
    """
    images = sum(len(b) for b in batches)
    fastest = {name: [float("inf")] * len(batches) for name in parts}
    for _ in range(repeats):
        for k, batch in enumerate(batches):
            for name, step in parts.items():
                start = time.perf_counter()
                step(batch)
                if cuda:
                    torch.cuda.synchronize()
                fastest[name][k] = min(fastest[name][k], time.perf_counter() - start)
    return {name: sum(values) / images for name, values in fastest.items()}


def measure(base_name: str, overrides: list[str], images: int, batch: int, repeats: int, runtime: Runtime,
            data: str) -> dict[str, float]:
    train, calibration, test = splits(data)
    method, values = base_config(base_name)
    config = apply_overrides({**FAST_FIT, "base": {"method": method, "config": values}}, overrides)
    line = build_detector("costfilter", method_config("costfilter", config))
    line.fit(train, calibration, runtime)  # fits its base too: the same base the line serves with
    base = line.base
    with torch.no_grad():
        return time_parts(line, base, test[:images], batch, repeats)


def time_parts(line, base, samples: list, batch: int, repeats: int) -> dict[str, float]:
    """Seconds per image of the line's and the base's model calls and of the filter's parts."""
    dataset = ImageDataset(samples, line.preprocessor)
    decoded = torch.stack([dataset[i]["image"] for i in range(len(dataset))]).to(line.device)
    batches = list(decoded.split(batch))
    cuda = line.device.type == "cuda"
    features = [line.extractor(b) for b in batches]
    templates = [line.bank.gather(line.bank.nearest(q, line.config.templates)) for q in features]
    channels = list(line.matching.layer_channels)
    volumes = [cost_volume(split_layers(q, channels), split_layers(t, channels), line.matching.depth)
               for q, t in zip(features, templates)]
    index = {id(b): i for i, b in enumerate(batches)}

    def base_part(b: torch.Tensor) -> object:
        # What the line's call spends on the base: its head on the filter's features, or its whole call.
        return base.predict_features(features[index[id(b)]]) if line.shares_features else base.predict(b)

    base_cells = [line.base_cells(base_part(b).anomaly_map) if line.base_guided else None for b in batches]

    def by_batch(fn: Callable[[int], object]) -> Callable[[torch.Tensor], object]:
        return lambda b: fn(index[id(b)])

    def unet(i: int) -> object:
        q = split_layers(features[i], channels)
        return line.filter(volumes[i], q, initial_map(volumes[i]), base_cells[i])

    parts = {
        "base model call": lambda b: base.predict(b),
        "base + filter model call": lambda b: line.predict(b),
        "backbone pass": lambda b: line.extractor(b),
        "base's part (its head on shared features, else its call)": base_part,
        "template choice": by_batch(lambda i: line.bank.gather(line.bank.nearest(features[i], line.config.templates))),
        "cost volume": by_batch(lambda i: cost_volume(split_layers(features[i], channels),
                                                      split_layers(templates[i], channels), line.matching.depth)),
        "3D U-Net": by_batch(unet),
    }
    line.filter.eval()
    for step in parts.values():  # warm-up: first calls allocate and pick kernels
        step(batches[0])
    times = seconds_per_image(parts, batches, repeats, cuda)
    times["filter adds"] = times["base + filter model call"] - times["base model call"]
    # The line's call less every timed part: map upsampling, image score, fusion, Python between them.
    times["rest of the line's call"] = times["base + filter model call"] - sum(
        times[k] for k in ("backbone pass", "base's part (its head on shared features, else its call)",
                           "template choice", "cost volume", "3D U-Net"))
    times["shares features"] = float(line.shares_features)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--bases", nargs="+", default=["gaussian", "patchcore"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--set", action="append", default=[], help="override a CostFilter config value")
    parser.add_argument("--cache-dir", default=str(Path(__file__).resolve().parent / "results" / "cache"))
    parser.add_argument("--name", default="costfilter_cost")
    args = parser.parse_args()
    require_dataset(args.data)
    configure_logging()
    runtime = Runtime(cache_dir=args.cache_dir)
    report = {"machine": machine(), "threads": torch.get_num_threads(), "images": args.images,
              "batch": args.batch, "repeats": args.repeats, "overrides": args.set, "bases": {}}
    lines = [f"# CostFilter-AD per-image cost ({args.images} magnetic_tile test images, batches of {args.batch}, "
             f"best of {args.repeats}, {torch.get_num_threads()} threads, overrides {args.set or 'none'})", "",
             "| part | " + " | ".join(args.bases) + " |", "|---|" + "---:|" * len(args.bases)]
    for name in args.bases:
        report["bases"][name] = measure(name, args.set, args.images, args.batch, args.repeats, runtime, args.data)
    for part in next(iter(report["bases"].values())):
        if part == "shares features":
            continue
        cells = [f"{report['bases'][b][part] * 1000:.1f} ms" for b in args.bases]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines.append("")
    for b, t in report["bases"].items():
        within = t["filter adds"] <= t["base model call"]
        lines.append(f"- {b}: the filter adds {t['filter adds'] * 1000:.1f} ms per image to the base's "
                     f"{t['base model call'] * 1000:.1f} ms: {'within' if within else 'over'} the cap (the base's own "
                     "time)")
    print("\n".join(lines))
    save(args.name, report, "\n".join(lines))


if __name__ == "__main__":
    main()
