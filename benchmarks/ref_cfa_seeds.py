"""How far does a cross-domain figure move with the seed alone? The source model and its adaptations,
trained as the README's main job trains them, once per seed.

    .venv/bin/python benchmarks/ref_cfa_seeds.py [--seeds 0 1 2] [--source elpv:mono] [--target elpv:poly]
        [--set key=value ...] [--name NAME]

For each seed: train the source model on every labelled source image (10% held out, the split does
not depend on the seed) with ``configs/ref_cfa_cpu.yaml`` and ``seed=N``, in this process; evaluate
it on the target's test split as is (w/o CFA); adapt copies of it to the unlabeled target images
with the default (T1 from scratch, full CFA), with ``target_init=source_frozen`` (full CFA) and with
``source_frozen`` w/o SFA, evaluating each. Figures (per seed, mean and standard deviation) go to
benchmarks/results/ref_cfa_seeds[_NAME].{json,md}, rewritten after every seed; ``--set`` overrides
keys of the config (e.g. ``normalisation.kind=position_whiten``). About 20 CPU-minutes per seed
on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, save  # noqa: E402

from ray_ad.config import apply_overrides  # noqa: E402
from ray_ad.pipeline import adapt_detector, evaluate_split, target_image_uris, train_detector  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ref_cfa_cpu.yaml"
VARIANTS = {
    "REF+CFA (T1 from scratch, the default)": [],
    "source_frozen, CFA full": ["target_init=source_frozen"],
    "source_frozen, w/o SFA": ["target_init=source_frozen", "cfa.second_order=false"],
}


def run_seed(seed: int, source: str, target: str, cache_dir: str, overrides: list[str]) -> dict[str, float]:
    config = apply_overrides({**yaml.safe_load(CONFIG.read_text()), "seed": seed}, overrides)
    detector, metrics = train_detector("ref_cfa", source, config, progress=False, cache_dir=cache_dir)
    row = {"source held-out image AUROC": metrics["image_auroc"]}
    row["w/o CFA (source model as is)"] = evaluate_split(detector, target, "test", progress=False)[1]["image_auroc"]
    images = target_image_uris(target)
    for name, variant in VARIANTS.items():
        tick = time.perf_counter()
        adapted = copy.deepcopy(detector)
        adapt_detector(adapted, images, variant, progress=False, cache_dir=cache_dir)
        row[name] = evaluate_split(adapted, target, "test", progress=False)[1]["image_auroc"]
        print(f"seed {seed} | {name}: image AUROC {row[name]:.3f} ({time.perf_counter() - tick:.0f} s)", flush=True)
    return row


def table(results: dict[int, dict[str, float]], source: str, target: str) -> str:
    labels = list(next(iter(results.values())))
    lines = [f"{source} -> {target}, image AUROC per seed (source held-out share in the first row):", "",
             "| | " + " | ".join(f"seed {s}" for s in results) + " | mean | std |",
             "|---|" + "---:|" * (len(results) + 2)]
    for label in labels:
        values = [results[s][label] for s in results]
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {statistics.mean(values):.3f} | {spread:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--source", default="elpv:mono")
    parser.add_argument("--target", default="elpv:poly")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the source model and its adaptations (repeatable)")
    parser.add_argument("--name", help="suffix of the result files (default: none)")
    args = parser.parse_args()
    results: dict[int, dict[str, float]] = {}
    for seed in args.seeds:
        tick = time.perf_counter()
        results[seed] = run_seed(seed, args.source, args.target, str(RESULTS / "cache"), args.overrides)
        print(f"seed {seed} done in {time.perf_counter() - tick:.0f} s", flush=True)
        text = table(results, args.source, args.target)
        print(text)
        name = f"ref_cfa_seeds_{args.name}" if args.name else "ref_cfa_seeds"
        save(name, {"machine": machine(), "args": vars(args), "results": results}, text)


if __name__ == "__main__":
    main()
