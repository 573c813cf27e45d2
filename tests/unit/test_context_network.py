"""OSD-IRF's context variant (ours, ``ray_ad/diffusion/context.py``): hidden cells predicted from the rest.

The toy of ``consistent_tile_split``: every cell of an image is the image's own vector, a few odd cells
another's. Per position all cells are N(0, I), so the per-position Gaussian cannot see the odd cells;
a network that predicts each cell from the others can.
"""

import pytest
import torch

from ray_ad.bundle import load_bundle, save_bundle
from ray_ad.data.toy_features import consistent_tile_split
from ray_ad.diffusion import DiT, NoiseSchedule
from ray_ad.diffusion.context import ContextNet, context_masks, context_residual
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime
from ray_ad.metrics import auroc
from ray_ad.training import ScoreNetLoop, TrainConfig
from tests.conftest import tiny_osd_irf_config

GRID = 4
BACKBONE = {"image_size": 64, "grid_size": GRID, "layers": [1]}  # 24 channels


def context_detector(steps: int, block: int = 1, **extra):
    config = tiny_osd_irf_config(backbone=BACKBONE, irf_input="context",
                                 normalisation={"kind": "position_whiten", "ridge": 0.01}, **extra)
    config["score_net"] = {"hidden": 32, "depth": 2, "heads": 2, "gaussian_skip": False}
    config["train"] = {"steps": steps, "batch_size": 64, "lr": 1e-3, "warmup_steps": 20, "ema_decay": 0.99,
                       "objective": "masked_context", "context_block": block}
    return build_detector("osd_irf", method_config("osd_irf", config))


def test_the_four_patterns_hide_every_cell_once_in_blocks():
    masks = context_masks(8, 2)
    assert masks.shape == (4, 1, 8, 8)
    assert torch.equal(masks.sum(0), torch.ones(1, 8, 8))
    assert (masks.flatten(1).sum(1) == 16).all()  # a quarter of the grid each
    first = masks[0, 0]
    assert first[:2, :2].eq(1).all() and first[:2, 2:4].eq(0).all() and first[4:6, 4:6].eq(1).all()
    for bad in (0, 5):
        with pytest.raises(ValueError, match=f"context_block .* got {bad}"):
            context_masks(8, bad)


def test_a_hidden_cell_is_predicted_without_its_own_value():
    torch.manual_seed(0)
    net = ContextNet(DiT(6, GRID, hidden=16, depth=1, heads=2), 6)
    torch.nn.init.normal_(net.net.out.weight)  # a network whose output is not zero
    for block in net.net.blocks:
        torch.nn.init.normal_(block.ada[-1].weight)
    x = torch.randn(2, 6, GRID, GRID)
    mask = context_masks(GRID, 1)[0].expand(2, 1, GRID, GRID)
    changed = x + 5.0 * mask * torch.randn_like(x)  # other values in the hidden cells only
    assert net(x, mask).abs().sum() > 0
    torch.testing.assert_close(net(changed, mask), net(x, mask))
    # ... while a visible cell's value does reach the prediction.
    assert not torch.allclose(net(x + (1 - mask), mask), net(x, mask))


def test_the_untrained_residual_is_the_whitened_feature_itself():
    detector = context_detector(steps=0)
    x0 = torch.randn(3, detector.extractor.out_channels, GRID, GRID)
    assert torch.equal(context_residual(detector.score_net, x0, 1), x0)
    gaussian_part, r = detector.irf_split(x0)
    assert torch.equal(gaussian_part[0], x0) and r.abs().max() == 0


def test_context_configs_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="gaussian_skip"):
        method_config("osd_irf", {**tiny_osd_irf_config(irf_input="context"),
                                  "train": {"objective": "masked_context"},
                                  "score_net": {"gaussian_skip": True}})
    with pytest.raises(ValueError, match="needs train.objective=masked_context"):
        method_config("osd_irf", tiny_osd_irf_config(irf_input="context"))
    with pytest.raises(ValueError, match="context_block must be in .* got 3"):
        context_detector(steps=0, block=3)  # a 4 x 4 grid holds two 2-cell blocks per side at most
    with pytest.raises(ValueError, match="train.objective must be one of"):
        TrainConfig(objective="contrast")
    with pytest.raises(ValueError, match="does not fit a DiT"):
        ScoreNetLoop(DiT(6, GRID, hidden=16, depth=1, heads=2), NoiseSchedule(),
                     TrainConfig(objective="masked_context"))
    with pytest.raises(ValueError, match="scoring=inversion"):
        context_detector(steps=0).set_scoring("inversion")


@pytest.mark.slow  # trains a toy context network, about 20 s
def test_trained_context_network_sees_cells_inconsistent_with_their_tile(tmp_path):
    gaussian = build_detector("gaussian", method_config("gaussian", {"backbone": BACKBONE, "device": "cpu",
                                                                      "map_sigma": 1.0}))
    train, calibration, test, labels = consistent_tile_split(gaussian.extractor.out_channels, GRID)
    gaussian.fit_features(train)
    gaussian.calibrate_features(calibration)
    assert auroc(gaussian.predict_features(test).pred_score.numpy(), labels.numpy()) < 0.65

    detector = context_detector(steps=400)
    detector.fit_features(train, len(train), Runtime(progress=False))
    detector.calibrate_features(calibration)
    scores = detector.predict_features(test).pred_score
    assert auroc(scores.numpy(), labels.numpy()) > 0.85
    # The bundle carries the context network (mask token included): same scores after a round trip.
    save_bundle(detector, str(tmp_path / "context"))
    torch.testing.assert_close(load_bundle(str(tmp_path / "context")).predict_features(test).pred_score, scores)
