"""REF + CFA end to end on tiny generated images: source training, adaptation, bundles, CLI."""

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ray_ad import cli
from ray_ad.bundle import load_bundle, save_bundle
from ray_ad.data import load_samples, write_manifest
from ray_ad.data.images import load_image
from ray_ad.data.synthetic import anomaly_pair, perlin_mask, synthesize_anomaly
from ray_ad.errors import ConfigError, DataError
from ray_ad.evaluation import compute_metrics, run_detector
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime
from ray_ad.methods.ref_cfa.align import tail_directions
from tests.conftest import batch_dependence, image_batch, make_mvtec, shift_folder, tiny_ref_cfa_config

pytestmark = pytest.mark.slow  # every test here trains score networks

QUIET = Runtime(progress=False)


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ref_cfa")
    source = make_mvtec(root / "source", n_train=12, n_good=6, n_bad=6, seed=0)
    held_out = make_mvtec(root / "held_out", n_train=1, n_good=6, n_bad=6, seed=5)
    target = shift_folder(make_mvtec(root / "target_raw", n_train=12, n_good=6, n_bad=6, seed=3), root / "target")
    return {"root": root, "source": source, "held_out": held_out, "target": target}


@pytest.fixture(scope="module")
def source_model(domains):
    detector = build_detector("ref_cfa", method_config("ref_cfa", tiny_ref_cfa_config()))
    samples = load_samples(str(domains["source"]))
    normals = [s for s in samples if s.label == 0]
    info = detector.fit(samples, normals[:3], QUIET)
    return detector, info


def test_source_model_learns_from_masks_and_separates_unseen_anomalies(source_model, domains):
    detector, info = source_model
    assert info["synthetic_images"] == 0  # the source has real anomalies with masks
    assert info["head_loss_last"] < info["head_loss_first"]
    metrics = compute_metrics(run_detector(detector, load_samples(str(domains["held_out"]), "test"), progress=False))
    assert metrics["image_auroc"] >= 0.9
    assert metrics["pixel_auroc"] >= 0.8
    assert np.isfinite(detector.threshold)


def test_adapt_aligns_the_target_and_round_trips_through_a_bundle(source_model, domains, tmp_path):
    detector = copy.deepcopy(source_model[0])
    target_images = [s.path for s in load_samples(str(domains["target"]))]
    info = detector.adapt(target_images, QUIET)
    assert detector.adapted and detector.target is not detector.source
    # Each closed-form alignment does what its loss asks for.
    assert info["dsa_subspace_distance_after"] < 1e-4 < info["dsa_subspace_distance_before"]
    assert info["sfa_coral_after"] < 0.01 * info["sfa_coral_before"]
    assert info["ta_profile_gap_after"] <= info["ta_profile_gap_before"]
    rotation = detector.alignment.rotation
    assert torch.allclose(rotation @ rotation.T, torch.eye(detector.channels), atol=1e-4)
    save_bundle(detector, str(tmp_path / "adapted"))
    loaded = load_bundle(str(tmp_path / "adapted"))
    assert loaded.adapted and loaded.threshold == pytest.approx(detector.threshold)
    images = torch.randn(2, 3, 64, 64)
    assert torch.allclose(loaded.predict(images).pred_score, detector.predict(images).pred_score, atol=1e-6)
    # The source model is unchanged by adapting a copy, and scores the target differently.
    assert not torch.allclose(source_model[0].predict(images).pred_score, detector.predict(images).pred_score)


def test_an_image_scores_the_same_alone_and_in_any_batch(source_model, domains):
    detector = source_model[0]
    images = image_batch(domains["target"], detector)
    # (With fields.last_reference="previous", what older bundles load with, the same images differ by
    # about 1e-4 here: M_K is rounding noise and so is the turn into it.)
    assert batch_dependence(detector, images) < 1e-6


def test_source_frozen_target_reuses_s1_on_target_statistics_without_training(source_model, domains):
    detector = copy.deepcopy(source_model[0])
    detector.config.target_init = "source_frozen"

    def no_training(*args: object) -> None:
        raise AssertionError("source_frozen must not train a target score network")

    target_images = [s.path for s in load_samples(str(domains["target"]))]
    info = detector.adapt(target_images, Runtime(progress=False, score_net_trainer=no_training))
    assert info["target_training_steps"] == 0 and detector.adapted
    source_weights, target_weights = detector.source.net.state_dict(), detector.target.net.state_dict()
    assert detector.target.net is not detector.source.net
    assert all(torch.equal(source_weights[k], target_weights[k]) for k in source_weights)
    # The standardisation is the target's: darker, lower-contrast images shift the feature statistics.
    features = detector.target_features(target_images, QUIET)
    assert torch.allclose(detector.target.normaliser.mean, features.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not torch.allclose(detector.target.normaliser.mean, detector.source.normaliser.mean, atol=1e-3)



def test_statistic_directions_fold_flips_into_the_alignment(source_model, domains, tmp_path):
    detector = copy.deepcopy(source_model[0])
    scalars = detector._scalar_dim()
    assert detector.source_directions is not None and detector.source_directions.shape == (scalars,)
    assert set(detector.source_directions.tolist()) <= {-1.0, 1.0}
    target_images = [s.path for s in load_samples(str(domains["target"]))]
    cache: dict = {}
    detector.adapt(target_images, QUIET, cache=cache)
    paper = detector.config.cfa
    detector.config.cfa = dataclasses.replace(paper, statistic_directions=True, second_order=False)
    info = detector.fit_alignment(target_images, QUIET, cache=cache)
    # Without SFA the alignment is exactly the flip: identity on h(P), -1 on the flipped statistics.
    flip = torch.diagonal(detector.alignment.align_a)
    assert torch.equal(detector.alignment.align_a, torch.diag(flip))
    assert torch.equal(flip[:-scalars], torch.ones(len(flip) - scalars))
    assert int((flip < 0).sum()) == info["statistics_flipped"]
    fields = detector.aligned_fields(detector.target, detector.target.normalise(cache["target_features"]),
                                     detector.target_basis(), detector.alignment.positions)
    # The rule: -1 exactly where the target's heavier tail disagrees with the source's labelled direction.
    target = tail_directions(detector.image_statistics(detector.signatures(fields)))
    assert torch.equal(flip[-scalars:], detector.source_directions * target)
    z, _ = detector.signature(fields.index(torch.arange(detector.grid**2)))
    expected = detector.f_psi(z * flip)
    torch.testing.assert_close(detector.patch_logits(fields.index(torch.arange(detector.grid**2))), expected)
    # The flips survive a bundle round trip, and so do the source directions.
    save_bundle(detector, str(tmp_path / "flipped"))
    loaded = load_bundle(str(tmp_path / "flipped"))
    torch.testing.assert_close(loaded.source_directions, detector.source_directions)
    torch.testing.assert_close(loaded.alignment.align_a, detector.alignment.align_a)


def test_synthetic_witness_reads_pasted_anomalies_through_the_target_network(source_model, domains):
    detector = copy.deepcopy(source_model[0])
    target_images = [s.path for s in load_samples(str(domains["target"]))]
    cache: dict = {}
    detector.adapt(target_images, QUIET, cache=cache)
    detector.config.cfa = dataclasses.replace(detector.config.cfa, statistic_directions=True,
                                              direction_witness="synthetic", witness_images=6)
    info = detector.fit_alignment(target_images, QUIET, cache=cache)
    originals, anomalous, targets = cache["witness"]
    assert originals.shape == anomalous.shape and len(targets) == 6
    assert not torch.equal(originals, anomalous)  # something was pasted
    # The rule: the sign of the median change of each statistic over the cells the anomaly covers.
    directions = []
    for features in (originals, anomalous):
        fields = detector.aligned_fields(detector.target, detector.target.normalise(features), detector.target_basis(),
                                         detector.alignment.positions)
        directions.append(detector.signatures(fields)[:, -detector._scalar_dim():])
    inside = targets.flatten() >= 0.5
    expected = torch.where((directions[1] - directions[0])[inside].median(0).values >= 0, 1.0, -1.0)
    assert info["target_directions"] == [int(v) for v in expected]
    assert info["statistics_flipped"] == int((detector.source_directions * expected < 0).sum())


def test_unknown_direction_witness_is_named():
    with pytest.raises(ValueError, match="'labels'"):
        method_config("ref_cfa", tiny_ref_cfa_config(cfa={"rank": 3, "direction_witness": "labels"}))


def test_statistic_directions_need_a_source_that_measured_them(source_model, domains):
    detector = copy.deepcopy(source_model[0])
    detector.source_directions = None  # a bundle trained before the option existed
    detector.config.cfa = dataclasses.replace(detector.config.cfa, statistic_directions=True)
    target_images = [s.path for s in load_samples(str(domains["target"]))]
    with pytest.raises(ConfigError, match="statistic_directions needs the source's statistic directions"):
        detector.adapt(target_images, QUIET)

def test_temporal_alignment_over_diffusion_time_runs_the_target_chain_at_the_warped_timesteps(
    source_model, domains, tmp_path
):
    detector = copy.deepcopy(source_model[0])
    detector.config.cfa = dataclasses.replace(detector.config.cfa, temporal_mode="timesteps")
    target_images = [s.path for s in load_samples(str(domains["target"]))]
    detector.adapt(target_images, QUIET)
    detector.alignment.positions = torch.tensor([0.5, 1.5, 2.0])  # psi as TA might fit it, clamped at the end
    chains = []
    original = detector.fields

    def recording(*args, **kwargs):
        chains.append(kwargs.get("timesteps"))
        return original(*args, **kwargs)

    detector.fields = recording
    fields = detector.domain_fields(torch.randn(2, detector.channels, detector.grid, detector.grid))
    # t(psi) between the configured 300, 200, 100; the clamped end moved one timestep on, not repeated.
    assert chains == [[250, 150, 100]]
    # Step 0 is the chain's first call: no change and no turn, as on the source (interpolating the
    # stored steps at 0.5 would carry half of step 1's change into it).
    assert torch.equal(fields.change[:, 0], torch.zeros_like(fields.change[:, 0]))
    assert torch.equal(fields.turn[:, 0], torch.zeros_like(fields.turn[:, 0]))
    detector.config.cfa = dataclasses.replace(detector.config.cfa, temporal_mode="resample")
    resampled = detector.domain_fields(torch.randn(2, detector.channels, detector.grid, detector.grid))
    assert resampled.change[:, 0].abs().sum() > 0


def test_input_alignment_moves_g_phi_inputs_onto_the_source_normals(source_model, domains, tmp_path):
    detector = copy.deepcopy(source_model[0])
    assert detector.input_center is not None and detector.input_center.shape == detector.input_scale.shape
    detector.config.cfa = dataclasses.replace(detector.config.cfa, input_alignment=True)
    target_images = [s.path for s in load_samples(str(domains["target"]))]
    cache: dict = {}
    info = detector.adapt(target_images, QUIET, cache=cache)
    fields = detector.aligned_fields(detector.target, detector.target.normalise(cache["target_features"]),
                                     detector.target_basis(), detector.alignment.positions)
    raw = detector.g_phi_inputs(fields)
    aligned = raw * detector.alignment.input_a + detector.alignment.input_b
    # Per coordinate, the aligned target inputs have the source normals' median (the fit's sample of at
    # most 50k cells is every cell here).
    torch.testing.assert_close(aligned.median(0).values, detector.input_center, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(raw.median(0).values, detector.input_center, atol=1e-2)
    assert info["input_scale_ratio_median"] == pytest.approx(float(detector.alignment.input_a.median()))
    save_bundle(detector, str(tmp_path / "aligned"))
    loaded = load_bundle(str(tmp_path / "aligned"))
    torch.testing.assert_close(loaded.alignment.input_a, detector.alignment.input_a)
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.predict(images).pred_score, detector.predict(images).pred_score)
    # Turned off again, a refit leaves no input alignment behind.
    detector.config.cfa = dataclasses.replace(detector.config.cfa, input_alignment=False)
    detector.fit_alignment(target_images, QUIET, cache=cache)
    assert detector.alignment.input_a is None and "input_a" not in detector.tensors()


def test_input_alignment_needs_the_source_spread_or_its_normals(source_model, domains):
    detector = copy.deepcopy(source_model[0])
    center = detector.input_center
    detector.input_center = detector.input_scale = None  # a source bundle older than the option
    detector.config.cfa = dataclasses.replace(detector.config.cfa, input_alignment=True)
    target_images = [s.path for s in load_samples(str(domains["target"]))]
    with pytest.raises(ConfigError, match="fit_input_anchors"):
        detector.adapt(target_images, QUIET)
    normals = [s for s in load_samples(str(domains["source"])) if s.label == 0]
    detector.fit_input_anchors(normals, QUIET)
    assert detector.input_center.shape == center.shape


def test_robust_target_net_retrains_without_the_images_it_denoises_worst(source_model, domains):
    from ray_ad.training import per_sample_epsilon_loss

    detector = copy.deepcopy(source_model[0])
    detector.config.target_trim = 0.25
    seen: list[torch.Tensor] = []
    trainer = Runtime().score_net_trainer

    def recording(net, x0, *args, **kwargs):
        seen.append(x0)
        return trainer(net, x0, *args, **kwargs)

    target_images = [s.path for s in load_samples(str(domains["target"]))]
    cache: dict = {}
    first_losses = {}

    original_train = detector._train_domain

    def train_domain(features, runtime, name):
        domain, losses = original_train(features, runtime, name)
        if not first_losses:
            x0 = domain.normalise(features)
            first_losses["loss"] = per_sample_epsilon_loss(domain.net, detector.schedule, x0,
                                                           detector.timesteps.tolist(), detector.config.seed)
        return domain, losses

    detector._train_domain = train_domain
    info = detector.fit_target_score_net(target_images, Runtime(progress=False, score_net_trainer=recording),
                                         cache=cache)
    n = len(target_images)
    assert [len(x) for x in seen] == [n, round(0.75 * n)] == [n, info["target_images_kept"]]
    # The second pass saw exactly the images with the lowest first-pass loss.
    kept = first_losses["loss"].argsort()[: round(0.75 * n)].sort().values
    features = cache["target_features"]
    expected = detector.target.normalise(features[kept])
    torch.testing.assert_close(seen[1], expected)
    assert info["target_pass2_loss_last"] is not None


def test_unknown_target_init_is_named():
    with pytest.raises(ValueError, match="'warm'"):
        method_config("ref_cfa", tiny_ref_cfa_config(target_init="warm"))


@pytest.mark.parametrize("fields", [{"components": ["M", "Q"]}, {"components": ["R"]}, {"representation": "raw"}])
def test_ablated_field_settings_train_and_predict(domains, fields):
    config = tiny_ref_cfa_config(fields={**tiny_ref_cfa_config()["fields"], **fields})
    config["head"]["steps"] = 10
    detector = build_detector("ref_cfa", method_config("ref_cfa", config))
    samples = load_samples(str(domains["source"]))
    detector.fit(samples, [s for s in samples if s.label == 0][:2], QUIET)
    prediction = detector.predict(torch.randn(3, 3, 64, 64))
    assert prediction.pred_score.shape == (3,) and prediction.anomaly_map.shape == (3, 64, 64)
    assert torch.isfinite(prediction.pred_score).all()


def test_normal_only_source_trains_on_synthetic_anomalies(domains):
    config = tiny_ref_cfa_config()
    config["head"].update(steps=10, synthetic_ratio=0.5)
    detector = build_detector("ref_cfa", method_config("ref_cfa", config))
    normals = load_samples(str(domains["source"]), "train")
    info = detector.fit(normals[2:], normals[:2], QUIET)
    assert info["synthetic_images"] == 5  # round(10 normals * 0.5)


def test_synthetic_anomaly_changes_only_pixels_inside_its_mask():
    rng = np.random.default_rng(0)
    image = np.full((64, 64, 3), 100, dtype=np.uint8)
    donor = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    anomalous, mask = synthesize_anomaly(image, donor, rng)
    assert mask.any() and not mask.all()
    assert np.array_equal(anomalous[~mask], image[~mask])
    assert (anomalous[mask] != 100).any()
    again = perlin_mask(64, np.random.default_rng(7))
    assert np.array_equal(again, perlin_mask(64, np.random.default_rng(7)))  # deterministic per seed


def test_anomaly_pair_pastes_a_donor_into_the_resized_image(domains):
    paths = [s.path for s in load_samples(str(domains["source"]), "train")]
    original, anomalous, mask = anomaly_pair(paths, 0, 1, 32, np.random.default_rng(0))
    assert original.shape == anomalous.shape == (32, 32, 3) and mask.shape == (32, 32)
    assert np.array_equal(original, np.asarray(load_image(paths[0]).resize((32, 32), Image.BILINEAR)))
    assert np.array_equal(anomalous[~mask], original[~mask]) and mask.any()
    # The same rng state draws the same anomaly; no size keeps the image's own (shorter) side.
    again = anomaly_pair(paths, 0, 1, 32, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(again, (original, anomalous, mask)))
    assert anomaly_pair(paths, 0, 1, None, np.random.default_rng(0))[0].shape == (64, 64, 3)


def test_source_fit_rejects_unlabelled_samples(domains):
    detector = build_detector("ref_cfa", method_config("ref_cfa", tiny_ref_cfa_config()))
    samples = load_samples(str(domains["source"]))
    samples[0] = dataclasses.replace(samples[0], label=-1)
    with pytest.raises(DataError, match="labelled 0"):
        detector.fit(samples, samples[:1], QUIET)


def _write_config(path: Path) -> str:
    path.write_text(yaml.safe_dump(tiny_ref_cfa_config()))
    return str(path)


def test_adapt_never_reads_a_target_label_or_mask(source_model, domains, tmp_path, monkeypatch):
    """Two manifests of the same target images with different labels and masks adapt identically,
    and no mask is ever opened."""
    source_uri = str(tmp_path / "source_bundle")
    save_bundle(source_model[0], source_uri)
    samples = load_samples(str(domains["target"]))
    rng = np.random.default_rng(0)
    scrambled = [
        dataclasses.replace(s, label=int(label), mask_path="does/not/exist.png" if label else None)
        for s, label in zip(samples, rng.permutation([s.label for s in samples]))
    ]
    write_manifest(samples, str(tmp_path / "a.parquet"))
    write_manifest(scrambled, str(tmp_path / "b.parquet"))

    def no_masks(*args, **kwargs):
        raise AssertionError("adaptation opened a mask")

    monkeypatch.setattr("ray_ad.data.dataset.load_mask", no_masks)
    for name in ("a", "b"):
        code = cli.main(["adapt", "--model", source_uri, "--target", str(tmp_path / f"{name}.parquet"),
                         "--out", str(tmp_path / f"adapted_{name}"), "--quiet"])
        assert code == 0
    a, b = load_bundle(str(tmp_path / "adapted_a")), load_bundle(str(tmp_path / "adapted_b"))
    for key, value in a.tensors().items():
        assert torch.equal(value, b.tensors()[key]), key
    assert a.threshold == b.threshold


def test_cli_train_adapt_evaluate(domains, tmp_path, capsys):
    config = _write_config(tmp_path / "tiny.yaml")
    source_uri, adapted_uri = str(tmp_path / "src"), str(tmp_path / "adapted")
    assert cli.main(["train", "--method", "ref_cfa", "--data", str(domains["source"]), "--out", source_uri,
                     "--config", config, "--quiet", "--calibration-fraction", "0.3"]) == 0
    assert "labelled images" in capsys.readouterr().out
    assert cli.main(["adapt", "--model", source_uri, "--target", str(domains["target"]), "--out", adapted_uri,
                     "--set", "cfa.temporal=false", "--set", "train.steps=20", "--eval-split", "test",
                     "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "dsa_subspace_distance_after" in out and "image_auroc" in out
    adapted_config = json.loads((Path(adapted_uri) / "config.json").read_text())
    assert adapted_config["state"]["adapted"] is True
    assert adapted_config["config"]["cfa"]["temporal"] is False
    assert cli.main(["evaluate", "--model", adapted_uri, "--data", str(domains["target"]), "--quiet"]) == 0
    assert "ref_cfa" in capsys.readouterr().out


def test_cli_adapt_errors_name_the_problem(domains, tmp_path, capsys, source_model):
    source_uri = str(tmp_path / "src")
    save_bundle(source_model[0], source_uri)
    code = cli.main(["adapt", "--model", source_uri, "--target", str(domains["target"]),
                     "--out", str(tmp_path / "x"), "--set", "backbone.grid_size=4"])
    assert code == 2 and "adapt can only change cfa, train, target_init; not backbone" in capsys.readouterr().err
    code = cli.main(["adapt", "--model", source_uri, "--target", str(domains["target"]),
                     "--out", str(tmp_path / "z"), "--set", "cfa.rank=2"])
    assert code == 2 and "cfa.rank=2 differs from the source model's U_S rank 3" in capsys.readouterr().err
    osd = build_detector("osd_irf", method_config("osd_irf", {"backbone": {"image_size": 64, "grid_size": 8,
                                                                           "layers": [1, 2]}, "device": "cpu"}))
    save_bundle(osd, str(tmp_path / "osd"))
    code = cli.main(["adapt", "--model", str(tmp_path / "osd"), "--target", str(domains["target"]),
                     "--out", str(tmp_path / "y")])
    assert code == 2 and "only ref_cfa source models can be adapted" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("x", "y", "z"))
