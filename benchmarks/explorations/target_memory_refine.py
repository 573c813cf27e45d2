"""Does a second drop, refereed by the target memory itself, make a cleaner memory?

    .venv/bin/python benchmarks/explorations/target_memory_refine.py [--task magnetic_tile-shift] [--seeds 0]
        [--rounds 2] [--rules share z] [--name NAME]

The target memory drops the landed images its referee flags (round 0 here: the source line's 3-sigma
rule, its top share when none stands out; the default when this ran) and keeps the rest. The defects
it keeps are what cost it most of its gap to a clean memory. Once built, the memory is itself a
referee, and one that has seen the landing's surface: each landed image is scored against it the way
a new image would be (largest cell distance to the second distinct memory image that matches the
cell), with its own image's cells out of the memory (cross-fitted: the landed images fall into
``FOLDS`` interleaved folds, each scored against the memory less its fold). The next memory drops
the images that referee flags (``share``: the landing's defect share, the fallback's count; ``z``: 3
spreads above the normal mode) from the whole fit part, and so on for ``--rounds`` rounds (iterative
trimming, as robust estimators refit on their inliers). Candidates' split as in
``benchmarks/adaptation.py`` (gate seed = seed). Labels are read only for the figures: each
referee's AUROC over the landed images and each memory's test image AUROC and F1-max.
Figures go to benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from adaptation import TASKS  # noqa: E402
from source_referee_drop import read_task, report  # noqa: E402
from target_memory_kth_image import image_scores, kept_memory  # noqa: E402

from ray_ad.methods.target_memory.model import drop_mask, top_share  # noqa: E402
from ray_ad.metrics import auroc, f1_max  # noqa: E402

RULES = ("share", "z")
FOLDS = 8
MATCH_IMAGES = 2  # the memory's default (memory.match_images)


def memory_scores_of_landing(landed: torch.Tensor, keep: torch.Tensor) -> np.ndarray:
    """Each landed image's score against the memory of the ``keep`` images, its own image never in it."""
    scores = np.zeros(len(landed))
    kept = torch.nonzero(keep).flatten()
    fold = torch.arange(len(landed)) % FOLDS  # interleaved: neighbours in file order share a folder
    for f in range(FOLDS):
        in_memory = kept[fold[kept] != f]
        bank, owners = kept_memory(landed, in_memory)
        query = torch.nonzero(fold == f).flatten()  # kept or dropped, each scored against the memory less its fold
        scores[query.numpy()] = image_scores(landed[query], bank, owners, MATCH_IMAGES)
    return scores


def first_drop(source_scores: np.ndarray, share: float) -> torch.Tensor:
    """The memory's drop when this ran (``drop_image_rule=z``): the source's 3-sigma rule, its top share
    when nothing stands out. (Today's default, ``share``, is the top share always.)"""
    values = torch.as_tensor(source_scores, dtype=torch.float32)
    drop = drop_mask(values, "z", 3.0)
    return drop if drop.any() else top_share(values, share)


def run(task: str, seed: int, method: str, rounds: int, rules: list[str], cache_dir: str) -> dict:
    parts = read_task(task, seed, method, cache_dir)
    landed, share = parts.landed, parts.share

    def memory_row(keep: torch.Tensor, referee: np.ndarray) -> dict:
        bank, owners = kept_memory(landed, keep)
        test_scores = image_scores(parts.test_cells, bank, owners, MATCH_IMAGES)
        drop = ~keep  # labels from here on, for the figures only
        return {"flag_auroc": auroc(referee, parts.landed_labels), "dropped": int(drop.sum()),
                "dropped_defective": int(parts.landed_labels[drop.numpy()].sum()),
                "image_auroc": auroc(test_scores, parts.test_labels),
                "image_f1max": f1_max(test_scores, parts.test_labels)}

    rows = {}
    keep0 = ~first_drop(parts.source_scores, share)
    rows["round 0 (the source's 3-sigma drop)"] = memory_row(keep0, parts.source_scores)
    print(task, seed, "round 0", rows["round 0 (the source's 3-sigma drop)"], flush=True)
    referees: dict[bytes, np.ndarray] = {}  # by the memory's kept images: round 1 is the same for every rule
    for rule in rules:
        keep = keep0
        for r in range(1, rounds + 1):
            key = keep.numpy().tobytes()
            referee = referees[key] = referees[key] if key in referees else memory_scores_of_landing(landed, keep)
            values = torch.as_tensor(referee, dtype=torch.float32)
            keep = ~(top_share(values, share) if rule == "share" else drop_mask(values, "z", 3.0))
            name = f"round {r}, {rule}"
            rows[name] = memory_row(keep, referee)
            print(task, seed, name, rows[name], flush=True)
    return {"rows": rows, "landed": len(landed), "landed_defective": int(parts.landed_labels.sum()), "share": share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="magnetic_tile-shift", choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--source-method", default="ref_cfa")
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    parser.add_argument("--name", default="target_memory_refine")
    args = parser.parse_args()
    results = {}
    for seed in args.seeds:  # saved after every seed
        results[seed] = run(args.task, seed, args.source_method, args.rounds, args.rules, args.cache_dir)
        report(args, results, f"The target memory refereeing its own next drop ({args.task}; match_images = 2; "
               "round 0 is the source's 3-sigma drop; flag AUROC: the round's referee over the landed images)")


if __name__ == "__main__":
    main()
