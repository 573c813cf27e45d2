"""The statistic-direction alignment (ours, not the paper's) on both elpv tasks: does flipping the
statistics whose unlabeled-target direction differs from the source's close the gap CFA leaves?

    .venv/bin/python benchmarks/explorations/ref_cfa_directions.py [--seeds 0] [--tasks elpv:mono,elpv:poly ...] \
        [--name NAME]

Per task and seed: train the source model as the README's main job does (``configs/ref_cfa_cpu.yaml``,
``seed=N``, 10% held out); evaluate it on the target's test split as is (w/o CFA); adapt it with the
default T1 (from scratch) and the paper's CFA; then, on the same T1 and target fields, refit only the
closed-form alignment with ``cfa.statistic_directions=true`` (with and without SFA), once per direction
witness (``tail``: the heavier tail over the target; ``synthetic``: the change where a synthetic anomaly
is pasted into target images), and evaluate each. Witness check rows: how many of the statistics each
witness points the same way as the labels do (the synthetic witness on the source against the source's
labels; both witnesses on the target against the target test split's labels, read for this check only).
Target labels are read only to evaluate. Figures go to benchmarks/results/ref_cfa_directions.{json,md},
rewritten after every task. About 20 CPU-minutes per task and seed on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

# benchmarks/ (the shared _common and the main benchmarks) and this folder (the other explorations)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import RESULTS, machine, save  # noqa: E402

from ray_ad.data import load_samples  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.methods.ref_cfa.align import source_directions  # noqa: E402
from ray_ad.pipeline import evaluate_split, target_image_uris, train_detector  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ref_cfa_cpu.yaml"
REFITS = {
    "REF+CFA + direction alignment": {"statistic_directions": True},
    "REF+CFA + direction alignment, w/o SFA": {"statistic_directions": True, "second_order": False},
    "REF+CFA + direction alignment, synthetic witness": {"statistic_directions": True,
                                                         "direction_witness": "synthetic"},
    "REF+CFA + direction alignment, synthetic witness, w/o SFA": {
        "statistic_directions": True, "direction_witness": "synthetic", "second_order": False},
}


def true_directions(detector, target: str, cache_dir: str) -> torch.Tensor:
    """The statistics' directions on the target's labelled test split under the adapted model (check only)."""
    samples = load_samples(target, "test")
    features = detector.extract_features(samples, Runtime(progress=False, cache_dir=cache_dir))
    z = torch.cat([detector.signatures(detector.domain_fields(chunk)) for chunk in features.split(32)])
    labels = torch.tensor([float(s.label) for s in samples])
    keep = labels >= 0
    return source_directions(detector.image_statistics(z)[keep], labels[keep])


def witness_checks(detector, source: str, target: str, infos: dict[str, dict], cache_dir: str) -> dict:
    """How many statistics each label-free witness points the way the labels do (labels read to check only)."""
    n = len(detector.source_directions)
    source_paths = [s.path for s in load_samples(source) if s.label in (0, 1)]
    on_source = detector.synthetic_directions(detector.source, detector.basis, source_paths, None)
    truth = true_directions(detector, target, cache_dir)
    row = {"check: synthetic witness on the source agrees with its labels":
           f"{int((on_source == detector.source_directions).sum())} of {n}",
           "check: statistics whose direction differs between source and target (labels)":
           f"{int((detector.source_directions != truth).sum())} of {n}"}
    for name, info in infos.items():
        guessed = torch.tensor(info["target_directions"], dtype=torch.float32)
        row[f"check: {name}: target directions right"] = f"{int((guessed == truth).sum())} of {n}"
    return row


def run(source: str, target: str, seed: int, cache_dir: str) -> dict[str, float]:
    config = {**yaml.safe_load(CONFIG.read_text()), "seed": seed}
    detector, metrics = train_detector("ref_cfa", source, config, progress=False, cache_dir=cache_dir)
    row = {"source held-out image AUROC": metrics["image_auroc"],
           "w/o CFA (source model as is)": evaluate_split(detector, target, "test", progress=False)[1]["image_auroc"]}
    images, cache = target_image_uris(target), {}
    tick = time.perf_counter()
    detector.adapt(images, Runtime(progress=False, cache_dir=cache_dir), cache=cache)
    row["REF+CFA (the paper's CFA, T1 from scratch)"] = evaluate_split(detector, target, "test", progress=False)[1][
        "image_auroc"]
    print(f"{source} -> {target} seed {seed}: adapted in {time.perf_counter() - tick:.0f} s", flush=True)
    paper, infos = detector.config.cfa, {}
    for name, change in REFITS.items():
        detector.config.cfa = dataclasses.replace(paper, **change)
        info = detector.fit_alignment(images, Runtime(progress=False, cache_dir=cache_dir), cache=cache)
        row[name] = evaluate_split(detector, target, "test", progress=False)[1]["image_auroc"]
        row[f"{name}: statistics flipped"] = info["statistics_flipped"]
        if change.get("second_order", True):  # the witness does not depend on SFA
            infos[change.get("direction_witness", "tail") + " witness"] = info
    detector.config.cfa = paper
    # The paper's TA and DSA again.
    detector.fit_alignment(images, Runtime(progress=False, cache_dir=cache_dir), cache=cache)
    row.update(witness_checks(detector, source, target, infos, cache_dir))
    for key, value in row.items():
        print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}", flush=True)
    return row


def table(results: dict[str, dict[str, float]]) -> str:
    labels = list(next(iter(results.values())))
    lines = ["| | " + " | ".join(results) + " | mean |", "|---|" + "---:|" * (len(results) + 1)]
    for label in labels:
        values = [results[task][label] for task in results]
        shown = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in values]
        mean = f"{statistics.mean(values):.3f}" if all(isinstance(v, float) for v in values) else ""
        lines.append(f"| {label} | " + " | ".join(shown) + f" | {mean} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--tasks", nargs="+", default=["elpv:mono,elpv:poly", "elpv:poly,elpv:mono"],
                        help="SOURCE,TARGET pairs")
    parser.add_argument("--cache-dir", default=str(RESULTS / "cache"))
    parser.add_argument("--name", default="ref_cfa_directions", help="results file name under benchmarks/results/")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for seed in args.seeds:
        for task in args.tasks:
            source, _, target = task.partition(",")
            results[f"{source} -> {target}, seed {seed}"] = run(source, target, seed, args.cache_dir)
            report = table(results)
            save(args.name, {"results": results, "config": str(CONFIG), "machine": machine()},
                 report)
    print(report)


if __name__ == "__main__":
    main()
