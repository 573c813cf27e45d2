"""CostFilter-AD: the cost volume, the filter's shapes, the loss, the synthetic pool and the plug-in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ray_ad.bundle import load_bundle, save_bundle
from ray_ad.data.synthetic import pasted_anomaly
from ray_ad.errors import BundleError, ConfigError
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime
from ray_ad.methods.costfilter.loss import LossWeights, costfilter_loss, soft_iou_loss, ssim_loss
from ray_ad.methods.costfilter.model import pool_shares
from ray_ad.methods.costfilter.network import CostFilterNet, FilterNetConfig
from ray_ad.methods.costfilter.templates import TemplateBank
from ray_ad.methods.costfilter.volume import cost_volume, initial_map, layer_costs, split_layers
from ray_ad.pipeline import train_detector
from tests.conftest import tiny_costfilter_config


# ---------------------------------------------------------------- the cost volume (Sec. 3.2)
def test_a_query_equal_to_a_template_costs_nothing_at_the_matching_cells():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 6, 3, 3, generator=generator)
    other = torch.randn(6, 3, 3, generator=generator)
    costs = layer_costs(query, torch.stack([other, query[0]]), depth=4)  # template 1 is the query itself
    assert costs.shape == (1, 4, 3, 3)
    assert costs[:, 0].abs().max() < 1e-6  # each cell's nearest match: its own copy, cost 1 - cos = 0
    assert (costs[:, 1:] > 1e-3).all()  # random vectors are nowhere near parallel
    assert (costs.diff(dim=1) >= 0).all()  # kept in ascending order


def test_top_d_keeps_exactly_the_d_smallest_costs_of_every_query_cell():
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(2, 5, 2, 3, generator=generator)
    templates = torch.randn(2, 3, 5, 2, 3, generator=generator)  # each query has its own 3 templates
    kept = layer_costs(query, templates, depth=7)
    for b in range(2):
        for y in range(2):
            for x in range(3):
                q = query[b, :, y, x]
                every = [1 - torch.nn.functional.cosine_similarity(q, templates[b, n, :, j, i], dim=0)
                         for n in range(3) for j in range(2) for i in range(3)]  # Eqs. 1-2 by hand
                assert torch.allclose(kept[b, :, y, x], torch.stack(every).sort().values[:7], atol=1e-5)


def test_volume_stacks_layers_as_depth_and_the_initial_map_is_the_nearest_cost():
    generator = torch.Generator().manual_seed(2)
    channels = [4, 6]
    query = torch.randn(2, 10, 4, 4, generator=generator)
    templates = torch.randn(3, 10, 4, 4, generator=generator)  # shared by the batch
    volume = cost_volume(split_layers(query, channels), split_layers(templates, channels), depth=5)
    assert volume.shape == (2, 5, 2, 4, 4)  # [B, D, L, H', W']
    assert torch.equal(initial_map(volume), volume[:, 0])
    with pytest.raises(ValueError, match="D = 49"):
        layer_costs(query[:, :4], templates[:, :4], depth=49)  # N * H' * W' = 48
    with pytest.raises(ValueError, match="do not add up"):
        split_layers(query, [4, 5])


# ---------------------------------------------------------------- the filter (Sec. 3.3-3.4)
@pytest.mark.parametrize("grid,batch", [(8, 2), (10, 1), (16, 3)])
@pytest.mark.parametrize("ablation", [{}, {"spatial_guidance": False, "matching_guidance": False, "rcsa": False},
                                      {"base_guidance": False}])
def test_shapes_through_the_unet(grid, batch, ablation):
    # Seeded: about 1 in 100 random inits of a filter this narrow (width 4) has its map within 1e-4 of
    # constant before any training, which the liveness check below would call dead.
    torch.manual_seed(0)
    channels, depth = [4, 6, 8], 6
    net = CostFilterNet(depth, channels, FilterNetConfig(width=4, levels=3, guidance_width=2, **ablation), classes=3)
    volume = torch.rand(batch, depth, len(channels), grid, grid)
    query = [torch.randn(batch, c, grid, grid) for c in channels]
    anomaly_map, logits = net(volume, query, initial_map(volume), torch.rand(batch, grid, grid))
    assert anomaly_map.shape == (batch, grid, grid)
    assert ((anomaly_map > 0) & (anomaly_map < 1)).all()  # the softmax's anomaly channel
    # The min over channels of Eq. 4 must carry the input: a map that is constant over space is a dead filter.
    assert anomaly_map.flatten(1).std(1).min() > 1e-4
    assert logits.shape == (batch, 3)  # the class-aware adaptor
    with pytest.raises(ValueError, match="does not match the filter"):
        net(volume[:, :5], query, initial_map(volume), torch.rand(batch, grid, grid))


def test_an_unguided_filter_has_no_guidance_projectors():
    full = CostFilterNet(4, [3, 5], FilterNetConfig(width=4, levels=2))
    bare = CostFilterNet(4, [3, 5], FilterNetConfig(width=4, levels=2, spatial_guidance=False,
                                                    matching_guidance=False, rcsa=False, base_guidance=False))
    assert sum(p.numel() for p in bare.parameters()) < sum(p.numel() for p in full.parameters())
    assert all(level.h_map is None and level.h_query is None for level in bare.encoder)


def test_a_base_guided_filter_reads_the_base_map_and_refuses_to_run_without_it():
    torch.manual_seed(0)
    channels, depth, grid = [3, 5], 4, 8
    net = CostFilterNet(depth, channels, FilterNetConfig(width=4, levels=2, base_guidance=True)).eval()
    volume = torch.rand(2, depth, len(channels), grid, grid)
    query = [torch.randn(2, c, grid, grid) for c in channels]
    with pytest.raises(ValueError, match="guided by the base's map"):
        net(volume, query, initial_map(volume))
    with pytest.raises(ValueError, match=r"shape \[2, 8, 8\]"):
        net(volume, query, initial_map(volume), torch.rand(2, 4, 4))
    quiet, loud = torch.zeros(2, grid, grid), torch.zeros(2, grid, grid)
    loud[:, 2:4, 2:4] = 3.0  # the base flags a corner
    with torch.no_grad():
        a, _ = net(volume, query, initial_map(volume), quiet)
        b, _ = net(volume, query, initial_map(volume), loud)
    assert (a - b).abs().amax() > 1e-4  # the base's map reaches the output


# ---------------------------------------------------------------- the loss (Eq. 5)
def test_loss_terms_vanish_for_a_perfect_map_and_grow_for_a_wrong_one():
    mask = torch.zeros(2, 16, 16)
    mask[:, 4:9, 6:12] = 1.0
    assert soft_iou_loss(mask, mask) < 1e-6
    assert ssim_loss(mask, mask) < 1e-6
    good, terms_good = costfilter_loss(mask.clamp(0.01, 0.99), mask, LossWeights())
    bad, terms_bad = costfilter_loss((1 - mask).clamp(0.01, 0.99), mask, LossWeights())
    assert bad > 10 * good
    assert all(terms_bad[name] > terms_good[name] for name in ("focal", "soft_iou", "ssim", "mse"))


def test_the_class_aware_adaptor_lowers_gamma_only_where_it_classifies_right():
    prob = torch.full((2, 4, 4), 0.3)
    mask = torch.zeros(2, 4, 4)
    right = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])  # classes 0 and 1, both right
    wrong = torch.tensor([[-5.0, 5.0], [5.0, -5.0]])
    classes = torch.tensor([0, 1])
    weights = LossWeights(ssim=0, soft_iou=0, mse=0, ce=0)
    _, with_right = costfilter_loss(prob, mask, weights, right, classes)
    _, with_wrong = costfilter_loss(prob, mask, weights, wrong, classes)
    _, single = costfilter_loss(prob, mask, weights)
    assert with_wrong["focal"] == pytest.approx(single["focal"])  # gamma0 when the adaptor is wrong
    assert with_right["focal"] > single["focal"]  # smaller gamma: (0.3)^gamma weighs more
    with pytest.raises(ValueError, match="gamma0"):
        LossWeights(gamma0=0.5)


# ---------------------------------------------------------------- synthetic anomalies and templates
def test_the_synthetic_masks_are_exactly_the_pasted_pixels():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    donor = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    seen = set()
    for _ in range(12):
        anomalous, mask, source = pasted_anomaly(image, donor, rng)
        seen.add(source)
        assert mask.any()
        assert np.array_equal(mask, (anomalous != image).any(-1))
    assert seen == {"texture", "shuffle"}
    with pytest.raises(ValueError, match="fill sources"):
        pasted_anomaly(image, donor, rng, sources=["dtd"])


def test_the_subtle_source_pastes_small_defects_whose_mask_is_the_changed_pixels():
    rng = np.random.default_rng(5)
    image = rng.integers(60, 200, (64, 64, 3), dtype=np.uint8)
    donor = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for _ in range(20):
        anomalous, mask, source = pasted_anomaly(image, donor, rng, sources=["subtle"])
        assert source == "subtle"
        assert mask.any() and mask.mean() < 0.1  # a small defect, where a Perlin blob covers up to half
        assert np.array_equal(mask, (anomalous != image).any(-1))


def test_templates_are_the_nearest_bank_images_and_training_never_draws_the_query_itself():
    generator = torch.Generator().manual_seed(4)
    bank = TemplateBank(torch.rand(6, 5, 3, 3, generator=generator), [2, 3])
    query = bank.features[[4, 1]] + 0.001
    assert bank.nearest(query, 1)[:, 0].tolist() == [4, 1]
    for _ in range(20):
        drawn = bank.random(torch.tensor([2, -1, 5]), 5, generator)
        assert 2 not in drawn[0].tolist() and 5 not in drawn[2].tolist()
        assert all(len(set(row.tolist())) == 5 for row in drawn)
    with pytest.raises(ValueError, match="N = 7"):
        bank.nearest(query, 7)
    with pytest.raises(ValueError, match="another backbone"):
        TemplateBank(torch.rand(6, 4, 3, 3), [2, 3])


# ---------------------------------------------------------------- config errors
@pytest.mark.parametrize("values,message", [
    ({"templates": 0}, "templates"),
    ({"matching_depth": 129}, "matching_depth"),  # N * cells = 2 * 64
    ({"template_bank": 1}, "template_bank"),
    ({"base": {"method": "ref_cfa"}}, "base.method 'ref_cfa'"),
    ({"fusion": 1.5}, "fusion"),
])
def test_bad_config_values_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        method_config("costfilter", tiny_costfilter_config(**values))


def test_base_and_filter_must_read_the_same_input():
    config = tiny_costfilter_config(base={"method": "patchcore", "config": {"backbone": {"image_size": 96}}})
    with pytest.raises(ConfigError, match="96 px"):
        build_detector("costfilter", method_config("costfilter", config))


# ---------------------------------------------------------------- end to end
@pytest.mark.slow
def test_fit_predict_and_bundle_round_trip(tiny_mvtec: Path, tmp_path: Path):
    detector, metrics = train_detector("costfilter", str(tiny_mvtec), tiny_costfilter_config(), runtime=Runtime(False))
    fit = metrics["fit"]
    assert fit["steps"] == 30 and fit["template_bank"] == 8 and fit["pool"] == 24
    assert 0 < fit["pool_anomalous"] < 24
    assert metrics["image_auroc"] > 0.9  # bright squares on stripes: the kNN base alone finds them
    images = torch.stack([detector.preprocess(__import__("PIL.Image").Image.open(p).convert("RGB"))
                          for p in sorted((tiny_mvtec / "test" / "spot").glob("*.png"))])
    save_bundle(detector, str(tmp_path / "bundle"), metrics)
    loaded = load_bundle(str(tmp_path / "bundle"))
    before, after = detector.predict(images), loaded.predict(images)
    assert torch.equal(before.pred_score, after.pred_score)
    assert torch.equal(before.anomaly_map, after.anomaly_map)
    assert loaded.threshold == detector.threshold and loaded.base.threshold == detector.base.threshold
    alone = loaded.predict(images[:1]).pred_score  # the batch-of-one path scores as in a batch
    assert torch.allclose(alone, after.pred_score[:1], atol=1e-5)


@pytest.mark.slow
def test_a_base_guided_filter_trains_on_the_base_maps_of_its_pool_and_round_trips(tiny_mvtec: Path, tmp_path: Path):
    config = tiny_costfilter_config(filter={"width": 8, "levels": 2, "guidance_width": 4, "base_guidance": True})
    detector, metrics = train_detector("costfilter", str(tiny_mvtec), config, runtime=Runtime(False))
    assert metrics["image_auroc"] > 0.9
    images = torch.stack([detector.preprocess(__import__("PIL.Image").Image.open(p).convert("RGB"))
                          for p in sorted((tiny_mvtec / "test" / "spot").glob("*.png"))])
    base_cells = detector.base_cells(detector.base.predict(images).anomaly_map)
    assert base_cells.shape == (len(images), 8, 8)
    save_bundle(detector, str(tmp_path / "bundle"), metrics)
    loaded = load_bundle(str(tmp_path / "bundle"))
    assert loaded.base_guided and torch.equal(loaded.predict(images).anomaly_map, detector.predict(images).anomaly_map)


@pytest.mark.slow
def test_a_trained_base_bundle_is_reused_and_bad_bases_are_refused(tiny_mvtec: Path, tmp_path: Path):
    base, _ = train_detector("patchcore", str(tiny_mvtec), tiny_costfilter_config()["base"]["config"] | {
        "device": "cpu"}, runtime=Runtime(False), evaluate=False)
    save_bundle(base, str(tmp_path / "base"))
    config = tiny_costfilter_config(base={"model": str(tmp_path / "base")})
    detector, _ = train_detector("costfilter", str(tiny_mvtec), config, runtime=Runtime(False), evaluate=False)
    assert torch.equal(detector.base.bank, base.bank)  # the bundle's memory, not a new fit
    with pytest.raises(BundleError, match="no model bundle"):
        train_detector("costfilter", str(tiny_mvtec), tiny_costfilter_config(base={"model": str(tmp_path / "nope")}),
                       runtime=Runtime(False), evaluate=False)
    save_bundle(detector, str(tmp_path / "cf"))
    with pytest.raises(ConfigError, match="is a costfilter bundle"):
        train_detector("costfilter", str(tiny_mvtec), tiny_costfilter_config(base={"model": str(tmp_path / "cf")}),
                       runtime=Runtime(False), evaluate=False)


# ---------------------------------------------------------------- the fleet filter (one filter, several lines)
def test_a_fleet_bank_draws_every_query_templates_from_its_own_line_and_the_pool_points_into_it():
    from ray_ad.methods.costfilter.pool import SyntheticPool

    bank = TemplateBank(torch.rand(7, 5, 2, 2), [2, 3], classes=torch.tensor([0, 0, 0, 1, 1, 1, 1]))
    generator = torch.Generator().manual_seed(0)
    classes = torch.tensor([0, 1] * 50)
    exclude = torch.tensor([1, 4] * 50)  # each query's own source image in the concatenated bank
    chosen = bank.random(exclude, 2, generator, classes)
    assert (bank.classes[chosen] == classes[:, None]).all()  # never another line's templates
    assert not (chosen == exclude[:, None]).any()
    with pytest.raises(ValueError, match="has no classes"):
        TemplateBank(torch.rand(7, 5, 2, 2), [2, 3]).random(exclude[:2], 2, generator, classes[:2])
    a = SyntheticPool(torch.rand(3, 5, 2, 2), torch.zeros(3, 4, 4), torch.tensor([0, -1, 2]))
    b = SyntheticPool(torch.rand(2, 5, 2, 2), torch.zeros(2, 4, 4), torch.tensor([1, 3]))
    fleet = SyntheticPool.fleet([a, b], [3, 4])
    assert fleet.sources.tolist() == [0, -1, 2, 4, 6] and fleet.classes.tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="disagree on base guidance"):
        SyntheticPool.fleet([a, SyntheticPool(b.features, b.masks, b.sources, torch.zeros(2, 2, 2))], [3, 4])


@pytest.mark.slow
def test_one_fleet_filter_serves_two_lines_each_bundle_complete_on_its_own(tmp_path: Path):
    from ray_ad.data import training_split
    from ray_ad.methods.costfilter.fleet import train_fleet_filter
    from tests.conftest import make_mvtec

    lines = []
    for k in range(2):
        data = make_mvtec(tmp_path / f"line{k}", seed=k)
        train, calibration = training_split(str(data), 0.25)
        lines.append((build_detector("costfilter", method_config("costfilter", tiny_costfilter_config())), train,
                      calibration))
    bad = build_detector("costfilter", method_config("costfilter", tiny_costfilter_config(templates=3)))
    with pytest.raises(ConfigError, match="templates = 3"):
        train_fleet_filter([lines[0], (bad, *lines[1][1:])], Runtime(False))
    report = train_fleet_filter(lines, Runtime(False))
    first, second = (detector for detector, _, _ in lines)
    assert [r["fleet_line"] for r in report["lines"]] == [0, 1] and report["template_bank"] == 16
    assert first.filter.adaptor is not None and first.filter.adaptor.out_features == 2  # class-aware adaptor
    for a, b in zip(first.filter.state_dict().values(), second.filter.state_dict().values()):
        assert torch.equal(a, b)  # one filter, two copies
    assert not torch.equal(first.bank.features, second.bank.features)  # each line keeps its own templates
    images = torch.stack([first.preprocess(__import__("PIL.Image").Image.open(p).convert("RGB"))
                          for p in sorted((tmp_path / "line1" / "test" / "spot").glob("*.png"))])
    save_bundle(second, str(tmp_path / "bundle"))
    loaded = load_bundle(str(tmp_path / "bundle"))
    assert loaded.config.filter.classes == 2
    assert torch.equal(loaded.predict(images).anomaly_map, second.predict(images).anomaly_map)


@pytest.mark.slow
def test_the_pool_takes_its_base_maps_from_a_base_that_never_saw_the_pool_images(tiny_mvtec: Path):
    from ray_ad.data import training_split

    train, calibration = training_split(str(tiny_mvtec), 0.25)
    backbone = tiny_costfilter_config()["backbone"]
    base = {"method": "patchcore", "config": {"backbone": backbone, "bank_fraction": 1.0}}
    normal_levels, lowest = {}, {}
    for pool_base in ("same", "held_out", "auto", "cross_fit", "leave_one_out"):
        config = tiny_costfilter_config(base=base, train={"steps": 1, "batch_size": 4, "pool_size": 24,
                                                          "loss_size": 32, "pool_base": pool_base, "pool_folds": 3})
        detector = build_detector("costfilter", method_config("costfilter", config))
        parts = detector.prepare(train, calibration, Runtime(False))
        assert len(parts.pool) == 24
        normal = parts.pool.masks.flatten(1).amax(1) == 0
        normal_levels[pool_base] = float(parts.pool.base_maps[normal].mean())
        lowest[pool_base] = float(parts.pool.base_maps[normal].flatten(1).mean(1).min())
        # auto: a patchcore base is a memory of training patches, so its pool takes a held-out base;
        # cross_fit makes the pool from every training image, each fold mapped by the other folds' base
        held_out_images = len(train) - len(train) // 2
        assert parts.pool_images == (held_out_images if pool_base in ("held_out", "auto") else len(train))
    # The line's own kNN base matches its training images exactly: 0 outside the pasted defects, a map no
    # test image ever gets. The held-out base scores them as the unseen images they are to it.
    assert normal_levels["same"] < 1e-3 < 0.1 < normal_levels["held_out"] == normal_levels["auto"]
    # Cross-fitted: no normal pool item is mapped by a base that holds its image (that item would sit at 0).
    assert lowest["same"] < 1e-3 < 0.05 < lowest["cross_fit"]
    # Leave-one-out: every training image joins the pool and no normal item is matched with its own cells.
    assert lowest["same"] < 1e-3 < 0.05 < lowest["leave_one_out"]


def test_leave_one_out_pool_maps_need_a_memory_base_fitted_in_the_same_call(tiny_mvtec: Path, tmp_path: Path):
    from ray_ad.data import training_split

    train, calibration = training_split(str(tiny_mvtec), 0.25)
    backbone = tiny_costfilter_config()["backbone"]
    pool = {"steps": 1, "batch_size": 4, "pool_size": 8, "loss_size": 32, "pool_base": "leave_one_out"}
    gaussian = tiny_costfilter_config(base={"method": "gaussian", "config": {"backbone": backbone}}, train=pool)
    with pytest.raises(ValueError, match="needs a memory base.*'gaussian'"):
        build_detector("costfilter", method_config("costfilter", gaussian)).prepare(train, calibration, Runtime(False))
    base = build_detector("patchcore", method_config("patchcore", {"backbone": backbone, "device": "cpu"}))
    base.fit(train, calibration, Runtime(False))
    save_bundle(base, str(tmp_path / "base"))
    saved = tiny_costfilter_config(base={"method": "patchcore", "model": str(tmp_path / "base")}, train=pool)
    with pytest.raises(ValueError, match="base.model .*base'.* is a saved bundle"):
        build_detector("costfilter", method_config("costfilter", saved)).prepare(train, calibration, Runtime(False))


def test_pool_shares_split_the_pool_over_its_parts_by_their_image_counts():
    assert pool_shares(512, [761]) == [512]
    assert pool_shares(10, [3, 3, 3]) == [4, 3, 3]
    assert pool_shares(24, [5, 5, 4]) == [9, 8, 7]
    assert sum(pool_shares(512, [153, 152, 152, 152, 152])) == 512


@pytest.mark.slow
def test_a_base_with_the_filter_backbone_scores_the_filter_features_instead_of_a_second_pass(tiny_mvtec: Path):
    backbone = {"image_size": 64, "grid_size": 8, "layers": [1], "local_pool": 3}
    config = tiny_costfilter_config(backbone=backbone, base={"method": "gaussian", "config": {"backbone": backbone}})
    detector, _ = train_detector("costfilter", str(tiny_mvtec), config, runtime=Runtime(False), evaluate=False)
    assert detector.shares_features
    images = torch.stack([detector.preprocess(__import__("PIL.Image").Image.open(p).convert("RGB"))
                          for p in sorted((tiny_mvtec / "test" / "spot").glob("*.png"))])
    calls = []
    detector.base.extractor.register_forward_hook(lambda *args: calls.append(1))
    from_features = detector.base.predict_features(detector.extractor(images))
    torch.testing.assert_close(from_features.anomaly_map, detector.base.predict(images).anomaly_map)
    calls.clear()
    detector.predict(images)
    assert not calls  # the base's own backbone never ran: one pass served both
    other = dict(backbone, local_pool=5)
    config = tiny_costfilter_config(backbone=backbone, base={"method": "patchcore", "config": {"backbone": other}})
    assert not build_detector("costfilter", method_config("costfilter", config)).shares_features


# ---------------------------------------------------------------- reconstruction-based templates
def reconstruction_config(**extra: object) -> dict:
    """A CostFilter line whose templates include its OSD-IRF base's reconstructions (same backbone)."""
    backbone = {"image_size": 64, "grid_size": 8, "layers": [1], "local_pool": 3}
    base = {"backbone": backbone, "normalisation": {"kind": "position_whiten"}, "t": 250,
            "score_net": {"hidden": 16, "depth": 1, "heads": 2, "gaussian_skip": True}, "train": {"steps": 0}}
    return tiny_costfilter_config(backbone=backbone, base={"method": "osd_irf", "config": base},
                                  template_source="reconstruction", **extra)


@pytest.mark.slow
def test_reconstruction_templates_are_the_osd_irf_base_tweedie_estimates_and_round_trip(tiny_mvtec: Path,
                                                                                        tmp_path: Path):
    from ray_ad.data import training_split

    detector, _ = train_detector("costfilter", str(tiny_mvtec), reconstruction_config(), runtime=Runtime(False),
                                 evaluate=False)
    images = torch.stack([detector.preprocess(__import__("PIL.Image").Image.open(p).convert("RGB"))
                          for p in sorted((tiny_mvtec / "test" / "spot").glob("*.png"))])
    query = detector.extractor(images)
    templates = detector.templates_for(query)
    assert templates.shape == (len(images), 2, *query.shape[1:])
    # An untrained network behind the Gaussian skip is N(0, I)'s exact denoiser, whose Tweedie estimate
    # of whitened features z is alpha_bar_t z: in feature space each cell shrunk towards its position's mean.
    mean = detector.base.normaliser.mean.permute(2, 0, 1)
    alpha_bar = float(detector.base.schedule.alpha_bar(250, query.device))
    assert torch.allclose(templates[:, -1], mean + alpha_bar * (query - mean), atol=1e-3)
    assert torch.equal(templates[:, 0], detector.bank.gather(detector.bank.nearest(query, 1))[:, 0])
    # One network pass gives the base's prediction and its reconstruction, as the two separate calls do.
    prediction, reconstruction = detector.base.predict_and_reconstruct(query)
    assert torch.equal(reconstruction, detector.base.reconstruct_features(query))
    alone = detector.base.predict_features(query)
    assert torch.equal(prediction.pred_score, alone.pred_score) and torch.equal(prediction.anomaly_map,
                                                                                alone.anomaly_map)
    calls = []
    detector.base.score_net.register_forward_hook(lambda *args: calls.append(1))
    detector.predict(images)
    assert len(calls) == 1  # the line's prediction runs the base's network once per batch
    # The training pool carries the same base's reconstruction of each of its items.
    train, calibration = training_split(str(tiny_mvtec), 0.25)
    fresh = build_detector("costfilter", method_config("costfilter", reconstruction_config()))
    pool = fresh.prepare(train, calibration, Runtime(False)).pool
    assert torch.allclose(pool.reconstructions, fresh.base.reconstruct_features(pool.features), atol=1e-5)
    save_bundle(detector, str(tmp_path / "bundle"))
    loaded = load_bundle(str(tmp_path / "bundle"))
    assert torch.equal(loaded.predict(images).anomaly_map, detector.predict(images).anomaly_map)


def test_reconstruction_templates_need_an_osd_irf_base_on_the_filter_backbone():
    with pytest.raises(ConfigError, match="needs a base that reconstructs.*patchcore"):
        build_detector("costfilter", method_config("costfilter", tiny_costfilter_config(
            template_source="reconstruction")))
    config = reconstruction_config()
    config["base"]["config"]["backbone"] = {**config["base"]["config"]["backbone"], "grid_size": 4}
    with pytest.raises(ConfigError, match="filter's backbone config"):
        build_detector("costfilter", method_config("costfilter", config))
    with pytest.raises(ConfigError, match="template_source"):
        method_config("costfilter", tiny_costfilter_config(template_source="reconstructions"))


def test_training_takes_each_pool_item_reconstruction_as_its_last_template(monkeypatch):
    from ray_ad.methods.costfilter import training
    from ray_ad.methods.costfilter.config import FilterTrainConfig
    from ray_ad.methods.costfilter.network import Matching
    from ray_ad.methods.costfilter.pool import SyntheticPool

    generator = torch.Generator().manual_seed(3)
    features = torch.rand(8, 10, 4, 4, generator=generator)
    seen, forward = [], training.filter_forward

    def recording(model, matching, query, templates, base_cells=None):
        seen.append((query.clone(), templates.clone()))
        return forward(model, matching, query, templates, base_cells)

    monkeypatch.setattr(training, "filter_forward", recording)
    bank = TemplateBank(torch.rand(5, 10, 4, 4, generator=generator), [4, 6])
    net = CostFilterNet(6, [4, 6], FilterNetConfig(width=4, levels=2, guidance_width=2, base_guidance=False))
    masks = torch.zeros(8, 16, 16)
    for reconstructions in (features, None):  # a reconstruction equal to its item: the query itself
        seen.clear()
        pool = SyntheticPool(features, masks, torch.full((8,), -1), reconstructions=reconstructions)
        loop = training.FilterLoop(net, pool, bank, Matching((4, 6), templates=2, depth=6),
                                   FilterTrainConfig(steps=2, batch_size=3, loss_size=16), LossWeights(), "cpu", 0)
        loop.run(progress=False)
        matches = [torch.equal(templates[:, -1], query) for query, templates in seen]
        assert len(seen) == 2 and all(matches) == (reconstructions is not None) and any(matches) == all(matches)
