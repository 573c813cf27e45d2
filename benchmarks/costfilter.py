"""CostFilter-AD on magnetic_tile: each base detector beside base + filter, over filter seeds.

    .venv/bin/python benchmarks/costfilter.py [--bases patchcore gaussian] [--seeds 0 1 2] [--set key=value ...]

Each base is fitted once (patchcore: ``configs/patchcore_magnetic_tile.yaml``; gaussian: the OSD-IRF
recipe with 0 training steps, i.e. the per-position Gaussian reference of ``magnetic_tile.py``) and
saved; the filter is then trained over that base bundle once per seed (``base.model``), so the rows
differ only by the filter. Prints and saves image/pixel AUROC, AP, F1-max, AU-PRO, seconds per image
(mean and spread over seeds), pixel AUROC per defect type, and overlay PNGs [image | base | base + CF |
mask] for a few images of each defect type (seed 0) under ``results/<name>_overlays/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MAGNETIC_TILE, RESULTS, machine, save, splits  # noqa: E402
from magnetic_tile import pixel_auroc_per_defect  # noqa: E402

from ray_ad.bundle import save_bundle  # noqa: E402
from ray_ad.config import apply_overrides, load_file, to_dict  # noqa: E402
from ray_ad.data.images import load_image  # noqa: E402
from ray_ad.evaluation import Results, compute_metrics, run_detector  # noqa: E402
from ray_ad.heatmaps import overlay  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.progress import configure_logging  # noqa: E402
from ray_ad.report import METRIC_KEYS  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
KEYS = METRIC_KEYS + ("model_seconds_per_image",)


def base_config(name: str) -> tuple[str, dict]:
    if name == "patchcore":
        return "patchcore", load_file(str(CONFIGS / "patchcore_magnetic_tile.yaml"))
    if name == "gaussian":  # the OSD-IRF recipe's per-position Gaussian: whitening only, no trained network
        return "osd_irf", apply_overrides(load_file(str(CONFIGS / "osd_irf_magnetic_tile.yaml")),
                                          ["train.steps=0", "score_net.gaussian_skip=true"])
    raise SystemExit(f"error: unknown base {name!r} (use patchcore or gaussian)")


def overlays(base: Results, filtered: Results, out: Path, per_kind: int) -> int:
    """[image | base map | filtered map | mask] for the first ``per_kind`` images of every defect type."""
    out.mkdir(parents=True, exist_ok=True)
    vmax_base, vmax_cf = (float(np.quantile(r.maps, 0.999)) for r in (base, filtered))
    kinds: dict[str, int] = {}
    written = 0
    for i, path in enumerate(base.paths):
        kind = Path(path).parent.name
        if kind == "good" or kinds.get(kind, 0) >= per_kind:
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
        image = load_image(path)
        size = base.maps[i].shape[::-1]
        panels = [image.resize(size), overlay(image, base.maps[i], vmax_base),
                  overlay(image, filtered.maps[i], vmax_cf),
                  Image.fromarray(base.masks[i].astype(np.uint8) * 255).convert("RGB")]
        canvas = Image.new("RGB", (size[0] * len(panels), size[1]))
        for k, panel in enumerate(panels):
            canvas.paste(panel, (k * size[0], 0))
        canvas.save(out / f"{kind}_{Path(path).stem}.png")
        written += 1
    return written


def summarise(runs: list[dict]) -> dict[str, dict[str, float]]:
    return {key: {"mean": float(np.mean([r[key] for r in runs])), "std": float(np.std([r[key] for r in runs]))}
            for key in KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--bases", nargs="+", default=["patchcore", "gaussian"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], help="override a CostFilter config value")
    parser.add_argument("--cache-dir", default=str(RESULTS / "cache"))
    parser.add_argument("--overlays", type=int, default=2, help="overlay PNGs per defect type (seed 0)")
    parser.add_argument("--name", default="costfilter")
    args = parser.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"error: dataset not found at {args.data} (pass --data)")
    configure_logging()
    train, calibration, test = splits(args.data)
    runtime = Runtime(cache_dir=args.cache_dir)
    report: dict = {"bases": {}, "machine": machine(), "overrides": args.set}
    lines = []
    for name in args.bases:
        method, values = base_config(name)
        base = build_detector(method, method_config(method, values))
        base.fit(train, calibration, runtime)
        base_uri = str(RESULTS / "runs" / f"{args.name}_base_{name}")
        save_bundle(base, base_uri)
        base_results = run_detector(base, test)
        entry = {"base": compute_metrics(base_results), "base_per_defect": pixel_auroc_per_defect(base_results),
                 "filtered": [], "filtered_per_defect": [], "fit": []}
        for seed in args.seeds:
            overrides = apply_overrides({"base": {"model": base_uri}, "seed": seed}, args.set)
            detector = build_detector("costfilter", method_config("costfilter", overrides))
            start = time.perf_counter()
            fit = detector.fit(train, calibration, runtime)
            fit["seconds"] = time.perf_counter() - start
            results = run_detector(detector, test)
            entry["filtered"].append(compute_metrics(results))
            entry["filtered_per_defect"].append(pixel_auroc_per_defect(results))
            entry["fit"].append(fit)
            entry["config"] = to_dict(detector.config)
            if seed == args.seeds[0] and args.overlays:
                overlays(base_results, results, RESULTS / f"{args.name}_overlays" / name, args.overlays)
        entry["summary"] = summarise(entry["filtered"])
        report["bases"][name] = entry
        lines += table(name, entry, len(args.seeds))
        print("\n".join(table(name, entry, len(args.seeds))))
        save(args.name, report, "\n".join(lines))  # after each base: a long run keeps what it measured


def table(name: str, entry: dict, seeds: int) -> list[str]:
    base, summary = entry["base"], entry["summary"]
    kinds = list(entry["base_per_defect"])
    out = [f"### base: {name} (filter over {seeds} seeds: mean ± std)", "",
           "| | " + " | ".join(KEYS) + " |", "|---|" + "---:|" * len(KEYS),
           f"| {name} | " + " | ".join(f"{base[k]:.4f}" for k in KEYS) + " |",
           f"| {name} + CostFilter | " + " | ".join(f"{summary[k]['mean']:.4f} ± {summary[k]['std']:.4f}"
                                                   for k in KEYS) + " |", "",
           "pixel AUROC per defect type:", "", "| | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds),
           f"| {name} | " + " | ".join(f"{entry['base_per_defect'][k]['pixel_auroc']:.3f}" for k in kinds) + " |"]
    per_seed = entry["filtered_per_defect"]
    out.append(f"| {name} + CostFilter | " + " | ".join(
        f"{np.mean([p[k]['pixel_auroc'] for p in per_seed]):.3f}" for k in kinds) + " |")
    return out + [""]


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
