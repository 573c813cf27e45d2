"""Backbone features on a Ray Data actor pool: the same tensors as local extraction, through the same cache."""

from __future__ import annotations

import torch

from ray_ad.backbones import BackboneConfig, FeatureExtractor
from ray_ad.data import load_samples
from ray_ad.distributed.batch import RayFeatureBackend
from ray_ad.features import extract_features
from tests.conftest import make_mvtec


def test_actor_pool_features_equal_local_ones_and_fill_the_training_cache(ray_cluster, tmp_path):
    samples = load_samples(str(make_mvtec(tmp_path / "data", n_train=5)), "train")
    extractor = FeatureExtractor(BackboneConfig(image_size=64, grid_size=8, layers=(1, 2)))
    local = extract_features(extractor, samples, augment=2, progress=False)
    cache = tmp_path / "cache"
    pooled = extract_features(extractor, samples, augment=2, progress=False, cache_dir=str(cache),
                              backend=RayFeatureBackend(actors=2, batch_size=2))
    assert pooled.shape == local.shape == (10, extractor.out_channels, 8, 8)
    torch.testing.assert_close(pooled, local, rtol=1e-4, atol=1e-4)  # same order: originals, then variants

    def must_not_run(*_args):
        raise AssertionError("the cache written by the actor pool should have been reused")

    again = extract_features(extractor, samples, augment=2, progress=False, cache_dir=str(cache), backend=must_not_run)
    torch.testing.assert_close(again, pooled)
