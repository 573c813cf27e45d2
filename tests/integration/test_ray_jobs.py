"""The jobs on a real local Ray cluster, with a real S3 endpoint on 127.0.0.1 where it matters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from ray_ad import registry, storage
from ray_ad.data import load_samples
from ray_ad.evaluation import compute_metrics, run_detector
from ray_ad.methods import method_config
from tests.conftest import (
    REPO,
    make_mvtec,
    shift_folder,
    tiny_costfilter_config,
    tiny_nagl_config,
    tiny_osd_irf_config,
    tiny_ref_cfa_config,
    upload_folder,
)
from tests.helpers import load_job

JOBS = ("train_source", "train_fleet", "adapt_target", "sweep", "evaluate", "score_batch")


def write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("job", JOBS)
def test_every_job_documents_its_flags(job):
    out = subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--root" in out and "ray job submit" in out


def test_train_source_with_two_workers_publishes_to_s3(ray_cluster, s3_bucket, tmp_path):
    local_data = make_mvtec(tmp_path / "data")
    upload_folder(local_data, f"{s3_bucket}/data/tiles")
    config = write_config(tmp_path / "c.yaml", tiny_osd_irf_config(train={"steps": 40, "batch_size": 8,
                                                                          "warmup_steps": 5, "lr": 1e-3}))
    root = f"{s3_bucket}/fleet"
    code = load_job("train_source").main([
        "--line", "tiles", "--method", "osd_irf", "--data", f"{s3_bucket}/data/tiles", "--root", root,
        "--config", config, "--workers", "2", "--checkpoint-every", "10", "--quiet",
    ])
    assert code == 0
    detector, version = registry.load_current(root, "tiles", device="cpu")
    metrics = json.loads(storage.read_text(storage.join(registry.version_uri(root, "tiles", version), "metrics.json")))
    assert metrics["ray_train"]["workers"] == 2 and metrics["fit"]["steps"] == 40
    # The published figures are those of the published model: the same test split scored here, in process.
    local = compute_metrics(run_detector(detector, load_samples(str(local_data), "test"), progress=False))
    assert metrics["image_auroc"] == pytest.approx(local["image_auroc"])
    assert storage.list_files(f"{root}/ray_train")  # the checkpoints went to S3 too
    prediction = detector.predict(torch.zeros(1, 3, 64, 64))
    assert torch.isfinite(prediction.pred_score).all()


def test_train_source_select_publishes_the_recipe_the_validation_ranks_first(ray_cluster, tmp_path):
    tiny = ["backbone.image_size=64", "backbone.layers=[1, 2]", "device=cpu"]
    candidates = write_config(tmp_path / "candidates.yaml", {"candidates": [
        {"name": "one_cell", "method": "gaussian", "set": [*tiny, "backbone.grid_size=1"]},
        {"name": "grid8", "method": "gaussian", "set": [*tiny, "backbone.grid_size=8"]},
    ]})
    root = str(tmp_path / "fleet")
    assert load_job("train_source").main(["--line", "tiles", "--select", candidates, "--data",
                                          str(make_mvtec(tmp_path / "data", n_train=40)), "--root", root,
                                          "--quiet"]) == 0
    detector, version = registry.load_current(root, "tiles", device="cpu")
    metrics = json.loads(storage.read_text(storage.join(registry.version_uri(root, "tiles", version), "metrics.json")))
    figures = metrics["selection"]["candidates"]
    assert metrics["selection"]["winner"] == "grid8" and detector.config.backbone.grid_size == 8
    assert figures["grid8"]["validation_auroc"] > figures["one_cell"]["validation_auroc"]


def test_train_fleet_publishes_every_line_with_one_filter_under_one_version(ray_cluster, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_costfilter_config())
    root = str(tmp_path / "fleet")
    lines = ["--line", f"tiles={make_mvtec(tmp_path / 'tiles', seed=0)}",
             "--line", f"cells={make_mvtec(tmp_path / 'cells', seed=1)}"]
    with pytest.raises(SystemExit) as refused:
        load_job("train_fleet").main(lines[:2] + ["--root", root, "--config", config, "--quiet"])
    assert refused.value.code == 2 and "at least two lines" in capsys.readouterr().err
    assert load_job("train_fleet").main(lines + ["--root", root, "--config", config, "--version", "v1",
                                                 "--quiet"]) == 0
    tiles, tiles_version = registry.load_current(root, "tiles", device="cpu")
    cells, cells_version = registry.load_current(root, "cells", device="cpu")
    assert tiles_version == cells_version == "v1"
    assert tiles.config.filter.classes == 2  # the class-aware adaptor of a two-line filter
    for a, b in zip(tiles.filter.state_dict().values(), cells.filter.state_dict().values()):
        assert torch.equal(a, b)
    metrics = json.loads(storage.read_text(storage.join(registry.version_uri(root, "cells", "v1"), "metrics.json")))
    assert metrics["fleet"] == ["cells", "tiles"] and metrics["fit"]["fleet_lines"] == 2
    assert metrics["image_auroc"] > 0.9  # bright squares on stripes
    assert storage.list_files(f"{root}/ray_train")  # the filter trained on Ray Train, checkpointed


def test_a_bad_source_line_is_refused_with_its_name(ray_cluster, tmp_path, capsys):
    code = load_job("adapt_target").main(["--line", "new", "--source-line", "missing", "--target", str(tmp_path),
                                          "--root", str(tmp_path / "root"), "--quiet"])
    assert code == 2
    assert "'missing' has no published model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ref_cfa_fleet(ray_cluster, tmp_path_factory):
    """A local storage root with a ref_cfa source line trained on Ray Train, and a shifted target domain."""
    from ray_ad.distributed.lines import train_line

    base = tmp_path_factory.mktemp("fleet")
    source = make_mvtec(base / "source", n_train=10, n_good=4, n_bad=4)
    target = shift_folder(make_mvtec(base / "raw_target", n_train=10, n_good=4, n_bad=4, seed=5), base / "target")
    root = str(base / "root")
    train_line("src", "ref_cfa", str(source), root, tiny_ref_cfa_config(), progress=False)
    return root, target


def test_adapt_target_gates_every_candidate_and_publishes_the_winner_once_per_target(ref_cfa_fleet, capsys):
    root, target = ref_cfa_fleet
    job = load_job("adapt_target")
    argv = ["--line", "shifted", "--source-line", "src", "--target", str(target), "--root", root,
            "--eval-data", str(target), "--quiet"]
    assert job.main(argv) == 0
    out = capsys.readouterr().out
    assert "<- winner" in out and "gate (synthetic), decision: published" in out
    detector, version = registry.load_current(root, "shifted", device="cpu")
    assert torch.isfinite(detector.predict(torch.zeros(2, 3, 64, 64)).pred_score).all()
    [status_file] = storage.list_files(storage.join(root, "jobs"))
    status = json.loads(storage.read_text(status_file))
    assert status["state"] == "succeeded" and status["version"] == version and status["source_line"] == "src"
    assert status["decision"] == "published" and status["served_version"] is None  # a new line
    candidates = status["gate"]["candidates"]
    # A ref_cfa source: every default candidate.
    assert set(candidates) == {"source", "target_memory", "target_gaussian", "ref_cfa"}
    # In the order of preference, a candidate wins only by beating every one before it by gate.margin (0.01).
    winner, best_before = "source", candidates["source"]["gate_auroc"]
    for name in ("target_memory", "target_gaussian", "ref_cfa"):
        if candidates[name]["gate_auroc"] >= best_before + 0.01:
            winner = name
        best_before = max(best_before, candidates[name]["gate_auroc"])
    assert status["winner"] == winner
    served_as = {"source": "ref_cfa", "target_memory": "target_memory", "target_gaussian": "gaussian",
                 "ref_cfa": "ref_cfa"}
    assert detector.method == served_as[winner]
    assert detector.threshold == pytest.approx(candidates[winner]["threshold"])
    # The same target again: nothing is trained or published.
    assert job.main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert registry.list_versions(root, "shifted") == [version]


def test_score_batch_writes_one_parquet_row_per_image(ref_cfa_fleet, tmp_path):
    root, target = ref_cfa_fleet
    images = sorted((target / "test").rglob("*.png"))
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i, path in enumerate(images):
        (folder / f"{i:02d}.png").write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code = load_job("score_batch").main(["--line", "src", "--images", str(folder), "--root", root,
                                         "--actors", "2", "--batch-size", "3"])
    assert code == 0
    version = registry.current_version(root, "src")
    table = pq.read_table(f"{folder}_scores/src/{version}").to_pylist()
    assert len(table) == len(images) + 1
    assert {row["model_version"] for row in table} == {version}
    broken = [row for row in table if row["path"].endswith("broken.png")]
    assert broken[0]["error"] and broken[0]["decision"] is False
    good = [row for row in table if not row["path"].endswith("broken.png")]
    assert all(row["error"] is None and row["score"] == row["score"] for row in good)  # finite, no NaN


def test_evaluate_job_writes_image_metrics(ref_cfa_fleet):
    root, target = ref_cfa_fleet
    assert load_job("evaluate").main(["--line", "src", "--data", str(target), "--root", root, "--actors", "2"]) == 0
    version = registry.current_version(root, "src")
    metrics = json.loads(storage.read_text(storage.join(root, "evaluations", "src", version, "evaluation.json")))
    # Ray Data's actor pool scores as the model does in this process.
    detector, _ = registry.load_current(root, "src", device="cpu")
    local = compute_metrics(run_detector(detector, load_samples(str(target), "test"), progress=False))
    assert metrics["images"] == 8 and metrics["image_auroc"] == pytest.approx(local["image_auroc"])


def test_sweep_writes_table_plot_and_a_best_config_that_trains(ray_cluster, tmp_path):
    data = make_mvtec(tmp_path / "data", n_train=14)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"search": "random", "rounds": 2, "params": {
        "t": {"choice": [150, 400]}, "train.lr": {"loguniform": [3e-4, 3e-3]},
    }}))
    config = write_config(tmp_path / "base.yaml", tiny_osd_irf_config(train={"steps": 30, "batch_size": 8,
                                                                           "warmup_steps": 5}))
    root = tmp_path / "root"
    code = load_job("sweep").main(["--method", "osd_irf", "--data", str(data), "--root", str(root),
                                   "--space", str(space), "--samples", "3", "--config", config, "--name", "t"])
    assert code == 0
    folder = root / "sweeps" / "t"
    rows = (folder / "summary.csv").read_text().strip().splitlines()
    assert rows[0].startswith("t,train.lr,val_image_auroc") and len(rows) == 4
    assert (folder / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = yaml.safe_load((folder / "best_config.yaml").read_text())
    assert best["t"] in (150, 400) and 3e-4 <= best["train"]["lr"] <= 3e-3
    assert best["train"]["steps"] == 30  # the base config is carried over
    method_config("osd_irf", best)
    assert list((folder / "tune").rglob("events.out.tfevents*"))  # TensorBoard finds the trials
    assert not any("test" in p.parts for p in (folder / "validation").rglob("*"))


def test_a_nagl_sweep_over_m_validates_on_a_held_out_domain_only(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --root, as in the README: Tune's trials run in folders of their own
    source, held_out = make_mvtec(tmp_path / "source", seed=0), make_mvtec(tmp_path / "held_out", n_train=16, seed=1)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"search": "random", "rounds": 1, "params": {"proxies": {"grid": [2, 5]}}}))
    config = write_config(tmp_path / "base.yaml", tiny_nagl_config(train={
        "steps": 15, "batch_size": 4, "synthetic_count": 6, "max_normals": 8}))
    root = tmp_path / "root"
    args = ["--method", "nagl", "--data", str(source), "--root", "root", "--space", str(space),
            "--samples", "1", "--config", config, "--name", "m", "--cache-dir", "cache"]
    assert load_job("sweep").main(args) == 2  # no held-out domain given: refused before any trial
    assert load_job("sweep").main([*args, "--validation-data", str(held_out)]) == 0
    folder = root / "sweeps" / "m"
    rows = (folder / "summary.csv").read_text().strip().splitlines()
    assert rows[0].startswith("proxies,val_image_auroc") and sorted(r.split(",")[0] for r in rows[1:]) == ["2", "5"]
    assert yaml.safe_load((folder / "best_config.yaml").read_text())["proxies"] in (2, 5)
    made = [p.name for p in (folder / "validation").rglob("*.png")]
    assert any(name.startswith("reference_") and name.endswith("_mask.png") for name in made)


def test_a_space_with_an_unknown_key_fails_before_any_trial(ray_cluster, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"params": {"train.lrr": {"choice": [0.1]}}}))
    code = load_job("sweep").main(["--method", "osd_irf", "--data", str(make_mvtec(tmp_path / "d")),
                                   "--root", str(tmp_path / "r"), "--space", str(space), "--samples", "1"])
    assert code == 2
    assert "train.lrr" in capsys.readouterr().err


def test_a_failed_adaptation_is_recorded_and_publishes_nothing(ref_cfa_fleet, tmp_path, capsys):
    root, _ = ref_cfa_fleet
    empty = tmp_path / "landing" / "b1"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    code = load_job("adapt_target").main(["--line", "broken", "--source-line", "src", "--target", str(empty),
                                          "--root", root, "--quiet"])
    assert code == 2
    assert "no images (.png" in capsys.readouterr().err
    failed = [json.loads(storage.read_text(p)) for p in storage.list_files(storage.join(root, "jobs"))]
    [status] = [s for s in failed if s["new_line"] == "broken"]
    assert status["state"] == "failed" and str(empty) in status["error"]
    assert registry.current_version(root, "broken") is None
