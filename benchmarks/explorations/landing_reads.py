"""What reading the landing once saves the adaptation job: the memories' part of ``adapt_candidates``
with every reader reading the fit part itself (as before ``LandedCells``) and with one shared read.

    .venv/bin/python benchmarks/explorations/landing_reads.py [--target 'elpv:poly?layout=landing'] [--repeats 2]

The part timed is what the landing's reading touches: the landing's defect share (threshold rule
``share``), the memory without the source-flagged images (the source scores the fit part first, the same
in both ways) and the memory of every image. The source is a PatchCore fitted on 64 elpv mono normals (8 more
calibrate it; only its backbone and its scores of the fit part matter here). The two ways run in turns, ``--repeats``
times each, with no feature cache; both must build the same memories (checked). Figures go to
benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _common import machine, save  # noqa: E402

from ray_ad.adaptation.gate import split_landing  # noqa: E402
from ray_ad.adaptation.promote import AdaptConfig, _LandingReader, _samples, _target_memory  # noqa: E402
from ray_ad.data import Sample, load_samples  # noqa: E402
from ray_ad.methods import build_detector, method_config  # noqa: E402
from ray_ad.methods.base import Runtime  # noqa: E402
from ray_ad.methods.target_memory import TargetMemory  # noqa: E402


def memories_part(source, fit_part: list[str], config: AdaptConfig, shared: bool) -> tuple[float, list]:
    """Seconds for the share and both memories, and the memories' banks (to check the two ways agree)."""
    runtime = Runtime(progress=False)
    tick = time.perf_counter()
    landing = _LandingReader(source, fit_part, config.memory, runtime) if shared else None
    referee = TargetMemory.from_source(source, config.memory)
    referee.landing_share(_samples(fit_part), runtime, landing.cells() if landing else None)
    every_image = replace(config.memory, drop_image_z=None, drop_cell_z=None)
    # Not shared: each memory reads the landing through a reader of its own, as before the shared read.
    memories = [_target_memory(source, fit_part, memory_config, runtime,
                               landing or _LandingReader(source, fit_part, memory_config, runtime))
                for memory_config in (config.memory, every_image)]
    return time.perf_counter() - tick, [memory.bank for memory, _ in memories]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="elpv:poly?layout=landing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--name", default="landing_reads")
    args = parser.parse_args()
    landed = [s.path for s in load_samples(args.target, "landing")]
    config = AdaptConfig()
    fit_part = split_landing(landed, config.gate)[0]
    normals = [Sample(s.path, 0) for s in load_samples("elpv:mono", "train") if s.label == 0][:72]
    source = build_detector("patchcore", method_config("patchcore", {"device": "cpu"}))
    source.fit(normals[:64], normals[64:], Runtime(progress=False))
    seconds: dict[str, list[float]] = {"each reader reads": [], "one shared read": []}
    banks = {}
    for repeat in range(args.repeats):
        for way, shared in (("each reader reads", False), ("one shared read", True)):
            took, banks[way] = memories_part(source, fit_part, config, shared)
            seconds[way].append(took)
            print(f"repeat {repeat}: {way}: {took:.1f} s", flush=True)
    same = all(torch.equal(a, b) for a, b in zip(banks["each reader reads"], banks["one shared read"]))
    if not same:
        raise SystemExit("error: the two ways built different memories")
    lines = [f"Landing {args.target}: {len(fit_part)} images to fit on; the share and both memories "
             f"(PatchCore source; {args.repeats} runs of each way, in turns).", "",
             "| way | seconds per run | best |", "|---|---|---:|"]
    lines += [f"| {way} | {' / '.join(f'{s:.1f}' for s in runs)} | {min(runs):.1f} |" for way, runs in seconds.items()]
    text = "\n".join(lines)
    print(text)
    save(args.name, {"target": args.target, "fit_part": len(fit_part), "seconds": seconds, "same_memories": same,
                     "machine": machine()}, text)


if __name__ == "__main__":
    main()
