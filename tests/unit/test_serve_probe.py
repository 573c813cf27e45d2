"""A scorer replica's health probe: a model that cannot score is refused (and fails the replica)."""

from __future__ import annotations

import pytest
import torch

from ray_ad.serve.scoring import probe_detector
from tests.helpers import random_bank_patchcore


def test_a_working_model_passes_and_a_broken_one_is_named():
    detector = random_bank_patchcore(1)
    probe_detector(detector, "line-a@v1")
    detector.bank = torch.full_like(detector.bank, float("nan"))
    with pytest.raises(RuntimeError, match="line-a@v1 gives a non-finite score"):
        probe_detector(detector, "line-a@v1")
    detector.bank = torch.zeros(3, 2)  # the wrong width: predict itself fails
    with pytest.raises(RuntimeError, match="line-a@v1 cannot score"):
        probe_detector(detector, "line-a@v1")
