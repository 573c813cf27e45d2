"""A line picks its own recipe without test labels (``ray_ad.selection``, ``ray-ad train --select``)."""

import json

import pytest
import yaml

from ray_ad.cli import main
from ray_ad.data import load_samples
from ray_ad.errors import ConfigError
from ray_ad.methods.gaussian.model import GaussianDetector
from ray_ad.selection import load_candidates, select_detector
from tests.conftest import make_mvtec

TINY = {"image_size": 64, "grid_size": 8, "layers": [1, 2]}


def write_candidates(path, candidates, **extra) -> str:
    path.write_text(yaml.safe_dump({"candidates": candidates, **extra}))
    return str(path)


def tiny_candidates() -> list[dict]:
    # A whole-image Gaussian (one cell) cannot see a small pasted defect that the 8 x 8 grid can.
    return [
        {"name": "one_cell", "method": "gaussian", "set": ["backbone.image_size=64", "backbone.grid_size=1",
                                                          "backbone.layers=[1, 2]", "device=cpu"]},
        {"name": "grid8", "method": "gaussian", "set": [f"backbone.{k}={v}" for k, v in TINY.items()] + ["device=cpu"]},
    ]


@pytest.mark.parametrize(("candidates", "message"), [
    ([], "non-empty 'candidates'"),
    ([{"method": "gaussian"}], "needs a name and a method"),
    ([{"name": "a", "method": "padim"}], "unknown method 'padim'"),
    ([{"name": "a", "method": "ref_cfa"}], "does not train on normal images alone"),
    ([{"name": "a", "method": "gaussian", "set": ["backbone.grid_size=0"]}], "grid_size must be positive"),
    ([{"name": "a", "method": "gaussian"}, {"name": "a", "method": "patchcore"}], "must be unique"),
    ([{"name": "a", "method": "gaussian", "sett": []}], "unknown keys ['sett']"),
])
def test_a_bad_candidates_file_is_refused_naming_the_value(tmp_path, candidates, message):
    with pytest.raises((ConfigError, ValueError), match=message.replace("[", r"\[").replace("]", r"\]")):
        load_candidates(write_candidates(tmp_path / "c.yaml", candidates))


def test_the_shipped_candidates_build():
    candidates, fraction = load_candidates(None)
    assert {c.method for c in candidates} >= {"gaussian", "patchcore", "osd_irf"} and fraction == 0.2


def test_a_candidate_config_file_is_read_beside_the_candidates_file(tmp_path):
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"backbone": {"grid_size": 4}}))
    [candidate], _ = load_candidates(write_candidates(tmp_path / "c.yaml", [
        {"name": "g", "method": "gaussian", "config": "g.yaml", "set": ["map_sigma=2"]}]))
    assert candidate.config == {"backbone": {"grid_size": 4}, "map_sigma": 2}


@pytest.mark.slow  # fits two detectors
def test_selection_ranks_on_held_out_normals_only_and_keeps_the_better_recipe(tmp_path, monkeypatch):
    data = make_mvtec(tmp_path / "data", n_train=40, n_good=4, n_bad=4)
    candidates, fraction = load_candidates(write_candidates(tmp_path / "c.yaml", tiny_candidates()))
    fitted_on: dict[str, list[str]] = {}
    real_fit = GaussianDetector.fit

    def spy(self, train, calibration, runtime=None):
        fitted_on[f"grid {self.config.backbone.grid_size}"] = [s.path for s in train + calibration]
        return real_fit(self, train, calibration, runtime)

    monkeypatch.setattr(GaussianDetector, "fit", spy)
    selection = select_detector(candidates, str(data), holdout_fraction=fraction)
    figures = selection.metrics["selection"]
    assert selection.winner == "grid8" == figures["winner"]
    assert figures["candidates"]["grid8"]["validation_auroc"] > figures["candidates"]["one_cell"]["validation_auroc"]
    # Both fitted on the same training normals; neither saw a held-out or a test image.
    train_split = {s.path for s in load_samples(str(data), "train")}
    assert fitted_on["grid 8"] == fitted_on["grid 1"] and set(fitted_on["grid 8"]) < train_split
    assert figures["held_out_images"] == 8 and len(fitted_on["grid 8"]) + 8 == 40  # 40 train normals
    assert selection.detectors["grid8"] is not selection.detectors["one_cell"]


@pytest.mark.slow  # fits two detectors
def test_train_select_writes_the_winner_with_every_candidates_figure(tmp_path, capsys):
    data = make_mvtec(tmp_path / "data", n_train=40, n_good=4, n_bad=4)
    candidates = write_candidates(tmp_path / "c.yaml", tiny_candidates())
    out = tmp_path / "model"
    assert main(["train", "--select", candidates, "--data", str(data), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "grid8" in printed and "<- selected" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selection"]["winner"] == "grid8"
    assert set(metrics["selection"]["candidates"]) == {"grid8", "one_cell"}
    assert "image_auroc" in metrics  # the test split, scored after the choice
    with pytest.raises(SystemExit):  # a method or a selection, not both
        main(["train", "--method", "gaussian", "--select", candidates, "--data", str(data), "--out", str(out)])
