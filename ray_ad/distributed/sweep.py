"""Ray Tune sweeps over a method's config: search space file, ASHA, random or Optuna search.

A space file (YAML or JSON) names config keys in the dotted form of ``--set``::

    search: optuna          # or random (default)
    rounds: 3               # report rounds per trial: the rungs ASHA may stop a trial at
    params:
      t: {choice: [250, 500, 750]}              # OSD-IRF timestep
      train.lr: {loguniform: [1.0e-4, 2.0e-3]}
      score_net.hidden: {choice: [64, 128]}     # model width
      fields.timesteps: {choice: [[400, 200, 100], [400, 300, 200, 100]]}   # REF: K steps
      head.lambda_stat: {uniform: [0.0, 1.0]}
      head.lambda_sp: {loguniform: [0.01, 1.0]}

Every trial is a function trainable: it builds the detector from the base config plus the sampled
values, trains it, and reports ``val_image_auroc`` on a validation set cut from the NON-test images
of the data (held-out normals, plus labelled anomalies where the non-test data has them, else
synthetic anomalies made from the held-out normals). The score network trains in ``rounds`` chunks;
methods that can score mid-training (OSD-IRF) report after each chunk, so ASHA can stop poor trials
early. The test split is never touched. Outputs under ``<root>/sweeps/<name>/``: Tune's trial folders
(with TensorBoard event files), ``summary.csv``, ``summary.md``, ``sweep.png`` (the metric against
each swept parameter) and ``best_config.yaml``, which ``ray-ad train --config`` takes as is.
"""

from __future__ import annotations

import copy
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml
from PIL import Image

from ray_ad import storage
from ray_ad.data import Sample, load_samples, split_calibration
from ray_ad.data.images import load_image
from ray_ad.data.synthetic import synthesize_anomaly
from ray_ad.errors import ConfigError, DataError
from ray_ad.methods import METHODS, build_detector, method_config
from ray_ad.metrics import image_metrics
from ray_ad.training import ScoreNetLoop

METRIC = "val_image_auroc"
DOMAINS = ("choice", "uniform", "loguniform", "randint")
SEARCHES = ("random", "optuna")


@dataclass
class SweepSpace:
    params: dict[str, tuple[str, Any]]  # dotted key -> (domain, argument)
    search: str = "random"
    rounds: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    def tune_space(self) -> dict[str, Any]:
        from ray import tune

        space = {}
        for key, (domain, arg) in self.params.items():
            if domain == "choice":
                space[key] = tune.choice(arg)
            elif domain == "uniform":
                space[key] = tune.uniform(*arg)
            elif domain == "loguniform":
                space[key] = tune.loguniform(*arg)
            else:
                space[key] = tune.randint(*arg)
        return space


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
        if domain == "choice" and (not isinstance(arg, list) or not arg):
            raise ConfigError(f"{source}: {key}.choice must be a non-empty list, got {arg!r}")
        if domain != "choice":
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
    data = copy.deepcopy(base)
    for key, value in params.items():
        node = data
        *sections, leaf = key.split(".")
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"swept key {key!r}: {part!r} is not a config section")
        node[leaf] = value.item() if isinstance(value, np.generic) else value
    return data


def check_space(method: str, base: dict[str, Any], space: SweepSpace) -> None:
    """Build the method's config at each parameter's bounds / choices, so a typo fails before any trial."""
    for key, (domain, arg) in space.params.items():
        for value in arg if domain == "choice" else [arg[0], arg[1] - (1 if domain == "randint" else 0)]:
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


def synthetic_anomalies(normals: list[Sample], folder: str, seed: int = 0) -> list[Sample]:
    """One Perlin-mask anomaly per normal image (self-shuffled fill from another image), as PNGs."""
    rng = np.random.default_rng(seed)
    out = []
    for i, sample in enumerate(normals):
        image = load_image(sample.path)
        size = min(image.size)
        base = np.asarray(image.resize((size, size)))
        donor = np.asarray(load_image(normals[(i + 1) % len(normals)].path).resize((size, size)))
        anomalous, _ = synthesize_anomaly(base, donor, rng)
        buffer = io.BytesIO()
        Image.fromarray(anomalous).save(buffer, format="PNG")
        uri = storage.join(folder, f"synthetic_{i:04d}.png")
        storage.write_bytes(uri, buffer.getvalue())
        out.append(Sample(uri, 1, None, "validation", sample.domain, "synthetic"))
    return out


def validation_auroc(detector: Any, validation: list[Sample]) -> float:
    from ray_ad.evaluation import run_detector

    results = run_detector(detector, validation, progress=False)
    labels = np.array([s.label for s in validation])
    return image_metrics(np.asarray(results.scores), labels)["image_auroc"]


# ------------------------------------------------------------------------ trials
class RoundTrainer:
    """A ``ScoreNetTrainer`` that trains in ``rounds`` chunks and calls ``on_round(ema, step)`` between them."""

    def __init__(self, rounds: int, on_round: Any) -> None:
        self.rounds, self.on_round = rounds, on_round

    def __call__(self, net, x0, schedule, config, device="cpu", seed=0, progress=True):  # noqa: ANN001
        loop = ScoreNetLoop(net, schedule, config, device, seed)
        for r in range(1, self.rounds + 1):
            loop.run(x0, until=math.ceil(config.steps * r / self.rounds), progress=False)
            if r < self.rounds:
                self.on_round(loop.ema, loop.step)
        return loop.ema, loop.losses


def run_trial(params: dict[str, Any], method: str, base: dict[str, Any], data: SweepData, rounds: int,
              cache_dir: str | None) -> None:
    """The Tune function trainable (one trial)."""
    from ray import tune

    detector = build_detector(method, method_config(method, trial_overrides(base, params)))

    def report_round(ema: Any, step: int) -> None:
        if hasattr(detector, "use_score_net"):  # methods that can score before fit() returns
            detector.use_score_net(ema, data.calibration, cache_dir)
            tune.report({METRIC: validation_auroc(detector, data.validation), "score_net_step": step})

    detector.score_net_trainer = RoundTrainer(rounds, report_round)
    detector.fit(data.fit, data.calibration, progress=False, cache_dir=cache_dir)
    tune.report({METRIC: validation_auroc(detector, data.validation), "score_net_step": -1})


# ------------------------------------------------------------------------ the sweep
def run_sweep(
    method: str, data: str, root: str, space: SweepSpace, samples: int, base: dict[str, Any] | None = None,
    name: str = "sweep", cpus_per_trial: float = 1, gpus_per_trial: float = 0, max_concurrent: int | None = None,
    cache_dir: str | None = None, seed: int = 0,
) -> dict[str, Any]:
    """Run the sweep on the current Ray; write summary, plot and best config; return their URIs and the best."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    base = dict(base or {})
    check_space(method, base, space)
    folder = storage.join(root, "sweeps", name)
    uses_labels = METHODS[method][0].uses_labels
    split = sweep_data(data, uses_labels, storage.join(folder, "validation"), seed=seed)
    print(f"sweep {name}: {len(split.fit)} fit, {len(split.calibration)} calibration, "
          f"{len(split.validation)} validation images ({sum(s.label == 1 for s in split.validation)} anomalous)")
    if space.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=seed)
        if max_concurrent:
            search_alg = ConcurrencyLimiter(search_alg, max_concurrent=max_concurrent)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(max_concurrent=max_concurrent or 0, random_state=seed)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, method=method, base=base, data=split, rounds=space.rounds,
                             cache_dir=cache_dir),
        {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
    )
    fs, path = storage.arrow_filesystem(folder)
    tuner = tune.Tuner(
        trainable,
        param_space=space.tune_space(),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=samples, search_alg=search_alg,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=space.rounds, grace_period=1,
                                    reduction_factor=2),
        ),
        run_config=tune.RunConfig(name="tune", storage_path=path, storage_filesystem=fs, verbose=1),
    )
    grid = tuner.fit()
    return write_outputs(grid, method, base, space, folder)


def write_outputs(grid: Any, method: str, base: dict[str, Any], space: SweepSpace, folder: str) -> dict[str, Any]:
    rows = []
    for result in grid:
        if result.metrics is None or METRIC not in result.metrics:
            rows.append({**{k: result.config.get(k) for k in space.params}, METRIC: None, "rounds": 0,
                         "error": str(result.error) if result.error else "no report"})
            continue
        history = result.metrics_dataframe
        best_seen = float(history[METRIC].max()) if history is not None and METRIC in history else None
        rows.append({**{k: result.config[k] for k in space.params}, METRIC: float(result.metrics[METRIC]),
                     "best_seen": best_seen, "rounds": int(result.metrics.get("training_iteration", 0)),
                     "error": None})
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
    print("\n".join(md_lines))
    print(f"best {METRIC} {best[METRIC]:.4f} with {best_params}; config: {outputs['best_config']}")
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
