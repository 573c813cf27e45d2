import torch

from ray_ad.bundle import load_bundle, save_bundle
from ray_ad.data import load_samples, split_calibration
from ray_ad.evaluation import compute_metrics, run_detector
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime


def test_nearest_neighbour_baseline_finds_generated_defects_and_round_trips(tiny_mvtec, tmp_path):
    samples = load_samples(str(tiny_mvtec))
    train, calibration = split_calibration([s for s in samples if s.split == "train"], 0.25)
    config = method_config("patchcore", {"backbone": {"image_size": 64, "grid_size": 8, "layers": [1, 2]},
                                         "bank_fraction": 1.0, "device": "cpu"})
    detector = build_detector("patchcore", config)
    info = detector.fit(train, calibration, Runtime(progress=False))
    assert info["bank_size"] == len(train) * 64
    metrics = compute_metrics(run_detector(detector, [s for s in samples if s.split == "test"], progress=False))
    assert metrics["image_auroc"] >= 0.9
    save_bundle(detector, str(tmp_path / "pc"))
    images = torch.randn(2, 3, 64, 64)
    reloaded = load_bundle(str(tmp_path / "pc"))
    assert torch.equal(reloaded.predict(images).pred_score, detector.predict(images).pred_score)
