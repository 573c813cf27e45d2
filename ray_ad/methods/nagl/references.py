"""A line's reference set: K normal images and abnormal images with their defect masks.

Stored in the line's bundle as uint8 pixels at the backbone's input size (``[K, 3, S, S]``, ``[A, 3, S,
S]``, masks ``[A, S, S]``), inside the checksummed weights file, so a reference set is published,
verified and rolled back exactly like any model version. Features are recomputed from the pixels when
the bundle loads (K + A backbone passes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ray_ad import storage
from ray_ad.data.images import decode_image, load_image, resized_pixels
from ray_ad.errors import DataError

TENSOR_KEYS = ("ref.normal", "ref.abnormal", "ref.masks")


@dataclass
class ReferenceSet:
    normal: torch.Tensor  # uint8 [K, 3, S, S]
    abnormal: torch.Tensor  # uint8 [A, 3, S, S]
    masks: torch.Tensor  # uint8 [A, S, S], 1 inside the defect

    def __post_init__(self) -> None:
        if self.normal.ndim != 4 or len(self.normal) < 1:
            raise DataError("a reference set needs at least one normal reference image")
        if len(self.abnormal) != len(self.masks):
            raise DataError(f"{len(self.abnormal)} abnormal references but {len(self.masks)} masks")
        empty = [i for i in range(len(self.masks)) if not bool(self.masks[i].any())]
        if empty:
            raise DataError(f"abnormal reference {empty[0]}: its mask marks no defect pixel")

    @property
    def shots(self) -> str:
        """``"K+A"``, as the CLI's ``--shots`` writes it."""
        return f"{len(self.normal)}+{len(self.abnormal)}"

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(TENSOR_KEYS, (self.normal, self.abnormal, self.masks)))

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> ReferenceSet:
        return ReferenceSet(*(tensors[key].to(torch.uint8) for key in TENSOR_KEYS))


def defect_pixels(mask: np.ndarray) -> np.ndarray:
    """Which pixels of a grey mask are defect: above 127 for 0/255 masks, nonzero for 0/1 masks."""
    return mask > (127 if mask.max(initial=0) > 1 else 0)


def build_references(normal: list[tuple[str, Image.Image]], abnormal: list[tuple[str, Image.Image, Image.Image | None]],
                     size: int) -> ReferenceSet:
    """A reference set from named PIL images; every error names the offending image.

    ``abnormal`` items are (name, image, mask); the mask must have the image's size (``defect_pixels`` says
    which pixels are defect), and a missing mask (None) or one without a defect pixel is refused.
    """
    if not normal:
        raise DataError("no normal reference: a reference set needs at least one normal image")
    pixels, masks = [], []
    for name, image, mask in abnormal:
        if mask is None:
            raise DataError(f"abnormal reference {name}: no mask given (abnormal references need IMAGE:MASK)")
        if mask.size != image.size:
            raise DataError(f"abnormal reference {name}: its mask is {mask.size[0]}x{mask.size[1]} but the image "
                            f"is {image.size[0]}x{image.size[1]}")
        binary = defect_pixels(np.asarray(mask.convert("L").resize((size, size), Image.Resampling.NEAREST)))
        if not binary.any():
            raise DataError(f"abnormal reference {name}: its mask marks no defect pixel (at {size}x{size})")
        pixels.append(resized_pixels(image, size))
        masks.append(torch.from_numpy(binary.astype(np.uint8)))
    return ReferenceSet(
        torch.stack([resized_pixels(image, size) for _, image in normal]),
        torch.stack(pixels) if pixels else torch.zeros(0, 3, size, size, dtype=torch.uint8),
        torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.uint8))


def load_references(normal: list[str], abnormal: list[tuple[str, str | None]], size: int) -> ReferenceSet:
    """A reference set from image URIs and (image URI, mask URI) pairs."""
    def read_mask(uri: str) -> Image.Image:
        return decode_image(storage.read_bytes(uri), uri, keep_gray=True)

    return build_references([(uri, load_image(uri)) for uri in normal],
                            [(uri, load_image(uri), read_mask(mask) if mask else None) for uri, mask in abnormal], size)


__all__ = ["ReferenceSet", "build_references", "load_references"]


def publish_references(root: str, line: str, model_uri: str, normal: list[tuple[str, Image.Image]],
                       abnormal: list[tuple[str, Image.Image, Image.Image | None]]) -> str:
    """Publish ``line``'s reference set as a new version: the nagl model at ``model_uri`` (a generalist
    or another line's version) with these references. Nothing is written when any input is bad."""
    from ray_ad import registry  # the registry imports the methods: imported here, not at module load
    from ray_ad.bundle import load_bundle

    detector = load_bundle(model_uri, device="cpu")
    if not getattr(detector, "uses_references", False):
        raise DataError(f"{model_uri} is a {detector.method} model; references belong to nagl models")
    references = build_references(normal, abnormal, detector.image_size)
    detector.set_references(references)
    metrics = {"references": {"normal": [name for name, _ in normal], "abnormal": [name for name, *_ in abnormal],
                              "model": model_uri}}
    return registry.publish(detector, root, line, metrics)
