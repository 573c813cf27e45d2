"""Which target score network should CFA align? T1 trained from scratch (the paper's T1), T1
fine-tuned from the source network S1, or S1 itself with no target training at all, re-standardised
on the target's features (``target_init: source_frozen``) or not.

    .venv/bin/python benchmarks/explorations/ref_cfa_target_net.py [--task mono-poly|poly-mono ...]
    .venv/bin/python benchmarks/explorations/ref_cfa_target_net.py --adapted runs/fleet/models/elpv-poly/VERSION \
        --target elpv:poly --name main-job

The first form loads, for each task, the adapted bundle the cross-domain benchmark saved
(``benchmarks/results/runs/ref_cfa_<task>``: source S1, head and anchors, and T1 fine-tuned from
S1) and the T1 from scratch that benchmark cached (``cache/score_nets/<task>-target-*.pt``). The
second takes any adapted bundle (e.g. the README main job's line) and its target; its own T1 is one
row. Either refits only the alignment (closed form) for each choice of target network and CFA switch,
and evaluates on the target's labelled test split (labels are read only there). "w/o CFA" is the
source model as is. Figures go to benchmarks/results/ref_cfa_target_net[_NAME].{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

# benchmarks/ (the shared _common and the main benchmarks) and this folder (the other explorations)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import RESULTS, machine, save  # noqa: E402

from ray_ad.bundle import load_bundle  # noqa: E402
from ray_ad.data import load_samples  # noqa: E402
from ray_ad.evaluation import compute_metrics, run_detector  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.methods.ref_cfa.model import REFCFA  # noqa: E402
from ray_ad.methods.ref_cfa.scorer import Domain  # noqa: E402
from ray_ad.pipeline import target_image_uris  # noqa: E402

TASKS = {"mono-poly": "elpv:poly", "poly-mono": "elpv:mono"}
CFA_SWITCHES = {
    "CFA full": {},
    "w/o SFA": {"second_order": False},
    "w/o DSA": {"directional": False},
    "w/o TA": {"temporal": False},
    # The target network and its normalisation alone, no alignment: separates what the target side
    # buys from what TA, DSA and SFA do on top of it.
    "no alignment (TA, DSA, SFA off)": {"temporal": False, "directional": False, "second_order": False},
}


def scratch_target(detector: REFCFA, task: str) -> Domain:
    """The cached T1 of ``task`` that is not the bundle's (fine-tuned) one: the T1 from scratch."""
    fine_tuned = detector.domain_tensors("target")
    for path in sorted((RESULTS / "cache" / "score_nets").glob(f"{task}-target-*.pt")):
        tensors = torch.load(path, weights_only=True)["tensors"]
        if any(not torch.equal(tensors[k].cpu(), v.cpu()) for k, v in fine_tuned.items()):
            keep = detector.target
            detector.load_domain_tensors("target", tensors)
            detector.target, scratch = keep, detector.target
            return scratch
    sys.exit(f"no cached T1 from scratch for {task}: run benchmarks/ref_cfa_cross_domain.py first")


def run_task(task: str, bundle: str, target: str, cached_scratch: bool) -> dict[str, dict[str, float]]:
    detector = load_bundle(bundle, device="auto")
    images, test = target_image_uris(target), load_samples(target, "test")
    cache_dir = str(RESULTS / "cache")
    quiet = Runtime(progress=False, cache_dir=cache_dir)
    rows: dict[str, dict[str, float]] = {}

    def evaluate(label: str, tick: float) -> None:
        metrics = compute_metrics(run_detector(detector, test, progress=False))
        rows[label] = {"image_auroc": metrics["image_auroc"], "image_ap": metrics["image_ap"],
                       "seconds": time.perf_counter() - tick}
        print(f"{task} | {label}: image AUROC {metrics['image_auroc']:.3f}, AP {metrics['image_ap']:.3f}", flush=True)

    own, base_cfa, own_init = detector.target, detector.config.cfa, detector.config.target_init
    targets: dict[str, Domain] = {}
    if cached_scratch:  # the cross-domain benchmark's bundles hold T1 fine-tuned; its scratch T1 is cached
        targets["T1 from scratch (the default)"] = scratch_target(detector, task)
        targets["T1 fine-tuned from S1"] = own
    else:
        targets[f"the bundle's T1 (target_init: {own_init})"] = own
    tick = time.perf_counter()
    detector.target = None
    evaluate("w/o CFA (source model as is)", tick)

    features = detector.target_features(images, Runtime(cache_dir=cache_dir))
    detector.config.target_init = "source_frozen"  # S1 re-standardised on the target: no training
    detector.fit_target_score_net(images, quiet, {"target_features": features})
    targets["T1 = S1, target standardisation"] = detector.target
    targets["T1 = S1, source standardisation"] = detector.source
    for name, domain in targets.items():
        detector.target = domain
        cache = {"target_features": features}
        for switch, change in CFA_SWITCHES.items():
            detector.config.cfa = dataclasses.replace(base_cfa, **change)
            tick = time.perf_counter()
            detector.fit_alignment(images, quiet, cache=cache)
            evaluate(f"{name}, {switch}", tick)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--adapted", help="an adapted ref_cfa bundle URI (instead of the benchmark's bundles)")
    parser.add_argument("--target", help="with --adapted: the target it was adapted to, e.g. elpv:poly")
    parser.add_argument("--name", default="adapted", help="with --adapted: the task's name in the table and file")
    args = parser.parse_args()
    if args.adapted:
        if not args.target:
            parser.error("--adapted needs --target (the data the bundle was adapted to)")
        runs = {args.name: (args.adapted, args.target, False)}
    else:
        missing = [t for t in args.task if not (RESULTS / "runs" / f"ref_cfa_{t}").exists()]
        if missing:
            sys.exit(f"no saved bundle for {missing}: run benchmarks/ref_cfa_cross_domain.py first")
        runs = {t: (str(RESULTS / "runs" / f"ref_cfa_{t}"), TASKS[t], True) for t in args.task}
    results = {task: run_task(task, *run) for task, run in runs.items()}
    labels = list(next(iter(results.values())))
    table = "\n".join([
        "| target network, CFA | " + " | ".join(f"{t} image AUROC" for t in results) + " | mean |",
        "|---|" + "---:|" * (len(results) + 1),
        *(f"| {label} | " + " | ".join(f"{results[t][label]['image_auroc']:.3f}" for t in results)
          + f" | {sum(results[t][label]['image_auroc'] for t in results) / len(results):.3f} |" for label in labels),
    ])
    print(table)
    name = f"ref_cfa_target_net_{args.name}" if args.adapted else "ref_cfa_target_net"
    save(name, {"machine": machine(), "runs": {t: r[:2] for t, r in runs.items()}, "results": results}, table)


if __name__ == "__main__":
    main()
