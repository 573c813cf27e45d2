"""Sweep space files and the round-by-round trainer (no Ray needed)."""

from __future__ import annotations

import pytest
import torch

from ray_ad.diffusion import NoiseSchedule, ScoreNetConfig, build_score_net
from ray_ad.distributed.sweep import RoundTrainer, check_space, parse_space, trial_overrides
from ray_ad.errors import ConfigError
from ray_ad.training import TrainConfig, train_score_net


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
