"""Decoding images and masks from bytes, with errors that name the file."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ray_ad import storage
from ray_ad.errors import DataError, ImageTooLarge

# Decompression bombs are refused outright rather than warned about.
warnings.simplefilter("error", Image.DecompressionBombWarning)


def decode_image(data: bytes, name: str, max_pixels: int | None = None, keep_gray: bool = False) -> Image.Image:
    """Bytes -> RGB PIL image (grayscale and palette images become 3 channels).

    With ``keep_gray`` a grayscale image stays one channel ("L"): ``to_tensor`` then resizes one
    channel instead of three and repeats it afterwards, the same tensor for a third of the work.
    Over ``max_pixels`` (read from the header, before decoding): ``ImageTooLarge``; bytes that do not
    decode: ``DataError``."""
    if not data:
        raise DataError(f"{name}: empty file")
    try:
        image = Image.open(io.BytesIO(data))
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ImageTooLarge(
                f"{name}: image of {image.width}x{image.height} pixels is over the limit of "
                f"{max_pixels} pixels"
            )
        image.load()
    except ImageTooLarge:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise DataError(f"{name}: not a readable image ({exc})") from exc
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale (common for industrial cameras): scale to 8 bits before RGB.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray((array / peak * 255.0).astype(np.uint8))
    if keep_gray and image.mode == "L":
        return image
    return image.convert("RGB")


def load_image(uri: str, max_pixels: int | None = None, keep_gray: bool = False) -> Image.Image:
    return decode_image(storage.read_bytes(uri), uri, max_pixels, keep_gray)


def load_mask(uri: str, expected_size: tuple[int, int]) -> Image.Image:
    """A binary mask (any nonzero pixel is defect) of the same size as its image."""
    data = storage.read_bytes(uri)
    try:
        mask = Image.open(io.BytesIO(data))
        mask.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{uri}: not a readable mask image ({exc})") from exc
    if mask.size != expected_size:
        raise DataError(
            f"mask {uri} is {mask.size[0]}x{mask.size[1]} but its image is "
            f"{expected_size[0]}x{expected_size[1]}"
        )
    return mask.convert("L")


def resized_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """PIL RGB or grayscale ("L") -> uint8 ``[3, size, size]`` as the backbone sees it before normalising;
    a grayscale image is resized as one channel and repeated (bilinear resizing acts on each channel
    alone, so the result is that of its RGB conversion)."""
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    pixels = torch.from_numpy(np.array(image.resize((size, size), Image.BILINEAR)))
    return pixels.expand(3, size, size) if pixels.ndim == 2 else pixels.permute(2, 0, 1)


def normalise_pixels(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``[..., 3, S, S]`` -> the normalised float tensor: (x / 255 - mean) / std as one multiply-add."""
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    return pixels.float() * (1.0 / (255.0 * std_t)) - mean_t / std_t


def to_tensor(
    image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """PIL RGB or grayscale ("L") -> normalised float tensor ``[3, size, size]``."""
    return normalise_pixels(resized_pixels(image, size), mean, std)


def mask_to_tensor(mask: Image.Image | None, size: int) -> torch.Tensor:
    """Binary mask ``[1, size, size]`` (zeros when there is no mask)."""
    if mask is None:
        return torch.zeros(1, size, size)
    resized = mask.resize((size, size), Image.NEAREST)
    return torch.from_numpy((np.asarray(resized) > 127).astype(np.float32))[None]


@dataclass(frozen=True)
class Preprocessor:
    """What a detector does to an image before its backbone: resize to ``size`` and normalise with the
    backbone's ``mean``/``std``. Saved in every bundle (the backbone config and ``mean``/``std``), so a
    caller never rebuilds it from a detector's parts."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image (RGB, or "L" for the one-channel fast path) -> ``[3, size, size]``."""
        return to_tensor(image, self.size, self.mean, self.std)

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> ``[B, 3, size, size]``."""
        return torch.stack([self(image) for image in images])
