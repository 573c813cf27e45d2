import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ray_ad.backbones import BackboneConfig, FeatureExtractor
from ray_ad.backbones.extractor import build_body
from ray_ad.backbones.weights import load_state_dict
from ray_ad.errors import WeightsError
from ray_ad.methods.nagl.config import NAGLConfig


@pytest.mark.slow  # full-size backbone passes
def test_embedded_package_weights_load_into_timm():
    config = BackboneConfig(layers=(1, 2, 3), grid_size=16, image_size=64)
    body = build_body(config)
    state = load_state_dict("package:efficientnet-lite0", "tf_efficientnet_lite0")
    # The first conv and a late block weight arrive unchanged (order-based name mapping).
    assert torch.equal(body.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(body.blocks[4][0].conv_pw.weight, state["_blocks.8._expand_conv.weight"])
    assert len(body.blocks) == 5  # blocks after stage 3 are pruned
    extractor = FeatureExtractor(config)
    features = extractor(torch.zeros(2, 3, 64, 64))
    assert features.shape == (2, 24 + 40 + 112, 16, 16)
    assert extractor.mean == (0.5, 0.5, 0.5)


@pytest.mark.slow  # full-size backbone
def test_nagl_default_backbone_is_lite2_with_its_embedded_weights():
    config = NAGLConfig().backbone
    assert config.name == "tf_efficientnet_lite2" and config.weight_source == "package:efficientnet-lite2"
    body = build_body(config)
    state = load_state_dict("package:efficientnet-lite2", "tf_efficientnet_lite2")
    assert torch.equal(body.conv_stem.weight, state["_conv_stem.weight"])  # ImageNet, not a random start
    features = FeatureExtractor(config)(torch.zeros(1, 3, 64, 64))
    assert features.shape == (1, 48 + 120, 32, 32)  # stages 2 and 3: C = 168 (the README's d_model)


def test_random_init_only_by_name_and_missing_file_is_an_error(tmp_path):
    FeatureExtractor(BackboneConfig(weights="random", image_size=64, grid_size=4))
    with pytest.raises(WeightsError, match="weight file not found: .*missing.safetensors"):
        FeatureExtractor(BackboneConfig(weights=str(tmp_path / "missing.safetensors"), image_size=64))


def test_safetensors_file_and_shape_mismatch(tmp_path):
    donor = build_body(BackboneConfig(weights="random", layers=(1, 2), image_size=64, grid_size=4))
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    loaded = build_body(BackboneConfig(weights=str(path), layers=(1, 2), image_size=64, grid_size=4))
    assert torch.equal(loaded.conv_stem.weight, donor.conv_stem.weight)
    bad = {k: v for k, v in donor.state_dict().items()}
    bad["conv_stem.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match="do not fit the model"):
        FeatureExtractor(BackboneConfig(weights=str(tmp_path / "bad.safetensors"), layers=(1, 2), image_size=64))


def test_pth_with_weights_only(tmp_path):
    donor = build_body(BackboneConfig(weights="random", layers=(1,), image_size=64, grid_size=4))
    torch.save({"state_dict": donor.state_dict()}, tmp_path / "w.pth")
    loaded = build_body(BackboneConfig(weights=str(tmp_path / "w.pth"), layers=(1,), image_size=64, grid_size=4))
    assert torch.equal(loaded.conv_stem.weight, donor.conv_stem.weight)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match="cannot read weights from .*junk.pth"):
        FeatureExtractor(BackboneConfig(weights=str(tmp_path / "junk.pth"), image_size=64))


def test_unknown_package_is_named():
    with pytest.raises(WeightsError, match="unknown weight package 'efficientnet-lite9'"):
        load_state_dict("package:efficientnet-lite9", "tf_efficientnet_lite0")


def test_grid_is_pooled_and_frozen():
    extractor = FeatureExtractor(BackboneConfig(layers=(2, 3), grid_size=8, image_size=64, local_pool=3))
    extractor.train()
    assert not extractor.body.training
    assert all(not p.requires_grad for p in extractor.parameters())
    assert extractor(torch.randn(1, 3, 64, 64)).shape == (1, 40 + 112, 8, 8)



@pytest.mark.slow  # full-size backbone passes
def test_cpu_batches_run_in_cache_sized_chunks_with_the_same_features(monkeypatch):
    extractor = FeatureExtractor(BackboneConfig(layers=(2, 3), grid_size=8, image_size=128, local_pool=(3, 5)))
    assert extractor.cpu_chunk_images == 8  # 2 x 256^2 pixels = 8 images of 128^2
    images = torch.randn(19, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    whole = extractor._grid_features(images)  # one pass over the whole batch
    passes = []
    grid_features = extractor._grid_features
    monkeypatch.setattr(extractor, "_grid_features", lambda part: passes.append(len(part)) or grid_features(part))
    chunked = extractor(images)
    assert passes == [8, 8, 3]
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())
    assert FeatureExtractor(BackboneConfig(layers=(2,), grid_size=8, image_size=512)).cpu_chunk_images == 1


@pytest.mark.slow  # full-size backbone passes
def test_several_pool_sizes_stack_one_copy_per_size():
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    single = {size: FeatureExtractor(BackboneConfig(layers=(2, 3), grid_size=8, image_size=64, local_pool=size))
              for size in (3, 5)}
    stacked = FeatureExtractor(BackboneConfig(layers=(2, 3), grid_size=8, image_size=64, local_pool=(3, 5)))
    assert stacked.out_channels == 2 * (40 + 112)
    expected = torch.cat([single[3](images), single[5](images)], dim=1)
    torch.testing.assert_close(stacked(images), expected)
    # The wider pool really is a different view of the same cells.
    assert not torch.allclose(single[3](images), single[5](images))


@pytest.mark.parametrize("size", [3, 5, 11])
def test_box_average_is_the_k_by_k_mean_without_padding(size):
    from ray_ad.backbones.extractor import box_average

    feature = torch.randn(2, 4, 9, 13, generator=torch.Generator().manual_seed(size))
    expected = F.avg_pool2d(feature, size, stride=1, padding=size // 2, count_include_pad=False)
    torch.testing.assert_close(box_average(feature, size), expected)
    # A corner cell averages only the cells inside the image.
    half = size // 2
    corner = feature[..., : half + 1, : half + 1].mean((-1, -2))
    torch.testing.assert_close(box_average(feature, size)[..., 0, 0], corner)


@pytest.mark.parametrize("pools", [2, (3, 4), (), 0])
def test_bad_pool_sizes_are_named(pools):
    with pytest.raises(ValueError, match="local_pool must be odd positive kernel sizes"):
        BackboneConfig(local_pool=pools)


def test_pool_sizes_read_from_a_config_list():
    from ray_ad.config import from_dict

    config = from_dict(BackboneConfig, {"local_pool": [3, 11]})
    assert config.pool_sizes == (3, 11)
    assert from_dict(BackboneConfig, {"local_pool": 3}).pool_sizes == (3,)

@pytest.mark.slow  # full-size backbone passes
def test_bundled_weights_classify_a_real_photo():
    # matplotlib ships Grace Hopper's portrait; ImageNet class 652 is "military uniform".
    import numpy as np
    import timm
    from matplotlib import cbook
    from PIL import Image

    from ray_ad.backbones.weights import apply_weights

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    apply_weights(model, load_state_dict("package:efficientnet-lite0", "tf_efficientnet_lite0"), "package")
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((224, 224))
    x = (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.no_grad():
        assert model(x).argmax().item() == 652


def test_batch_norms_fold_into_the_convolutions_without_changing_the_features(monkeypatch):
    import ray_ad.backbones.extractor as extractor_module

    config = BackboneConfig(layers=(1, 2, 3), grid_size=8, image_size=128)
    folded = FeatureExtractor(config)
    assert folded.folded_norms > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.body.modules())
    monkeypatch.setattr(extractor_module, "fold_batch_norms", lambda body, forward: (body, 0))
    plain = FeatureExtractor(config)
    images = torch.randn(2, 3, 128, 128)
    reference = plain(images)
    assert torch.allclose(folded(images), reference, atol=1e-4 * reference.abs().max().item())


def test_a_fold_that_changes_the_output_is_not_used():
    from torch import nn

    from ray_ad.backbones.fold import fold_batch_norms

    class NormBeforeConv(nn.Module):
        """conv and norm are registered in this order, but the norm runs first: folding would be wrong."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.norm = nn.BatchNorm2d(3)
            self.norm.running_mean.fill_(0.5)
            self.norm.running_var.fill_(4.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.norm(x))

    body = NormBeforeConv().eval()
    example = torch.randn(1, 3, 4, 4)
    kept, count = fold_batch_norms(body, lambda module: [module(example)])
    assert kept is body and count == 0
