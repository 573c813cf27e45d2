"""Config sweeps without Ray: the search space file, the validation set, one trial, and the report.

``ray_ad.distributed.sweep`` runs these on Ray Tune (ASHA, random or Optuna search); everything here
runs, and is tested, in a plain process. A space file (YAML or JSON) names config keys in the dotted
form of ``--set``::

    search: optuna          # or random (default)
    rounds: 3               # report rounds per trial: the rungs ASHA may stop a trial at
    params:
      t: {choice: [250, 500, 750]}              # OSD-IRF timestep (grid: each value, once per sample)
      train.lr: {loguniform: [1.0e-4, 2.0e-3]}
      score_net.hidden: {choice: [64, 128]}     # model width
      fields.timesteps: {choice: [[400, 200, 100], [400, 300, 200, 100]]}   # REF: K steps
      head.lambda_stat: {uniform: [0.0, 1.0]}
      head.lambda_sp: {loguniform: [0.01, 1.0]}

A trial builds the detector from the base config plus the sampled values, trains it, and reports
``val_image_auroc`` on a validation set cut from the NON-test images of the data (held-out normals,
plus labelled anomalies where the non-test data has them, else synthetic anomalies made from the
held-out normals). The score network trains in ``rounds`` chunks; methods that can score mid-training
(``RescoresDuringTraining``: OSD-IRF) report after each chunk, so ASHA can stop poor trials early. The
test split is never touched. The report, under ``<root>/sweeps/<name>/``: ``summary.csv``,
``summary.md``, ``sweep.png`` (the metric against each swept parameter) and ``best_config.yaml``, which
``ray-ad train --config`` takes as is.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml
from PIL import Image

from ray_ad import storage
from ray_ad.config import apply_overrides
from ray_ad.data import Sample, load_samples, split_calibration
from ray_ad.data.synthetic import anomaly_pair
from ray_ad.errors import ConfigError, DataError
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import RescoresDuringTraining, Runtime
from ray_ad.metrics import image_metrics
from ray_ad.training import ScoreNetLoop

log = logging.getLogger(__name__)

METRIC = "val_image_auroc"
DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")
LISTED = ("choice", "grid")  # domains given as a list of values (grid: every value, once per sample)
SEARCHES = ("random", "optuna")


# ------------------------------------------------------------------------ the space
@dataclass
class SweepSpace:
    params: dict[str, tuple[str, Any]]  # dotted key -> (domain, argument)
    search: str = "random"
    rounds: int = 3
    extra: dict[str, Any] = field(default_factory=dict)


def parse_space(data: dict[str, Any], source: str = "space") -> SweepSpace:
    """Check a space file's content; every error names the bad key or value."""
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict) or not data["params"]:
        raise ConfigError(f"{source}: expected a mapping with a non-empty 'params' mapping")
    unknown = set(data) - {"params", "search", "rounds"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}; use params, search, rounds")
    search = data.get("search", "random")
    if search not in SEARCHES:
        raise ConfigError(f"{source}: search={search!r}; use one of {', '.join(SEARCHES)}")
    rounds = data.get("rounds", 3)
    if not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"{source}: rounds must be a positive integer, got {rounds!r}")
    params: dict[str, tuple[str, Any]] = {}
    for key, spec in data["params"].items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
            raise ConfigError(f"{source}: param {key!r} needs exactly one of {', '.join(DOMAINS)}, got {spec!r}")
        domain, arg = next(iter(spec.items()))
        if domain in LISTED and (not isinstance(arg, list) or not arg):
            raise ConfigError(f"{source}: {key}.{domain} must be a non-empty list, got {arg!r}")
        if domain == "grid" and search != "random":
            raise ConfigError(f"{source}: {key}.grid needs search: random (a grid is not an Optuna space)")
        if domain not in LISTED:
            if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, int | float) for v in arg)
                    and arg[0] < arg[1]):
                raise ConfigError(f"{source}: {key}.{domain} must be [low, high] with low < high, got {arg!r}")
            if domain == "loguniform" and arg[0] <= 0:
                raise ConfigError(f"{source}: {key}.loguniform needs low > 0, got {arg[0]}")
        params[key] = (domain, arg)
    return SweepSpace(params, search, rounds)


def load_space(uri: str) -> SweepSpace:
    try:
        data = yaml.safe_load(storage.read_text(uri))
    except yaml.YAMLError as exc:
        raise ConfigError(f"space file {uri} is not valid YAML/JSON: {exc}") from exc
    return parse_space(data, uri)


def trial_overrides(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base config with the sampled values set at their dotted keys (``train.lr`` -> train: {lr})."""
    return apply_overrides(base, {key: value.item() if isinstance(value, np.generic) else value
                                  for key, value in params.items()})


def check_space(method: str, base: dict[str, Any], space: SweepSpace) -> None:
    """Build the method's config at each parameter's bounds / choices, so a typo fails before any trial."""
    for key, (domain, arg) in space.params.items():
        for value in arg if domain in LISTED else [arg[0], arg[1] - (1 if domain == "randint" else 0)]:
            try:
                method_config(method, trial_overrides(base, {key: value}))
            except (ConfigError, ValueError, TypeError) as exc:
                raise ConfigError(f"swept {key}={value!r} is not a valid {method} config: {exc}") from exc


# ------------------------------------------------------------------------ data
@dataclass
class SweepData:
    fit: list[Sample]
    calibration: list[Sample]
    validation: list[Sample]

    def describe(self) -> str:
        return (f"{len(self.fit)} fit, {len(self.calibration)} calibration, {len(self.validation)} validation "
                f"images ({sum(s.label == 1 for s in self.validation)} anomalous)")


def sweep_data(data: str, uses_labels: bool, folder: str, fraction: float = 0.3, seed: int = 0) -> SweepData:
    """fit / calibration / validation from the non-test images of ``data`` (deterministic).

    Validation anomalies: the labelled non-test anomalies held out, or, when there are none, synthetic
    anomalies made from the validation normals and written under ``folder``.
    """
    pool = [s for s in load_samples(data) if s.split != "test" and s.label in (0, 1)]
    if not uses_labels:
        pool = [s for s in pool if s.label == 0]
    if sum(s.label == 0 for s in pool) < 6:
        raise DataError(f"{data}: a sweep needs at least 6 non-test normal images, found "
                        f"{sum(s.label == 0 for s in pool)}")
    fit, held = split_calibration(pool, fraction)
    calibration_all, validation = split_calibration(held, 0.5)
    calibration = [s for s in calibration_all if s.label == 0]
    fit += [s for s in calibration_all if s.label == 1]
    if not calibration:
        raise DataError(f"{data}: no held-out normal image left for calibration")
    if not any(s.label == 1 for s in validation):
        validation = validation + synthetic_anomalies([s for s in validation if s.label == 0], folder, seed)
    return SweepData(fit, calibration, validation)


def synthetic_anomalies(normals: list[Sample], folder: str, seed: int = 0, prefix: str = "synthetic") -> list[Sample]:
    """One Perlin-mask anomaly per normal image (self-shuffled fill from another image), as PNGs with
    their masks (``<prefix>_<i>_mask.png``: a reference-based model needs the abnormal reference's mask)."""
    rng = np.random.default_rng(seed)
    uris = [sample.path for sample in normals]
    out = []
    for i, sample in enumerate(normals):
        # The next image is the donor; native size (the shorter side), PIL's default filter.
        _, anomalous, mask = anomaly_pair(uris, i, (i + 1) % len(uris), None, rng, resample=None)
        uri, mask_uri = (storage.join(folder, f"{prefix}_{i:04d}{suffix}.png") for suffix in ("", "_mask"))
        for target, pixels in ((uri, anomalous), (mask_uri, mask.astype(np.uint8) * 255)):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            storage.write_bytes(target, buffer.getvalue())
        out.append(Sample(uri, 1, mask_uri, "validation", sample.domain, "synthetic"))
    return out


def reference_sweep_data(data: str | list[str], validation_data: str, folder: str, seed: int = 0) -> SweepData:
    """fit / references / validation for a reference-based model (NAGL): fit on every labelled image of
    the source(s) ``data``; validate on another domain, ``validation_data``, from its NON-test normals
    alone: one half are the normal references (and, with a synthetic anomaly pasted in, the abnormal
    references with their masks), the other half and their synthetic anomalies the validation queries."""
    sources = [data] if isinstance(data, str) else list(data)
    if validation_data in sources:
        raise ConfigError(f"the validation domain {validation_data} is also a training source: validate on a "
                          "held-out domain")
    fit = [s for uri in sources for s in load_samples(uri) if s.label in (0, 1)]
    normals = [s for s in load_samples(validation_data) if s.split != "test" and s.label == 0]
    if len(normals) < 8:
        raise DataError(f"{validation_data}: a reference sweep needs at least 8 non-test normal images, "
                        f"found {len(normals)}")
    queries, references = split_calibration(normals, 0.5)
    validation = queries + synthetic_anomalies(queries, folder, seed)
    abnormal = synthetic_anomalies(references, folder, seed + 1, prefix="reference")
    return SweepData(fit, references + abnormal, validation)


def validation_auroc(detector: Any, validation: list[Sample]) -> float:
    from ray_ad.evaluation import run_detector

    results = run_detector(detector, validation, progress=False)
    labels = np.array([s.label for s in validation])
    return image_metrics(np.asarray(results.scores), labels)["image_auroc"]


def reference_validation_auroc(detector: Any, data: SweepData, draws: int = 3, seed: int = 0,
                               shots: tuple[int, int] = (4, 1)) -> float:
    """Mean validation AUROC over ``draws`` reference sets drawn from ``data.calibration`` (normal
    references and synthetic abnormal ones with masks), N4+A1 by default."""
    from ray_ad.fewshot import references_from_samples

    normal = [s for s in data.calibration if s.label == 0]
    abnormal = [s for s in data.calibration if s.label == 1]
    values = []
    for draw in range(draws):
        rng = np.random.default_rng(seed + draw)
        chosen = [normal[i] for i in rng.choice(len(normal), min(shots[0], len(normal)), replace=False)]
        chosen += [abnormal[i] for i in rng.choice(len(abnormal), min(shots[1], len(abnormal)), replace=False)]
        detector.set_references(references_from_samples(chosen, detector.image_size))
        values.append(validation_auroc(detector, data.validation))
    return float(np.mean(values))


# ------------------------------------------------------------------------ one trial
class RoundTrainer:
    """A ``ScoreNetTrainer`` that trains in ``rounds`` chunks and calls ``on_round(ema, step)`` between them."""

    def __init__(self, rounds: int, on_round: Callable[[Any, int], None]) -> None:
        self.rounds, self.on_round = rounds, on_round

    def __call__(self, net, x0, schedule, config, device="cpu", seed=0, progress=True):  # noqa: ANN001
        loop = ScoreNetLoop(net, schedule, config, device, seed)
        for r in range(1, self.rounds + 1):
            loop.run(x0, until=math.ceil(config.steps * r / self.rounds), progress=False)
            if r < self.rounds:
                self.on_round(loop.ema, loop.step)
        return loop.ema, loop.losses


def run_trial(
    params: dict[str, Any], method: str, base: dict[str, Any], data: SweepData, rounds: int, cache_dir: str | None,
    report: Callable[[dict[str, Any]], None],
) -> None:
    """One trial: fit ``method`` with the sampled ``params`` and ``report`` the validation AUROC, between
    score-net rounds (methods that can rescore mid-training) and after ``fit`` (``score_net_step`` -1)."""
    detector = build_detector(method, method_config(method, trial_overrides(base, params)))

    def report_round(ema: Any, step: int) -> None:
        if isinstance(detector, RescoresDuringTraining):
            detector.use_score_net(ema, data.calibration, runtime)
            report({METRIC: validation_auroc(detector, data.validation), "score_net_step": step})

    runtime = Runtime(progress=False, cache_dir=cache_dir, score_net_trainer=RoundTrainer(rounds, report_round))
    detector.fit(data.fit, data.calibration, runtime)
    if getattr(detector, "uses_references", False):  # scored against references drawn from the held-out domain
        report({METRIC: reference_validation_auroc(detector, data), "score_net_step": -1})
    else:
        report({METRIC: validation_auroc(detector, data.validation), "score_net_step": -1})


# ------------------------------------------------------------------------ the report
def write_report(rows: list[dict[str, Any]], method: str, base: dict[str, Any], space: SweepSpace,
                 folder: str) -> dict[str, Any]:
    """Summary CSV and Markdown, plot and best config of the trials' ``rows`` (the swept values, ``METRIC``
    or None, ``rounds``, ``error``) under ``folder``; returns their URIs, the best values and the rows."""
    scored = [r for r in rows if r[METRIC] is not None]
    if not scored:
        raise DataError(f"every trial failed; first error: {rows[0]['error'] if rows else 'no trials'}")
    best = max(scored, key=lambda r: r[METRIC])
    best_params = {k: best[k] for k in space.params}
    best_config = trial_overrides(base, best_params)
    method_config(method, best_config)  # it must build
    header = [*space.params, METRIC, "rounds", "error"]
    csv_lines = [",".join(header)] + [",".join(_cell(r.get(h)) for h in header) for r in rows]
    md_lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md_lines += ["| " + " | ".join(_cell(r.get(h)) for h in header) + " |" for r in rows]
    outputs = {
        "summary_csv": storage.join(folder, "summary.csv"),
        "summary_md": storage.join(folder, "summary.md"),
        "plot": storage.join(folder, "sweep.png"),
        "best_config": storage.join(folder, "best_config.yaml"),
    }
    storage.write_text(outputs["summary_csv"], "\n".join(csv_lines) + "\n")
    storage.write_text(outputs["summary_md"], "\n".join(md_lines) + f"\n\nbest: {best_params} -> "
                       f"{METRIC} {best[METRIC]:.4f}\n")
    storage.write_bytes(outputs["plot"], plot(rows, list(space.params)))
    storage.write_text(outputs["best_config"], yaml.safe_dump(best_config, sort_keys=True))
    log.info("%s", "\n".join(md_lines))
    log.info("best %s %.4f with %s; config: %s", METRIC, best[METRIC], best_params, outputs["best_config"])
    return {"best": best_params, "best_metric": best[METRIC], "rows": rows, **outputs}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, list | dict) else str(value).replace(",", ";")


def plot(rows: list[dict[str, Any]], params: list[str]) -> bytes:
    """One panel per swept parameter: the validation metric of every finished trial against it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.2), squeeze=False)
    scored = [r for r in rows if r[METRIC] is not None]
    for ax, key in zip(axes[0], params):
        values = [r[key] for r in scored]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        xs = values if numeric else [json.dumps(v) for v in values]
        ax.scatter(xs, [r[METRIC] for r in scored], c=[r["rounds"] for r in scored], cmap="viridis")
        ax.set_xlabel(key)
        ax.set_ylabel(METRIC)
        if numeric and values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle("validation image AUROC per trial (colour: rounds reached before ASHA stopped it)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
