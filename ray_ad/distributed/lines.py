"""Product lines on Ray: train a source line, adapt it to a new target domain, publish to the registry.

These are the bodies of ``jobs/train_source.py`` and ``jobs/adapt_target.py`` (and what the landing
watcher submits). Score networks train on Ray Train; everything is written under one storage root::

    <root>/models/<line>/<version>/      bundles (registry.publish: files first, CURRENT last)
    <root>/jobs/<job_id>.json            adaptation status objects (candidates, gate scores, decision)
    <root>/ray_train/<run>/              Ray Train checkpoints
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from ray_ad import registry, storage
from ray_ad.adaptation.promote import SERVED, Outcome, adapt_candidates, split_overrides
from ray_ad.bundle import load_bundle
from ray_ad.distributed.batch import RayFeatureBackend
from ray_ad.distributed.episode_train import RayEpisodeTrainer
from ray_ad.distributed.filter_train import RayFilterTrainer
from ray_ad.distributed.train import RayScoreNetTrainer, RayTrainSettings
from ray_ad.errors import RayADError
from ray_ad.job_status import adapt_job_id, read_job_status, target_key, timestamp, write_job_status
from ray_ad.methods.base import Runtime
from ray_ad.metrics import decision_metrics
from ray_ad.pipeline import evaluate_split, target_image_uris, train_detector, train_fleet, train_selected
from ray_ad.report import format_table
from ray_ad.selection import selection_table

log = logging.getLogger(__name__)

TABLE_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "seconds_per_image")
EVAL_KEYS = ("image_auroc", "image_ap", "image_f1max", "precision", "recall", "f1")


def train_settings(root: str, run_name: str, workers: int, use_gpu: bool, **extra: Any) -> RayTrainSettings:
    return RayTrainSettings(workers=workers, use_gpu=use_gpu, storage_path=storage.join(root, "ray_train"),
                            name=run_name, **extra)


def train_line(
    line: str, method: str | None, data: str | list[str], root: str, overrides: dict[str, Any] | None = None,
    workers: int = 1, use_gpu: bool = False, version: str | None = None, progress: bool = True,
    cache_dir: str | None = None, feature_actors: int = 0, select: str | None = None, **settings: Any,
) -> dict[str, Any]:
    """Train ``method`` on ``data`` with Ray Train, evaluate, publish as a new version of ``line``.

    With ``select`` (a candidates file, "" for ``configs/select.yaml``) instead of a method, every
    candidate recipe is trained and the one the label-free validation ranks first is published
    (``ray_ad.selection``). Re-running with the same ``version`` resumes its Ray Train runs.
    """
    registry.check_name("line", line)
    version = registry.check_name("version", version or registry.new_version())
    trainer = RayScoreNetTrainer(train_settings(root, f"{line}-{version}", workers, use_gpu, **settings))
    runtime = Runtime(progress, cache_dir, trainer, _feature_backend(feature_actors, use_gpu),
                      RayFilterTrainer(trainer.settings), RayEpisodeTrainer(trainer.settings))
    if select is not None:
        if not isinstance(data, str):
            raise RayADError("a recipe selection trains on exactly one dataset")
        detector, metrics = train_selected(select or None, data, overrides, runtime=runtime)
        log.info(selection_table(metrics["selection"]))
    elif method is None:
        raise RayADError("train_line needs a method or a candidates file to select from")
    else:
        detector, metrics = train_detector(method, data, overrides, runtime=runtime)
    method = detector.method
    metrics["ray_train"] = {"workers": workers, "use_gpu": use_gpu, **_train_figures(trainer)}
    registry.publish(detector, root, line, metrics, version=version)
    log.info(f"published {method} as {line}/{version} under {root}")
    if "image_auroc" in metrics:
        log.info(format_table({f"{line}/{version}": metrics}, TABLE_KEYS))
    return {"line": line, "version": version, "metrics": metrics}


def train_fleet_lines(
    lines: dict[str, str], root: str, overrides: dict[str, Any] | None = None, workers: int = 1,
    use_gpu: bool = False, version: str | None = None, progress: bool = True, cache_dir: str | None = None,
    feature_actors: int = 0, **settings: Any,
) -> dict[str, Any]:
    """One CostFilter-AD fleet filter for ``lines`` (``{line: data URI}``), trained on Ray Train; every line
    published as ``version`` with its own base and templates and a copy of the filter."""
    for line in lines:
        registry.check_name("line", line)
    if len(lines) < 2:
        raise RayADError(f"a fleet filter needs at least 2 lines, got {sorted(lines)}")
    version = registry.check_name("version", version or registry.new_version())
    trainer = RayScoreNetTrainer(train_settings(root, f"fleet-{version}", workers, use_gpu, **settings))
    runtime = Runtime(progress, cache_dir, trainer, _feature_backend(feature_actors, use_gpu),
                      RayFilterTrainer(trainer.settings), RayEpisodeTrainer(trainer.settings))
    trained = train_fleet(lines, overrides, runtime=runtime)  # every line complete before any is published
    for line, (detector, metrics) in trained.items():
        metrics["ray_train"] = {"workers": workers, "use_gpu": use_gpu}
        registry.publish(detector, root, line, metrics, version=version)
        log.info(f"published the fleet filter's {line} as {line}/{version} under {root}")
    rows = {f"{line}/{version}": metrics for line, (_, metrics) in trained.items() if "image_auroc" in metrics}
    if rows:
        log.info(format_table(rows, TABLE_KEYS))
    return {"version": version, "lines": {line: metrics for line, (_, metrics) in trained.items()}}


def _feature_backend(actors: int, use_gpu: bool) -> RayFeatureBackend | None:
    """Backbone features on a Ray Data actor pool of ``actors`` actors (0: in the driver)."""
    return RayFeatureBackend(actors, use_gpu) if actors > 0 else None


def _train_figures(trainer: RayScoreNetTrainer) -> dict[str, Any]:
    result = trainer.last_result
    if result is None:  # the method trains no score network
        return {}
    return {key: result.metrics[key] for key in ("images_per_s", "started_from_step") if key in result.metrics}


def adapt_line(
    new_line: str, source_line: str, target: str, root: str, target_split: str | None = None,
    overrides: list[str] | None = None, eval_data: str | None = None, eval_split: str = "test",
    workers: int = 1, use_gpu: bool = False, progress: bool = True, cache_dir: str | None = None,
    feature_actors: int = 0, force: bool = False, **settings: Any,
) -> dict[str, Any]:
    """Adapt ``source_line``'s current model to the unlabeled ``target``: build every candidate (the
    source as is, a target memory, REF+CFA for ref_cfa sources), rank them on held-out landed images
    with no target label, and publish the winner as a new version of ``new_line`` only when it beats
    what ``new_line`` serves by the gate's margin (``force`` publishes it anyway). Otherwise the job
    records ``"decision": "kept"`` with the evidence and publishes nothing.

    Idempotent: a target already processed returns its status unchanged. With ``eval_data`` (labelled
    target data), every candidate is evaluated on its ``eval_split`` after the decision is made.
    """
    registry.check_name("line", new_line)
    source_version = registry.current_version(root, source_line)
    if source_version is None:
        raise RayADError(f"source line {source_line!r} has no published model under {root}")
    config, ref_cfa_overrides = split_overrides(overrides)
    job_id = adapt_job_id(new_line, source_line, source_version, target_key(target))
    status = read_job_status(root, job_id)
    if status is not None and status.get("state") == "succeeded":
        log.info(f"{job_id}: {target} was already processed ({status.get('decision', 'published')} "
              f"{new_line}/{status.get('version')}); nothing to do")
        return status
    version = (status or {}).get("version") or registry.new_version()  # a retry resumes the same run
    served_version = registry.current_version(root, new_line)
    status = {
        "job_id": job_id, "state": "running", "new_line": new_line, "source_line": source_line,
        "source_version": source_version, "target": target, "version": version, "served_version": served_version,
        "started": timestamp(), "error": None, "decision": None,
    }
    write_job_status(root, status)
    try:
        source = load_bundle(registry.version_uri(root, source_line, source_version))
        served = load_bundle(registry.version_uri(root, new_line, served_version)) if served_version else None
        images = target_image_uris(target, target_split)
        log.info(f"{job_id}: adapting {source_line}/{source_version} ({source.method}) to {len(images)} unlabeled "
              f"images of {target}" + (f"; {new_line} serves {served_version}" if served_version else ""))
        trainer = RayScoreNetTrainer(train_settings(root, job_id, workers, use_gpu, **settings))
        runtime = Runtime(progress, cache_dir, trainer, _feature_backend(feature_actors, use_gpu))
        outcome = adapt_candidates(source, target, images, config, served, ref_cfa_overrides, runtime)
        decision = "published" if force else outcome.decision
        status.update(gate=outcome.evidence(), winner=outcome.winner, decision=decision,
                      forced=force and outcome.decision == "kept")
        _print_gate(outcome, served_version)
        winner = outcome.candidates[outcome.winner]
        metrics: dict[str, Any] = {"adaptation": outcome.evidence(),
                                   "ray_train": {"workers": workers, **_train_figures(trainer)}}
        if eval_data:  # labels are read only now, after the decision
            table, evaluated = _evaluate_candidates(outcome, eval_data, eval_split, progress)
            metrics.update(evaluated[outcome.winner])
            status["table"] = table
            log.info(f"{eval_data} {eval_split} split (read after the decision):\n{table}")
        if decision == "published":
            registry.publish(winner, root, new_line, metrics, version=version)
        else:
            status["version"] = None
    except Exception as exc:
        status.update(state="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        write_job_status(root, status)
        raise
    status.update(state="succeeded", finished=timestamp())
    write_job_status(root, status)
    if decision == "published":
        log.info(f"{job_id}: published {outcome.winner} as {new_line}/{version}")
    else:
        log.info(f"{job_id}: kept {new_line}/{served_version}: the best candidate ({outcome.winner}) does not beat it "
              f"by the gate margin {config.gate.margin}")
    return status


def _print_gate(outcome: Outcome, served_version: str | None) -> None:
    rows = {}
    for name, gate in outcome.gate.items():
        label = f"served ({served_version})" if name == SERVED else name
        rows[label + (" <- winner" if name == outcome.winner else "")] = gate
    log.info(f"gate ({outcome.gate_source}), decision: {outcome.decision}")
    log.info(format_table(rows, ("gate_auroc", "threshold", "flagged_held_out", "build_seconds")))


def _evaluate_candidates(
    outcome: Outcome, eval_data: str, eval_split: str, progress: bool
) -> tuple[str, dict[str, dict[str, Any]]]:
    evaluated = {}
    for name, detector in outcome.candidates.items():
        results, figures = evaluate_split(detector, eval_data, eval_split, progress)
        # Each new candidate at the threshold it would ship with; the served version at its own.
        threshold = detector.threshold if name == SERVED else outcome.gate[name]["threshold"]
        figures.update(decision_metrics(results.scores, results.labels, threshold))
        evaluated[name] = figures
    rows = {f"{name}{' <- winner' if name == outcome.winner else ''}": {**figures,
            "gate_auroc": outcome.gate[name]["gate_auroc"]} for name, figures in evaluated.items()}
    return format_table(rows, ("gate_auroc", *EVAL_KEYS)), evaluated
