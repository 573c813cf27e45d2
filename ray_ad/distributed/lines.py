"""Product lines on Ray: train a source line, adapt it to a new target domain, publish to the registry.

These are the bodies of ``jobs/train_source.py`` and ``jobs/adapt_target.py`` (and what the landing
watcher submits). Score networks train on Ray Train; everything is written under one storage root::

    <root>/models/<line>/<version>/      bundles (registry.publish: files first, CURRENT last)
    <root>/jobs/<job_id>.json            adaptation status objects
    <root>/ray_train/<run>/              Ray Train checkpoints
"""

from __future__ import annotations

import datetime as dt
import json
import traceback
from typing import Any

from ray_ad import registry, storage
from ray_ad.bundle import load_bundle
from ray_ad.cli import format_table
from ray_ad.distributed.batch import RayFeatureBackend
from ray_ad.distributed.train import RayScoreNetTrainer, RayTrainSettings
from ray_ad.errors import RayADError
from ray_ad.job_status import adapt_job_id, job_status_uri, read_job_status
from ray_ad.pipeline import adapt_detector, evaluate_split, target_image_uris, train_detector

TABLE_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "seconds_per_image")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def train_settings(root: str, run_name: str, workers: int, use_gpu: bool, **extra: Any) -> RayTrainSettings:
    return RayTrainSettings(workers=workers, use_gpu=use_gpu, storage_path=storage.join(root, "ray_train"),
                            name=run_name, **extra)


def train_line(
    line: str, method: str, data: str, root: str, overrides: dict[str, Any] | None = None,
    workers: int = 1, use_gpu: bool = False, version: str | None = None, progress: bool = True,
    cache_dir: str | None = None, feature_actors: int = 0, **settings: Any,
) -> dict[str, Any]:
    """Train ``method`` on ``data`` with Ray Train, evaluate, publish as a new version of ``line``.

    Re-running with the same ``version`` resumes its Ray Train runs from their checkpoints.
    """
    registry.check_name("line", line)
    version = registry.check_name("version", version or registry.new_version())
    trainer = RayScoreNetTrainer(train_settings(root, f"{line}-{version}", workers, use_gpu, **settings))
    detector, metrics = train_detector(method, data, overrides, progress=progress, cache_dir=cache_dir,
                                       score_net_trainer=trainer,
                                       feature_backend=_feature_backend(feature_actors, use_gpu))
    metrics["ray_train"] = {"workers": workers, "use_gpu": use_gpu, **_train_figures(trainer)}
    registry.publish(detector, root, line, metrics, version=version)
    print(f"published {method} as {line}/{version} under {root}")
    if "image_auroc" in metrics:
        print(format_table({f"{line}/{version}": metrics}, TABLE_KEYS))
    return {"line": line, "version": version, "metrics": metrics}


def _feature_backend(actors: int, use_gpu: bool) -> RayFeatureBackend | None:
    """Backbone features on a Ray Data actor pool of ``actors`` actors (0: in the driver)."""
    return RayFeatureBackend(actors, use_gpu) if actors > 0 else None


def _train_figures(trainer: RayScoreNetTrainer) -> dict[str, Any]:
    result = trainer.last_result
    if result is None:  # the method trains no score network
        return {}
    return {key: result.metrics[key] for key in ("images_per_s", "started_from_step") if key in result.metrics}


def _write_status(root: str, status: dict[str, Any]) -> None:
    status["updated"] = _now()
    storage.write_text(job_status_uri(root, status["job_id"]), json.dumps(status, indent=2, sort_keys=True))


def adapt_line(
    new_line: str, source_line: str, target: str, root: str, target_split: str | None = None,
    overrides: list[str] | None = None, eval_data: str | None = None, eval_split: str = "test",
    workers: int = 1, use_gpu: bool = False, progress: bool = True, cache_dir: str | None = None,
    feature_actors: int = 0, **settings: Any,
) -> dict[str, Any]:
    """REF+CFA adaptation of ``source_line``'s current model to the unlabeled ``target``, published as
    a new version of ``new_line``. Idempotent: a target already adapted returns its status unchanged.

    With ``eval_data`` (labelled target data), the source model before adaptation and the adapted
    model are both evaluated on its ``eval_split``; labels are never read before adaptation is done.
    """
    registry.check_name("line", new_line)
    source_version = registry.current_version(root, source_line)
    if source_version is None:
        raise RayADError(f"source line {source_line!r} has no published model under {root}")
    job_id = adapt_job_id(new_line, source_line, source_version, target)
    status = read_job_status(root, job_id)
    if status is not None and status.get("state") == "succeeded":
        print(f"{job_id}: {target} was already adapted into {new_line}/{status['version']}; nothing to do")
        return status
    version = (status or {}).get("version") or registry.new_version()  # a retry resumes the same run
    status = {
        "job_id": job_id, "state": "running", "new_line": new_line, "source_line": source_line,
        "source_version": source_version, "target": target, "version": version, "started": _now(),
        "error": None,
    }
    _write_status(root, status)
    try:
        detector = load_bundle(registry.version_uri(root, source_line, source_version))
        images = target_image_uris(target, target_split)
        print(f"{job_id}: adapting {source_line}/{source_version} to {len(images)} unlabeled images of {target}")
        trainer = RayScoreNetTrainer(train_settings(root, job_id, workers, use_gpu, **settings))
        info = adapt_detector(detector, images, overrides, progress=progress, cache_dir=cache_dir,
                              score_net_trainer=trainer,
                              feature_backend=_feature_backend(feature_actors, use_gpu))
        metrics: dict[str, Any] = {"adapt": info, "ray_train": {"workers": workers, **_train_figures(trainer)}}
        if eval_data:
            before = load_bundle(registry.version_uri(root, source_line, source_version))
            before_metrics = evaluate_split(before, eval_data, eval_split, progress)[1]
            after_metrics = evaluate_split(detector, eval_data, eval_split, progress)[1]
            metrics.update(after_metrics)
            metrics["before_adaptation"] = before_metrics
            status["table"] = format_table(
                {f"{source_line} (source, no CFA)": before_metrics, f"{new_line} (REF+CFA)": after_metrics},
                TABLE_KEYS,
            )
            print(f"{eval_data} {eval_split} split, before and after adaptation:\n{status['table']}")
        registry.publish(detector, root, new_line, metrics, version=version)
    except Exception as exc:
        status.update(state="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        _write_status(root, status)
        raise
    status.update(state="succeeded", finished=_now(), metrics={k: v for k, v in metrics.items()
                                                               if not isinstance(v, dict)})
    _write_status(root, status)
    print(f"{job_id}: published {new_line}/{version}")
    return status
