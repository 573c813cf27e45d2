"""Does NAGL's trained part carry to *unseen* domains of the families it was trained on?

    .venv/bin/python benchmarks/nagl_heldout_domains.py --models runs/nagl_models_proc12 [--domains 5] \
        [--draws 5] [--name nagl_heldout_domains]

A diagnostic beside ``benchmarks/nagl.py``: the generalists it saved with ``--models DIR`` (task
``mt-elpv``, every seed found) score new procedural domains (``ray_ad.data.procedural``, style seed 1000:
none of the 12 training domains, which use seeds 0-11), each with 60 train normals, 40 test normals and
60 masked defects, in the same settings and rows as the main benchmark (same reference draws, same
code). If NAGL beats its normal branch there but not on elpv, its trained part learns defects relative
to references, and what fails on elpv is the gap between the source families and elpv's cells.
Figures go to benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save  # noqa: E402
from nagl import ROWS, Target, score_target  # noqa: E402

from ray_ad.bundle import load_bundle  # noqa: E402
from ray_ad.data.procedural import write_domains  # noqa: E402
from ray_ad.progress import configure_logging  # noqa: E402

HELD_OUT_SEED = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="the --models folder of a benchmarks/nagl.py run")
    parser.add_argument("--domains", type=int, default=5)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--cache-dir", default="/tmp/ray_ad_nagl_cache")
    parser.add_argument("--name", default="nagl_heldout_domains")
    args = parser.parse_args()
    configure_logging()
    saved = sorted(Path(args.models).glob("mt-elpv-seed*"))
    if not saved:
        raise SystemExit(f"no mt-elpv-seed* generalist under {args.models}: run benchmarks/nagl.py --models first")
    detectors = [load_bundle(str(path)) for path in saved]
    uris = write_domains(str(Path(args.cache_dir) / "procedural_heldout"), args.domains, normals=60, defects=60,
                         seed=HELD_OUT_SEED, test_normals=40)
    results: dict = {"machine": machine(), "models": [str(p) for p in saved], "draws": args.draws, "targets": {}}
    lines = [f"NAGL generalists of {args.models} ({len(saved)} seeds) on {len(uris)} unseen procedural domains, "
             f"{args.draws} draws; image / pixel AUROC, mean over draws and seeds", "",
             "| domain | row | setting | image AUROC | pixel AUROC |", "|---|---|---|---:|---:|"]
    for uri in uris:
        domain = Path(uri).name
        rows = score_target(Target(uri, detectors[0], args.cache_dir), detectors, args.draws, domain)
        results["targets"][domain] = rows
        for name in ROWS:
            for setting, figs in rows.get(name, {}).items():
                lines.append(f"| {domain} | {name} | {setting} | {figs['image_auroc']['mean']:.3f} | "
                             f"{figs['pixel_auroc']['mean']:.3f} |")
    lines.append("")
    for setting, name in (("N4", "kNN"), ("N4", "normal branch"), ("N4+A1", "S_a alone"), ("N4+A1", "NAGL")):
        means = [rows[name][setting]["image_auroc"]["mean"] for rows in results["targets"].values()]
        lines.append(f"- {name} {setting}: mean image AUROC over the domains {np.mean(means):.3f}")
    text = "\n".join(lines)
    save(args.name, results, text)
    print(text)


if __name__ == "__main__":
    main()
