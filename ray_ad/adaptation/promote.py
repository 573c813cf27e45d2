"""Adapt a line to a landed batch: build every candidate, rank them without target labels, pick one.

    landed images --split_landing--> fit part ------> candidates: the source as is,
                                 \\                               target memories (any source method),
                                  \\                              REF+CFA (ref_cfa sources)
                                   held-out part --> gate (synthetic defects, or _acceptance/ labels)
                                                     -> winner, its unlabeled threshold,
                                                        "published" | "kept" against the served version

Ray-free: ``distributed/lines.py`` wraps it with the registry, the job status and Ray Train.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ray_ad.adaptation.gate import GateConfig, GateSet, acceptance_images, choose, gate_score, split_landing
from ray_ad.adaptation.target_gaussian import MIN_IMAGES as MIN_GAUSSIAN_IMAGES
from ray_ad.adaptation.target_gaussian import fit_target_gaussian, landing_gaussian_config
from ray_ad.config import apply_overrides, from_dict, override_section
from ray_ad.data import Sample
from ray_ad.evaluation import run_detector
from ray_ad.methods import Detector
from ray_ad.methods.base import Runtime
from ray_ad.methods.gaussian import GaussianConfig
from ray_ad.methods.target_memory import LandedCells, TargetMemory, TargetMemoryConfig
from ray_ad.pipeline import adapt_detector

log = logging.getLogger(__name__)

# target_memory drops the source line's top share of the landed images (memory.drop_image_rule,
# memory.drop_referee; drop_referee=mutual: those its mutual scores flag); target_gaussian fits a
# per-position Gaussian on the images that drop keeps (target_gaussian.py); target_gaussian_all and
# target_memory_all keep every landed image. The order is the gate's order of preference (gate.choose):
# a candidate must beat every one before it by gate.margin.
CANDIDATES = ("source", "target_memory", "target_gaussian", "target_gaussian_all", "target_memory_all", "ref_cfa")
# What the job builds unless candidates=[...] says otherwise: not target_memory_all. Its gate AUROC is
# biased upwards (the real defects among the held-out images count as untouched negatives, and a memory
# that learnt the landing's defects as normal scores them low), so the gate ranked it above the memory
# without the source's top share on every development split while that memory scored 6.8-8.4 points
# higher on the test split (magnetic_tile seen by a new camera; the adaptation README). Rule fixed before the run.
# Nor target_gaussian_all, for the same bias: the gate ranked it 0.04 above the Gaussian it replaces on the
# shifted tiles, where it scored 6.9 points under it (the adaptation README).
DEFAULT_CANDIDATES = ("source", "target_memory", "target_gaussian", "ref_cfa")
# Fewer held-out images than this give no normal mode to stand out from: no suspects.
MIN_IMAGES_FOR_SUSPECTS = 20
SERVED = "served"


@dataclass
class AdaptConfig:
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES  # ref_cfa is built only when the source is a ref_cfa model
    gate: GateConfig = field(default_factory=GateConfig)
    # Which landed images the memory and the Gaussian leave out: the landing's defect share of them
    # (drop_image_rule "share"), ranked by the source line when its scores of the landing part into two
    # modes at least as clearly as the mutual scores do, else by both (TargetMemoryConfig.drop_referee
    # "auto"). The top share against the source's 3-sigma rule, on magnetic_tile seen by a new camera with a
    # PatchCore source: test image AUROC 0.894 / 0.901 / 0.889 against 0.890 / 0.897 / 0.883 on three
    # splits (benchmarks/explorations/source_referee_drop.py). "auto" against the source alone, by the target
    # Gaussian: the same 0.969 there (the source's scores part clearly), 0.793 / 0.810 / 0.803 against 0.762
    # / 0.792 / 0.788 on the textured tiles, whose look is new to the source (benchmarks/explorations/
    # target_gaussian.py; the adaptation README). Rules written before each run.
    memory: TargetMemoryConfig = field(
        default_factory=lambda: TargetMemoryConfig(drop_referee="auto", drop_image_rule="share"))
    # The target Gaussian's cells and trim (its images are those the memory's drop keeps).
    gaussian: GaussianConfig = field(default_factory=landing_gaussian_config)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.candidates) - set(CANDIDATES))
        if unknown or not self.candidates:
            raise ValueError(f"candidates {list(self.candidates)} must be a non-empty subset of {list(CANDIDATES)}")


ADAPT_KEYS = ("candidates", "gate", "memory", "gaussian")


def split_overrides(overrides: list[str] | None) -> tuple[AdaptConfig, list[str]]:
    """``--set`` items for the adaptation itself (candidates, gate.*, memory.*, gaussian.*) and the rest
    (REF+CFA's)."""
    ours = [item for item in overrides or [] if override_section(item) in ADAPT_KEYS]
    rest = [item for item in overrides or [] if item not in ours]
    return from_dict(AdaptConfig, apply_overrides({}, ours)), rest


@dataclass
class Outcome:
    candidates: dict[str, Detector]  # every model the gate saw (the served version too, if any)
    gate: dict[str, dict[str, Any]]  # name -> gate_auroc, per_kind, threshold, seconds (build + gate)
    winner: str
    decision: str  # "published" | "kept"
    gate_source: str  # "synthetic" | "acceptance"
    landed: int
    held_out: int
    landing_share: float | None = None  # estimated defect share of the landing (threshold rule "share")

    def evidence(self) -> dict[str, Any]:
        """JSON-able record for the job status and the bundle's metrics."""
        return {"winner": self.winner, "decision": self.decision, "gate_source": self.gate_source,
                "landed_images": self.landed, "held_out_images": self.held_out,
                "landing_defect_share": self.landing_share, "candidates": self.gate}


def adapt_candidates(
    source: Detector, target: str, images: list[str], config: AdaptConfig, served: Detector | None = None,
    ref_cfa_overrides: list[str] | None = None, runtime: Runtime | None = None,
) -> Outcome:
    """Build the candidates on the fit part of ``images``, gate them on the held-out part, choose.

    The winner's threshold is set to its unlabeled operating point; nothing is published here.
    """
    runtime = runtime or Runtime()
    fit_part, held_out = split_landing(images, config.gate)
    landing = _LandingReader(source, fit_part, config.memory, runtime)
    gate_set = build_gate_set(source, target, held_out, config, runtime, fit_part, landing)
    log.info("gate: %s on %s images held out of %s landed", gate_set.source, len(held_out), len(images))
    log.info(f"{len(images)} landed images: {len(fit_part)} to fit on, {len(held_out)} held out for the gate "
          f"({gate_set.source} ranking: {gate_set.counts})")
    # Each builder returns the candidate and what its fit says about the landing (None: nothing to say).
    builders = {
        "source": lambda: (copy.deepcopy(source), None),
        "target_memory": lambda: _target_memory(source, fit_part, config.memory, runtime, landing),
        "target_gaussian": lambda: _target_gaussian(source, fit_part, config.gaussian, landing, runtime),
        "target_gaussian_all": lambda: _target_gaussian(source, fit_part, config.gaussian, landing, runtime,
                                                        drop=False),
        "target_memory_all": lambda: _target_memory(source, fit_part, replace(config.memory, drop_image_z=None,
                                                    drop_cell_z=None), runtime, landing),
        "ref_cfa": lambda: (_ref_cfa(source, fit_part, ref_cfa_overrides, runtime), None),
    }
    candidates: dict[str, Detector] = {}
    scores: dict[str, dict[str, Any]] = {}
    for name in config.candidates:
        if name == "ref_cfa" and source.method != "ref_cfa":
            continue
        tick = time.perf_counter()
        detector, fit = builders[name]()
        build_seconds = time.perf_counter() - tick
        if detector is None:  # nothing to build it from (too few landed images): the others still compete
            log.warning(f"candidate {name} not built: {fit['not_built']}")
            continue
        candidates[name] = detector
        scores[name] = gate_score(candidates[name], gate_set, config.gate)
        scores[name]["build_seconds"] = build_seconds
        if fit is not None:
            scores[name]["fit"] = fit
        log.info(f"candidate {name}: gate AUROC {scores[name]['gate_auroc']:.3f} "
              f"(built in {build_seconds:.0f} s)")
    if served is not None:
        candidates[SERVED] = served
        scores[SERVED] = gate_score(served, gate_set, config.gate)
        log.info(f"served version: gate AUROC {scores[SERVED]['gate_auroc']:.3f}")
    # The preference order is CANDIDATES' whatever order --set lists them in: the source as is always first.
    winner, decision = choose(scores, SERVED if served is not None else None, config.gate.margin, order=CANDIDATES)
    candidates[winner].threshold = scores[winner]["threshold"]
    return Outcome(candidates, scores, winner, decision, gate_set.source, len(images), len(held_out),
                   gate_set.landing_share)


def build_gate_set(
    source: Detector, target: str, held_out: list[str], config: AdaptConfig, runtime: Runtime | None = None,
    fit_part: list[str] | None = None, landing: _LandingReader | None = None,
) -> GateSet:
    """What the gate ranks on: the batch's ``_acceptance/`` images if it has them, else synthetic defects
    pasted into the held-out images that are no suspects (``gate.suspect_z``). With threshold rule
    ``share``, the landing's defect share comes from the mutual scores of ``fit_part`` (read through
    ``landing`` when given, which the memories then reuse)."""
    acceptance = acceptance_images(target)
    landing = landing or _LandingReader(source, fit_part or [], config.memory, runtime or Runtime())
    suspects = None
    if acceptance is None and config.gate.suspect_z is not None and len(held_out) >= MIN_IMAGES_FOR_SUSPECTS:
        # The referee is mutual scoring among the held-out images, none of the candidates.
        suspects = landing.memory().mutual_suspects(_samples(held_out), config.gate.suspect_z, runtime)
        if suspects.mean() > 0.5:  # a "mode" that half the images stand out from is no normal mode
            log.warning("gate: %s of %s held-out images stand out; no suspects", suspects.sum(), len(held_out))
            suspects = None
    gate_set = GateSet.build(held_out, source.image_size, config.gate, acceptance, suspects)
    if config.gate.threshold_rule == "share" and fit_part:
        # A property of the landing, not of any candidate: every candidate's threshold flags that share
        # of its held-out scores. The referee is mutual scoring again (on the source's backbone).
        gate_set.landing_share = landing.memory().landing_share(_samples(fit_part), runtime, landing.cells())
        log.info("gate: the landing's defect share is %.3f (mutual scores of %s images)",
                 gate_set.landing_share, len(fit_part))
    return gate_set


def _samples(paths: list[str]) -> list[Sample]:
    return [Sample(path, -1) for path in paths]  # label -1: nothing downstream can read a label


class _LandingReader:
    """The fit part's cells on the memories' backbone, read on first use and shared by the landing's
    defect share and every target memory (one backbone pass and one mutual scoring per job, not three
    and two). The memory configs differ in drop rules only, never in backbone, grid or mutual settings."""

    def __init__(self, source: Detector, fit_part: list[str], config: TargetMemoryConfig, runtime: Runtime) -> None:
        self._source, self._config = source, config
        self._fit_part, self._runtime = fit_part, runtime
        self._memory: TargetMemory | None = None
        self._cells: LandedCells | None = None
        self._referee: np.ndarray | None = None

    def memory(self) -> TargetMemory:
        """An unfitted memory on the source's backbone (built on first use: it loads the backbone)."""
        if self._memory is None:
            self._memory = TargetMemory.from_source(self._source, self._config)
        return self._memory

    def cells(self) -> LandedCells:
        if self._cells is None:
            self._cells = self.memory().read_landing(_samples(self._fit_part), self._runtime)
        return self._cells

    def referee_scores(self) -> np.ndarray | None:
        """The source as is scores every landed image to fit on, once, when the drop reads it (None when not)."""
        if not self._config.reads_source_scores:
            return None
        if self._referee is None:
            self._referee = run_detector(self._source, _samples(self._fit_part), progress=self._runtime.progress).scores
        return self._referee


# What a memory's fit records in the job's evidence: which referee dropped how many landed images (the
# dropped images' paths stay in the job's log, not in every status read).
MEMORY_FIT_KEYS = ("landed_images", "dropped_images", "drop_referee", "bank_size", "defect_share")


def _target_memory(source: Detector, fit_part: list[str], config: TargetMemoryConfig,
                   runtime: Runtime, landing: _LandingReader) -> tuple[TargetMemory, dict[str, Any]]:
    memory = TargetMemory.from_source(source, config)
    # The drop reads the source's scores of every landed image, read once for every candidate that drops.
    referee = landing.referee_scores() if config.drop_image_z is not None else None
    info = memory.fit(_samples(fit_part), [], runtime, referee_scores=referee, landed=landing.cells())
    return memory, {key: info[key] for key in MEMORY_FIT_KEYS}


def _target_gaussian(source: Detector, fit_part: list[str], config: GaussianConfig, landing: _LandingReader,
                     runtime: Runtime, drop: bool = True) -> tuple[Detector | None, dict[str, Any]]:
    """The per-position Gaussian of the landed images the memory's drop keeps (``drop=False``: of every
    landed image; None: too few of them)."""
    if drop:
        keep, referee_used = landing.memory().kept_images(landing.cells(), landing.referee_scores())
    else:
        keep, referee_used = np.ones(len(fit_part), dtype=bool), None
    kept = [path for path, kept in zip(fit_part, keep.tolist()) if kept]
    if len(kept) < MIN_GAUSSIAN_IMAGES:
        return None, {"not_built": f"{len(kept)} landed images kept, a Gaussian needs {MIN_GAUSSIAN_IMAGES}"}
    detector, info = fit_target_gaussian(source, kept, config, runtime)
    return detector, {"landed_images": len(fit_part), "dropped_images": len(fit_part) - len(kept),
                      "drop_referee": referee_used, **info}


def _ref_cfa(source: Detector, fit_part: list[str], overrides: list[str] | None, runtime: Runtime) -> Detector:
    adapted = copy.deepcopy(source)
    adapt_detector(adapted, fit_part, overrides, runtime)
    return adapted
