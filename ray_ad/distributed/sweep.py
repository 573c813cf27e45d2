"""Ray Tune sweeps over a method's config: ASHA early stopping, random or Optuna search.

The space file, the validation set, the trial and the report are Ray-free (``ray_ad.tuning``, which
documents the space file format); this module runs them on Tune. Outputs under ``<root>/sweeps/<name>/``:
Tune's trial folders (``tune/``, with TensorBoard event files), ``summary.csv``, ``summary.md``,
``sweep.png`` and ``best_config.yaml``.
"""

from __future__ import annotations

import logging
from typing import Any

from ray_ad import storage
from ray_ad.errors import ConfigError
from ray_ad.methods import METHODS
from ray_ad.tuning import (
    METRIC,
    SweepData,
    SweepSpace,
    check_space,
    reference_sweep_data,
    run_trial,
    sweep_data,
    write_report,
)

log = logging.getLogger(__name__)


def tune_space(space: SweepSpace) -> dict[str, Any]:
    """The space's parameters as Tune search domains."""
    from ray import tune

    domains = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda arg: tune.uniform(*arg),
               "loguniform": lambda arg: tune.loguniform(*arg), "randint": lambda arg: tune.randint(*arg)}
    return {key: domains[domain](arg) for key, (domain, arg) in space.params.items()}


def tune_trial(params: dict[str, Any], method: str, base: dict[str, Any], data: SweepData, rounds: int,
               cache_dir: str | None) -> None:
    """The Tune function trainable: one ``run_trial`` reporting to Tune."""
    from ray import tune

    run_trial(params, method, base, data, rounds, cache_dir, report=tune.report)


def run_sweep(
    method: str, data: str, root: str, space: SweepSpace, samples: int, base: dict[str, Any] | None = None,
    name: str = "sweep", cpus_per_trial: float = 1, gpus_per_trial: float = 0, max_concurrent: int | None = None,
    cache_dir: str | None = None, seed: int = 0, validation_data: str | None = None,
) -> dict[str, Any]:
    """Run the sweep on the current Ray; write summary, plot and best config; return their URIs and the best.

    A reference-based method (nagl) trains on ``data`` and validates on another domain, ``validation_data``
    (its non-test normals and synthetic anomalies made from them; ``tuning.reference_sweep_data``).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    base = dict(base or {})
    check_space(method, base, space)
    # Tune runs each trial in a working directory of its own: a relative root or cache folder given here
    # would name another place there (the validation images written below would not be found).
    folder = storage.join(storage.absolute(root), "sweeps", name)
    cache_dir = storage.absolute(cache_dir) if cache_dir else None
    detector_cls = METHODS[method][0]
    if detector_cls.uses_references != (validation_data is not None):
        raise ConfigError(f"{method}: --validation-data (a held-out domain) is required for reference-based methods "
                          "(nagl) and applies to no other")
    if detector_cls.uses_references:
        split = reference_sweep_data(data, validation_data, storage.join(folder, "validation"), seed=seed)
    else:
        split = sweep_data(data, detector_cls.uses_labels, storage.join(folder, "validation"), seed=seed)
    log.info("sweep %s: %s", name, split.describe())
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
        tune.with_parameters(tune_trial, method=method, base=base, data=split, rounds=space.rounds,
                             cache_dir=cache_dir),
        {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
    )
    fs, path = storage.arrow_filesystem(folder)
    tuner = tune.Tuner(
        trainable,
        param_space=tune_space(space),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=samples, search_alg=search_alg,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=space.rounds, grace_period=1,
                                    reduction_factor=2),
        ),
        run_config=tune.RunConfig(name="tune", storage_path=path, storage_filesystem=fs, verbose=1),
    )
    grid = tuner.fit()
    return write_report(trial_rows(grid, space), method, base, space, folder)


def trial_rows(grid: Any, space: SweepSpace) -> list[dict[str, Any]]:
    """One row per Tune result: the swept values, the last and best reported metric, rounds reached, error."""
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
    return rows
