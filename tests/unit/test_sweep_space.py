"""Sweep space files, the round-by-round trainer, a whole trial and the report (no Ray needed)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from ray_ad import tuning
from ray_ad.diffusion import NoiseSchedule, ScoreNetConfig, build_score_net
from ray_ad.errors import ConfigError, DataError
from ray_ad.methods import method_config
from ray_ad.training import TrainConfig, train_score_net
from ray_ad.tuning import (
    METRIC,
    RoundTrainer,
    check_space,
    parse_space,
    run_trial,
    sweep_data,
    trial_overrides,
    write_report,
)
from tests.conftest import REPO, make_mvtec, tiny_osd_irf_config


def test_a_valid_space_parses_and_sets_nested_keys():
    space = parse_space({"search": "optuna", "rounds": 2, "params": {
        "t": {"choice": [100, 500]}, "train.lr": {"loguniform": [1e-4, 1e-3]},
    }})
    assert space.search == "optuna" and space.rounds == 2 and space.params["t"] == ("choice", [100, 500])
    config = trial_overrides({"train": {"steps": 10}}, {"t": 100, "train.lr": 5e-4})
    assert config == {"t": 100, "train": {"steps": 10, "lr": 5e-4}}
    check_space("osd_irf", {}, space)


@pytest.mark.parametrize(("content", "named"), [
    ({"params": {}}, "non-empty 'params'"),
    ({"params": {"t": {"choice": [1]}}, "search": "grid"}, "search='grid'"),
    ({"params": {"t": {"choice": [1]}}, "rounds": 0}, "rounds"),
    ({"params": {"t": {"between": [1, 2]}}}, "param 't'"),
    ({"params": {"train.lr": {"uniform": [2, 1]}}}, "train.lr.uniform"),
    ({"params": {"train.lr": {"loguniform": [0, 1]}}}, "train.lr.loguniform"),
    ({"params": {"t": {"choice": []}}}, "t.choice"),
    ({"params": {"t": {"choice": [1]}}, "sampels": 3}, "sampels"),
])
def test_bad_spaces_name_the_bad_value(content, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(".", r"\.")):
        parse_space(content, "space.yaml")


def test_swept_values_must_build_a_valid_config():
    with pytest.raises(ConfigError, match="train.lrr"):
        check_space("osd_irf", {}, parse_space({"params": {"train.lrr": {"choice": [0.1]}}}))
    with pytest.raises(ConfigError, match="t=2000"):
        check_space("osd_irf", {}, parse_space({"params": {"t": {"choice": [500, 2000]}}}))


@pytest.mark.slow  # a training run
def test_training_in_rounds_is_the_same_run_as_training_at_once():
    config = TrainConfig(steps=30, batch_size=4, warmup_steps=3)
    x0 = torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(0))

    def net():
        torch.manual_seed(0)
        return build_score_net(ScoreNetConfig(kind="dit", hidden=16, depth=1, heads=2), 4, 4)

    seen = []
    _, chunked = RoundTrainer(3, lambda ema, step: seen.append(step))(net(), x0, NoiseSchedule(), config, seed=1)
    _, whole = train_score_net(net(), x0, NoiseSchedule(), config, seed=1, progress=False)
    assert chunked == whole
    assert seen == [10, 20]  # reported between rounds, not after the last


def test_sampled_numpy_values_become_plain_values_and_the_base_is_not_changed():
    base = {"train": {"steps": 10}}
    config = trial_overrides(base, {"t": np.int64(100), "train.lr": np.float64(5e-4)})
    assert config == {"t": 100, "train": {"steps": 10, "lr": 5e-4}} and type(config["t"]) is int
    assert base == {"train": {"steps": 10}}
    with pytest.raises(ConfigError, match="'t' is not a section"):
        trial_overrides({"t": 3}, {"t.x": 1})


@pytest.mark.slow  # trains a (tiny) real OSD-IRF
def test_a_trial_reports_between_rounds_and_after_fit_without_ray(tmp_path, monkeypatch):
    data = sweep_data(str(make_mvtec(tmp_path / "data", n_train=14)), False, str(tmp_path / "validation"))
    assert not {s.split for s in data.fit + data.calibration} & {"test"}
    assert any(s.defect == "synthetic" for s in data.validation)  # the MVTec train split has no anomalies
    # Which network each validation scored, and what it gave (the report must carry that round's value).
    scored: list[tuple[float, float]] = []
    real_validation = tuning.validation_auroc

    def spy(detector, samples):
        value = real_validation(detector, samples)
        fingerprint = sum(p.double().sum().item() for p in detector.score_net.parameters())
        scored.append((fingerprint, value))
        return value

    monkeypatch.setattr(tuning, "validation_auroc", spy)
    reports = []
    base = tiny_osd_irf_config(train={"steps": 12, "batch_size": 8, "warmup_steps": 2})
    run_trial({"t": 150}, "osd_irf", base, data, 3, None, reports.append)
    assert [r["score_net_step"] for r in reports] == [4, 8, -1]  # OSD-IRF rescores between rounds
    assert [r[METRIC] for r in reports] == [value for _, value in scored]
    assert len({fingerprint for fingerprint, _ in scored}) == 3  # each round scored its own (EMA) network


@pytest.mark.slow  # a fresh interpreter that imports torch
def test_the_sweep_logic_imports_no_ray():
    code = "import sys, ray_ad.tuning; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_report_names_the_best_trial_and_its_config_builds(tmp_path):
    space = parse_space({"params": {"t": {"choice": [150, 400]}, "train.lr": {"loguniform": [1e-4, 1e-3]}}})
    rows = [
        {"t": 150, "train.lr": 2e-4, METRIC: 0.7, "rounds": 3, "error": None},
        {"t": 400, "train.lr": 5e-4, METRIC: 0.9, "rounds": 3, "error": None},
        {"t": 400, "train.lr": 1e-4, METRIC: None, "rounds": 0, "error": "boom, again"},
    ]
    out = write_report(rows, "osd_irf", {"train": {"steps": 30}}, space, str(tmp_path))
    assert out["best"] == {"t": 400, "train.lr": 5e-4} and out["best_metric"] == 0.9
    lines = (tmp_path / "summary.csv").read_text().splitlines()
    assert lines == ["t,train.lr,val_image_auroc,rounds,error", "150,0.0002,0.7,3,", "400,0.0005,0.9,3,",
                     "400,0.0001,,0,boom; again"]
    best = yaml.safe_load((tmp_path / "best_config.yaml").read_text())
    assert best == {"t": 400, "train": {"steps": 30, "lr": 5e-4}}
    method_config("osd_irf", best)
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(DataError, match="every trial failed; first error: boom"):
        write_report(rows[2:], "osd_irf", {}, space, str(tmp_path))


@pytest.mark.parametrize("space,method", [("osd_irf_t.yaml", "osd_irf"), ("ref_cfa_losses.yaml", "ref_cfa"),
                                          ("costfilter.yaml", "costfilter")])
def test_every_shipped_space_builds_its_methods_config_at_every_bound(space, method):
    from ray_ad.tuning import load_space

    loaded = load_space(str(REPO / "configs" / "sweeps" / space))
    check_space(method, {}, loaded)  # raises, naming the key, if a swept value is no valid config
    assert loaded.params
    with pytest.raises(ConfigError, match="templates"):
        check_space("costfilter", {}, parse_space({"params": {"templates": {"choice": [0, 4]}}}))
