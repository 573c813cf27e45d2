"""The CLI end to end on real images: a small slice of magnetic_tile written as a Parquet manifest."""

import json

import pytest

from ray_ad.cli import main
from ray_ad.data import load_samples, write_manifest
from tests.conftest import tiny_osd_irf_config
from tests.helpers import pairwise_auroc


def test_train_and_evaluate_on_real_magnetic_tile_images(magnetic_tile, tmp_path, capsys):
    samples = load_samples(str(magnetic_tile))
    train = [s for s in samples if s.split == "train"][:24]
    good = [s for s in samples if s.split == "test" and s.label == 0][:6]
    bad = [s for s in samples if s.split == "test" and s.label == 1][::60][:6]
    manifest = tmp_path / "slice.parquet"
    write_manifest(train + good + bad, str(manifest))

    config = tmp_path / "c.json"
    backbone = {"image_size": 128, "grid_size": 8, "layers": [1, 2, 3]}
    config.write_text(json.dumps(tiny_osd_irf_config(backbone=backbone)))
    model, report = tmp_path / "model", tmp_path / "m.json"
    assert main(["train", "--method", "osd_irf", "--data", str(manifest), "--out", str(model),
                 "--config", str(config), "--no-eval", "--quiet"]) == 0
    assert main(["evaluate", "--model", str(model), "--data", str(manifest), "--json", str(report),
                 "--quiet"]) == 0
    metrics = json.loads(report.read_text())
    # Real grayscale JPEGs of varying size with real masks: every metric is computed, and evaluate's
    # image AUROC is the pair count over what predict says of the same 12 images.
    assert all(isinstance(metrics[key], float) for key in ("pixel_auroc", "pixel_aupro", "pixel_ap"))
    assert metrics["seconds_per_image"] > 0
    capsys.readouterr()
    assert main(["predict", "--model", str(model), *(s.path for s in good + bad), "--json"]) == 0
    scores = {row["path"]: row["score"] for row in json.loads(capsys.readouterr().out)}
    assert metrics["image_auroc"] == pytest.approx(pairwise_auroc(scores, {s.path for s in bad}))
