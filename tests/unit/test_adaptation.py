"""Label-free adaptation: mutual scoring, the target memory, the unlabeled threshold, the promotion gate."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import norm

import ray_ad.adaptation.promote as promote_module
import ray_ad.methods.target_memory.model as model_module
from ray_ad import registry, storage
from ray_ad.adaptation.gate import GateConfig, GateSet, choose, gate_score, split_landing
from ray_ad.adaptation.mutual import greedy_coreset, kth_image_distance, mutual_scores, nearest_distance
from ray_ad.adaptation.promote import CANDIDATES, AdaptConfig, adapt_candidates, split_overrides
from ray_ad.adaptation.target_gaussian import fit_target_gaussian
from ray_ad.adaptation.threshold import (
    TwoGaussians,
    defect_share,
    fit_two_gaussians,
    normal_mode,
    unlabeled_threshold,
)
from ray_ad.bundle import load_bundle, save_bundle
from ray_ad.data import Sample, load_samples, write_manifest
from ray_ad.data.images import load_image
from ray_ad.errors import ConfigError, DataError
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime
from ray_ad.methods.target_memory import TargetMemory, TargetMemoryConfig
from ray_ad.methods.target_memory.model import drop_mask, mean_rank
from ray_ad.metrics import decision_metrics
from ray_ad.pipeline import target_image_uris
from tests.conftest import texture

QUIET = Runtime(progress=False)

TINY_BACKBONE = {"image_size": 64, "grid_size": 8, "layers": [1, 2], "local_pool": 1}


def test_mutual_scores_by_hand_and_never_match_an_image_with_itself():
    # Three one-cell images on a line at 0, 1 and 3: each cell's nearest cell in every *other* image.
    features = torch.tensor([[[0.0]], [[1.0]], [[3.0]]])
    assert mutual_scores(features, fraction=1.0).flatten().tolist() == pytest.approx([2.0, 1.5, 2.5])
    assert mutual_scores(features, fraction=0.5).flatten().tolist() == pytest.approx([1.0, 1.0, 2.0])
    # A cell that exists in one image only scores its distance to the rest, not 0 (its own copy).
    rng = torch.Generator().manual_seed(0)
    cells = torch.randn(6, 4, 8, generator=rng) * 0.01
    cells[2, 3] = 5.0
    scores = mutual_scores(cells, fraction=0.3)
    assert scores[2, 3] > 10
    assert scores.flatten().topk(2).values[1] < 0.1


def test_greedy_coreset_covers_every_cluster():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([centres[[0]].expand(200, 2), centres[[1]].expand(5, 2), centres[[2]].expand(5, 2)])
    points = points + 0.01 * torch.randn(len(points), 2, generator=torch.Generator().manual_seed(0))
    chosen = points[greedy_coreset(points, 3)]
    assert torch.cdist(centres, chosen).amin(1).max() < 0.1  # a random 3 of 210 would miss a small cluster


def test_kth_image_distance_counts_distinct_images_not_cells():
    # Image 0 holds two cells at 0 and 0.1, image 1 one at 1, image 2 one at 3 (one channel).
    bank = torch.tensor([[0.0], [0.1], [1.0], [3.0]])
    owners = torch.tensor([0, 0, 1, 2])
    query = torch.tensor([[0.0]])
    # The second-nearest *cell* is image 0's other one (0.1); the second-nearest *image* is image 1.
    assert kth_image_distance(query, bank, owners, 1).tolist() == pytest.approx([0.0])
    assert kth_image_distance(query, bank, owners, 2).tolist() == pytest.approx([1.0])
    assert kth_image_distance(query, bank, owners, 3).tolist() == pytest.approx([3.0])
    with pytest.raises(ValueError, match="k=4"):
        kth_image_distance(query, bank, owners, 4)
    # Against brute force on random cells: k = 1 is the nearest cell, k the k-th lowest per-image minimum.
    generator = torch.Generator().manual_seed(0)
    queries, images = torch.randn(40, 6, generator=generator), torch.randn(12, 9, 6, generator=generator)
    flat, owners = images.reshape(-1, 6), torch.arange(12).repeat_interleave(9)
    per_image = torch.cdist(queries, flat).view(40, 12, 9).amin(-1).sort(1).values
    assert torch.equal(kth_image_distance(queries, flat, owners, 1), nearest_distance(queries, flat))
    for k in (2, 3, 5):
        assert torch.allclose(kth_image_distance(queries, flat, owners, k), per_image[:, k - 1], atol=1e-5)


def _mixture(rng: np.random.Generator, defective: float, normal, defect) -> tuple[np.ndarray, np.ndarray]:
    n = 4000
    labels = np.r_[np.zeros(int(n * (1 - defective))), np.ones(int(n * defective))]
    return np.where(labels == 1, defect(len(labels)), normal(len(labels))), labels


def _assert_mode_fit(scores: np.ndarray, labels: np.ndarray, defective: float, shape: str,
                     false_alarm: tuple[float, float], grid: np.ndarray) -> None:
    """Centre 0 and scale 1 within 0.1, the share within 0.04, the false-alarm threshold in range, and
    the F1 rule within 0.02 of the best F1 any threshold of ``grid`` reaches on these labels."""
    centre, spread = normal_mode(scores, shape)
    assert abs(centre) < 0.1 and abs(spread - 1) < 0.1, (defective, centre, spread)
    assert abs(defect_share(scores, centre, shape) - defective) < 0.04
    assert false_alarm[0] < unlabeled_threshold(scores, 0.01, "false_alarm", shape=shape) < false_alarm[1]
    f1 = decision_metrics(scores, labels, unlabeled_threshold(scores, shape=shape))["f1"]
    best = max(decision_metrics(scores, labels, t)["f1"] for t in grid)
    assert defective == 0.0 or f1 > best - 0.02, (defective, f1, best)


def test_unlabeled_threshold_fits_the_normal_mode_of_a_contaminated_mixture():
    rng = np.random.default_rng(0)
    for defective in (0.0, 0.1, 0.3, 0.45):
        scores, labels = _mixture(rng, defective, lambda n: rng.normal(0, 1, n), lambda n: rng.normal(5, 1, n))
        # The false-alarm rule: the normal mode's 0.99 quantile (2.33), whatever the contamination.
        _assert_mode_fit(scores, labels, defective, "gaussian", (2.1, 2.6), np.linspace(0, 5, 101))
    # With no defects to speak of, the F1 rule falls back to the false-alarm rule.
    clean = rng.normal(0, 1, 4000)
    assert unlabeled_threshold(clean) == unlabeled_threshold(clean, rule="false_alarm")
    # The rule a clean source uses (0.99 quantile of the scores) lands inside the defects here:
    assert np.quantile(scores, 0.99) > 5
    with pytest.raises(ValueError, match="false_alarm_rate"):
        unlabeled_threshold(scores, false_alarm_rate=0.7)


def test_a_gumbel_mode_fits_maxima_that_a_gaussian_mode_misreads():
    """Normal scores that are maxima (Gumbel: mode 0, scale 1, 0.99 quantile 4.60) and defects above them."""
    rng = np.random.default_rng(1)
    for defective in (0.0, 0.1, 0.3, 0.45):
        scores, labels = _mixture(rng, defective, lambda n: rng.gumbel(0, 1, n), lambda n: rng.normal(7, 1.5, n))
        _assert_mode_fit(scores, labels, defective, "gumbel", (4.2, 5.0), np.linspace(0, 8, 161))
        # A Gaussian read of the same scores takes the long upper side of the normals for defects.
        assert defect_share(scores, normal_mode(scores)[0]) > defective + 0.08
    with pytest.raises(ValueError, match="shape"):
        unlabeled_threshold(scores, shape="cauchy")


@pytest.mark.slow  # fits detectors
def test_a_two_gaussian_fit_reads_defects_that_overlap_the_normals():
    """Defects N(3, 2) over normals N(0, 1): wide, overlapping, and reaching below the normals' mode."""
    rng = np.random.default_rng(2)
    grid = np.linspace(-1, 8, 181)
    for defective in (0.15, 0.3, 0.45):
        scores, labels = _mixture(rng, defective, lambda n: rng.normal(0, 1, n), lambda n: rng.normal(3, 2, n))
        fit = fit_two_gaussians(scores)
        assert abs(fit.share - defective) < 0.05 and abs(fit.normal_mean) < 0.1 and abs(fit.normal_std - 1) < 0.1
        # The fit does not depend on the scores' unit (probabilities spread over 1e-4 included).
        assert fit_two_gaussians(1e-4 * scores + 0.5).share == pytest.approx(fit.share, abs=1e-3)
        f1 = decision_metrics(scores, labels, unlabeled_threshold(scores, shape="mixture"))["f1"]
        best = max(decision_metrics(scores, labels, t)["f1"] for t in grid)
        assert f1 > best - 0.02, (defective, f1, best)
    # One Gaussian explains clean scores (BIC): no defect share, the normal mode's 0.99 quantile.
    clean = rng.normal(0, 1, 4000)
    assert fit_two_gaussians(clean).share == 0.0
    assert 2.1 < unlabeled_threshold(clean, shape="mixture") < 2.6


def test_the_share_rule_flags_as_many_images_as_the_defect_share():
    """Rule "share": the (1 - pi) quantile, so with pi given exactly, precision equals recall; with pi
    fitted from the scores, F1 within 0.03 of the best threshold's; a clean sample falls back."""
    rng = np.random.default_rng(3)
    grid = np.linspace(-1, 6, 141)
    for defective in (0.1, 0.3, 0.45):
        scores, labels = _mixture(rng, defective, lambda n: rng.normal(0, 1, n), lambda n: rng.normal(3, 1, n))
        given = decision_metrics(scores, labels, unlabeled_threshold(scores, rule="share", share=defective))
        assert given["precision"] == pytest.approx(given["recall"], abs=0.01), (defective, given)
        fitted = decision_metrics(scores, labels, unlabeled_threshold(scores, rule="share"))["f1"]
        best = max(decision_metrics(scores, labels, t)["f1"] for t in grid)
        assert fitted > best - 0.03, (defective, fitted, best)
    clean = rng.normal(0, 1, 4000)
    assert unlabeled_threshold(clean, rule="share", share=0.01) == unlabeled_threshold(clean, rule="false_alarm")
    with pytest.raises(ValueError, match="defect share"):
        unlabeled_threshold(clean, rule="share", share=1.2)


def test_the_mixture_drop_rule_drops_the_upper_component_only():
    rng = np.random.default_rng(4)
    scores, labels = _mixture(rng, 0.2, lambda n: rng.normal(0, 1, n), lambda n: rng.normal(5, 1, n))
    dropped = drop_mask(torch.from_numpy(scores), "mixture").numpy()
    assert dropped[labels == 1].mean() > 0.97 and dropped[labels == 0].mean() < 0.01
    assert not drop_mask(torch.from_numpy(rng.normal(0, 1, 500)), "mixture").any()  # one Gaussian: none
    with pytest.raises(ValueError, match="drop rule"):
        drop_mask(torch.from_numpy(scores), "median")


def _textures(folder: Path, count: int, seed: int, defective: tuple[int, ...] = (), size: int = 64) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = texture(rng, size)
        if i in defective:
            y, x = rng.integers(8, size - 24, 2)
            image[y : y + 14, x : x + 14] = 250
        path = folder / f"cell_{seed}_{i:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.slow  # fits detectors
def test_target_memory_drops_the_landed_defects_and_keeps_the_rest(tmp_path):
    landed = _textures(tmp_path / "landed", 24, seed=1, defective=(3, 11, 17))
    config = method_config("target_memory", {"backbone": TINY_BACKBONE, "device": "cpu", "map_sigma": 1.0})
    memory = build_detector("target_memory", config)
    info = memory.fit([Sample(p, -1) for p in landed], [], QUIET)
    assert sorted(info["dropped_paths"]) == sorted(landed[i] for i in (3, 11, 17))
    assert info["bank_size"] <= (24 - 3) * 64
    # The landing's defect share comes from the landed images' mutual scores (3 of 24 here); held-out
    # images drawn like the landing (2 of 16 defective) then set the threshold that flags that share.
    assert info["defect_share"] == pytest.approx(3 / 24, abs=0.05)
    held_out = _textures(tmp_path / "held_out", 16, seed=3, defective=(4, 12))
    threshold = memory.calibrate_unlabeled([Sample(p, -1) for p in held_out], QUIET)
    fresh = _textures(tmp_path / "fresh", 16, seed=2, defective=tuple(range(8, 16)))
    images = memory.preprocessor.batch([load_image(p) for p in fresh])
    scores = memory.predict(images).pred_score
    assert scores[8:].min() > scores[:8].max()  # the defects the memory dropped are not its normals
    assert (scores[:8] <= threshold).all() and (scores[8:] > threshold).all()


@pytest.mark.slow  # fits detectors
def test_with_the_source_as_referee_the_memory_drops_the_images_the_source_flags(tmp_path):
    landed = _textures(tmp_path / "landed", 24, seed=1, defective=(3, 11, 17))
    config = method_config("target_memory", {"backbone": TINY_BACKBONE, "device": "cpu", "drop_referee": "source"})
    memory = build_detector("target_memory", config)
    samples = [Sample(p, -1) for p in landed]
    # A referee that flags 3 and 11 but not 17 (nor anything else): its scores decide, not the mutual scores.
    # (The normals' scores: Gaussian quantiles, so that 24 images have a normal mode to stand out from.)
    referee = np.full(len(landed), 5.0)
    normals = [i for i in range(len(landed)) if i not in (3, 11)]
    referee[normals] = 1.0 + 0.05 * norm.ppf((np.arange(len(normals)) + 0.5) / len(normals))
    info = memory.fit(samples, [], QUIET, referee_scores=referee)
    assert sorted(info["dropped_paths"]) == sorted(landed[i] for i in (3, 11))
    assert info["drop_referee"] == "source"
    # A referee whose scores have none standing out (Gaussian quantiles; it ranks images 0, 1, 2 highest,
    # none of them a defect, to tell its ranking from the mutual scores'): by silent_referee_fallback,
    # "share" drops its top share of the landing (the mutual share: 3 of 24 here), "mutual" lets the
    # mutual scores decide (they flag 3, 11 and 17, as the test above shows), "none" keeps every image.
    silent = 1.0 + 0.05 * norm.ppf((np.arange(len(landed))[::-1] + 0.5) / len(landed))
    by_fallback = {}
    for fallback in ("share", "mutual", "none"):
        fitted = build_detector("target_memory", replace(config, silent_referee_fallback=fallback))
        by_fallback[fallback] = fitted.fit(samples, [], QUIET, referee_scores=silent)
    assert round(by_fallback["share"]["defect_share"] * len(landed)) == 3
    assert sorted(by_fallback["share"]["dropped_paths"]) == landed[:3]
    assert by_fallback["share"]["drop_referee"] == "source, its top share (none stood out)"
    assert sorted(by_fallback["mutual"]["dropped_paths"]) == sorted(landed[i] for i in (3, 11, 17))
    assert by_fallback["mutual"]["drop_referee"] == "mutual (the source flagged none)"
    assert by_fallback["none"]["dropped_paths"] == [] and by_fallback["none"]["drop_referee"] == "source"
    # drop_image_rule "share" (the adaptation job's): the referee's top share of the landing, whatever stands
    # out. The first referee flags only 3 and 11; the share (3 of 24) also drops its next-highest image.
    by_share = build_detector("target_memory", replace(config, drop_image_rule="share"))
    info = by_share.fit(samples, [], QUIET, referee_scores=referee)
    assert sorted(info["dropped_paths"]) == sorted(landed[i] for i in (3, 11, normals[-1]))
    assert info["drop_referee"] == "source, its top share"
    assert AdaptConfig().memory.drop_image_rule == "share" and AdaptConfig().memory.drop_referee == "auto"
    assert "target_memory_all" not in AdaptConfig().candidates  # built only when asked for
    # Configs written before "share" said true / false.
    assert replace(config, silent_referee_fallback=True).silent_referee_fallback == "mutual"
    assert method_config("target_memory", {"silent_referee_fallback": False}).silent_referee_fallback == "none"
    with pytest.raises(ConfigError, match="silent_referee_fallback.*'labels'"):
        method_config("target_memory", {"silent_referee_fallback": "labels"})
    with pytest.raises(DataError, match="referee_scores"):
        memory.fit(samples, [], QUIET)
    with pytest.raises(DataError, match="24 finite image scores"):
        memory.fit(samples, [], QUIET, referee_scores=referee[:20])
    with pytest.raises(ConfigError, match="drop_referee"):
        method_config("target_memory", {"drop_referee": "labels"})


def test_mean_rank_averages_each_referees_ranks():
    assert mean_rank(torch.tensor([0.1, 0.5, 0.3]), torch.tensor([3.0, 1.0, 2.0])).tolist() == [1.0, 1.0, 1.0]
    assert mean_rank(torch.tensor([0.1, 0.5, 0.3]), torch.tensor([1.0, 3.0, 2.0])).tolist() == [0.0, 2.0, 1.0]
    with pytest.raises(ConfigError, match="consensus.*'share'.*'z'"):
        method_config("target_memory", {"drop_referee": "consensus", "drop_image_rule": "z"})


@pytest.mark.slow  # fits detectors
def test_the_consensus_referee_drops_a_defect_the_source_ranks_under_a_normal(tmp_path):
    landed = _textures(tmp_path / "landed", 24, seed=1, defective=(3, 11, 17))
    samples = [Sample(p, -1) for p in landed]
    config = method_config("target_memory", {"backbone": TINY_BACKBONE, "device": "cpu",
                                             "drop_referee": "consensus", "drop_image_rule": "share"})
    memory = build_detector("target_memory", config)
    cells = memory.read_landing(samples, QUIET)
    mutual = cells.mutual(config.mutual_fraction, config.mutual_references, config.seed).amax(1)
    assert set(mutual.argsort()[-3:].tolist()) == {3, 11, 17}  # the mutual scores rank the defects highest
    # The source ranks 3 and 11 highest, then the normal the mutual scores rank lowest, then 17.
    normal = int(mutual.argmin())
    order = [i for i in range(24) if i not in (3, 11, 17, normal)] + [17, normal, 11, 3]
    referee = np.empty(24)  # Gaussian quantiles in that order: one mode, nothing stands out
    referee[order] = norm.ppf((np.arange(24) + 0.5) / 24)
    info = memory.fit(samples, [], QUIET, referee_scores=referee, landed=cells)
    assert round(info["defect_share"] * 24) == 3
    assert sorted(info["dropped_paths"]) == sorted(landed[i] for i in (3, 11, 17))
    assert info["drop_referee"] == "consensus of the source and the mutual scores, its top share"
    alone = build_detector("target_memory", replace(config, drop_referee="source"))
    alone_info = alone.fit(samples, [], QUIET, referee_scores=referee, landed=cells)
    assert sorted(alone_info["dropped_paths"]) == sorted(landed[i] for i in (3, 11, normal))
    with pytest.raises(DataError, match="'consensus' needs the source line's scores"):
        memory.fit(samples, [], QUIET, landed=cells)
    # "auto": that referee has one mode (separation 0) where the mutual scores have two: the consensus.
    auto = build_detector("target_memory", replace(config, drop_referee="auto"))
    keep, used = auto.kept_images(cells, referee)
    assert sorted(np.flatnonzero(~keep.numpy()).tolist()) == [3, 11, 17]
    assert used.startswith("consensus of the source and the mutual scores (separation 0.00 against")
    # A source whose scores put 3, 11 and the normal far above the rest: two clear modes, so it decides alone.
    sharp = norm.ppf((np.arange(24) + 0.5) / 24)
    sharp[[3, 11, normal]] = [1e4, 1e4 + 1, 1e4 + 2]
    keep, used = auto.kept_images(cells, sharp)
    assert sorted(np.flatnonzero(~keep.numpy()).tolist()) == sorted([3, 11, normal]) and used.startswith("source (")


def test_two_gaussians_separation_is_ashmans_d():
    assert TwoGaussians(0.0, 1.0, 3.0, 1.0, 0.2).separation == pytest.approx(3.0)
    assert TwoGaussians(0.0, 1.0, 1.0, 0.0, 0.5).separation == pytest.approx(math.sqrt(2))
    assert TwoGaussians(0.0, 1.0, 0.0, 1.0, 0.0).separation == 0.0  # one Gaussian: nothing apart


@pytest.mark.slow  # fits detectors
def test_landed_cells_read_once_fit_the_same_memory_and_are_checked(tmp_path, monkeypatch):
    landed = [Sample(p, -1) for p in _textures(tmp_path / "landed", 24, seed=1, defective=(3, 11, 17))]
    config = method_config("target_memory", {"backbone": TINY_BACKBONE, "device": "cpu", "map_sigma": 1.0})
    alone = build_detector("target_memory", config)
    alone_info = alone.fit(landed, [], QUIET)
    shared = build_detector("target_memory", config)
    cells = shared.read_landing(landed, QUIET)
    calls = []
    real_mutual_scores = model_module.mutual_scores
    monkeypatch.setattr(model_module, "mutual_scores", lambda *a, **k: calls.append(1) or real_mutual_scores(*a, **k))
    share = shared.landing_share(landed, QUIET, cells)
    info = shared.fit(landed, [], QUIET, landed=cells)
    assert len(calls) == 1  # the drop reads the mutual scores the share computed
    assert info["dropped_paths"] == alone_info["dropped_paths"] and share == pytest.approx(alone_info["defect_share"])
    assert torch.equal(shared.bank, alone.bank) and torch.equal(shared.bank_owners, alone.bank_owners)
    with pytest.raises(DataError, match="24 images, not the 23"):
        shared.fit(landed[:-1], [], QUIET, landed=cells)
    with pytest.raises(DataError, match=re.escape(f"image 0 is '{landed[0].path}' there and '{landed[-1].path}' here")):
        shared.fit(landed[::-1], [], QUIET, landed=cells)
    other = build_detector("target_memory", method_config(
        "target_memory", {"backbone": {**TINY_BACKBONE, "local_pool": 3}, "device": "cpu"}))
    with pytest.raises(DataError, match="backbone"):
        other.fit(landed, [], QUIET, landed=cells)


@pytest.mark.slow  # extracts features
def test_the_landing_share_is_the_share_of_images_that_stand_out(tmp_path):
    config = method_config("target_memory", {"backbone": TINY_BACKBONE, "device": "cpu"})
    memory = build_detector("target_memory", config)
    defective = (2, 5, 9, 14, 20, 27, 33, 38)  # 8 of 40
    landed = [Sample(p, -1) for p in _textures(tmp_path / "landed", 40, seed=5, defective=defective)]
    assert memory.landing_share(landed, QUIET) == pytest.approx(0.2, abs=0.06)
    clean = [Sample(p, -1) for p in _textures(tmp_path / "clean", 40, seed=6)]
    assert memory.landing_share(clean, QUIET) < 0.05


@pytest.mark.slow  # fits detectors
def test_a_defect_kept_in_fewer_landed_images_than_match_images_does_not_vouch_for_itself(tmp_path):
    landed = _textures(tmp_path / "landed", 16, seed=1, defective=(3, 11))
    # Four normals, four new defects, and the two landed defective images again (a defect seen before).
    fresh = _textures(tmp_path / "fresh", 8, seed=2, defective=(4, 5, 6, 7)) + [landed[3], landed[11]]
    scores = {}
    for k in (1, 3):
        # Nothing is dropped: the two landed defects stay in the memory, as in target_memory_all.
        config = method_config("target_memory", {"backbone": TINY_BACKBONE, "device": "cpu", "map_sigma": 1.0,
                                                 "drop_image_z": None, "match_images": k})
        memory = build_detector("target_memory", config)
        memory.fit([Sample(p, -1) for p in landed], [], QUIET)
        scores[k] = memory.predict(memory.preprocessor.batch([load_image(p) for p in fresh])).pred_score
        bundle = tmp_path / f"bundle_k{k}"
        save_bundle(memory, str(bundle))
        loaded = load_bundle(str(bundle))
        assert loaded.config.match_images == k
        assert torch.allclose(loaded.predict(memory.preprocessor.batch([load_image(p) for p in fresh])).pred_score,
                              scores[k])
    # With the nearest cell, a landed defect vouches for its own kind: seen again, it scores below the
    # normals. With the third image, two landed copies are not enough: every defect scores above every normal.
    assert scores[1][8:].max() < scores[1][:4].min()
    assert scores[3][4:].min() > scores[3][:4].max()


def test_a_target_memory_bundle_without_image_owners_scores_by_the_nearest_cell(tmp_path):
    memory = build_detector("target_memory", method_config("target_memory", {"backbone": TINY_BACKBONE,
                                                                             "device": "cpu"}))
    memory.load_tensors({"bank": torch.randn(10, 4)})  # as written before match_images existed
    assert memory.config.match_images == 1
    assert set(memory.tensors()) == {"bank"}  # and saved again as it was
    with pytest.raises(KeyError, match="unexpected"):
        memory.load_tensors({"bank": torch.randn(10, 4), "bank_owners": torch.zeros(10), "extra": torch.zeros(1)})


def test_target_memory_takes_the_source_backbone_network_and_input_size():
    source = build_detector("patchcore", method_config("patchcore", {"backbone": {**TINY_BACKBONE, "image_size": 96},
                                                                     "device": "cpu"}))
    memory = TargetMemory.from_source(source, TargetMemoryConfig(backbone=source.config.backbone.__class__()))
    assert memory.image_size == 96
    assert memory.extractor.mean == source.extractor.mean and memory.extractor.std == source.extractor.std


def test_split_landing_is_by_name_only_and_disjoint():
    images = [f"s3://b/landing/x/batch/{i:04d}.png" for i in range(100)]
    fit, held = split_landing(images, GateConfig(holdout_fraction=0.2))
    assert len(held) == 20 and not set(fit) & set(held) and set(fit) | set(held) == set(images)
    moved = [p.replace("s3://b/landing/x/batch", "/copy") for p in images]
    assert [p.rsplit("/", 1)[1] for p in split_landing(moved, GateConfig(holdout_fraction=0.2))[1]] == [
        p.rsplit("/", 1)[1] for p in held]
    with pytest.raises(DataError, match="at least"):
        split_landing(images[:3], GateConfig())


def test_choose_keeps_the_served_version_unless_beaten_by_the_margin():
    scores = {"source": {"gate_auroc": 0.70}, "target_memory": {"gate_auroc": 0.805}, "served": {"gate_auroc": 0.80}}
    assert choose(scores, "served", 0.01) == ("target_memory", "kept")
    assert choose(scores, "served", 0.0) == ("target_memory", "published")
    assert choose(scores, None, 0.1) == ("target_memory", "published")
    # An adaptation has to beat the source as is by the margin too, or the source is the winner.
    assert choose(scores, None, 0.2) == ("source", "published")
    close = {"source": {"gate_auroc": 0.626}, "target_memory_all": {"gate_auroc": 0.631}}
    assert choose(close, None, 0.01) == ("source", "published")
    assert choose(close, None, 0.01, order=["target_memory_all", "source"]) == ("target_memory_all", "published")


def test_choose_prefers_the_earlier_candidate_unless_a_later_one_beats_every_earlier_one_by_the_margin():
    memories = {"source": {"gate_auroc": 0.51}, "target_memory": {"gate_auroc": 0.637},
                "target_memory_all": {"gate_auroc": 0.645}}
    assert choose(memories, None, 0.01) == ("target_memory", "published")  # 0.008 apart: inside the margin
    memories["target_memory_all"]["gate_auroc"] = 0.648
    assert choose(memories, None, 0.01) == ("target_memory_all", "published")
    # The job's order is fixed: listing the memory of every image first does not put it before the source.
    listed = {"target_memory_all": {"gate_auroc": 0.635}, "source": {"gate_auroc": 0.63}}
    assert choose(listed, None, 0.01, order=CANDIDATES) == ("source", "published")
    # A later candidate must clear the best earlier score, not only the current winner's.
    steps = {"a": {"gate_auroc": 0.60}, "b": {"gate_auroc": 0.605}, "c": {"gate_auroc": 0.612}}
    assert choose(steps, None, 0.01) == ("a", "published")
    assert choose(steps, None, 0.005) == ("c", "published")
    assert choose({"a": {"gate_auroc": float("nan")}, "b": {"gate_auroc": 0.6}}, None, 0.0) == ("b", "published")


def test_gate_set_pastes_defects_into_held_out_images_only(tmp_path):
    held = _textures(tmp_path / "held", 5, seed=3)
    gate = GateSet.build(held, 64, GateConfig(defects_per_image=3))
    assert gate.source == "synthetic" and len(gate.positives) == 15 and len(gate.negatives) == 5
    assert set(gate.positive_kinds) <= {"blend", "intensity", "scratch", "smear", "cutpaste"}
    assert all(not np.array_equal(p, gate.untouched[i // 3]) for i, p in enumerate(gate.positives))


@pytest.mark.slow  # fits detectors
def test_mutual_suspects_are_the_held_out_images_that_stand_out(tmp_path):
    held = _textures(tmp_path / "held", 24, seed=1, defective=(3, 11, 17))
    config = method_config("target_memory", {"backbone": TINY_BACKBONE, "device": "cpu"})
    referee = build_detector("target_memory", config)
    suspects = referee.mutual_suspects([Sample(p, -1) for p in held], z=3.0, runtime=QUIET)
    assert np.flatnonzero(suspects).tolist() == [3, 11, 17]
    # A handful of images has no mode to stand out from: nobody is a suspect.
    assert not referee.mutual_suspects([Sample(p, -1) for p in held[:5]], z=3.0, runtime=QUIET).any()


@pytest.mark.slow  # fits detectors
def test_suspects_are_neither_negatives_nor_pasted_into_but_still_set_the_threshold(tmp_path):
    held = _textures(tmp_path / "held", 12, seed=3, defective=(4, 9))
    source = _source(tmp_path)
    config = GateConfig(defects_per_image=2)
    suspects = np.zeros(12, dtype=bool)
    suspects[[4, 9]] = True
    plain, cleaned = GateSet.build(held, 64, config), GateSet.build(held, 64, config, suspects=suspects)
    assert len(plain.negatives) == 12 and len(plain.positives) == 24
    assert len(cleaned.negatives) == 10 and len(cleaned.positives) == 20 and cleaned.counts["suspects"] == 2
    assert not any(np.array_equal(n, held_image) for n in cleaned.negatives
                   for held_image in (cleaned.untouched[4], cleaned.untouched[9]))
    # The real defects among the held-out images scored high and counted against the source; no more.
    scores = {name: gate_score(source, gate, config) for name, gate in (("plain", plain), ("cleaned", cleaned))}
    assert scores["cleaned"]["gate_auroc"] > scores["plain"]["gate_auroc"]
    assert scores["cleaned"]["threshold"] == scores["plain"]["threshold"]  # every untouched image still counts
    with pytest.raises(DataError, match="every held-out image is a suspect"):
        GateSet.build(held, 64, config, suspects=np.ones(12, dtype=bool))
    # "positive": the suspects rank beside the pasted defects, as they landed.
    positive = GateSet.build(held, 64, GateConfig(defects_per_image=2, suspects="positive"), suspects=suspects)
    assert len(positive.negatives) == 10 and len(positive.positives) == 22 and positive.counts["pasted"] == 20
    assert positive.positive_kinds[-2:] == ["suspect", "suspect"]
    assert np.array_equal(positive.positives[-2], positive.untouched[4])
    with pytest.raises(ValueError, match="'maybe'"):
        GateConfig(suspects="maybe")


def test_split_overrides_separates_adaptation_keys_and_refuses_unknown_ones():
    config, rest = split_overrides(["gate.margin=0.05", "memory.bank_size=100", "cfa.rank=4", "candidates=[source]"])
    assert config.gate.margin == 0.05 and config.memory.bank_size == 100 and config.candidates == ("source",)
    assert rest == ["cfa.rank=4"]
    # The adaptation's memory drops by the source or the consensus ("auto"), also when other memory keys are set.
    assert config.memory.drop_referee == "auto" and AdaptConfig().memory.drop_referee == "auto"
    assert split_overrides(["memory.drop_referee=mutual"])[0].memory.drop_referee == "mutual"
    with pytest.raises(ConfigError, match="gate.margn"):
        split_overrides(["gate.margn=0.1"])
    with pytest.raises(ConfigError, match="candidates"):
        split_overrides(["candidates=[magic]"])


def _batch(tmp_path: Path, name: str, labelled: bool = False) -> str:
    """A landing batch of 30 generated cells, 4 of them defective (no label travels with it)."""
    folder = tmp_path / name
    _textures(folder, 30, seed=5, defective=(2, 9, 21, 27))
    if labelled:
        good = _textures(folder / "_acceptance" / "good", 4, seed=6)
        bad = _textures(folder / "_acceptance" / "defect", 4, seed=7, defective=(0, 1, 2, 3))
        assert good and bad
    return str(folder)


def _source(tmp_path: Path):
    train = _textures(tmp_path / "source", 12, seed=8)
    source = build_detector("patchcore", method_config("patchcore", {"backbone": TINY_BACKBONE, "device": "cpu",
                                                                     "map_sigma": 1.0, "bank_fraction": 1.0}))
    source.fit([Sample(p, 0) for p in train[:10]], [Sample(p, 0) for p in train[10:]], QUIET)
    return source


def _small_adapt_config(**gate: object) -> AdaptConfig:
    # Every candidate, the memory of every image too (not built by default): these tests compare the memories.
    small_cells = [f"{part}.backbone.{k}={v}" for part in ("memory", "gaussian")
                   for k, v in TINY_BACKBONE.items() if k != "image_size"]
    return split_overrides(small_cells + ["gate.holdout_fraction=0.3", "memory.map_sigma=1.0", "gaussian.map_sigma=1.0",
                                          "candidates=[source,target_memory,target_gaussian,target_gaussian_all,"
                                          "target_memory_all,ref_cfa]"]
                           + [f"gate.{k}={v}" for k, v in gate.items()])[0]


@pytest.mark.slow  # fits detectors
def test_the_adaptation_reads_the_fit_part_once_for_the_share_and_both_memories(tmp_path, monkeypatch):
    source = _source(tmp_path)
    images = sorted(target_image_uris(_batch(tmp_path, "batch")))
    reads, mutual = [], []
    real_read, real_mutual_scores = TargetMemory.read_landing, model_module.mutual_scores
    monkeypatch.setattr(TargetMemory, "read_landing", lambda self, *a, **k: reads.append(1) or real_read(self, *a, **k))
    monkeypatch.setattr(model_module, "mutual_scores", lambda *a, **k: mutual.append(1) or real_mutual_scores(*a, **k))
    referee_reads = []
    real_run = promote_module.run_detector
    monkeypatch.setattr(promote_module, "run_detector", lambda *a, **k: referee_reads.append(1) or real_run(*a, **k))
    outcome = adapt_candidates(source, str(tmp_path / "batch"), images, _small_adapt_config(), runtime=QUIET)
    assert {"target_memory", "target_gaussian", "target_memory_all"} <= set(outcome.candidates)
    assert outcome.landing_share is not None
    assert len(reads) == 1 and len(mutual) == 1
    assert len(referee_reads) == 1  # the source scores the fit part once, for the memory and the Gaussian
    # The evidence says what each memory dropped, and by which referee.
    fits = {name: outcome.evidence()["candidates"][name].get("fit") for name in outcome.candidates}
    assert fits["source"] is None and fits["target_memory_all"]["dropped_images"] == 0
    referee = fits["target_memory"]["drop_referee"]  # "auto": which referee, and the separations that chose it
    assert referee.startswith(("source (separation", "consensus of the source")) and "the mutual scores'" in referee
    assert fits["target_memory"]["landed_images"] == len(images) - outcome.held_out
    # The Gaussian fits on what the memory's drop keeps: the same images dropped, by the same referee.
    gaussian = fits["target_gaussian"]
    assert (gaussian["dropped_images"], gaussian["drop_referee"]) == (fits["target_memory"]["dropped_images"],
                                                                     fits["target_memory"]["drop_referee"])
    assert gaussian["fitted_images"] + gaussian["calibration_images"] == gaussian["landed_images"] - gaussian[
        "dropped_images"]
    assert outcome.candidates["target_gaussian"].method == "gaussian"
    # Its undropped twin fits every landed image to fit on, and says no referee dropped any.
    everything = fits["target_gaussian_all"]
    assert (everything["dropped_images"], everything["drop_referee"]) == (0, None)
    assert everything["fitted_images"] + everything["calibration_images"] == everything["landed_images"]


@pytest.mark.slow  # fits detectors
def test_the_gate_reads_no_label_of_the_landed_images(tmp_path):
    """Two manifests over the same landed images, one with true labels and one with every label flipped:
    the gate's scores, its decision and the winner's threshold do not change."""
    source = _source(tmp_path)
    batch = _batch(tmp_path, "batch")
    images = sorted(target_image_uris(batch))
    defective = {images[i] for i in (2, 9, 21, 27)}
    outcomes = []
    for flip in (False, True):
        manifest = str(tmp_path / f"manifest_{flip}.parquet")
        write_manifest([Sample(p, int((p in defective) != flip), None, "landing") for p in images], manifest)
        landed = target_image_uris(manifest, "landing")
        outcomes.append(adapt_candidates(source, manifest, landed, _small_adapt_config(), runtime=QUIET))
    def untimed(gate: dict) -> dict:
        return {name: {k: v for k, v in figures.items() if "seconds" not in k} for name, figures in gate.items()}

    assert untimed(outcomes[0].gate) == untimed(outcomes[1].gate)
    assert outcomes[0].winner == outcomes[1].winner
    # The landing's defect share (the threshold rule's) is read from the images, and each candidate's
    # threshold flags that share of its held-out images.
    share = outcomes[0].landing_share
    assert share == outcomes[1].landing_share and outcomes[0].evidence()["landing_defect_share"] == share
    assert 0.05 < share < 0.4  # 4 of 30 landed images are defective
    for figures in outcomes[0].gate.values():
        assert abs(figures["flagged_held_out"] - share) <= 1 / outcomes[0].held_out + 1e-9


@pytest.mark.slow  # fits detectors
def test_acceptance_images_rank_the_candidates_and_never_land(tmp_path):
    source = _source(tmp_path)
    batch = _batch(tmp_path, "batch", labelled=True)
    images = target_image_uris(batch)
    assert len(images) == 30 and not any("/_acceptance/" in p for p in images)
    outcome = adapt_candidates(source, batch, images, _small_adapt_config(), runtime=QUIET)
    assert outcome.gate_source == "acceptance"
    assert outcome.candidates["target_memory"].config.backbone.image_size == source.image_size
    # Every candidate tells the bright-square acceptance defects from the acceptance goods.
    assert all(outcome.gate[name]["gate_auroc"] > 0.9 for name in ("source", "target_memory", "target_memory_all"))
    # target_memory_all holds every cell of every image it was fitted on; target_memory may drop some.
    fit_part = split_landing(images, _small_adapt_config().gate)[0]
    cells_per_image = outcome.candidates["target_memory"].config.backbone.grid_size ** 2
    assert len(outcome.candidates["target_memory_all"].bank) == len(fit_part) * cells_per_image
    assert outcome.candidates["target_memory_all"].config.drop_image_z is None


@pytest.mark.slow  # fits detectors
def test_kept_publishes_nothing_and_leaves_current_untouched(tmp_path):
    from ray_ad.distributed.lines import adapt_line

    root = str(tmp_path / "root")
    registry.publish(_source(tmp_path), root, "src")
    batch = _batch(tmp_path, "batch1")
    first = adapt_line("new", "src", batch, root, overrides=_overrides(), progress=False)
    assert first["decision"] == "published" and first["gate"]["winner"] == first["winner"]
    current = registry.current_version(root, "new")
    assert current == first["version"]
    # The same images land again under another name: nothing beats what the line now serves.
    copy = tmp_path / "batch2"
    shutil.copytree(batch, copy)
    second = adapt_line("new", "src", str(copy), root, overrides=_overrides(), progress=False)
    assert second["decision"] == "kept" and second["version"] is None
    assert second["gate"]["candidates"]["served"]["gate_auroc"] >= max(
        v["gate_auroc"] for k, v in second["gate"]["candidates"].items() if k != "served") - 0.01
    assert registry.current_version(root, "new") == current
    assert registry.list_versions(root, "new") == [current]
    status = json.loads(storage.read_text(storage.join(root, "jobs", f"{second['job_id']}.json")))
    assert status["decision"] == "kept" and status["state"] == "succeeded"
    # --force publishes the winner anyway, as a new version.
    third = adapt_line("new", "src", str(tmp_path / "batch2") + "/", root, overrides=_overrides(), progress=False,
                       force=True)
    assert third["decision"] == "published" and registry.current_version(root, "new") == third["version"] != current


def _overrides() -> list[str]:
    return ([f"memory.backbone.{k}={v}" for k, v in TINY_BACKBONE.items() if k != "image_size"]
            + ["gate.holdout_fraction=0.3", "memory.map_sigma=1.0"])


def test_elpv_landing_layout_lands_every_label_and_never_the_evaluation_split():
    pytest.importorskip("elpv_dataset")
    samples = load_samples("elpv:poly?layout=landing")
    landing = [s for s in samples if s.split == "landing"]
    test = [s for s in samples if s.split == "test"]
    assert {s.label for s in landing} == {-1, 0, 1}  # defective and ambiguous cells land too
    assert {s.label for s in test} == {0, 1}
    assert not {s.path for s in landing} & {s.path for s in test}
    assert abs(len(test) / (len(test) + len(landing) + 0.0) - 0.37) < 0.05  # 40% of cells, less ambiguous
    with pytest.raises(DataError, match="layout"):
        load_samples("elpv:poly?layout=random")


@pytest.mark.slow  # fits detectors
def test_a_small_landing_keeps_every_image_and_still_fits(tmp_path):
    landed = _textures(tmp_path / "few", 4, seed=9, defective=(1,))
    memory = build_detector("target_memory", method_config("target_memory", {"backbone": TINY_BACKBONE,
                                                                             "device": "cpu"}))
    info = memory.fit([Sample(p, -1) for p in landed], [], QUIET)
    assert info["dropped_images"] == 0 and info["bank_size"] == 4 * 64
    # As the adaptation job builds it (referee "auto", rule "share"): too few images to compare referees.
    auto = build_detector("target_memory", replace(memory.config, drop_referee="auto", drop_image_rule="share"))
    info = auto.fit([Sample(p, -1) for p in landed], [], QUIET, referee_scores=np.array([0.1, 0.9, 0.2, 0.3]))
    assert info["dropped_images"] == 0 and info["drop_referee"].startswith("source (4 landed images are too few")
    coreset = build_detector("target_memory", method_config("target_memory", {"backbone": TINY_BACKBONE,
                                                                              "device": "cpu", "bank_size": 50}))
    assert coreset.fit([Sample(p, -1) for p in landed], [], QUIET)["bank_size"] == 50
    with pytest.raises(ConfigError, match="reference_images"):
        method_config("target_memory", {"reference_images": 0})


@pytest.mark.slow  # fits detectors
def test_a_target_gaussian_fits_the_kept_images_on_the_source_backbone(tmp_path):
    source = _source(tmp_path)
    landed = _textures(tmp_path / "landed", 12, seed=11)
    config = method_config("gaussian", {"backbone": {**TINY_BACKBONE, "image_size": 32}, "device": "cpu",
                                        "map_sigma": 1.0})
    detector, info = fit_target_gaussian(source, landed, config, QUIET)
    assert detector.method == "gaussian" and detector.config.backbone.image_size == source.config.backbone.image_size
    assert (info["fitted_images"], info["calibration_images"]) == (10, 2)  # every tenth kept image calibrates
    # Fitted on the ten others: the same as a gaussian fitted on them by hand.
    by_hand = build_detector("gaussian", replace(detector.config))
    features = by_hand.extract_features([Sample(p, -1) for p in landed], QUIET)
    by_hand.fit_features(features[[i for i in range(12) if i % 10]])
    assert torch.allclose(by_hand.normaliser.mean, detector.normaliser.mean)
    with pytest.raises(DataError, match="at least 3 kept landed images"):
        fit_target_gaussian(source, landed[:2], config, QUIET)


@pytest.mark.slow  # fits detectors
def test_a_candidate_with_too_few_images_to_fit_is_left_out_and_the_others_still_compete(tmp_path, monkeypatch):
    source = _source(tmp_path)
    images = sorted(target_image_uris(_batch(tmp_path, "batch")))
    monkeypatch.setattr(promote_module, "MIN_GAUSSIAN_IMAGES", 1000)  # more than any landing here keeps
    config = split_overrides([f"{part}.backbone.{k}={v}" for part in ("memory", "gaussian")
                              for k, v in TINY_BACKBONE.items() if k != "image_size"]
                             + ["gate.holdout_fraction=0.3", "candidates=[source,target_memory,target_gaussian]"])[0]
    outcome = adapt_candidates(source, str(tmp_path / "batch"), images, config, runtime=QUIET)
    assert set(outcome.candidates) == {"source", "target_memory"} == set(outcome.gate)
    assert outcome.winner in outcome.candidates
