"""A fleet filter: one cost-volume filter trained on several lines at once (CostFilter-AD's unified model).

The paper trains one filter for all categories of a benchmark, with a class-aware adaptor that
classifies the query's category from the filter's deepest features and lowers the focal loss's
gamma where it is right (Eq. 5). Here a category is a product line. Each line keeps its own base
detector, template bank and thresholds (``CostFilter.prepare``); the lines' synthetic pools and
banks are concatenated, a query's templates are always drawn from its own line, and one filter
(``filter.classes`` = the number of lines) trains on the whole. Every line's detector then holds a
copy of that filter, so each line's bundle is complete on its own and Serve needs nothing else.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from ray_ad.data import Sample
from ray_ad.errors import ConfigError
from ray_ad.methods.base import Runtime
from ray_ad.methods.costfilter.model import CostFilter
from ray_ad.methods.costfilter.network import CostFilterNet
from ray_ad.methods.costfilter.pool import SyntheticPool
from ray_ad.methods.costfilter.templates import TemplateBank
from ray_ad.methods.costfilter.training import train_filter
from ray_ad.training import loss_summary

# What every line of one fleet filter must share: the filter reads their features and volumes alike.
SHARED_KEYS = ("backbone", "templates", "template_source", "matching_depth", "filter", "train", "loss", "device")


def _check_compatible(detectors: list[CostFilter]) -> None:
    first = dataclasses.asdict(detectors[0].config)
    for k, detector in enumerate(detectors[1:], start=1):
        other = dataclasses.asdict(detector.config)
        for key in SHARED_KEYS:
            if key != "filter" and other[key] != first[key]:
                raise ConfigError(f"fleet filter: line {k} has {key} = {other[key]}, line 0 has {first[key]}; "
                                  f"the lines of one filter must share {', '.join(SHARED_KEYS)}")
        mine, theirs = ({k: v for k, v in c["filter"].items() if k != "classes"} for c in (first, other))
        if mine != theirs:
            raise ConfigError(f"fleet filter: line {k} has filter = {theirs}, line 0 has {mine}")


def train_fleet_filter(
    lines: list[tuple[CostFilter, list[Sample], list[Sample]]], runtime: Runtime | None = None, seed: int = 0,
) -> dict[str, Any]:
    """Fit every line's detector (``(detector, train normals, calibration normals)``) around one filter.

    Returns the fleet's training figures and each line's fit report (in the order given).
    """
    if len(lines) < 2:
        raise ValueError(f"a fleet filter needs at least 2 lines, got {len(lines)}")
    runtime = runtime or Runtime()
    detectors = [detector for detector, _, _ in lines]
    _check_compatible(detectors)
    parts = [detector.prepare(train, calibration, runtime) for detector, train, calibration in lines]
    first = detectors[0]
    bank = TemplateBank(torch.cat([d.bank.features for d in detectors]), first.layer_channels,
                        torch.cat([torch.full((len(d.bank),), k, dtype=torch.long) for k, d in enumerate(detectors)]))
    pool = SyntheticPool.fleet([p.pool for p in parts], [len(d.bank) for d in detectors])
    cfg = first.config
    filter_config = dataclasses.replace(cfg.filter, classes=len(lines))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CostFilterNet(cfg.matching_depth, first.layer_channels, filter_config).to(first.device)
    trainer = runtime.filter_trainer or train_filter
    net, losses = trainer(net, pool, bank.to(first.device), first.matching, cfg.train, cfg.loss, first.device, seed,
                          runtime.progress)
    reports = []
    for k, (detector, part) in enumerate(zip(detectors, parts)):
        detector.config.filter = dataclasses.replace(detector.config.filter, classes=len(lines))
        detector.filter = copy.deepcopy(net).eval()
        reports.append({**detector.finish(part, losses), "fleet_line": k, "fleet_lines": len(lines)})
    return {"lines": reports, "pool": len(pool), "template_bank": len(bank), **loss_summary(losses, "filter_")}
