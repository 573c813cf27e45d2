"""Can the source line help the target memory decide which landed images to drop?

    .venv/bin/python benchmarks/explorations/source_referee_drop.py [--task magnetic_tile-shift] [--seeds 0]
        [--flags mutual source both] [--rules z mixture share] [--name NAME]

The target memory drops the landed images that its mutual scores flag; on a contaminated landing
those separate defective from normal images weakly (magnetic_tile: image AUROC 0.69 over the landed
images, `landed_image_flags.py`), and the defects it keeps cost it most of its gap to a clean memory.
The source line never saw the landing's defects: under a domain shift its scores move, but they may
still rank the landed images. Flags compared, each over the fit part of the landing:
``mutual`` (today's), ``source`` (the source model's image score), ``both`` (the mean of the two in
robust units: median and 1.4826 x MAD over the fit part). Drop rules: ``z`` (3 spreads above the
normal mode, today's), ``mixture`` (the upper of two Gaussians), ``share`` (the top share of the
images, the share the landing's mutual scores give the threshold rule). The memory keeps every cell
of the other images and scores the task's test split with match_images = 2. Candidates' split as in
``benchmarks/adaptation.py`` (gate seed = seed). Labels are read only for the figures: the flag's
AUROC over the landed images and the memory's test image AUROC and F1-max.
Figures go to benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import machine, save  # noqa: E402
from adaptation import TASKS, landing, source_model  # noqa: E402
from adaptation_ensemble import robust_units  # noqa: E402
from target_memory_kth_image import image_scores, kept_memory  # noqa: E402

from ray_ad.adaptation.gate import GateConfig, split_landing  # noqa: E402
from ray_ad.adaptation.mutual import cells, mutual_scores  # noqa: E402
from ray_ad.adaptation.threshold import fit_two_gaussians  # noqa: E402
from ray_ad.data import Sample, load_samples  # noqa: E402
from ray_ad.evaluation import run_detector  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.methods.target_memory import TargetMemory  # noqa: E402
from ray_ad.methods.target_memory.model import drop_mask, top_share  # noqa: E402
from ray_ad.metrics import auroc, f1_max  # noqa: E402

FLAGS = ("mutual", "source", "both")
RULES = ("z", "mixture", "share")


@dataclass
class TaskLanding:
    """One task's fit part of the landing and its test split on the memory's cells, with what refers them."""

    landed: torch.Tensor  # [N, L, C] cells of the landed images to fit on
    mutual: np.ndarray  # each landed image's largest mutual cell score
    share: float  # the landing's defect share (two Gaussians over ``mutual``)
    source_scores: np.ndarray  # the source line's image score of each landed image
    test_cells: torch.Tensor
    landed_labels: np.ndarray  # for the figures only
    test_labels: np.ndarray


def read_task(task: str, seed: int, method: str, cache_dir: str) -> TaskLanding:
    """The fit part of ``task``'s landing (gate seed = ``seed``, as ``benchmarks/adaptation.py`` splits it)."""
    source_domain, target_domain = TASKS[task]
    target = landing(target_domain, cache_dir)
    runtime = Runtime(False, cache_dir)
    source = source_model("patchcore" if task == "magnetic_tile-shift" else method, source_domain, seed, cache_dir)
    samples = load_samples(target, "landing")
    fit_part, _ = split_landing([s.path for s in samples], GateConfig(seed=seed))
    memory = TargetMemory.from_source(source)
    unlabeled = [Sample(p, -1) for p in fit_part]
    landed = cells(memory.extract_features(unlabeled, runtime, desc="landed"))
    mutual = mutual_scores(landed, memory.config.mutual_fraction, memory.config.mutual_references,
                           memory.config.seed).amax(1).numpy()
    tick = time.perf_counter()
    source_scores = run_detector(source, unlabeled, progress=False).scores
    print(f"source scored {len(fit_part)} landed images in {time.perf_counter() - tick:.0f} s", flush=True)
    test = load_samples(target, "test")
    test_cells = cells(memory.extract_features(test, runtime, desc="test"))
    # Labels from here on, for the figures only.
    label = {s.path: s.label for s in samples}
    return TaskLanding(landed, mutual, fit_two_gaussians(mutual).share, source_scores, test_cells,
                       np.array([label[p] for p in fit_part]), np.array([s.label for s in test]))


def run(task: str, seed: int, method: str, flags: list[str], rules: list[str], cache_dir: str) -> dict:
    parts = read_task(task, seed, method, cache_dir)
    landed, mutual, share, source_scores = parts.landed, parts.mutual, parts.share, parts.source_scores
    test_cells, landed_labels, test_labels = parts.test_cells, parts.landed_labels, parts.test_labels
    values = {"mutual": mutual, "source": source_scores,
              "both": (robust_units(mutual, mutual) + robust_units(source_scores, source_scores)) / 2}
    rows = {}
    for flag in flags:
        scores = torch.as_tensor(values[flag], dtype=torch.float32)
        for rule in rules:
            drop = top_share(scores, share) if rule == "share" else drop_mask(scores, rule, 3.0)
            keep = ~drop
            bank, owners = kept_memory(landed, keep)
            test_scores = image_scores(test_cells, bank, owners, 2)
            rows[f"{flag}, {rule}"] = {
                "flag_auroc": auroc(values[flag], landed_labels), "dropped": int(drop.sum()),
                "dropped_defective": int(landed_labels[drop.numpy()].sum()),
                "image_auroc": auroc(test_scores, test_labels), "image_f1max": f1_max(test_scores, test_labels)}
            print(task, seed, flag, rule, rows[f"{flag}, {rule}"], flush=True)
    return {"rows": rows, "landed": len(landed), "landed_defective": int(landed_labels.sum()), "share": share}


def report(args: argparse.Namespace, results: dict, title: str | None = None) -> None:
    """Each seed's rows (flag AUROC over the landed images, what was dropped, the memory's test figures)."""
    lines = [title or f"Which landed images the target memory drops, by which referee ({args.task}; memory scored "
             "with match_images = 2)", "",
             "| seed | flag, drop rule | flag AUROC (landing labels) | dropped (defective) | image AUROC | F1-max |",
             "|---|---|---:|---:|---:|---:|"]
    for seed, result in results.items():
        for name, r in result["rows"].items():
            lines.append(f"| {seed} | {name} | {r['flag_auroc']:.3f} | {r['dropped']} ({r['dropped_defective']}) | "
                         f"{r['image_auroc']:.3f} | {r['image_f1max']:.3f} |")
    save_report(args, results, lines)


def save_report(args: argparse.Namespace, results: dict, lines: list[str]) -> None:
    """``lines`` (a table) with a line on each seed's landing, saved as ``args.name`` and printed."""
    lines = [*lines, "", "Landings: " + "; ".join(
        f"seed {s}: {r['landed']} images to fit on, {r['landed_defective']} defective, share fitted {r['share']:.3f}"
        for s, r in results.items())]
    save(args.name, {"machine": machine(), "task": args.task, "results": results}, "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="magnetic_tile-shift", choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--flags", nargs="+", default=list(FLAGS), choices=FLAGS)
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--source-method", default="ref_cfa")
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    parser.add_argument("--name", default="source_referee_drop")
    args = parser.parse_args()
    results = {}
    for seed in args.seeds:  # saved after every seed
        results[seed] = run(args.task, seed, args.source_method, args.flags, args.rules, args.cache_dir)
        report(args, results)


if __name__ == "__main__":
    main()
