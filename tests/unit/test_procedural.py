"""Procedural source domains: readable as any MVTec dataset, masks where the defects are, written once."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from ray_ad.data import load_samples
from ray_ad.data.procedural import FAMILIES, DomainStyle, render, write_domains


def test_every_family_renders_a_varied_image_that_changes_between_parts() -> None:
    styles = [DomainStyle.draw(i, np.random.default_rng(i)) for i in range(len(FAMILIES))]
    assert [s.family for s in styles] == list(FAMILIES)
    for style in styles:
        rng = np.random.default_rng(0)
        first, second = render(style, 64, rng), render(style, 64, rng)
        assert first.shape == (64, 64, 3) and first.dtype == np.uint8
        assert first.std() > 3, f"{style.family}: a flat image is no texture"
        assert np.abs(first.astype(int) - second).mean() > 1, f"{style.family}: two parts rendered alike"


def test_domains_are_mvtec_datasets_with_masks_on_the_changed_pixels(tmp_path) -> None:
    uris = write_domains(str(tmp_path), count=2, normals=3, defects=5, size=64, test_normals=2)
    assert [os.path.basename(u) for u in uris] == ["procedural-00-perlin", "procedural-01-stripes"]
    samples = load_samples(uris[1])
    normals = [s for s in samples if s.label == 0]
    defects = [s for s in samples if s.label == 1]
    assert sorted(s.split for s in normals) == ["test", "test", "train", "train", "train"]
    assert 1 <= len(defects) <= 5 and all(s.mask_path for s in defects)
    assert {s.domain for s in samples} == {"procedural-01-stripes"}
    for sample in defects:
        mask = np.asarray(Image.open(sample.mask_path)) > 127
        assert 0 < mask.mean() < 0.5, f"{sample.path}: a defect mask must mark part of the image"


def test_a_written_domain_is_kept_and_a_changed_one_rewritten(tmp_path) -> None:
    first = write_domains(str(tmp_path), count=1, normals=2, defects=2, size=32)[0]
    image = os.path.join(first, "train", "good", "0000.png")
    stamp = os.stat(image).st_mtime_ns
    write_domains(str(tmp_path), count=1, normals=2, defects=2, size=32)
    assert os.stat(image).st_mtime_ns == stamp
    write_domains(str(tmp_path), count=1, normals=2, defects=2, size=64)
    assert Image.open(image).size == (64, 64)
    # A rewrite with fewer images leaves none of the earlier ones behind.
    write_domains(str(tmp_path), count=1, normals=3, defects=2, size=32)
    write_domains(str(tmp_path), count=1, normals=2, defects=2, size=32)
    assert sorted(os.listdir(os.path.join(first, "train", "good"))) == ["0000.png", "0001.png"]


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="got 0, 80, 40, 256, 0"):
        write_domains("/nonexistent", count=0)
