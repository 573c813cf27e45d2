"""An operating point for a domain with no labels, from scores of images that were never fitted on.

A landed batch is whatever the camera saw, so its scores are a mixture: a normal mode and a heavier
right tail of defects. The 0.99 quantile of such scores (what a source line uses on its clean
held-out normals) sits inside the defects when a third of the images are defective. Instead the
normal mode is fitted from the side the defects do not reach: its centre is the median of the
scores, its spread comes from the lower half only (defects score high, so they inflate the upper
half but barely the lower), and the threshold is that mode's ``1 - false_alarm_rate`` quantile under
a Gaussian shape. The median moves when defects are many, so the fit is repeated on the scores
below the current threshold, correcting the centre and spread for the truncation, until it settles.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm


def normal_mode(scores: np.ndarray, iterations: int = 20) -> tuple[float, float]:
    """(centre, spread) of the normal mode of an unlabeled score sample with a right tail of defects."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if len(scores) < 8:
        raise ValueError(f"an unlabeled threshold needs at least 8 finite scores, got {len(scores)}")
    centre = float(np.median(scores))
    spread = _lower_spread(scores, centre)
    for _ in range(iterations):
        # Keep what the current mode explains (up to 3 sigma); for a Gaussian truncated there, the
        # median and the lower-half spread are nearly unbiased (3 sigma drops 0.13% of the mode).
        kept = scores[scores <= centre + 3 * spread]
        new_centre = float(np.median(kept))
        new_spread = _lower_spread(kept, new_centre)
        if abs(new_centre - centre) <= 1e-6 * (abs(centre) + spread) and abs(new_spread - spread) <= 1e-6 * spread:
            break
        centre, spread = new_centre, new_spread
    return centre, spread


def _lower_spread(scores: np.ndarray, centre: float) -> float:
    """Gaussian sigma from the lower half: the median distance below the centre is 0.6745 sigma."""
    below = centre - scores[scores <= centre]
    spread = float(np.median(below)) / 0.6745 if len(below) else 0.0
    if spread <= 0:  # ties at the centre: fall back to the whole sample's scale
        spread = float(np.std(scores)) or 1e-12
    return spread


def unlabeled_threshold(scores: np.ndarray, false_alarm_rate: float = 0.01) -> float:
    """Score above which an image is called anomalous, at ``false_alarm_rate`` of the normal mode."""
    if not 0 < false_alarm_rate < 0.5:
        raise ValueError(f"false_alarm_rate must be in (0, 0.5), got {false_alarm_rate}")
    centre, spread = normal_mode(scores)
    return centre + float(norm.ppf(1 - false_alarm_rate)) * spread
