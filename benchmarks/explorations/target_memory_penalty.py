"""Should a memory cell that stood out among the landed images vouch less for a test cell? On magnetic_tile
(the development set that is no elpv adaptation target).

    .venv/bin/python benchmarks/explorations/target_memory_penalty.py [--ks 1 2] [--name NAME]

A contaminated memory keeps defect cells, and a test defect then matches one of them closely. Every
memory cell already carries its mutual score from the landing (MuSc: how far it is from the other landed
images); a defect cell scored high there. Two ways to make it vouch less, neither dropping a cell (which
cost 38 points on clean normals: rare normal structures score like defects cell by cell):

- ``excess``: a test cell's distance through memory cell m is ``d(q, m) + max(0, s_m - c)``, with s_m
  m's mutual score and c a normal level of the landing's cell scores (``median``, or the normal mode
  plus 3 spreads, ``mode+3``). By the triangle inequality q's distance to the normal cells is at most
  ``d(q, m) + s_m``: the excess adds what m itself lacked of normality. A cell of a normal image pays
  (nearly) nothing, so a clean memory scores as before.
- ``softpatch`` (SoftPatch, Jiang et al., NeurIPS 2022, its soft re-weighting with the mutual score as
  the outlier score): ``d(q, m) * max(1, s_m / c)``.

The best m is searched among the 64 nearest cells by raw distance; with ``k`` the k-th distinct landed
image's best cell, as the memory's default. Landing and split as in ``target_memory_drop.py``. Image
AUROC and F1-max on the scored half, F1 at the ``share`` threshold (the landing's mutual share, as a
quantile of the held-out images' scores). Figures go to benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import DEFAULT_MAGNETIC_TILE, machine, save  # noqa: E402
from target_memory_kth_image import kept_memory  # noqa: E402
from unlabeled_thresholds import dev_landing  # noqa: E402

from ray_ad.adaptation.mutual import _exact_distances, _shortlist  # noqa: E402
from ray_ad.adaptation.threshold import fit_two_gaussians, normal_mode  # noqa: E402
from ray_ad.methods.target_memory.model import drop_mask  # noqa: E402
from ray_ad.metrics import auroc, decision_metrics, f1_max  # noqa: E402

SHORTLIST = 64


def shortlists(queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``SHORTLIST`` nearest bank cells of each query cell by raw distance: (indices, exact distances)."""
    index, distance = [], []
    for query in queries.split(4096):
        i = _shortlist(query, bank, SHORTLIST, 32768)
        index.append(i)
        distance.append(_exact_distances(query, bank, i))
    return torch.cat(index), torch.cat(distance)


def penalised_kth(index: torch.Tensor, distance: torch.Tensor, owners: torch.Tensor, mutual: torch.Tensor,
                  rule: str, level: float, k: int) -> torch.Tensor:
    s = mutual[index]
    if rule == "none":
        through = distance
    elif rule == "excess":
        through = distance + (s - level).clamp(min=0)
    else:  # softpatch
        through = distance * (s / level).clamp(min=1)
    through, order = through.sort(1)
    image = owners[index].gather(1, order)
    opens = ~(image[:, :, None] == image[:, None, :]).tril(-1).any(2)
    hit = (opens.cumsum(1) == k) & opens
    last = torch.full((len(index),), through.shape[1] - 1, dtype=torch.long)
    position = torch.where(hit.any(1), hit.long().argmax(1), last)
    return through.gather(1, position[:, None])[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--cache-dir", default="runs/feature_cache")
    parser.add_argument("--name", default="target_memory_penalty")
    args = parser.parse_args()
    dev = dev_landing(args.data, args.cache_dir)
    landed, scored, fit_part = dev.landed, dev.scored, dev.fit_part
    labels = np.array([s.label for s in scored])
    share = fit_two_gaussians(dev.mutual.numpy()).share
    normal = {s.path for s in landed if s.label == 0}
    memories = {"every image": torch.ones(len(fit_part), dtype=torch.bool),
                "z=3 dropped": ~drop_mask(dev.mutual, "z", 3.0),
                # For scale only (reads the landing's labels): what a penalty costs a memory with no defect in it.
                "labelled normals only": torch.tensor([p in normal for p in fit_part])}
    all_cells = dev.mutual_cells.flatten()
    sample = torch.randperm(len(all_cells), generator=torch.Generator().manual_seed(0))[:50000]
    centre, spread = normal_mode(all_cells[sample].numpy())
    levels = {"median": float(all_cells.median()), "mode+3": centre + 3 * spread}
    print("levels", levels, flush=True)
    variants = [("none", None)] + [(rule, level) for rule in ("excess", "softpatch") for level in levels]
    rows = {}
    for memory_name, keep in memories.items():
        bank, owners = kept_memory(dev.landed_cells, keep)
        mutual = dev.mutual_cells[keep].flatten()
        tick = time.perf_counter()
        lists = [(len(q), shortlists(q.reshape(-1, q.shape[-1]), bank)) for q in (dev.scored_cells, dev.held_cells)]
        print(f"{memory_name}: shortlists in {time.perf_counter() - tick:.0f} s", flush=True)
        for k in args.ks:
            for rule, level_name in variants:
                level = levels.get(level_name, 0.0)
                tick = time.perf_counter()
                test, held = (penalised_kth(index, distance, owners, mutual, rule, level, k).view(n, -1).amax(1).numpy()
                              for n, (index, distance) in lists)
                threshold = float(np.quantile(held, 1 - share))
                row = {"image_auroc": auroc(test, labels), "image_f1max": f1_max(test, labels),
                       "f1": decision_metrics(test, labels, threshold)["f1"], "seconds": time.perf_counter() - tick}
                name = f"{memory_name}, k={k}, {rule}" + (f" over {level_name}" if level_name else "")
                rows[name] = row
                print(name, row, flush=True)
    lines = [f"Target memory with penalised matches: {len(fit_part)} landed images to fit on, {len(scored)} scored "
             f"({int(labels.sum())} defective); landing share {share:.2f}; levels "
             + ", ".join(f"{k} {v:.3f}" for k, v in levels.items()), "",
             "| memory, k, penalty | image AUROC | F1-max | F1 at the share threshold |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['image_auroc']:.3f} | {r['image_f1max']:.3f} | {r['f1']:.3f} |"
              for name, r in rows.items()]
    save(args.name, {"machine": machine(), "data": args.data, "levels": levels, "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
