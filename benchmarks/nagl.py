"""NAGL across domains, as in the paper: train on one source, score an unseen target from a few references.

    .venv/bin/python benchmarks/nagl.py [--tasks mt-elpv elpv-mt] [--seeds 0 1 2] [--draws 5] \
        [--set key=value ...] [--name nagl]

Tasks: ``mt-elpv`` trains on magnetic_tile (its pixel masks + synthetic anomalies) and scores elpv mono
and elpv poly; ``elpv-mt`` trains on elpv mono + poly (synthetic anomalies with their masks: elpv has
no pixel masks) and scores magnetic_tile; ``mt+mono-poly`` and ``mt+poly-mono`` train on magnetic_tile
and the other elpv domain (its train normals with synthetic anomalies) and score the held-out one.
The generalist is trained once per seed (``--seeds``).
``--procedural N`` adds N procedural texture domains (``ray_ad.data.procedural``: drawn textures with
masked synthetic defects) to every task's sources, as the paper trains on many classes.

For every target and every draw (``--draws``, seeded by the draw index, so every seed and every row
sees the same references), K normal references come from the target's ``train`` split and one abnormal
reference from its ``test`` split (whole image as the defect region where the target has no masks);
both are removed from the scored images. Settings N1, N4 (normal references only) and N1+A1, N4+A1;
N_K and N_K+A1 share the draw's normal references and score the same images. Rows, all on the same
backbone features:

- ``kNN``: PatchCore's score with the same normal references (L2 to the nearest reference cell, max cell);
- ``normal branch``: NAGL's S_n alone (NAGL without RM/AFL, the paper's setting i);
- ``naive N+A NN``: S_n and the similarity to the nearest abnormal-reference defect cell (setting iii);
- ``S_a alone``: the anomaly-guided map of the trained RM and AFL without S_n (what the trained part
  carries by itself);
- ``NAGL``: S_n and S_a through the trained RM and AFL (setting iv).

Image AUROC, and pixel AUROC where the target has masks: mean over draws (and seeds for the trained
rows), the spread over draws, and for the trained rows the spread over training seeds. Seconds per
image: NAGL N4+A1 end to end from decoded images (backbone + search + attention). Saved as ``results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_MAGNETIC_TILE, machine, save  # noqa: E402

from ray_ad.bundle import load_bundle, read_metrics, save_bundle  # noqa: E402
from ray_ad.config import apply_overrides  # noqa: E402
from ray_ad.data import ImageDataset, load_samples  # noqa: E402
from ray_ad.data.procedural import write_domains  # noqa: E402
from ray_ad.fewshot import Shots, draw_references  # noqa: E402
from ray_ad.methods.base import Runtime, upsample_map  # noqa: E402
from ray_ad.methods.nagl.references import ReferenceSet  # noqa: E402
from ray_ad.methods.nagl.scoring import (  # noqa: E402
    anomaly_guided_score,
    cells,
    centred_anomaly_score,
    fused_map,
    normal_guided_score,
    reference_statistics,
    similarity,
    standardised,
    top_mean,
)
from ray_ad.metrics import auroc  # noqa: E402
from ray_ad.pipeline import train_detector  # noqa: E402
from ray_ad.progress import configure_logging  # noqa: E402

# "procedural-mt" trains on the procedural domains alone (--procedural N) and scores magnetic_tile: a real
# domain of another family than any source, and no elpv target, so NAGL's variants can be chosen on it
# before elpv is read.
# "mt+mono-poly" / "mt+poly-mono" train on every real domain but the target (the fleet's case: a new line
# joins lines the generalist was trained on, one of them of the same product in another make).
TASKS = {"mt-elpv": ("magnetic_tile", ["elpv:mono", "elpv:poly"]), "elpv-mt": ("elpv", ["magnetic_tile"]),
         "procedural-mt": ("procedural", ["magnetic_tile"]),
         "mt+mono-poly": ("magnetic_tile+elpv:mono", ["elpv:poly"]),
         "mt+poly-mono": ("magnetic_tile+elpv:poly", ["elpv:mono"])}
TRAINED_ROWS = ("S_a alone", "NAGL")  # rows that depend on the trained RM and AFL: spread over seeds too
SCORING_KEYS = ("unmasked_region",)  # config keys that apply to a loaded bundle (--models) too
ROWS = ("kNN", "normal branch", "naive N+A NN", "S_a alone", "NAGL")


def resolve(name: str, magnetic_tile: str) -> list[str]:
    """Dataset URIs of a task's source or target name (``a+b``: both)."""
    known = {"magnetic_tile": [magnetic_tile], "elpv": ["elpv:mono", "elpv:poly"], "procedural": []}
    return [uri for part in name.split("+") for uri in known.get(part, [part])]


class Target:
    """A target's test split: backbone cells once, labels and pixel masks once."""

    def __init__(self, uri: str, detector, cache_dir: str) -> None:
        self.uri = uri
        self.samples = [s for s in load_samples(uri, "test") if s.label in (0, 1)]
        self.cells = cells(detector.extract_features(self.samples, Runtime(False, cache_dir), desc=f"{uri} features"))
        self.labels = np.array([s.label for s in self.samples])
        self.has_masks = any(s.mask_path for s in self.samples)
        self.masks = None
        if self.has_masks:
            dataset = ImageDataset(self.samples, detector.preprocessor)
            self.masks = np.stack([dataset[i]["mask"][0].numpy() > 0.5 for i in range(len(dataset))])


def search(F_q: torch.Tensor, normal: torch.Tensor, statistics) -> tuple[torch.Tensor, ...]:
    """Of every query cell against one reference set, in chunks: PatchCore's L2 kNN score on the raw
    features, and (in the references' standard units when ``statistics`` is given, as NAGL scores) the
    query's features, residual Res(F^q, F^n) and s_n."""
    raw = normal[0]
    raw_norms = raw.norm(dim=-1)
    refs = standardised(statistics, normal)[0][0] if statistics else raw
    features, res, s_n, knn = [], [], [], []
    for chunk in F_q.split(16):
        knn.append((chunk.norm(dim=-1, keepdim=True) ** 2 + raw_norms**2 - 2 * chunk @ raw.T).clamp_min(0).amin(-1)
                   .sqrt())
        chunk = standardised(statistics, chunk)[0] if statistics else chunk
        cos, index = (F.normalize(chunk, dim=-1) @ F.normalize(refs, dim=-1).T).max(-1)
        s_n.append((1 + cos) / 2)  # (1 + cos) / 2 of the nearest normal cell, as nearest_normal gives it
        res.append(chunk - refs[index])  # Res(F^q, F^n)
        features.append(chunk)
    return torch.cat(features), torch.cat(res), torch.cat(s_n), torch.cat(knn)


def figures(target: Target, keep: np.ndarray, cell_scores: torch.Tensor, image_scores: torch.Tensor,
            detector) -> dict[str, float]:
    out = {"image_auroc": auroc(image_scores.numpy()[keep], target.labels[keep])}
    if target.has_masks:
        grid = detector.config.backbone.grid_size
        maps = torch.cat([upsample_map(chunk.view(-1, grid, grid), detector.image_size, detector.config.map_sigma)
                          for chunk in cell_scores[torch.from_numpy(keep)].split(64)])
        out["pixel_auroc"] = auroc(maps.numpy().ravel(), target.masks[keep].ravel())
    return out


@dataclass
class ReferenceDraw:
    """One draw of a target's references and every query cell searched against its normal references."""

    references: ReferenceSet
    keep: np.ndarray  # the target images scored (neither reference image is)
    statistics: tuple[torch.Tensor, torch.Tensor] | None  # the normal references' units, with ``standardise``
    F_q: torch.Tensor
    res_q: torch.Tensor
    S_n: torch.Tensor
    knn: torch.Tensor


@torch.no_grad()
def draw_and_search(target: Target, detector, normal: int, draw: int) -> ReferenceDraw:
    """Draw ``draw`` of K = ``normal`` normal references and one abnormal reference from the target, set on
    ``detector``, and ``search`` of every test cell against the normal ones (shared by every generalist)."""
    references, used = draw_references(target.uri, Shots(normal, 1), np.random.default_rng(draw),
                                       detector.image_size)
    keep = np.array([s.path not in used for s in target.samples])
    detector.set_references(references)
    statistics = reference_statistics(detector._normal_cells) if detector.config.standardise else None
    F_q, res_q, s_n, knn = search(target.cells, detector._normal_cells, statistics)
    return ReferenceDraw(references, keep, statistics, F_q, res_q, normal_guided_score(s_n), knn)


@torch.no_grad()
def anomaly_map(detector, drawn: ReferenceDraw) -> torch.Tensor:
    """S_a of every test cell by one generalist against the draw's references (RM mined once when they are
    set), centred when the generalist's config says so, as ``NAGL.predict`` scores."""
    detector.set_references(drawn.references)
    S_a = torch.cat([anomaly_guided_score(q, detector.net(r, q, detector._P_tilde))
                     for q, r in zip(drawn.F_q.split(16), drawn.res_q.split(16))])
    return centred_anomaly_score(S_a) if detector.config.centre_anomaly_map else S_a


@torch.no_grad()
def score_draw(target: Target, detectors: list, normal: int, draw: int) -> dict[str, dict[str, list[dict]]]:
    """Every row's figures for one draw of K = ``normal`` normal references and one abnormal reference:
    {setting: {row: [figures per trained seed]}}. Both settings (N_K and N_K+A1) share the normal
    references and score the same images (neither reference image is scored in either)."""
    first = detectors[0]
    drawn = draw_and_search(target, first, normal, draw)
    keep, S_n, knn, statistics = drawn.keep, drawn.S_n, drawn.knn, drawn.statistics
    top = first.config.top_fraction
    abnormal = standardised(statistics, first._abnormal_cells)[0] if statistics else first._abnormal_cells
    defect_cells = abnormal[:, first._abnormal_masks[0] > 0]
    naive = fused_map(S_n, torch.cat([similarity(c, defect_cells.expand(len(c), -1, -1)).amax(-1)
                                      for c in drawn.F_q.split(16)]))
    nagl, anomaly_branch = [], []
    for detector in detectors:
        S_a = anomaly_map(detector, drawn)
        S = fused_map(S_n, S_a)
        nagl.append(figures(target, keep, S, top_mean(S, top), detector))
        anomaly_branch.append(figures(target, keep, S_a, top_mean(S_a, top), detector))
    return {
        f"N{normal}": {"kNN": [figures(target, keep, knn, knn.amax(-1), first)],
                       "normal branch": [figures(target, keep, S_n, top_mean(S_n, top), first)]},
        f"N{normal}+A1": {"naive N+A NN": [figures(target, keep, naive, top_mean(naive, top), first)],
                          "S_a alone": anomaly_branch, "NAGL": nagl},
    }


def score_target(target: Target, detectors: list, draws: int, label: str) -> dict:
    """Every row's figures on one target, N1, N1+A1, N4 and N4+A1 over ``draws`` reference draws:
    {row: {setting: {metric: summary}}}; a line per setting is printed, prefixed with ``label``."""
    rows: dict = {}
    for normal in (1, 4):
        per_draw = [score_draw(target, detectors, normal, draw) for draw in range(draws)]
        for setting, names in per_draw[0].items():
            for name in names:
                values = [draw[setting][name] for draw in per_draw]
                rows.setdefault(name, {})[setting] = {
                    key: summary(values, key) for key in ("image_auroc", "pixel_auroc") if summary(values, key)}
            print(f"{label} {setting}: " + ", ".join(
                f"{name} {rows[name][setting]['image_auroc']['mean']:.4f}" for name in names), flush=True)
    return rows


def seconds_per_image(detector, target: Target, shots: Shots) -> float:
    """NAGL end to end on 64 decoded test images (backbone, search, attention), after one warm-up batch."""
    references, _ = draw_references(target.uri, shots, np.random.default_rng(0), detector.image_size)
    detector.set_references(references)
    dataset = ImageDataset(target.samples[:64], detector.preprocessor, with_masks=False)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    detector.predict(images[:8])
    start = time.perf_counter()
    for chunk in images.split(16):
        detector.predict(chunk)
    return (time.perf_counter() - start) / len(images)


def summary(values: list[list[dict[str, float]]], key: str) -> dict[str, float] | None:
    """values[draw][seed] -> mean, spread over draws (of the seed mean) and over seeds (of the draw mean)."""
    if key not in values[0][0]:
        return None
    grid = np.array([[entry[key] for entry in draw] for draw in values])  # [draws, seeds]
    return {"mean": float(grid.mean()), "draw_std": float(grid.mean(1).std()), "seed_std": float(grid.mean(0).std())}


def table(results: dict) -> str:
    lines = []
    for task, entry in results["tasks"].items():
        lines += [f"### {task}: trained on {entry['source']}, {len(entry['seeds'])} seed(s), "
                  f"{entry['train_seconds']:.0f} s training per seed", ""]
        for target, rows in entry["targets"].items():
            lines += [f"**{target}** (NAGL N4+A1: {rows['seconds_per_image']:.4f} s per image end to end)", "",
                      "| row | setting | image AUROC | ± draws | ± seeds | pixel AUROC | ± draws |",
                      "|---|---|---:|---:|---:|---:|---:|"]
            for name in ROWS:
                for setting, figs in rows["rows"].get(name, {}).items():
                    image, pixel = figs["image_auroc"], figs.get("pixel_auroc")
                    seed = f"{image['seed_std']:.4f}" if name in TRAINED_ROWS else ""
                    pixel_cells = f"{pixel['mean']:.4f} | {pixel['draw_std']:.4f}" if pixel else "- | -"
                    lines.append(f"| {name} | {setting} | {image['mean']:.4f} | {image['draw_std']:.4f} | {seed} | "
                                 f"{pixel_cells} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="NAGL config override")
    parser.add_argument("--magnetic-tile", default=str(DEFAULT_MAGNETIC_TILE))
    parser.add_argument("--cache-dir", default="/tmp/ray_ad_nagl_cache")
    parser.add_argument("--name", default="nagl")
    parser.add_argument("--procedural", type=int, default=0, metavar="COUNT",
                        help="add COUNT procedural texture domains (ray_ad.data.procedural, written under the "
                             "cache dir) to every task's training sources")
    parser.add_argument("--models", default=None, metavar="DIR",
                        help="save each trained generalist as DIR/<task>-seed<N>, and load it from there if present "
                             "(re-scores without retraining; training seconds: those of the run that trained it)")
    parser.add_argument("--train-only", action="store_true",
                        help="train (and save, with --models) the generalists, score no target: for choosing a "
                             "variant on held-out domains (nagl_heldout_domains.py) before any target is read")
    args = parser.parse_args()
    if args.train_only and not args.models:
        parser.error("--train-only keeps nothing without --models DIR")
    if "procedural-mt" in args.tasks and not args.procedural:
        parser.error("task procedural-mt trains on the procedural domains alone: give --procedural N")
    configure_logging()
    torch.manual_seed(0)
    results: dict = {"machine": machine(), "overrides": args.set, "draws": args.draws,
                     "procedural_domains": args.procedural, "tasks": {}}
    procedural = write_domains(str(Path(args.cache_dir) / "procedural"), args.procedural) if args.procedural else []
    for task in args.tasks:
        source, targets = TASKS[task]
        sources = resolve(source, args.magnetic_tile) + procedural
        detectors, fits, seconds = [], [], []
        for seed in args.seeds:
            saved = Path(args.models) / f"{task}-seed{seed}" if args.models else None
            if saved is not None and (saved / "config.json").exists():
                # A generalist trained by an earlier run with the same --set: score it again, no training.
                print(f"[{task}] seed {seed}: the NAGL bundle at {saved}", flush=True)
                detector, metrics = load_bundle(str(saved)), read_metrics(str(saved))
                scoring = apply_overrides({}, [o for o in args.set if o.split("=")[0] in SCORING_KEYS])
                for key, value in scoring.items():  # knobs that change scoring, not training, apply as well
                    setattr(detector.config, key, type(getattr(detector.config, key))(value))
            else:
                overrides = apply_overrides({"seed": seed}, args.set)
                print(f"[{task}] training NAGL on {source}, seed {seed}", flush=True)
                started = time.perf_counter()
                detector, metrics = train_detector("nagl", sources, overrides,
                                                   runtime=Runtime(False, args.cache_dir), evaluate=False)
                metrics["train_seconds"] = time.perf_counter() - started
                if saved is not None:
                    save_bundle(detector, str(saved), metrics)
            detectors.append(detector)
            fits.append(metrics["fit"])
            print(f"[{task}] seed {seed}: loss {metrics['fit']['loss_first']:.4f} -> {metrics['fit']['loss_last']:.4f}",
                  flush=True)
            seconds.append(metrics["train_seconds"])
        train_seconds = float(np.mean(seconds))
        if args.train_only:
            continue
        if procedural:
            source = (f"{len(procedural)} procedural domains" if source == "procedural"
                      else f"{source} + {len(procedural)} procedural domains")
        entry = {"source": source, "seeds": args.seeds, "train_seconds": train_seconds, "fits": fits, "targets": {}}
        for target_name in targets:
            uri = resolve(target_name, args.magnetic_tile)[0]
            target = Target(uri, detectors[0], args.cache_dir)
            rows = score_target(target, detectors, args.draws, f"[{task}] {target_name}")
            entry["targets"][target_name] = {"rows": rows,
                                             "seconds_per_image": seconds_per_image(detectors[0], target, Shots(4, 1))}
        results["tasks"][task] = entry
    if args.train_only:
        print(f"trained generalists saved under {args.models}; no target scored")
        return
    text = table(results)
    print(text)
    save(args.name, results, text)


if __name__ == "__main__":
    main()
