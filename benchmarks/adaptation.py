"""Does a landed batch make a line better? Every adaptation candidate, the gate's pick and a labelled
reference, on elpv mono -> poly and poly -> mono, and on magnetic_tile seen by a new camera.

    .venv/bin/python benchmarks/adaptation.py [--tasks mono-poly poly-mono magnetic_tile-shift magnetic_tile-texture]
        [--seeds 0 1 2] [--source-method ref_cfa|patchcore] [--set key=value ...]
        [--source-set key=value ...] [--name NAME] [--resume]

Each domain is laid out as a camera delivers it (``elpv:<d>?layout=landing``): a fixed 40% of its cells
is the labelled test split and never lands; every other cell lands, defective and ambiguous ones too.
For each task and seed: train the source model on the source domain (``configs/ref_cfa_cpu.yaml`` with
``seed=N`` for ref_cfa, or a PatchCore kNN on its train normals; ``--source-set`` changes that config,
e.g. ``normalisation.kind=position_whiten``), run ``adapt_candidates`` exactly as
``jobs/adapt_target.py`` does (gate seed = N), then, with the decision made, read the target's test
labels and score every candidate: image AUROC, F1-max, and precision / recall / F1 at the threshold the
candidate would ship with. Rows: the source as is, the target memory, REF+CFA (ref_cfa sources), the
gate's pick, and a kNN fitted on the *labelled* normals of the landed cells (a reference that reads
labels: what a labelling effort would buy). The gate's Spearman rank correlation with test AUROC
across candidates is reported per run.

``magnetic_tile-shift`` (needs ../shared/datasets/magnetic_tile): the source is a kNN (PatchCore, the
recipe of benchmarks/configs/patchcore_magnetic_tile.yaml) on the tile's train normals; the target is
every tile darker and lower in contrast (0.6 x + 20, a new camera), laid out like elpv's landing: the
shifted train normals and a fixed hashed half of the shifted test images land (about 18% of the landed
tiles are defective), the other half of the test images is the labelled test split. A ref_cfa source is
not used there: trained on every labelled tile, it would have seen the target's test defects.
``magnetic_tile-texture``: the same, with each shifted tile also under a smooth random grain of its own
(a surface the source never saw, as poly's crystal grains are new to a mono line): there the source as is
is a weak referee of which landed images are defective (image AUROC 0.558 on seed 0's test split).

Figures go to benchmarks/results/adaptation[_NAME].{json,md},
rewritten after every run. About 12 CPU-minutes per run with a ref_cfa source on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import yaml
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, save  # noqa: E402

from ray_ad.adaptation.gate import choose, gate_score, split_landing  # noqa: E402
from ray_ad.adaptation.promote import CANDIDATES, adapt_candidates, build_gate_set, split_overrides  # noqa: E402
from ray_ad.bundle import load_bundle, save_bundle  # noqa: E402
from ray_ad.config import apply_overrides  # noqa: E402
from ray_ad.data import load_samples  # noqa: E402
from ray_ad.evaluation import compute_metrics, run_detector  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.metrics import decision_metrics  # noqa: E402
from ray_ad.pipeline import train_detector  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ref_cfa_cpu.yaml"
TASKS = {"mono-poly": ("mono", "poly"), "poly-mono": ("poly", "mono"), "magnetic_tile-shift": ("tile", "tile-shift"),
         "magnetic_tile-texture": ("tile", "tile-texture")}
MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile"
PATCHCORE_TILE = Path(__file__).resolve().parent / "configs" / "patchcore_magnetic_tile.yaml"
SOURCES = Path(__file__).resolve().parents[1] / "runs" / "adaptation_sources"
LABELLED_REFERENCE = "kNN on labelled target normals (reads labels)"


def landing(domain: str, cache_dir: str) -> str:
    if domain.startswith("tile-"):
        return shifted_magnetic_tile(cache_dir, domain.removeprefix("tile-"))
    return f"elpv:{domain}?layout=landing"


def _textured(pixels, name: str):
    """``pixels`` darker and lower in contrast, under a smooth random texture of its own (seeded by the
    file name): a surface whose grain differs from part to part, as poly's crystal grains differ from
    cell to cell, which a source line has never seen."""
    import numpy as np
    import torch

    generator = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    height, width = pixels.shape[:2]
    coarse = torch.randn(1, 1, max(2, height // 12), max(2, width // 12), generator=generator)
    grain = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    grain = grain[0, 0].numpy() * 10
    return 0.6 * pixels + 20 + (grain[..., None] if pixels.ndim == 3 else grain).astype(np.float32)


def shifted_magnetic_tile(cache_dir: str, kind: str = "shift") -> str:
    """A Parquet manifest of the shifted tiles with ``landing`` and ``test`` splits (written once).
    ``shift``: every tile 0.6 x + 20 (a new camera); ``texture``: that and a grain of each tile's own."""

    import numpy as np
    from PIL import Image

    from ray_ad.data import Sample, write_manifest

    # Absolute: a manifest resolves relative paths against its own folder.
    folder = (Path(cache_dir).parent / f"magnetic_tile_{kind}").resolve()
    manifest = folder / "manifest.parquet"
    if manifest.exists():
        return str(manifest)
    samples = []
    for sample in load_samples(str(MAGNETIC_TILE)):
        out = folder / Path(sample.path).relative_to(MAGNETIC_TILE)
        out.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(Image.open(sample.path), dtype=np.float32)
        shifted = 0.6 * pixels + 20 if kind == "shift" else _textured(pixels, out.name)
        Image.fromarray(shifted.clip(0, 255).astype(np.uint8)).save(out)
        unit = int(hashlib.sha256(out.name.encode()).hexdigest()[:8], 16) / 2**32
        split = "landing" if sample.split == "train" or unit < 0.5 else "test"
        samples.append(Sample(str(out), sample.label, sample.mask_path, split, f"magnetic_tile-{kind}", sample.defect))
    write_manifest(samples, str(manifest))
    return str(manifest)


def source_model(method: str, domain: str, seed: int, cache_dir: str, overrides: list[str] | None = None):
    """The source line's model, trained once per (method, domain, seed, config) and kept as a bundle
    under ``runs/adaptation_sources/``: re-running the benchmark after an adaptation change then costs
    the adaptation only (a ref_cfa source is about 17 CPU-minutes on 2 cores). ``overrides``
    (``key=value``) change the source's config, and so its cache key."""
    if domain == "tile":
        method, data, config = "patchcore", str(MAGNETIC_TILE), yaml.safe_load(PATCHCORE_TILE.read_text())
    elif method == "ref_cfa":
        data, config = f"elpv:{domain}", yaml.safe_load(CONFIG.read_text())
    else:
        data, config = f"elpv:{domain}", {}
    config = apply_overrides({**config, "seed": seed}, overrides or [])
    key = hashlib.sha256(json.dumps([method, data, config], sort_keys=True).encode()).hexdigest()[:16]
    bundle = SOURCES / f"{method}-{domain}-seed{seed}-{key}"
    if (bundle / "config.json").exists():
        return load_bundle(str(bundle))
    detector = train_detector(method, data, config, runtime=Runtime(False, cache_dir), evaluate=False)[0]
    save_bundle(detector, str(bundle))
    return detector


def labelled_reference(target: str, seed: int, cache_dir: str):
    """A PatchCore-style kNN on the target's own backbone features, fitted on landed cells *labelled* normal."""
    from ray_ad.methods.target_memory import TargetMemoryConfig

    normals = [s for s in load_samples(target, "landing") if s.label == 0]
    calibration, train = normals[: len(normals) // 10], normals[len(normals) // 10 :]
    backbone = TargetMemoryConfig().backbone  # the target memory's cells, so the rows compare like for like
    detector = build_detector("patchcore", method_config("patchcore", {
        "backbone": {"layers": list(backbone.layers), "grid_size": backbone.grid_size,
                     "local_pool": backbone.local_pool}, "bank_fraction": 1.0, "seed": seed}))
    detector.fit(train, calibration, Runtime(False, cache_dir))
    return detector


def score(detector, test, threshold: float) -> dict[str, float]:
    results = run_detector(detector, test, progress=False)
    out = compute_metrics(results)
    out.update(decision_metrics(results.scores, results.labels, threshold))
    return {k: out[k] for k in ("image_auroc", "image_f1max", "precision", "recall", "f1", "seconds_per_image")}


def run(task: str, seed: int, method: str, overrides: list[str], cache_dir: str,
        variant_names: list[str] | None = None, source_overrides: list[str] | None = None) -> dict:
    source_domain, target_domain = TASKS[task]
    target = landing(target_domain, cache_dir)
    tick = time.perf_counter()
    source = source_model(method, source_domain, seed, cache_dir, source_overrides)
    source_seconds = time.perf_counter() - tick
    config, ref_overrides = split_overrides([*overrides, f"gate.seed={seed}"])
    images = [s.path for s in load_samples(target, "landing")]
    outcome = adapt_candidates(source, target, images, config, ref_cfa_overrides=ref_overrides,
                               runtime=Runtime(False, cache_dir))
    # The decision is made; from here on the target's labels are read, for the figures only.
    test = load_samples(target, "test")
    rows = {}
    for name, detector in outcome.candidates.items():
        gate = outcome.gate[name]
        rows[name] = {**score(detector, test, gate["threshold"]), "gate_auroc": gate["gate_auroc"],
                      "build_seconds": gate.get("build_seconds"), "fit": gate.get("fit")}
        print(f"{task} seed {seed} | {name}: {rows[name]}", flush=True)
    reference = labelled_reference(target, seed, cache_dir)
    rows[LABELLED_REFERENCE] = score(reference, test, reference.threshold)
    names = list(outcome.candidates)
    variants = gate_variants(source, target, images, config, outcome, rows, cache_dir,
                             list(GATE_VARIANTS) if variant_names is None else variant_names)
    gate_values = [rows[n]["gate_auroc"] for n in names]
    test_values = [rows[n]["image_auroc"] for n in names]
    best = max(names, key=lambda n: rows[n]["image_auroc"])
    return {
        "rows": rows, "winner": outcome.winner, "decision": outcome.decision, "best_by_test_labels": best,
        "landing_share": outcome.landing_share,
        "pick_minus_best": rows[outcome.winner]["image_auroc"] - rows[best]["image_auroc"],
        "pick_minus_source": rows[outcome.winner]["image_auroc"] - rows["source"]["image_auroc"],
        "gate_spearman": float(spearmanr(gate_values, test_values).statistic) if len(names) > 2 else None,
        "source_seconds": source_seconds, "per_kind": {n: outcome.gate[n].get("per_kind") for n in names},
        "gate_variants": variants,
    }


# How the gate treats the held-out images that stand out (gate.suspect_z, gate.suspects): each variant
# re-ranks the same candidates on its own gate set, so one run measures them all.
GATE_VARIANTS = {"suspects rank as negatives": {"suspect_z": None},
                 "suspects excluded": {"suspect_z": 3.0, "suspects": "exclude"},
                 "suspects as positives": {"suspect_z": 3.0, "suspects": "positive"}}


def gate_variants(source, target: str, images: list[str], config, outcome, rows: dict, cache_dir: str,
                  names: list[str]) -> dict:
    fit_part, held_out = split_landing(images, config.gate)
    out = {}
    for variant in names:
        changes = GATE_VARIANTS[variant]
        variant_config = dataclasses.replace(config, gate=dataclasses.replace(config.gate, **changes))
        gate_set = build_gate_set(source, target, held_out, variant_config, Runtime(False, cache_dir), fit_part)
        # The job's own gate: its scores are in the outcome already (the set is rebuilt for its counts).
        scores = outcome.gate if variant_config.gate == config.gate else {
            name: gate_score(detector, gate_set, variant_config.gate) for name, detector in outcome.candidates.items()}
        winner, _ = choose(scores, None, variant_config.gate.margin, order=CANDIDATES)
        best = max(scores, key=lambda n: rows[n]["image_auroc"])
        out[variant] = {"gate_auroc": {n: s["gate_auroc"] for n, s in scores.items()}, "winner": winner,
                        "pick_minus_best": rows[winner]["image_auroc"] - rows[best]["image_auroc"],
                        "pick_minus_source": rows[winner]["image_auroc"] - rows["source"]["image_auroc"],
                        "suspects": gate_set.counts.get("suspects", 0)}
        print(f"gate variant {variant}: {out[variant]}", flush=True)
    return out


def table(results: dict[str, dict[int, dict]]) -> str:
    lines = []
    for task, seeds in results.items():
        names = list(next(iter(seeds.values()))["rows"])
        lines += [f"### {task.replace('-', ' -> ')} (image AUROC; F1 at the shipped threshold in brackets)", "",
                  "| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std |",
                  "|---|" + "---:|" * (len(seeds) + 2)]
        for name in [*names, "gate's pick"]:
            values, cells = [], []
            for run_ in seeds.values():
                row = run_["rows"][run_["winner"] if name == "gate's pick" else name]
                values.append(row["image_auroc"])
                cells.append(f"{row['image_auroc']:.3f} ({row['f1']:.2f})")
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(values):.3f} | {std:.3f} |")
        lines += ["", "| seed | pick | decision | best by test labels | pick - best | pick - source | gate Spearman |",
                  "|---|---|---|---|---:|---:|---:|"]
        for seed, run_ in seeds.items():
            rho = "n/a" if run_["gate_spearman"] is None else f"{run_['gate_spearman']:.2f}"
            lines.append(f"| {seed} | {run_['winner']} | {run_['decision']} | {run_['best_by_test_labels']} | "
                         f"{run_['pick_minus_best']:+.3f} | {run_['pick_minus_source']:+.3f} | {rho} |")
        lines.append("")
        variants = [v for run_ in seeds.values() for v in run_.get("gate_variants", {})]
        if variants:
            lines += ["The same candidates ranked by each treatment of the held-out suspects (gate AUROC per "
                      "candidate; pick - best, pick - source):", "",
                      "| seed | gate variant | suspects | gate AUROC | pick | pick - best | pick - source |",
                      "|---|---|---:|---|---|---:|---:|"]
            for seed, run_ in seeds.items():
                for variant, v in run_.get("gate_variants", {}).items():
                    gates = ", ".join(f"{n} {a:.3f}" for n, a in v["gate_auroc"].items())
                    lines.append(f"| {seed} | {variant} | {v['suspects']} | {gates} | {v['winner']} | "
                                 f"{v['pick_minus_best']:+.3f} | {v['pick_minus_source']:+.3f} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["mono-poly", "poly-mono", "magnetic_tile-shift"],
                        choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--source-method", default="ref_cfa", choices=["ref_cfa", "patchcore", "osd_irf"])
    parser.add_argument("--set", action="append", default=[], help="adaptation overrides (gate.*, memory.*, cfa.*)")
    parser.add_argument("--source-set", action="append", default=[],
                        help="source model config overrides (e.g. normalisation.kind=position_whiten)")
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    parser.add_argument("--name", default="")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the results file")
    parser.add_argument("--gate-variants", nargs="*", default=list(GATE_VARIANTS), choices=list(GATE_VARIANTS),
                        help="treatments of the held-out suspects to re-rank each run's candidates by (none: skip)")
    args = parser.parse_args()
    apply_overrides({}, args.set)  # fail fast on a malformed --set
    apply_overrides({}, args.source_set)
    name = "adaptation" + (f"_{args.name}" if args.name else "")
    results: dict[str, dict[int, dict]] = {}
    saved = RESULTS / f"{name}.json"
    if args.resume and saved.exists():  # runs already measured with these settings are kept, not re-run
        payload = json.loads(saved.read_text())
        if (payload["source_method"], payload["overrides"], payload.get("source_overrides", [])) == (
                args.source_method, args.set, args.source_set):
            results = {task: {int(seed): run_ for seed, run_ in runs.items()}
                       for task, runs in payload["results"].items()}
    for seed in args.seeds:  # seed-major: a partial run still covers every task
        for task in args.tasks:
            if seed in results.get(task, {}):
                continue
            tick = time.perf_counter()
            results.setdefault(task, {})[seed] = run(task, seed, args.source_method, args.set, args.cache_dir,
                                                      args.gate_variants, args.source_set)
            results[task][seed]["seconds"] = time.perf_counter() - tick
            payload = {"source_method": args.source_method, "overrides": args.set, "source_overrides": args.source_set,
                       "machine": machine(), "results": results}
            changed = f" with {' '.join(args.source_set)}" if args.source_set else ""
            described = f"Source: {args.source_method}{changed}"
            save(name, payload, f"{described} (magnetic_tile tasks: patchcore).\n\n" + table(results))
    print(table(results))


if __name__ == "__main__":
    main()
