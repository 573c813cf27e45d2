import json

import pytest
import torch

from ray_ad.bundle import load_bundle, read_metrics, save_bundle
from ray_ad.data import load_samples, split_calibration
from ray_ad.errors import BundleError
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime
from tests.conftest import tiny_osd_irf_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.conftest import make_mvtec

    root = make_mvtec(tmp_path_factory.mktemp("data") / "tiny")
    train, calibration = split_calibration(load_samples(str(root), "train"), 0.25)
    config = tiny_osd_irf_config(train={"steps": 10, "batch_size": 4, "warmup_steps": 2})
    detector = build_detector("osd_irf", method_config("osd_irf", config))
    detector.fit(train, calibration, Runtime(progress=False))
    return detector


def test_round_trip_gives_identical_predictions(trained, tmp_path):
    save_bundle(trained, str(tmp_path / "b"), {"image_auroc": 0.5})
    loaded = load_bundle(str(tmp_path / "b"))
    images = torch.randn(2, 3, 64, 64)
    a, b = trained.predict(images), loaded.predict(images)
    assert torch.equal(a.pred_score, b.pred_score) and torch.equal(a.anomaly_map, b.anomaly_map)
    assert loaded.threshold == trained.threshold and loaded.calibration == trained.calibration
    assert read_metrics(str(tmp_path / "b")) == {"image_auroc": 0.5}


def test_truncated_tampered_and_missing_bundles_are_refused(trained, tmp_path):
    uri = tmp_path / "b"
    save_bundle(trained, str(uri))
    weights = (uri / "weights.safetensors").read_bytes()
    (uri / "weights.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(BundleError, match="truncated"):
        load_bundle(str(uri))
    flipped = bytearray(weights)
    flipped[-1] ^= 0xFF
    (uri / "weights.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(str(uri))
    (uri / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match="incomplete"):
        load_bundle(str(uri))
    with pytest.raises(BundleError, match="no model bundle at"):
        load_bundle(str(tmp_path / "nothing"))


def test_config_edits_are_refused(trained, tmp_path):
    uri = tmp_path / "b"
    save_bundle(trained, str(uri))
    config_path = uri / "config.json"
    config_path.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(str(uri))
    save_bundle(trained, str(uri))
    config = json.loads(config_path.read_text())
    config["config"]["score_net"]["hidden"] = 64  # weights no longer fit
    config_path.write_text(json.dumps(config))
    with pytest.raises(BundleError, match="does not match its config"):
        load_bundle(str(uri))
    config["format_version"] = 99
    config_path.write_text(json.dumps(config))
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(str(uri))


def test_bundle_on_s3(trained, s3_bucket):
    save_bundle(trained, f"{s3_bucket}/models/line-a/v1")
    loaded = load_bundle(f"{s3_bucket}/models/line-a/v1")
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(trained.predict(images).pred_score, loaded.predict(images).pred_score)


def test_bundles_saved_before_a_config_key_load_with_what_they_were_fitted_under():
    from ray_ad.bundle import with_stored_defaults

    older = {"fields": {"timesteps": [300, 100]}, "seed": 1}
    assert with_stored_defaults("ref_cfa", older)["fields"]["last_reference"] == "previous"
    assert "last_reference" not in older["fields"]  # the stored config itself is left alone
    newer = {"fields": {"timesteps": [300, 100], "last_reference": "projection"}}
    assert with_stored_defaults("ref_cfa", newer)["fields"]["last_reference"] == "projection"
    assert with_stored_defaults("patchcore", {"seed": 1}) == {"seed": 1}  # no stored defaults
