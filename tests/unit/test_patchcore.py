import pytest
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


def test_predict_without_scores_as_a_memory_that_never_held_the_named_images(tiny_mvtec):
    from ray_ad.data.images import load_image

    samples = load_samples(str(tiny_mvtec))
    train, calibration = split_calibration([s for s in samples if s.split == "train"], 0.25)
    config = {"backbone": {"image_size": 64, "grid_size": 8, "layers": [1, 2]}, "bank_fraction": 1.0, "device": "cpu"}
    full = build_detector("patchcore", method_config("patchcore", config))
    full.fit(train, calibration, Runtime(progress=False))
    left_out = train[1:3]  # two training images, as a pool item's source and donor
    without = build_detector("patchcore", method_config("patchcore", config))
    without.fit([s for s in train if s not in left_out], calibration, Runtime(progress=False))
    unseen = next(s for s in samples if s.split == "test")
    images = full.preprocessor.batch([load_image(s.path) for s in (*left_out, unseen)])
    excluded = [tuple(s.path for s in left_out)] * 2 + [("not/a/training/image.png",)]
    leave_out = full.predict_without(images, excluded)
    # The two left-out images: exactly the memory fitted without them (their own cells would score 0).
    assert torch.allclose(leave_out.anomaly_map[:2], without.predict(images[:2]).anomaly_map, atol=1e-5)
    assert full.predict(images[:2]).pred_score.max() < 1e-4 < leave_out.pred_score[:2].min()
    # A path that names no training image excludes nothing.
    assert leave_out.pred_score[2] > 1.0
    assert torch.allclose(leave_out.anomaly_map[2], full.predict(images[2:]).anomaly_map[0], atol=1e-4)
    reloaded_error = "only a PatchCore fitted in this process"
    detector = build_detector("patchcore", method_config("patchcore", config))
    detector.load_tensors(full.tensors())
    with pytest.raises(ValueError, match=reloaded_error):
        detector.predict_without(images, excluded)
