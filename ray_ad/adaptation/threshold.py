"""An operating point for a domain with no labels, from scores of images that were never fitted on.

A landed batch is whatever the camera saw, so its scores are a mixture: a normal mode and a heavier
right tail of defects. The 0.99 quantile of such scores (what a source line uses on its clean
held-out normals) sits inside the defects when a third of the images are defective. Instead the
normal mode is fitted from the side the defects do not reach: its centre is the densest point of the
scores (their half-sample mode), its spread comes from the scores below that centre only (defects
score high, so they widen the upper side but barely the lower).

Two rules turn the fitted mode into a threshold:

- ``false_alarm``: the mode's ``1 - false_alarm_rate`` quantile. It ignores how many defects there
  are, so on a line with many defects it flags only the clearest.
- ``f1`` (default): the fitted mode also says how many images are defective (the share of scores
  the mode does not explain: ``pi = 1 - 2 * P(score <= centre)``, since the mode holds half of its
  own mass below its centre) and how many normals any threshold would flag, so the expected
  precision and recall of every candidate threshold follow from the scores alone; the threshold is
  the one whose expected F1 is highest. With no defects to speak of (``pi`` under ``min_share``)
  it falls back to ``false_alarm``.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm


def normal_mode(scores: np.ndarray) -> tuple[float, float]:
    """(centre, spread) of the normal mode of an unlabeled score sample with a right tail of defects.

    The centre is the half-sample mode (Bickel & Fruhwirth 2006): the densest half of the sample,
    halved again until three points remain, then refined by the median of a window around it. Unlike
    the median of the whole sample it stays on the normal mode while defects are fewer than the
    normals. The spread is the lower-side sigma around it.
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64)[np.isfinite(scores)])
    if len(scores) < 8:
        raise ValueError(f"an unlabeled threshold needs at least 8 finite scores, got {len(scores)}")
    window = scores
    while len(window) > 3:
        half = (len(window) + 1) // 2
        widths = window[half - 1 :] - window[: len(window) - half + 1]
        start = int(np.argmin(widths))
        window = window[start : start + half]
    centre = float(np.mean(window))
    # The half-sample mode is robust but noisy (it ends on three points); refine it with the median of
    # a window symmetric around it, which is unbiased for a symmetric mode and still ignores most
    # of a right tail of defects.
    for _ in range(20):
        spread = _lower_spread(scores, centre)
        inside = scores[np.abs(scores - centre) <= 1.5 * spread]
        new_centre = float(np.median(inside)) if len(inside) else centre
        if abs(new_centre - centre) <= 1e-9 * (abs(centre) + spread):
            break
        centre = new_centre
    return centre, _lower_spread(scores, centre)


def _lower_spread(scores: np.ndarray, centre: float) -> float:
    """Gaussian sigma from the lower half: the median distance below the centre is 0.6745 sigma."""
    below = centre - scores[scores <= centre]
    spread = float(np.median(below)) / 0.6745 if len(below) else 0.0
    if spread <= 0:  # ties at the centre: fall back to the whole sample's scale
        spread = float(np.std(scores)) or 1e-12
    return spread


RULES = ("f1", "false_alarm")


def unlabeled_threshold(
    scores: np.ndarray, false_alarm_rate: float = 0.01, rule: str = "f1", min_share: float = 0.05
) -> float:
    """Score above which an image is called anomalous (see the module docstring for the rules)."""
    if not 0 < false_alarm_rate < 0.5:
        raise ValueError(f"false_alarm_rate must be in (0, 0.5), got {false_alarm_rate}")
    if rule not in RULES:
        raise ValueError(f"threshold rule must be one of {', '.join(RULES)}, got {rule!r}")
    scores = np.sort(np.asarray(scores, dtype=np.float64)[np.isfinite(scores)])
    centre, spread = normal_mode(scores)
    fallback = centre + float(norm.ppf(1 - false_alarm_rate)) * spread
    share = defect_share(scores, centre)
    if rule == "false_alarm" or share < min_share:
        return fallback
    n = len(scores)
    candidates = scores[scores > centre]
    flagged = n - np.searchsorted(scores, candidates, side="right")  # images above each candidate
    false_alarms = (1 - share) * n * norm.sf((candidates - centre) / spread)
    true_hits = np.clip(flagged - false_alarms, 0, None)
    expected_f1 = 2 * true_hits / (flagged + share * n)
    return float(candidates[int(np.argmax(expected_f1))]) if len(candidates) else fallback


def defect_share(scores: np.ndarray, centre: float) -> float:
    """Share of the sample the normal mode does not explain: the mode puts half its mass below ``centre``."""
    below = float(np.mean(np.asarray(scores) <= centre))
    return max(0.0, 1.0 - 2.0 * below)
