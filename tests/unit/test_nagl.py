"""NAGL: the attention mask, the per-sample mask layout, S_n, references and the bundle round trip."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ray_ad.bundle import load_bundle, save_bundle
from ray_ad.data import load_samples
from ray_ad.errors import ConfigError, DataError
from ray_ad.methods import build_detector
from ray_ad.methods.base import Runtime
from ray_ad.methods.nagl.config import EpisodeConfig
from ray_ad.methods.nagl.episodes import DomainPool, build_domain_pool, cell_mask, sample_episodes
from ray_ad.methods.nagl.model import NoReferences
from ray_ad.methods.nagl.network import (
    NAGLNet,
    ResidualMining,
    abnormal_attention_mask,
    branch_maps,
    score_maps,
    sine_positions,
)
from ray_ad.methods.nagl.references import build_references
from ray_ad.methods.nagl.scoring import (
    cells,
    centred_anomaly_score,
    defect_region,
    nearest_normal,
    normal_guided_score,
    reference_statistics,
    residual,
    standardised,
    top_mean,
)
from tests.conftest import tiny_nagl_config


def test_rm_mask_excludes_cells_outside_the_abnormal_region() -> None:
    torch.manual_seed(0)
    rm = ResidualMining(dim=8, proxies=3, heads=2, alpha=-1e9).eval()
    F_a, res_a = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    M_a = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    with torch.no_grad():
        before = rm(F_a, res_a, M_a)
        outside = F_a.clone(), res_a.clone()
        outside[0][0, 2:] += 5 * torch.randn(2, 8)
        outside[1][0, 2:] += 5 * torch.randn(2, 8)
        inside = F_a.clone(), res_a.clone()
        inside[1][0, 0] += 5 * torch.randn(8)
        torch.testing.assert_close(rm(*outside, M_a), before)  # cells outside the mask are never attended
        assert not torch.allclose(rm(*inside, M_a), before, atol=1e-3)  # a cell inside is


def test_mask_layout_is_per_sample_not_tiled() -> None:
    masks = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    layout = abnormal_attention_mask(masks, queries=2, heads=3, alpha=-1.0)
    assert layout.shape == (6, 2, 3)
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(layout[b * 3 + h], (-1.0 * (1 - masks[b])).expand(2, 3))
    # The authors' repeat() tiles the batch per head: row 1 (sample 0, head 1) would get sample 1's mask.
    tiled = (-1.0 * (1 - masks))[:, None, :].expand(-1, 2, -1).repeat(3, 1, 1)
    torch.testing.assert_close(tiled[1], layout[3])
    assert not torch.equal(tiled[1], layout[1])


def test_batched_rm_equals_each_sample_alone() -> None:
    torch.manual_seed(1)
    rm = ResidualMining(dim=8, proxies=3, heads=4, alpha=-1e9).eval()
    F_a, res_a = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    M_a = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 1.0, 1.0]])
    with torch.no_grad():
        both = rm(F_a, res_a, M_a)
        for b in range(2):
            torch.testing.assert_close(both[b : b + 1], rm(F_a[b : b + 1], res_a[b : b + 1], M_a[b : b + 1]))


def test_normal_score_has_the_known_nearest_neighbour() -> None:
    normal = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    query = torch.tensor([[[1.0, 0.1], [0.2, -1.0]]])
    s_n, nearest = nearest_normal(query, normal)
    # Cell 0 is nearest to (1, 0): cos = 1 / sqrt(1.01); cell 1 (0.2, -1) to (1, 0): cos = 0.2 / sqrt(1.04).
    torch.testing.assert_close(s_n, torch.tensor([[(1 + 1 / math.sqrt(1.01)) / 2, (1 + 0.2 / math.sqrt(1.04)) / 2]]))
    torch.testing.assert_close(nearest, torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]))
    res, _ = residual(query, normal)
    torch.testing.assert_close(res, torch.tensor([[[0.0, 0.1], [-0.8, -1.0]]]))


def test_an_unmasked_reference_gets_its_cells_farthest_from_the_normals_and_a_given_region_is_kept() -> None:
    given = torch.tensor([[1.0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]])
    S_n = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.8, 0.1, 0.0, 0.2, 0.1, 0.3],
                        [0.9, 0.9, 0.0, 0.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]])
    region = defect_region(given, S_n, fraction=0.2)
    assert region[0].nonzero().flatten().tolist() == [1, 4]  # the two cells (20%) with the largest S_n
    torch.testing.assert_close(region[1], given[1])  # a mask that marks a region is kept as given
    assert defect_region(given, S_n, fraction=0.01)[0].sum() == 1  # at least one cell


def test_training_episodes_give_a_share_of_abnormal_references_without_their_mask() -> None:
    torch.manual_seed(2)
    masks = (torch.rand(6, 16) < 0.2).float()
    masks[:, 0] = 1.0  # every defect marks at least one cell, none marks them all
    pool = DomainPool("d", torch.randn(5, 16, 4), torch.randn(6, 16, 4), masks)

    def references(share: float) -> torch.Tensor:
        config = EpisodeConfig(batch_size=64, shots=(2,), maskless_references=share)
        return sample_episodes([pool], config, torch.Generator().manual_seed(0)).M_a

    assert not references(0.0).bool().all(-1).any()  # exact masks only
    assert references(1.0).bool().all()  # every reference as a dataset without masks gives it
    whole = references(0.5).bool().all(-1).float().mean()
    assert 0.3 < whole < 0.7


def test_paired_episodes_give_an_abnormal_query_a_reference_of_its_own_defect_type() -> None:
    # Abnormal image i holds the value i in every feature, so an episode says which images it drew.
    abnormal = torch.arange(6.0)[:, None, None].expand(6, 16, 4).clone()
    kinds = ("crack", "crack", "crack", "stain", "stain", "blowhole")  # the blowhole has no partner
    pool = DomainPool("d", torch.randn(5, 16, 4), abnormal, torch.ones(6, 16), kinds)

    def drawn(pair: bool) -> tuple[list[str], list[str]]:
        config = EpisodeConfig(batch_size=400, shots=(2,), anomaly_probability=1.0, pair_defects=pair)
        episodes = sample_episodes([pool], config, torch.Generator().manual_seed(0))
        refs, queries = episodes.F_a[:, 0, 0].long().tolist(), episodes.F_q[:, 0, 0].long().tolist()
        assert all(r != q for r, q in zip(refs, queries, strict=True))  # never the query itself
        return [kinds[i] for i in refs], [kinds[i] for i in queries]

    refs, queries = drawn(pair=True)
    partnered = [(r, q) for r, q in zip(refs, queries, strict=True) if q != "blowhole"]
    assert partnered and all(r == q for r, q in partnered)
    assert "blowhole" in queries  # a type without a second image still gets a reference (any other defect)
    refs, queries = drawn(pair=False)
    assert sum(r != q for r, q in zip(refs, queries, strict=True)) > 100  # unpaired: types mix


def test_a_domain_pool_records_each_defect_s_type(tiny_mvtec: Path) -> None:
    detector = build_detector("nagl", tiny_nagl_config())
    samples = [s for s in load_samples(str(tiny_mvtec)) if s.label in (0, 1)]
    train = replace(detector.config.train, synthetic_count=3, fill_sources=("texture",))
    pool = build_domain_pool(detector.extractor, "tiny", samples, train, np.random.default_rng(0), "cpu", False)
    assert pool.kinds == ("spot",) * 4 + ("synthetic:texture",) * 3  # the real defects' folder, then the pasted
    assert len(pool.kinds) == len(pool.abnormal) == len(pool.masks)


def test_a_domain_pool_refuses_defect_kinds_that_do_not_match_its_images() -> None:
    with pytest.raises(ValueError, match="2 defect kinds for 3 abnormal images"):
        DomainPool("d", torch.randn(2, 4, 3), torch.randn(3, 4, 3), torch.ones(3, 4), ("a", "b"))


def test_training_estimates_the_region_of_a_maskless_reference_as_inference_does() -> None:
    torch.manual_seed(3)
    net = NAGLNet(dim=8, proxies=3, heads=2, alpha=-1e9).eval()
    F_q, normal, F_a = torch.randn(2, 10, 8), torch.randn(2, 20, 8), torch.randn(2, 10, 8)
    whole = torch.ones(2, 10)
    with torch.no_grad():
        S, s = score_maps(net, F_q, normal, F_a, whole, standardise=True, unmasked_region=0.2)
        statistics = reference_statistics(normal)
        normal_std, F_a_std = standardised(statistics, normal, F_a)
        _, s_n_a = residual(F_a_std, normal_std)
        region = defect_region(whole, normal_guided_score(s_n_a), 0.2)  # what set_references estimates
        expected, _ = score_maps(net, F_q, normal, F_a, region, standardise=True)
        unestimated, _ = score_maps(net, F_q, normal, F_a, whole, standardise=True)
    assert region.sum(-1).tolist() == [2.0, 2.0]
    torch.testing.assert_close(S, expected)
    assert not torch.allclose(S, unestimated)  # the whole image would attend to every reference cell


def test_a_centred_anomaly_map_is_measured_from_each_query_s_median_cell() -> None:
    S_a = torch.tensor([[0.2, 0.4, 0.9], [0.5, 0.5, 0.6]])
    torch.testing.assert_close(centred_anomaly_score(S_a), torch.tensor([[-0.2, 0.0, 0.5], [0.0, 0.0, 0.1]]))
    # wired through the branches: S_n as it was, S_a less each query's median cell
    torch.manual_seed(4)
    net = NAGLNet(dim=8, proxies=3, heads=2, alpha=-1e9).eval()
    F_q, normal, F_a = torch.randn(2, 9, 8), torch.randn(1, 20, 8), torch.randn(1, 9, 8)
    M_a = torch.zeros(1, 9)
    M_a[0, :3] = 1
    with torch.no_grad():
        S_n, S_a = branch_maps(net, F_q, normal, F_a, M_a)
        S_n_c, S_a_c = branch_maps(net, F_q, normal, F_a, M_a, centre_anomaly=True)
    torch.testing.assert_close(S_n_c, S_n)
    assert S_a_c.median(-1).values.abs().max() < 1e-6
    torch.testing.assert_close(S_a_c, S_a - S_a.median(-1, keepdim=True).values)


def test_sine_positions_encode_row_then_column_on_a_hand_checked_grid() -> None:
    # 2 x 2 grid, 4 channels: both frequencies are 1, the axis steps are pi and 2 pi, so each axis reads
    # [sin, cos] = [0, -1] for the first row (column) and [0, 1] for the second; a cell is [row, column]
    expected = torch.tensor([[0.0, -1, 0, -1], [0, -1, 0, 1], [0, 1, 0, -1], [0, 1, 0, 1]])
    torch.testing.assert_close(sine_positions(4, 4), expected, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="square grid"):
        sine_positions(6, 4)
    with pytest.raises(ConfigError, match="divisible by 4"):
        NAGLNet(dim=6, proxies=3, heads=2, alpha=-1e9, key_positions=True)


def test_key_positions_make_the_proxies_depend_on_where_cells_are() -> None:
    # Without positions, attention is blind to the order of the query's cells: shuffling them leaves the
    # anomaly proxies P^ as they were. With the authors' key positions it does not.
    torch.manual_seed(5)
    F_q, F_a = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    res_q, res_a, M_a = torch.randn(1, 16, 8), torch.randn(1, 16, 8), torch.ones(1, 16)
    order = torch.randperm(16)
    for key_positions, order_matters in ((False, False), (True, True)):
        torch.manual_seed(6)
        net = NAGLNet(dim=8, proxies=3, heads=2, alpha=-1e9, key_positions=key_positions).eval()
        with torch.no_grad():
            P_hat = net(res_q, F_q, F_a=F_a, res_a=res_a, M_a=M_a)
            shuffled = net(res_q[:, order], F_q[:, order], F_a=F_a, res_a=res_a, M_a=M_a)
        assert torch.allclose(P_hat, shuffled, atol=1e-5) != order_matters
    # two abnormal references: each image's cells get the same embedding
    with torch.no_grad():
        two = net.mine(torch.cat([F_a, F_a], 1), torch.cat([res_a, res_a], 1), torch.ones(1, 32), cells=16)
        one = net.mine(F_a, res_a, M_a)
    torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-4)


def test_image_score_is_the_mean_of_the_top_share() -> None:
    scores = torch.arange(200, dtype=torch.float32)[None]
    assert float(top_mean(scores, 0.01)) == pytest.approx(198.5)  # ceil(2.0) = 2 cells: 199 and 198
    assert float(top_mean(scores[:, :50], 0.01)) == pytest.approx(49.0)  # at least one cell


def _images(root: Path) -> tuple[list[tuple[str, Image.Image]], list[tuple[str, Image.Image, Image.Image]]]:
    samples = load_samples(str(root))
    normal = [(s.path, Image.open(s.path).convert("RGB")) for s in samples if s.label == 0][:3]
    abnormal = [(s.path, Image.open(s.path).convert("RGB"), Image.open(s.mask_path)) for s in samples
                if s.label == 1][:1]
    return normal, abnormal


def test_reference_errors_name_the_bad_input(tiny_mvtec: Path) -> None:
    normal, abnormal = _images(tiny_mvtec)
    name, image, mask = abnormal[0]
    with pytest.raises(DataError, match="no normal reference"):
        build_references([], abnormal, 64)
    with pytest.raises(DataError, match=f"{name}: no mask"):
        build_references(normal, [(name, image, None)], 64)
    with pytest.raises(DataError, match=f"{name}: its mask is 32x32 but the image is 64x64"):
        build_references(normal, [(name, image, mask.resize((32, 32)))], 64)
    with pytest.raises(DataError, match="marks no defect pixel"):
        build_references(normal, [(name, image, Image.new("L", image.size))], 64)


def test_untrained_model_without_references_refuses_to_score(tiny_mvtec: Path) -> None:
    detector = build_detector("nagl", tiny_nagl_config())
    with pytest.raises(NoReferences, match="references add"):
        detector.predict(torch.zeros(1, 3, 64, 64))


def test_training_lowers_the_loss_and_the_bundle_round_trips(tiny_mvtec: Path, tmp_path: Path) -> None:
    detector = build_detector("nagl", tiny_nagl_config(train={
        "steps": 100, "batch_size": 4, "lr": 5e-3, "synthetic_count": 12, "max_normals": 12}))
    samples = [s for s in load_samples(str(tiny_mvtec)) if s.label in (0, 1)]
    info = detector.fit(samples, [], Runtime(progress=False))
    assert info["domains"] == ["tiny"] and info["steps"] == 100
    assert info["loss_last"] < 0.9 * info["loss_first"]  # untrained (no gradient reaching RM/AFL): ~1.0

    normal, abnormal = _images(tiny_mvtec)
    detector.set_references(build_references(normal, abnormal, 64))
    queries = torch.stack([detector.preprocess(Image.open(s.path).convert("RGB")) for s in samples[:6]])
    expected = detector.predict(queries)
    assert expected.anomaly_map.shape == (6, 64, 64)

    save_bundle(detector, str(tmp_path / "bundle"))
    loaded = load_bundle(str(tmp_path / "bundle"))
    assert loaded.references is not None and loaded.references.shots == "3+1"
    got = loaded.predict(queries)
    torch.testing.assert_close(got.pred_score, expected.pred_score)
    torch.testing.assert_close(got.anomaly_map, expected.anomaly_map)

    # The branches differ: S_n alone is the normal part of the fused map, the naive branch another map.
    loaded.set_branch("normal")
    normal_only = loaded.predict(queries).pred_score
    loaded.set_branch("naive")
    naive = loaded.predict(queries).pred_score
    assert not torch.allclose(normal_only, expected.pred_score) and not torch.allclose(naive, normal_only)


def test_a_whole_image_mask_becomes_the_reference_cells_farthest_from_the_normals(tiny_mvtec: Path) -> None:
    normal, abnormal = _images(tiny_mvtec)
    name, image, mask = abnormal[0]
    whole = [(name, image, Image.new("L", image.size, 255))]
    detector = build_detector("nagl", tiny_nagl_config(unmasked_region=0.1))  # grid 8: ceil(6.4) = 7 cells
    detector.set_references(build_references(normal, whole, 64))
    region = detector._abnormal_masks[0]
    # The reference's own S_n against the normal references, from the normal branch's map.
    detector.set_branch("normal")
    with torch.no_grad():
        S_n, _ = detector._score(cells(detector.extractor(detector.preprocess(image)[None])))
    assert sorted(region.nonzero().flatten().tolist()) == sorted(S_n[0].topk(7).indices.tolist())

    kept = build_detector("nagl", tiny_nagl_config(unmasked_region=0))
    kept.set_references(build_references(normal, whole, 64))
    assert bool(kept._abnormal_masks.all())  # 0: the whole image, as given
    given = build_detector("nagl", tiny_nagl_config(unmasked_region=0.1))
    references = build_references(normal, abnormal[:1], 64)
    given.set_references(references)
    torch.testing.assert_close(given._abnormal_masks[0], cell_mask(references.masks, 8)[0])  # a region: as given


def test_the_generalist_without_references_round_trips(tmp_path: Path) -> None:
    detector = build_detector("nagl", tiny_nagl_config())
    save_bundle(detector, str(tmp_path / "generalist"))
    loaded = load_bundle(str(tmp_path / "generalist"))
    assert loaded.references is None
    for name, value in detector.net.state_dict().items():
        torch.testing.assert_close(loaded.net.state_dict()[name], value)


def test_reference_masks_accept_zero_one_masks(tiny_mvtec: Path) -> None:
    normal, abnormal = _images(tiny_mvtec)
    name, image, mask = abnormal[0]
    zero_one = Image.fromarray((np.asarray(mask) > 127).astype(np.uint8))
    refs = build_references(normal, [(name, image, zero_one)], 64)
    assert refs.masks.sum() == build_references(normal, abnormal, 64).masks.sum() > 0


def test_a_reference_sweep_fits_on_the_source_and_validates_on_the_held_out_domain_s_non_test_normals(tmp_path):
    from ray_ad.errors import ConfigError
    from ray_ad.tuning import reference_sweep_data
    from tests.conftest import make_mvtec

    source, held_out = make_mvtec(tmp_path / "source", seed=0), make_mvtec(tmp_path / "held_out", n_train=16, seed=1)
    data = reference_sweep_data(str(source), str(held_out), str(tmp_path / "made"))
    assert {s.domain for s in data.fit} == {"source"} and any(s.label == 1 for s in data.fit)
    real = [s for s in data.calibration + data.validation if s.defect != "synthetic"]
    assert real and all(s.domain == "held_out" and s.split == "train" and s.label == 0 for s in real)
    synthetic = [s for s in data.calibration + data.validation if s.defect == "synthetic"]
    assert synthetic and all(s.label == 1 and Image.open(s.mask_path).getbbox() for s in synthetic)
    # References and queries never share an image.
    assert not {s.path for s in data.calibration} & {s.path for s in data.validation}
    with pytest.raises(ConfigError, match="held-out domain"):
        reference_sweep_data(str(source), str(source), str(tmp_path / "again"))


def test_the_anomaly_branch_loss_supervises_s_a_on_its_own() -> None:
    """With loss.anomaly_branch > 0 (the authors' per-branch supervision) S_a must match the mask by itself:
    an S_a that is right where the fused map is not costs less than one that is wrong, and without
    the weight S_a does not enter the loss except through S."""
    from ray_ad.methods.nagl.config import NAGLLossWeights
    from ray_ad.methods.nagl.loss import nagl_loss

    M_q = torch.zeros(2, 16)
    M_q[:, :3] = 1
    y_q = torch.ones(2)
    S = torch.full((2, 16), 0.5)
    s = S.max(-1).values
    right, wrong = M_q * 0.9 + 0.05, (1 - M_q) * 0.9 + 0.05
    paper, authors = NAGLLossWeights(), NAGLLossWeights(anomaly_branch=1.0)
    assert nagl_loss(S, s, M_q, y_q, paper, right)[0] == nagl_loss(S, s, M_q, y_q, paper, wrong)[0]
    assert nagl_loss(S, s, M_q, y_q, authors, right)[0] < nagl_loss(S, s, M_q, y_q, authors, wrong)[0] - 0.5
    with pytest.raises(ValueError, match="S_a"):
        nagl_loss(S, s, M_q, y_q, authors)
    with pytest.raises(ValueError, match="anomaly_branch"):
        NAGLLossWeights(anomaly_branch=-1.0)


def test_proxies_start_at_the_configured_scale() -> None:
    torch.manual_seed(0)
    small = NAGLNet(dim=64, proxies=50, heads=2, alpha=-1e9).rm.P
    unit = NAGLNet(dim=64, proxies=50, heads=2, alpha=-1e9, proxy_std=1.0).rm.P
    assert abs(float(small.detach().std()) - 0.02) < 0.002
    assert abs(float(unit.detach().std()) - 1.0) < 0.05
