import pytest
import torch

from ray_ad.errors import ConfigError
from ray_ad.methods.osd_irf.model import OSDIRFConfig
from ray_ad.normalisation import FeatureNormaliser, NormalisationConfig
from ray_ad.training import TrainConfig


def correlated_features(n: int = 400, channels: int = 5, grid: int = 3, seed: int = 0) -> torch.Tensor:
    """Features whose mean and channel covariance differ from one grid position to the next."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(grid, grid, channels, channels, generator=generator)
    offset = 3 * torch.randn(grid, grid, channels, generator=generator)
    latent = torch.randn(n, grid, grid, channels, generator=generator)
    cells = torch.einsum("nhwc,hwdc->nhwd", latent, mixing) + offset
    return cells.permute(0, 3, 1, 2).contiguous()


def test_channel_standardisation_matches_mean_and_std():
    features = correlated_features()
    normaliser = FeatureNormaliser(NormalisationConfig("channel"), 5, 3).fit(features)
    out = normaliser(features)
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(5), atol=1e-5)
    assert torch.allclose(out.std(dim=(0, 2, 3)), torch.ones(5), atol=1e-5)


def test_position_whitening_gives_identity_covariance_at_every_position():
    features = correlated_features()
    normaliser = FeatureNormaliser(NormalisationConfig("position_whiten", ridge=1e-8), 5, 3).fit(features)
    out = normaliser(features).permute(2, 3, 0, 1)  # [G, G, N, C]
    assert torch.allclose(out.mean(2), torch.zeros(3, 3, 5), atol=1e-4)
    centred = out - out.mean(2, keepdim=True)
    covariance = torch.einsum("hwnc,hwnd->hwcd", centred, centred) / (out.shape[2] - 1)
    assert torch.allclose(covariance, torch.eye(5).expand(3, 3, 5, 5), atol=1e-3)
    # Channel-wise standardisation leaves the correlations in place: the covariance is far from I.
    channel = FeatureNormaliser(NormalisationConfig("channel"), 5, 3).fit(features)(features).permute(2, 3, 0, 1)
    centred = channel - channel.mean(2, keepdim=True)
    assert (torch.einsum("hwnc,hwnd->hwcd", centred, centred) / 399 - torch.eye(5)).abs().max() > 0.5


def test_whitened_norm_is_the_mahalanobis_distance_and_whitening_is_symmetric():
    features = correlated_features(seed=1)
    ridge = 0.05
    normaliser = FeatureNormaliser(NormalisationConfig("position_whiten", ridge=ridge), 5, 3).fit(features)
    assert torch.allclose(normaliser.scale, normaliser.scale.transpose(-1, -2), atol=1e-5)  # ZCA
    query = correlated_features(n=4, seed=2)
    squared_norm = normaliser(query).pow(2).sum(1)  # [4, G, G]
    # By hand, at position (1, 2): (x - mu)^T (Sigma + ridge * mean variance * I)^-1 (x - mu).
    cells = features[:, :, 1, 2].double()
    mu, sigma = cells.mean(0), torch.cov(cells.T)
    sigma = sigma + ridge * sigma.diagonal().mean() * torch.eye(5, dtype=torch.float64)
    delta = query[:, :, 1, 2].double() - mu
    mahalanobis = (delta @ torch.linalg.solve(sigma, delta.T)).diagonal()
    assert torch.allclose(squared_norm[:, 1, 2].double(), mahalanobis, rtol=1e-4)


def test_chunked_fit_equals_one_pass_and_tensors_round_trip():
    features = correlated_features(n=50)
    config = NormalisationConfig("position_whiten")
    one = FeatureNormaliser(config, 5, 3).fit(features, chunk=50)
    chunked = FeatureNormaliser(config, 5, 3).fit(features, chunk=7)
    assert torch.allclose(one.scale, chunked.scale, atol=1e-5) and torch.allclose(one.mean, chunked.mean, atol=1e-5)
    tensors = one.tensors("feature_")
    assert set(tensors) == {"feature_mean", "feature_whiten"}
    loaded = FeatureNormaliser(config, 5, 3).load_tensors(tensors, "feature_")
    assert torch.equal(loaded(features), one(features))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="'pca'"):
        NormalisationConfig("pca")
    with pytest.raises(ValueError, match="ridge"):
        NormalisationConfig("position_whiten", ridge=0)
    with pytest.raises(ConfigError, match="at least 2"):
        FeatureNormaliser(NormalisationConfig("position_whiten"), 5, 3).fit(correlated_features(n=1))
    with pytest.raises(ValueError, match="augment"):
        OSDIRFConfig(normalisation=NormalisationConfig("position_whiten"), train=TrainConfig(augment=4))


@pytest.mark.parametrize("kind", ["channel", "position_whiten"])
def test_invert_gives_back_the_features_that_were_normalised(kind):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(20, 6, 4, 4, generator=generator) * 3 + torch.arange(6.0)[:, None, None]
    normaliser = FeatureNormaliser(NormalisationConfig(kind=kind), 6, 4).fit(features)
    others = torch.randn(3, 6, 4, 4, generator=generator) * 5  # not the fitted ones: any features invert
    assert torch.allclose(normaliser.invert(normaliser(others)), others, atol=1e-4)
    assert not torch.allclose(normaliser(others), others, atol=1e-1)  # the normalisation did change them


def test_a_cell_mask_fits_each_position_on_its_kept_cells_only():
    features = correlated_features(n=120)
    keep = torch.ones(120, 3, 3, dtype=torch.bool)
    keep[:40, 0, 1] = False  # position (0, 1) keeps images 40..119, every other position all of them
    config = NormalisationConfig("position_whiten")
    masked = FeatureNormaliser(config, 5, 3).fit(features, keep)
    later = FeatureNormaliser(config, 5, 3).fit(features[40:])
    every = FeatureNormaliser(config, 5, 3).fit(features)
    assert torch.allclose(masked.mean[0, 1], later.mean[0, 1], atol=1e-5)
    assert torch.allclose(masked.scale[0, 1], later.scale[0, 1], atol=1e-4)
    assert torch.allclose(masked.mean[2, 2], every.mean[2, 2], atol=1e-5)
    assert not torch.allclose(masked.mean[0, 1], every.mean[0, 1], atol=1e-3)
    with pytest.raises(ConfigError, match="at least 2 kept cells"):
        FeatureNormaliser(config, 5, 3).fit(features, torch.zeros(120, 3, 3, dtype=torch.bool))
    with pytest.raises(ConfigError, match="shape"):
        FeatureNormaliser(config, 5, 3).fit(features, keep[:, :2])


def test_a_trimmed_fit_leaves_out_a_minority_of_outlying_cells():
    features = correlated_features(n=400)
    clean = FeatureNormaliser(NormalisationConfig("position_whiten"), 5, 3).fit(features[80:])
    contaminated = features.clone()
    contaminated[:80, :, 1, 1] += 40  # a fifth of the images hold a defect at position (1, 1)
    plain = FeatureNormaliser(NormalisationConfig("position_whiten"), 5, 3).fit(contaminated)
    robust = FeatureNormaliser(NormalisationConfig("position_whiten"), 5, 3)
    keep = robust.trimmed_fit(contaminated, trim=0.25)
    assert keep[:80, 1, 1].sum() == 0 and keep[80:, 1, 1].float().mean() > 0.9  # the defects left out
    assert (plain.mean[1, 1] - clean.mean[1, 1]).abs().max() > 5  # the plain fit is pulled towards them
    assert (robust.mean[1, 1] - clean.mean[1, 1]).abs().max() < 1.0
    # A defect is far from the robust fit's normal mode and near the plain one's.
    defect = contaminated[:1]
    assert robust(defect)[0, :, 1, 1].norm() > 3 * plain(defect)[0, :, 1, 1].norm()
    assert robust.trimmed_fit(features, trim=0.0).all()  # no trim: every cell, the plain fit
    assert robust.trimmed_fit(features, trim=0.2, rounds=0).all()  # no refit round: every cell
    with pytest.raises(ConfigError, match="trim"):
        robust.trimmed_fit(features, trim=1.0)
