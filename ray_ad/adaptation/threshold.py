"""An operating point for a domain with no labels, from scores of images that were never fitted on.

A landed batch is whatever the camera saw, so its scores are a mixture: a normal mode and a heavier
right tail of defects. The 0.99 quantile of such scores (what a source line uses on its clean
held-out normals) sits inside the defects when a third of the images are defective. Instead the
normal mode is fitted from the side the defects do not reach: its centre is the densest point of the
scores (their half-sample mode), its spread comes from the scores below that centre only (defects
score high, so they widen the upper side but barely the lower).

Three rules turn the scores into a threshold (``share`` is the default of the gate and the target
memory, chosen on magnetic_tile by benchmarks/explorations/unlabeled_thresholds.py):

- ``false_alarm``: the mode's ``1 - false_alarm_rate`` quantile. It ignores how many defects there
  are, so on a line with many defects it flags only the clearest.
- ``share``: flag as many images as the domain's defect share says are defective (the scores'
  ``1 - pi`` quantile), where expected precision equals expected recall. It needs no shape for the
  normals or the defects, only ``pi``, and that can come from far more images than the held-out
  scores: the adaptation job fits two Gaussians to the mutual scores of every landed image
  (``TargetMemory.landing_share``). Below ``min_share`` it falls back to ``false_alarm``.
- ``f1``: the fitted mode also says how many images are defective (the share of scores
  the mode does not explain: ``pi = 1 - 2 * P(score <= centre)``, since the mode holds half of its
  own mass below its centre) and how many normals any threshold would flag, so the expected
  precision and recall of every candidate threshold follow from the scores alone; the threshold is
  the one whose expected F1 is highest. With no defects to speak of (``pi`` under ``min_share``)
  it falls back to ``false_alarm``.

The shape of the normal mode (``shape``): ``gaussian`` (symmetric), or ``gumbel`` for image scores
that are the largest of many cell scores (every memory-based detector here): such maxima follow an
extreme-value law, whose upper tail is longer than its lower side says under a Gaussian. A Gumbel
mode with location mu (its mode) and scale beta puts exp(-1) of its mass below mu and the median of
that part at mu - 0.527 beta.

Both read the normal mode from its lower side and so assume that side tells the upper one.
``mixture`` (the default of the gate and the target memory) does not: it fits two Gaussians to all
the scores by EM (the lower one the normals, the upper one the defects), keeps the second only when
it lowers the BIC below one Gaussian's, and takes expected hits and false alarms from both fitted
components. It was chosen on magnetic_tile (benchmarks/explorations/threshold_shapes.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import gumbel_r, norm, rv_continuous
from sklearn.mixture import GaussianMixture

MODE_SHAPES = ("gaussian", "gumbel")  # a normal mode read from its lower side
SHAPES = (*MODE_SHAPES, "mixture")
# Share of the mode's mass below its centre, and where the median of that part lies in scale units.
_MASS_BELOW = {"gaussian": 0.5, "gumbel": math.exp(-1.0)}
_LOWER_MEDIAN = {"gaussian": float(norm.ppf(0.25)), "gumbel": float(gumbel_r.ppf(math.exp(-1.0) / 2))}
_WINDOW = 1.5  # half-width, in scales, of the window whose median refines the centre
# Where the median of the mode's mass inside that window lies (0 for a symmetric mode).
_WINDOW_MEDIAN = {name: float(law.ppf((law.cdf(-_WINDOW) + law.cdf(_WINDOW)) / 2))
                  for name, law in (("gaussian", norm), ("gumbel", gumbel_r))}


def _law(shape: str) -> rv_continuous:
    if shape not in MODE_SHAPES:
        raise ValueError(f"normal-mode shape must be one of {', '.join(MODE_SHAPES)}, got {shape!r}")
    return norm if shape == "gaussian" else gumbel_r


def normal_mode(scores: np.ndarray, shape: str = "gaussian") -> tuple[float, float]:
    """(centre, spread) of the normal mode of an unlabeled score sample with a right tail of defects.

    The centre is the half-sample mode (Bickel & Fruhwirth 2006): the densest half of the sample,
    halved again until three points remain, then refined by the median of a window around it. Unlike
    the median of the whole sample it stays on the normal mode while defects are fewer than the
    normals. The spread is the scale of ``shape`` (sigma, or the Gumbel beta) from the lower side.
    """
    _law(shape)
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
    # a window symmetric around it (less that median's offset from the mode of a skewed shape), which
    # still ignores most of a right tail of defects.
    for _ in range(20):
        spread = _lower_spread(scores, centre, shape)
        inside = scores[np.abs(scores - centre) <= _WINDOW * spread]
        new_centre = float(np.median(inside)) - _WINDOW_MEDIAN[shape] * spread if len(inside) else centre
        if abs(new_centre - centre) <= 1e-9 * (abs(centre) + spread):
            break
        centre = new_centre
    return centre, _lower_spread(scores, centre, shape)


def _lower_spread(scores: np.ndarray, centre: float, shape: str) -> float:
    """Scale from the part below the centre: its median lies ``_LOWER_MEDIAN`` scales below it
    (0.6745 sigma for a Gaussian)."""
    below = centre - scores[scores <= centre]
    spread = float(np.median(below)) / -_LOWER_MEDIAN[shape] if len(below) else 0.0
    if spread <= 0:  # ties at the centre: fall back to the whole sample's scale
        spread = float(np.std(scores)) or 1e-12
    return spread


RULES = ("f1", "false_alarm", "share")


def unlabeled_threshold(
    scores: np.ndarray, false_alarm_rate: float = 0.01, rule: str = "f1", min_share: float = 0.05,
    shape: str = "gaussian", share: float | None = None,
) -> float:
    """Score above which an image is called anomalous (see the module docstring for the rules).

    ``share``: the defect share of the domain for rule ``share``, estimated elsewhere (from the whole
    landing); None estimates it from ``scores`` by two Gaussians.
    """
    if not 0 < false_alarm_rate < 0.5:
        raise ValueError(f"false_alarm_rate must be in (0, 0.5), got {false_alarm_rate}")
    if rule not in RULES:
        raise ValueError(f"threshold rule must be one of {', '.join(RULES)}, got {rule!r}")
    if share is not None and not 0 <= share < 1:
        raise ValueError(f"defect share must be in [0, 1), got {share}")
    scores = np.sort(np.asarray(scores, dtype=np.float64)[np.isfinite(scores)])
    if rule == "share":
        pi = fit_two_gaussians(scores).share if share is None else share
        if pi >= min_share:
            # As many flagged as the share says are defective: where precision equals recall.
            return float(np.quantile(scores, 1 - pi))
        rule = "false_alarm"  # a clean batch: the normal mode's false-alarm quantile
    if shape == "mixture":
        return _mixture_threshold(scores, false_alarm_rate, rule, min_share)
    law = _law(shape)
    centre, spread = normal_mode(scores, shape)
    fallback = centre + float(law.ppf(1 - false_alarm_rate)) * spread
    share = defect_share(scores, centre, shape)
    if rule == "false_alarm" or share < min_share:
        return fallback
    n = len(scores)
    candidates = scores[scores > centre]
    flagged = n - np.searchsorted(scores, candidates, side="right")  # images above each candidate
    false_alarms = (1 - share) * n * law.sf((candidates - centre) / spread)
    true_hits = np.clip(flagged - false_alarms, 0, None)
    expected_f1 = 2 * true_hits / (flagged + share * n)
    return float(candidates[int(np.argmax(expected_f1))]) if len(candidates) else fallback


def defect_share(scores: np.ndarray, centre: float, shape: str = "gaussian") -> float:
    """Share of the sample the normal mode does not explain: the mode puts ``_MASS_BELOW`` of its mass
    (half, for a Gaussian) below ``centre``."""
    _law(shape)
    below = float(np.mean(np.asarray(scores) <= centre))
    return max(0.0, 1.0 - below / _MASS_BELOW[shape])


@dataclass(frozen=True)
class TwoGaussians:
    """Normals ~ N(normal_mean, normal_std), defects ~ N(defect_mean, defect_std), ``share`` defective."""

    normal_mean: float
    normal_std: float
    defect_mean: float
    defect_std: float
    share: float

    @property
    def separation(self) -> float:
        """Ashman's D: the two means' distance in the components' pooled spread, sqrt(2) |mu_d - mu_n| /
        sqrt(s_n^2 + s_d^2) (0 when one Gaussian explains the scores as well). Above 2 the two modes are
        clearly apart."""
        if self.share == 0:
            return 0.0
        return math.sqrt(2) * abs(self.defect_mean - self.normal_mean) / math.hypot(self.normal_std, self.defect_std)


def fit_two_gaussians(scores: np.ndarray, seed: int = 0) -> TwoGaussians:
    """EM fit of two Gaussians to ``scores``; ``share`` is 0 when one Gaussian explains them as well
    (by BIC), and the normal component is then that one Gaussian."""
    x = np.asarray(scores, dtype=np.float64)[np.isfinite(scores)].reshape(-1, 1)
    if len(x) < 8:
        raise ValueError(f"an unlabeled threshold needs at least 8 finite scores, got {len(x)}")
    # Fitted on standardised scores: sklearn adds an absolute 1e-6 to every variance, which would
    # swamp scores that spread over 1e-3 (probabilities) and vanish on distances in the tens.
    offset, scale = float(x.mean()), float(x.std()) or 1.0
    z = (x - offset) / scale
    # EM crawls on overlapping components: sklearn's default tolerance (1e-3) stops it in a flat
    # stretch short of the maximum, with the defect share off by 0.07 on a 30% mixture.
    one = GaussianMixture(1, random_state=seed).fit(z)
    two = GaussianMixture(2, n_init=4, tol=1e-7, max_iter=2000, random_state=seed).fit(z)
    if two.bic(z) >= one.bic(z):
        mean, std = offset + scale * float(one.means_[0, 0]), scale * float(np.sqrt(one.covariances_.ravel()[0]))
        return TwoGaussians(mean, std, mean, std, 0.0)
    means, stds = offset + scale * two.means_.ravel(), scale * np.sqrt(two.covariances_.ravel())
    low, high = int(np.argmin(means)), int(np.argmax(means))
    return TwoGaussians(float(means[low]), float(stds[low]), float(means[high]), float(stds[high]),
                        float(two.weights_[high]))


def upper_component(scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """Which ``scores`` are more likely under the upper of two Gaussians fitted by EM (``fit_two_gaussians``,
    weights included) than under the lower one; none when one Gaussian explains them as well."""
    x = np.asarray(scores, dtype=np.float64)
    fit = fit_two_gaussians(x, seed)
    if fit.share == 0:
        return np.zeros(len(x), dtype=bool)
    upper = fit.share * norm.pdf(x, fit.defect_mean, fit.defect_std)
    lower = (1 - fit.share) * norm.pdf(x, fit.normal_mean, fit.normal_std)
    # A wide upper component also has more density than a narrow lower one far *below* the normals;
    # those low scores are not defects.
    return (upper > lower) & (x > fit.normal_mean)


def _mixture_threshold(scores: np.ndarray, false_alarm_rate: float, rule: str, min_share: float) -> float:
    fit = fit_two_gaussians(scores)
    fallback = fit.normal_mean + float(norm.ppf(1 - false_alarm_rate)) * fit.normal_std
    if rule == "false_alarm" or fit.share < min_share:
        return fallback
    candidates = scores[scores > fit.normal_mean]
    if not len(candidates):
        return fallback
    false_alarms = (1 - fit.share) * norm.sf(candidates, fit.normal_mean, fit.normal_std)
    true_hits = fit.share * norm.sf(candidates, fit.defect_mean, fit.defect_std)
    expected_f1 = 2 * true_hits / (false_alarms + true_hits + fit.share)
    return float(candidates[int(np.argmax(expected_f1))])
