"""CostFilter-AD on magnetic_tile: each base detector beside base + filter, over filter seeds.

    .venv/bin/python benchmarks/costfilter.py [--bases patchcore gaussian osd_irf] [--seeds 0 1 2] \
        [--set key=value ...] [--base-set key=value ... | --base-model BUNDLE] [--fleet elpv:mono ...]

Each base is fitted once (patchcore: ``configs/patchcore_magnetic_tile.yaml``; gaussian: the ``gaussian``
detector with the OSD-IRF recipe's backbone and whitening, i.e. the r = 0 reference of ``magnetic_tile.py``;
osd_irf: ``configs/osd_irf_magnetic_tile.yaml``, the base of ``--set template_source=reconstruction``;
``--base-set`` overrides a base config value; ``--base-model`` loads a saved one instead) and saved; the
filter is then trained over that base bundle once per seed (``base.model``), so the rows differ only by the
filter. With ``--set train.pool_base=leave_one_out`` (which reads the memory's record of each cell's
training image, kept only by a base fitted in the same call) the base is refitted inside each seed's fit
from the same config instead: the same memory, since patchcore's full bank does not depend on the seed.
Prints and saves image/pixel AUROC, AP, F1-max, AU-PRO, seconds per image (mean and spread over
seeds), pixel AUROC per defect type, and overlay PNGs [image | base | base + CF | mask] for a few images of
each defect type (seed 0) under ``results/<name>_overlays/``.

With ``--fleet DATA ...`` each seed also trains one fleet filter (``costfilter.fleet``) on magnetic_tile
and the named datasets' normal images, each line with its own base of the same kind (fitted once on
its data), and scores magnetic_tile with it: the per-line and the fleet filter side by side. The other
lines' image AUROC on their test splits (base vs fleet-filtered) is reported too.
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
from _common import DEFAULT_MAGNETIC_TILE, RESULTS, machine, require_dataset, save, splits  # noqa: E402
from magnetic_tile import pixel_auroc_per_defect  # noqa: E402

from ray_ad.bundle import load_bundle, save_bundle  # noqa: E402
from ray_ad.config import apply_overrides, load_file, to_dict  # noqa: E402
from ray_ad.data.images import load_image  # noqa: E402
from ray_ad.evaluation import Results, compute_metrics, run_detector  # noqa: E402
from ray_ad.heatmaps import overlay  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.methods.costfilter.fleet import train_fleet_filter  # noqa: E402
from ray_ad.progress import configure_logging  # noqa: E402
from ray_ad.report import METRIC_KEYS  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
KEYS = METRIC_KEYS + ("model_seconds_per_image",)


def fits_base_in_call(overrides: dict) -> bool:
    """Leave-one-out pool maps read the memory's record of each cell's image, which a saved base bundle
    does not keep: the filter's config must then name the base's method and config, not a bundle."""
    return overrides.get("train", {}).get("pool_base") == "leave_one_out"


def base_config(name: str) -> tuple[str, dict]:
    if name == "patchcore":
        return "patchcore", load_file(str(CONFIGS / "patchcore_magnetic_tile.yaml"))
    if name == "gaussian":  # the OSD-IRF recipe's per-position Gaussian (its backbone and whitening), no network
        recipe = load_file(str(CONFIGS / "osd_irf_magnetic_tile.yaml"))
        return "gaussian", {"backbone": recipe["backbone"], "normalisation": recipe["normalisation"]}
    if name == "osd_irf":  # the OSD-IRF recipe itself (its network: the reconstruction templates' source)
        return "osd_irf", load_file(str(CONFIGS / "osd_irf_magnetic_tile.yaml"))
    raise SystemExit(f"error: unknown base {name!r} (use patchcore, gaussian or osd_irf)")


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
    parser.add_argument("--base-set", action="append", default=[],
                        help="override a base config value (e.g. train.steps=0 for an untrained osd_irf base)")
    parser.add_argument("--base-model", default="",
                        help="a saved base bundle of the one base named in --bases, used instead of fitting it")
    parser.add_argument("--cache-dir", default=str(RESULTS / "cache"))
    parser.add_argument("--overlays", type=int, default=2, help="overlay PNGs per defect type (seed 0)")
    parser.add_argument("--fleet", nargs="*", default=[], help="other lines' data for a fleet filter (e.g. elpv:mono)")
    parser.add_argument("--name", default="costfilter")
    args = parser.parse_args()
    require_dataset(args.data)
    if args.base_model and len(args.bases) != 1:
        sys.exit(f"error: --base-model replaces one base, but --bases names {len(args.bases)}")
    configure_logging()
    train, calibration, test = splits(args.data)
    runtime = Runtime(cache_dir=args.cache_dir)
    report: dict = {"bases": {}, "machine": machine(), "overrides": args.set, "base_overrides": args.base_set,
                    "base_model": args.base_model}
    lines = []
    for name in args.bases:
        if args.base_model:
            base, base_uri = load_bundle(args.base_model), args.base_model
        else:
            method, values = base_config(name)
            base = build_detector(method, method_config(method, apply_overrides(values, args.base_set)))
            base.fit(train, calibration, runtime)
            base_uri = str(RESULTS / "runs" / f"{args.name}_base_{name}")
            save_bundle(base, base_uri)
        base_results = run_detector(base, test)
        entry = {"base": compute_metrics(base_results), "base_per_defect": pixel_auroc_per_defect(base_results),
                 "filtered": [], "filtered_per_defect": [], "fit": [], "fleet": [], "fleet_per_defect": [],
                 "fleet_others": []}
        others = [fleet_line(name, data, args.name, runtime) for data in args.fleet]
        for seed in args.seeds:
            overrides = apply_overrides({"base": {"model": base_uri}, "seed": seed}, args.set)
            if fits_base_in_call(overrides):
                overrides["base"] = {"method": base.method, "config": to_dict(base.config)}
            detector = build_detector("costfilter", method_config("costfilter", overrides))
            start = time.perf_counter()
            fit = detector.fit(train, calibration, runtime)
            fit["seconds"] = time.perf_counter() - start
            results = run_detector(detector, test)
            entry["filtered"].append(compute_metrics(results))
            print(f"[{name}] seed {seed}: " + ", ".join(  # a long run's figures in its log as they come
                f"{key} {entry['filtered'][-1][key]:.4f}" for key in ("image_auroc", "pixel_auroc", "pixel_aupro")),
                flush=True)
            entry["filtered_per_defect"].append(pixel_auroc_per_defect(results))
            entry["fit"].append(fit)
            entry["config"] = to_dict(detector.config)
            if seed == args.seeds[0] and args.overlays:
                overlays(base_results, results, RESULTS / f"{args.name}_overlays" / name, args.overlays)
            if others:
                fleet_results, other_rows = fleet_seed(base_uri, others, train, calibration, test, seed, args.set,
                                                       runtime)
                entry["fleet"].append(compute_metrics(fleet_results))
                entry["fleet_per_defect"].append(pixel_auroc_per_defect(fleet_results))
                entry["fleet_others"].append(other_rows)
        entry["summary"] = summarise(entry["filtered"])
        report["bases"][name] = entry
        lines += table(name, entry, len(args.seeds))
        print("\n".join(table(name, entry, len(args.seeds))))
        save(args.name, report, "\n".join(lines))  # after each base: a long run keeps what it measured


def fleet_line(base: str, data: str, name: str, runtime: Runtime) -> dict:
    """Another line of the fleet: its splits and its own base of kind ``base``, fitted once and saved."""
    line_train, line_calibration, line_test = splits(data)
    method, values = base_config(base)
    detector = build_detector(method, method_config(method, values))
    detector.fit(line_train, line_calibration, runtime)
    uri = str(RESULTS / "runs" / f"{name}_base_{base}_{data.replace(':', '_')}")
    save_bundle(detector, uri)
    return {"data": data, "base_uri": uri, "train": line_train, "calibration": line_calibration,
            "test": line_test, "base_metrics": compute_metrics(run_detector(detector, line_test))}


def fleet_seed(base_uri: str, others: list[dict], train, calibration, test, seed: int, overrides: list[str],
               runtime: Runtime):
    """One fleet filter over magnetic_tile and ``others`` (seed ``seed``): magnetic_tile's results, and the
    other lines' image AUROC base vs fleet-filtered."""
    def line(uri: str):
        values = apply_overrides({"base": {"model": uri}, "seed": seed}, overrides)
        return build_detector("costfilter", method_config("costfilter", values))

    lines = [(line(base_uri), train, calibration)] + [(line(o["base_uri"]), o["train"], o["calibration"])
                                                      for o in others]
    train_fleet_filter(lines, runtime, seed=seed)
    rows = [{"data": o["data"], "base_image_auroc": o["base_metrics"]["image_auroc"],
             "fleet_image_auroc": compute_metrics(run_detector(detector, o["test"]))["image_auroc"]}
            for o, (detector, _, _) in zip(others, lines[1:])]
    return run_detector(lines[0][0], test), rows


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
    if entry["fleet"]:
        out.append(f"| {name} + fleet CostFilter | " + " | ".join(
            f"{np.mean([p[k]['pixel_auroc'] for p in entry['fleet_per_defect']]):.3f}" for k in kinds) + " |")
        fleet = summarise(entry["fleet"])
        out[6:6] = [f"| {name} + fleet CostFilter | " + " | ".join(
            f"{fleet[k]['mean']:.4f} ± {fleet[k]['std']:.4f}" for k in KEYS) + " |"]
        out += ["", "the fleet's other lines, image AUROC (base -> fleet-filtered, per seed):", ""]
        for k, row in enumerate(entry["fleet_others"][0]):
            per_seed = ", ".join(f"{rows[k]['fleet_image_auroc']:.4f}" for rows in entry["fleet_others"])
            out.append(f"- {row['data']}: {row['base_image_auroc']:.4f} -> {per_seed}")
    return out + [""]


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
