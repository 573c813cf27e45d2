"""REF + CFA cross-domain benchmark: every ablation of the paper's table in one command.

    .venv/bin/python benchmarks/ref_cfa_cross_domain.py [--tasks mono-poly poly-mono tile-shift]

Per task (source labelled, target unlabeled; target labels are used only to evaluate):
- the full REF + CFA model (S1, S2 on the source; T1, T2 on the target's images only), with T1 trained
  from scratch (the default) and fine-tuned from the source network (the base of the ablation rows);
- "w/o CFA": the source model applied to the target as is;
- CFA ablations: w/o TA, w/o DSA, w/o SFA (same target network, alignment refitted);
- REF ablations: w/o R, w/o M, w/o Q, raw residuals (head retrained on the same source fields, then
  the full CFA);
- OSD-IRF built from the same source score network (IRF Gaussian + calibration on source normals);
- the nearest-neighbour baseline fitted on the target's normal training images (a labelled reference).
Target images used for adaptation: every image of the target domain (unlabeled, anomalies included);
evaluation: the target's test split. Table: image AUROC (pixel AUROC where masks exist) and seconds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MAGNETIC_TILE, RESULTS, machine, save  # noqa: E402

from ray_ad.bundle import save_bundle  # noqa: E402
from ray_ad.config import apply_overrides, load_file, to_dict  # noqa: E402
from ray_ad.data import Sample, load_samples, split_calibration  # noqa: E402
from ray_ad.data.images import load_image  # noqa: E402
from ray_ad.evaluation import compute_metrics, run_detector  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.methods.ref_cfa.model import REFCFA  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = RESULTS / "cache"
HEAD_ABLATIONS = {
    "w/o R": {"components": ["M", "Q"]},
    "w/o M": {"components": ["R", "Q"]},
    "w/o Q": {"components": ["R", "M"]},
    "raw residuals (w/o REF)": {"representation": "raw"},
}
FULL = "REF+CFA (full, T1 fine-tuned from source)"
SCRATCH = "REF+CFA (full, T1 from scratch: the default)"
ALL_ON = {"temporal": True, "directional": True, "second_order": True}


def stable_half(path: str) -> int:
    import hashlib

    return hashlib.sha256(Path(path).name.encode()).digest()[0] % 2


def shift_image(image: Image.Image, seed: int) -> Image.Image:
    """The 'new camera' of the tile-shift target: lower contrast, brighter, blurred, noisier."""
    array = np.asarray(image.convert("L"), dtype=np.float32)
    array = (array - array.mean()) * 0.6 + array.mean() + 30  # contrast 0.6, gain +30
    blurred = np.asarray(Image.fromarray(array.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2)))
    noise = np.random.default_rng(seed).normal(0, 6, blurred.shape)
    return Image.fromarray((blurred + noise).clip(0, 255).astype(np.uint8))


def tile_shift_task(root: Path) -> tuple[list[Sample], list[Sample], list[Sample], list[Sample]]:
    """Source: half A of magnetic_tile (by file-name hash); target: half B, shifted and written once."""
    samples = load_samples(str(root))
    source = [s for s in samples if stable_half(s.path) == 0]
    target_dir = CACHE / "magnetic_tile_shift"
    target = []
    for s in (s for s in samples if stable_half(s.path) == 1):
        out = target_dir / Path(s.path).relative_to(root)
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            shift_image(load_image(s.path), int.from_bytes(Path(s.path).name.encode()[:4], "big")).save(out)
        target.append(Sample(str(out), s.label, s.mask_path, s.split, "magnetic_tile-shift", s.defect))
    target_train = [s for s in target if s.split == "train" and s.label == 0]
    target_test = [s for s in target if s.split == "test"]
    return source, target, target_train, target_test


def elpv_task(source: str, target: str):
    source_samples = [s for s in load_samples(f"elpv:{source}") if s.label in (0, 1)]
    target_samples = load_samples(f"elpv:{target}")
    target_train = [s for s in target_samples if s.split == "train" and s.label == 0]
    target_test = [s for s in target_samples if s.split == "test"]
    return source_samples, target_samples, target_train, target_test


def evaluate(detector, samples) -> dict[str, Any]:
    m = compute_metrics(run_detector(detector, samples, progress=False))
    return {key: m[key] for key in ("image_auroc", "pixel_auroc", "seconds_per_image")}


def score_net_stage(detector: REFCFA, role: str, task: str, paths: list[str], train) -> tuple[float, bool]:
    """Run S1 / T1, or reuse the network a previous run trained with the same config on the same images.

    Returns (training seconds as measured when it was trained, whether it was reused)."""
    import hashlib

    import torch

    parts = [to_dict(detector.config.backbone), to_dict(detector.config.score_net),
             to_dict(detector.config.train), detector.config.seed, sorted(paths)]
    if role == "target" and detector.config.target_init != "scratch":
        parts.append(detector.config.target_init)
    key = json.dumps(parts, sort_keys=True)
    path = CACHE / "score_nets" / f"{task}-{role}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        detector.load_domain_tensors(role, saved["tensors"])
        print(f"reusing the {role} score network from {path}")
        return float(saved["seconds"]), True
    tick = time.perf_counter()
    train()
    seconds = time.perf_counter() - tick
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"tensors": detector.domain_tensors(role), "seconds": seconds}, path)
    return seconds, False


def head_variant(full: REFCFA, fields: dict[str, Any], cache_dir: str) -> REFCFA:
    """A detector with other field settings sharing ``full``'s source score network and basis."""
    config = method_config("ref_cfa", {**to_dict(full.config), "fields": {**to_dict(full.config.fields), **fields}})
    variant: REFCFA = build_detector("ref_cfa", config)
    variant.source, variant.basis, variant.u_source = full.source, full.basis, full.u_source
    return variant


def run_task(name: str, source, target, target_train, target_test, config: dict[str, Any], cache_dir: str) -> dict:
    rows: dict[str, dict[str, Any]] = {}
    fit_set, held_out = split_calibration(source, 0.1)
    calibration = [s for s in held_out if s.label == 0]
    target_images = [s.path for s in target]  # adaptation sees image paths only
    print(f"[{name}] source {len(fit_set)} labelled ({sum(s.label for s in fit_set)} anomalous), "
          f"target {len(target_images)} unlabeled, target test {len(target_test)}")

    runtime, quiet = Runtime(cache_dir=cache_dir), Runtime(progress=False, cache_dir=cache_dir)
    tick = time.perf_counter()
    # The ablation rows use T1 fine-tuned from the source network (target_init: source); the default,
    # T1 from scratch, gets its own row below.
    full: REFCFA = build_detector("ref_cfa", method_config("ref_cfa", {**config, "target_init": "source"}))
    source_cache: dict[str, Any] = {}
    normals = [s for s in fit_set if s.label == 0]
    s1_seconds, reused = score_net_stage(full, "source", name, [s.path for s in normals],
                                         lambda: full.fit_source_score_net(normals, runtime))
    if reused:
        full.fit_source_basis(normals, runtime)
    tick = time.perf_counter()
    full.fit_detector(fit_set, runtime, cache=source_cache)
    full.calibrate(calibration, quiet)
    s2_seconds = time.perf_counter() - tick
    source_model = copy.deepcopy(full)
    rows["w/o CFA (source model as is)"] = {**evaluate(source_model, target_test),
                                            "fit_seconds": s1_seconds + s2_seconds}
    print("w/o CFA", rows["w/o CFA (source model as is)"])

    # OSD-IRF trained on the source: the same source score network, scored one-step (Eq. 7-11).
    osd_cfg = method_config("osd_irf", {
        "backbone": to_dict(full.config.backbone), "score_net": to_dict(full.config.score_net),
        "train": to_dict(full.config.train), "t": 250, "irf_gaussian": "fitted",
    })
    osd = build_detector("osd_irf", osd_cfg)
    osd.score_net, osd.normaliser = full.source.net, full.source.normaliser
    from ray_ad.features import extract_features

    osd.fit_irf_gaussian(osd.normalise(extract_features(osd.extractor, normals, cache_dir=cache_dir, progress=False)))
    osd.calibrate(calibration, quiet)
    rows["OSD-IRF (source score net)"] = {**evaluate(osd, target_test), "fit_seconds": s1_seconds}

    t1_seconds, _ = score_net_stage(full, "target", name, target_images,
                                 lambda: full.fit_target_score_net(target_images, runtime))
    target_cache: dict[str, Any] = {}
    variants = {FULL: {}, "w/o TA": {"temporal": False}, "w/o DSA": {"directional": False},
                "w/o SFA": {"second_order": False}}
    diagnostics = {}
    for label, off in variants.items():
        full.config.cfa = dataclasses.replace(full.config.cfa, **{**ALL_ON, **off})
        tick = time.perf_counter()
        diagnostics[label] = full.fit_alignment(target_images, quiet, cache=target_cache)
        rows[label] = {**evaluate(full, target_test), "fit_seconds": s1_seconds + s2_seconds + t1_seconds
                       + time.perf_counter() - tick}
        print(label, rows[label])
        if label == FULL:
            save_bundle(full, str(RESULTS / "runs" / f"ref_cfa_{name}"), {"target_test": rows[label]})
    full.config.cfa = dataclasses.replace(full.config.cfa, **ALL_ON)

    for label, fields in HEAD_ABLATIONS.items():
        tick = time.perf_counter()
        variant = head_variant(full, fields, cache_dir)
        variant.fit_detector(fit_set, quiet, cache=source_cache)
        variant.target = full.target
        variant.fit_alignment(target_images, quiet, cache=target_cache)
        rows[label] = {**evaluate(variant, target_test), "fit_seconds": time.perf_counter() - tick}
        print(label, rows[label])

    # T1 from a fresh initialisation (the paper's wording: "train a target score network"), full CFA.
    scratch = copy.deepcopy(full)
    scratch.config.target_init = "scratch"
    t1_scratch, _ = score_net_stage(scratch, "target", name, target_images,
                                    lambda: scratch.fit_target_score_net(target_images, runtime))
    scratch.fit_alignment(target_images, quiet)
    rows[SCRATCH] = {**evaluate(scratch, target_test), "fit_seconds": s1_seconds + s2_seconds + t1_scratch}
    print(SCRATCH, rows[SCRATCH])

    tick = time.perf_counter()
    knn_config = {"backbone": {"layers": [2, 3], "grid_size": 32}, "bank_fraction": 0.1}
    knn = build_detector("patchcore", method_config("patchcore", knn_config))
    knn.fit(*split_calibration(target_train, 0.1), quiet)
    rows["kNN on target normals (labelled reference)"] = {**evaluate(knn, target_test),
                                                          "fit_seconds": time.perf_counter() - tick}
    return {"rows": rows, "diagnostics": diagnostics,
            "seconds": {"S1": s1_seconds, "S2": s2_seconds, "T1": t1_seconds}}


def table(results: dict[str, dict]) -> str:
    tasks = list(results)
    labels = list(next(iter(results.values()))["rows"])
    header = "| variant | " + " | ".join(f"{t} image AUROC | {t} pixel AUROC" for t in tasks) + " | mean image AUROC |"
    lines = [header, "|---" * (2 * len(tasks) + 2) + "|"]
    for label in labels:
        cells, images = [], []
        for t in tasks:
            row = results[t]["rows"].get(label, {})
            image, pixel = row.get("image_auroc"), row.get("pixel_auroc")
            images.append(image)
            cells += [f"{image:.3f}" if image is not None else "-", f"{pixel:.3f}" if pixel is not None else "-"]
        mean = np.mean([v for v in images if v is not None])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean:.3f} |")
    seconds = ["", "Seconds (fit / per target image):", ""]
    for t in tasks:
        row = results[t]["rows"]
        seconds.append(f"- {t}: " + "; ".join(
            f"{label} {r['fit_seconds']:.0f} s / {r['seconds_per_image']:.3f} s" for label, r in row.items()))
    return "\n".join(lines + seconds)


def plot(results: dict[str, dict], path: Path) -> None:
    """Horizontal bars: image AUROC of every variant, one colour per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    labels = list(next(iter(results.values()))["rows"])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) * len(tasks) + 1.2))
    height = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        values = [results[task]["rows"].get(label, {}).get("image_auroc") or 0.0 for label in labels]
        ax.barh(np.arange(len(labels)) + i * height, values, height, label=task)
    ax.set_yticks(np.arange(len(labels)) + 0.4 - height / 2, labels)
    ax.invert_yaxis()
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_xlabel("target image AUROC")
    ax.legend(loc="lower right")
    ax.set_title("REF + CFA cross-domain ablations", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["mono-poly", "poly-mono", "tile-shift"])
    parser.add_argument("--config", default=str(REPO / "configs" / "ref_cfa_cpu.yaml"))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--magnetic-tile", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--name", default="ref_cfa_cross_domain")
    parser.add_argument("--plot-only", action="store_true", help="re-draw the plot from the saved JSON")
    args = parser.parse_args()
    if args.plot_only:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        plot(saved["results"], RESULTS / f"{args.name}.png")
        (RESULTS / f"{args.name}.md").write_text(table(saved["results"]) + "\n")
        print(table(saved["results"]))
        return
    config = apply_overrides(load_file(args.config), args.set)
    cache_dir = str(CACHE)
    results = {}
    for task in args.tasks:
        if task == "mono-poly":
            data = elpv_task("mono", "poly")
        elif task == "poly-mono":
            data = elpv_task("poly", "mono")
        elif task == "tile-shift":
            if not Path(args.magnetic_tile).exists():
                print(f"skipping tile-shift: no magnetic_tile at {args.magnetic_tile}")
                continue
            data = tile_shift_task(Path(args.magnetic_tile))
        else:
            sys.exit(f"error: unknown task {task!r}; use mono-poly, poly-mono or tile-shift")
        results[task] = run_task(task, *data, config, cache_dir)
        save(args.name, {"config": config, "machine": machine(), "results": results}, table(results))
        plot(results, RESULTS / f"{args.name}.png")
    print(table(results))


if __name__ == "__main__":
    main()
