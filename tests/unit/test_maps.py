import pytest
import torch
import torch.nn.functional as F

from ray_ad.methods.base import gaussian_kernel, upsample_map


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """The direct computation upsample_map replaces: reflect-padded separable blur of ``[B, H, W]`` maps."""
    if sigma <= 0:
        return maps
    kernel, radius = gaussian_kernel(sigma, maps.dtype, maps.device)
    out = maps[:, None]
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out[:, 0]


@pytest.mark.parametrize(("grid", "size", "sigma"), [(16, 256, 4.0), (8, 64, 1.0), (16, 256, 0.0), (7, 96, 2.5)])
def test_upsample_map_equals_upsampling_then_blurring_the_image(grid, size, sigma):
    cell_map = torch.rand(3, grid, grid)
    image = F.interpolate(cell_map[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(upsample_map(cell_map, size, sigma), gaussian_blur(image, sigma), atol=1e-5)


def test_blur_keeps_a_constant_map_and_spreads_a_peak_symmetrically():
    assert torch.allclose(upsample_map(torch.full((1, 4, 4), 2.0), 32, 2.0), torch.full((1, 32, 32), 2.0))
    peak = torch.zeros(1, 32, 32)
    peak[0, 16, 16] = 1.0
    blurred = gaussian_blur(peak, 2.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(blurred[0, 16 - 3, 16], blurred[0, 16 + 3, 16]) and blurred[0, 16, 16] < 0.1
