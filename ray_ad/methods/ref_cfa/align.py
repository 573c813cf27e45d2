"""Cross-domain Field Alignment (CFA): the three unsupervised alignments, each fitted in closed form.

The paper optimises three losses; each has a closed-form minimiser, which is what we fit (and the
losses are reported before/after as diagnostics):

- temporal alignment (TA): a monotone reparameterisation psi of the step axis that matches the target's
  mean residual profile to the source's;
- directional subspace alignment (DSA): orthogonal Procrustes between the top-r left singular
  subspaces U_T, U_S of the stacked M fields;
- second-order feature alignment (SFA): whiten-recolor of the target signatures onto the source's
  normal anchors, the minimiser of the CORAL loss.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.isotonic import IsotonicRegression

from ray_ad.metrics import auroc


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor U V^T of ``matrix`` = U S V^T (nearest orthogonal matrix)."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def orthogonal_procrustes(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """argmin_{Omega orthogonal} || Omega source - target ||_F for ``[d, n]`` matrices (Schoenemann)."""
    return polar(target @ source.T)


def top_left_singular(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` left singular vectors of a stacked matrix X, from its Gram matrix X X^T ``[C, C]``."""
    if not 1 <= rank <= gram.shape[0]:
        raise ValueError(f"cfa.rank must be between 1 and the feature dimension {gram.shape[0]}, got {rank}")
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.double())
    order = eigenvalues.argsort(descending=True)[:rank]
    return eigenvectors[:, order].float()


def subspace_rotation(u_target: torch.Tensor, u_source: torch.Tensor) -> torch.Tensor:
    """R = argmin_{R orthogonal} || R U_T - U_S ||_F over ``[C, C]`` rotations (DSA).

    Singular vectors correspond by the order of their singular values but carry arbitrary signs, so each
    target vector is first flipped to agree with its source partner. With r < C the minimiser is not
    unique; we take the one closest to the identity on the complements: the orthogonal polar factor of
    U_S B_T^T plus the projector between the two orthogonal complements.
    """
    signs = torch.sign((u_target * u_source).sum(0))
    b_target = u_target * torch.where(signs == 0, torch.ones_like(signs), signs)
    eye = torch.eye(u_target.shape[0], dtype=u_target.dtype, device=u_target.device)
    complement = (eye - u_source @ u_source.T) @ (eye - b_target @ b_target.T)
    return polar(u_source @ b_target.T + complement)


def subspace_distance(u_a: torch.Tensor, u_b: torch.Tensor) -> float:
    """|| U_a U_a^T - U_b U_b^T ||_F / sqrt(2 r): 0 for equal subspaces, 1 for orthogonal ones."""
    rank = u_a.shape[1]
    return float((u_a @ u_a.T - u_b @ u_b.T).norm() / (2 * rank) ** 0.5)


def covariance(z: torch.Tensor) -> torch.Tensor:
    centred = z - z.mean(0)
    return centred.T @ centred / max(1, z.shape[0] - 1)


def coral_loss(z: torch.Tensor, source_cov: torch.Tensor) -> float:
    """CORAL: || Cov(z) - Cov_S ||_F^2 / (4 d^2)."""
    d = z.shape[1]
    return float((covariance(z) - source_cov).pow(2).sum() / (4 * d * d))


def _matrix_power(cov: torch.Tensor, power: float, eps: float) -> torch.Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())
    scaled = eigenvalues.clamp_min(0) + eps
    return (eigenvectors * scaled.pow(power)) @ eigenvectors.T


def trimmed_moments(
    z: torch.Tensor, trim: float, steps: int = 3, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of ``z`` without its ``trim`` share of outlying rows.

    Concentration steps as in the minimum covariance determinant estimator: fit on the kept rows,
    keep the (1 - trim) share with the smallest Mahalanobis distance under that fit, repeat. An
    unlabeled target holds anomalies; left in, they would be whitened away with the domain shift.
    """
    keep = torch.ones(z.shape[0], dtype=torch.bool)
    for _ in range(steps if trim > 0 else 0):
        mean, cov = z[keep].mean(0), covariance(z[keep])
        centred = (z - mean).double()
        distance = (centred @ _matrix_power(cov, -1.0, eps) * centred).sum(1)
        kept = max(2, int(round((1 - trim) * len(distance))))
        keep = distance <= torch.kthvalue(distance, kept).values  # (torch.quantile caps its input size)
    return z[keep].mean(0), covariance(z[keep])


def relative_ridge(cov: torch.Tensor, ridge: float) -> float:
    """``ridge`` times the mean eigenvalue of ``cov`` (its trace / d): a ridge in the matrix's own units."""
    return ridge * float(cov.diagonal().mean().clamp_min(1e-12))


def whiten_recolor(
    z_target: torch.Tensor, source_mean: torch.Tensor, source_cov: torch.Tensor, eps: float = 1e-4, trim: float = 0.0,
    relative: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, b) with z' = A z + b: whiten with the target covariance, recolor with the source's.

    A = Cov_S^{1/2} Cov_T^{-1/2} and b = mu_S - A mu_T; Cov(A z + b) = Cov_S (up to the ridge eps),
    which minimises the CORAL loss. ``trim`` > 0 takes the target moments without that share of
    outlying rows (``trimmed_moments``). ``relative``: each covariance gets ``eps`` times its own mean
    eigenvalue, so the ridge means the same whatever the scale of the signatures (an absolute 1e-4 is
    nothing to a covariance on a scale of 1e2 and everything to one on 1e-5).
    """
    eps_target = relative_ridge(covariance(z_target), eps) if relative else eps
    eps_source = relative_ridge(source_cov, eps) if relative else eps
    target_mean, target_cov = trimmed_moments(z_target, trim, eps=eps_target)
    a = _matrix_power(source_cov, 0.5, eps_source) @ _matrix_power(target_cov, -0.5, eps_target)
    b = source_mean.double() - a @ target_mean.double()
    return a.float(), b.float()


def residual_profile(energy: torch.Tensor) -> np.ndarray:
    """Mean residual magnitude over cells per step: E ||R_t|| from squared norms ``[N, K]``."""
    return energy.clamp_min(0).sqrt().mean(0).double().numpy()


def temporal_reparameterisation(profile_target: np.ndarray, profile_source: np.ndarray) -> torch.Tensor:
    """Monotone psi: for each source step s, the fractional target step tau_s whose mean residual
    matches the source's at s (TA).

    Both profiles are made monotone over steps (isotonic regression, in the direction of the source's
    trend), the target profile is inverted by linear interpolation, and positions outside the target's
    range are clamped to its ends. Identical profiles give the identity 0, 1, ..., K-1.
    """
    steps = np.arange(len(profile_source), dtype=float)
    increasing = bool(profile_source[-1] >= profile_source[0])
    fit = IsotonicRegression(increasing=increasing)
    target = fit.fit_transform(steps, profile_target)
    source = IsotonicRegression(increasing=increasing).fit_transform(steps, profile_source)
    if not increasing:
        target, source = -target, -source
    # np.interp needs strictly increasing x: break ties by a tiny ramp.
    target = target + 1e-9 * steps
    positions = np.interp(source, target, steps)
    return torch.tensor(np.maximum.accumulate(positions), dtype=torch.float32)


def warped_timesteps(positions: torch.Tensor, timesteps: torch.Tensor) -> list[int]:
    """The diffusion timesteps at fractional step ``positions`` (TA over diffusion time).

    psi maps source step s to target step tau_s; rather than interpolating per-step quantities between
    the target's precomputed steps (where a change or a turn between steps is not an interpolation of
    its neighbours), the target chain is run at t(tau_s), linear in tau between the configured steps.
    Rounded to integers; equal neighbours (psi clamped at an end) are separated by one timestep so the
    chain keeps moving towards t = 0 as on the source.
    """
    k = torch.arange(len(timesteps), dtype=torch.float64)
    t = np.interp(positions.double().numpy(), k.numpy(), timesteps.double().numpy())
    out = [int(round(t[0]))]
    for value in t[1:]:
        out.append(max(0, min(int(round(value)), out[-1] - 1)))
    return out


def robust_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``x`` [rows, ...]: the median and 1.4826 x the median absolute deviation (the standard
    deviation for Gaussian data, undisturbed by a minority of outlying rows such as a target's defects)."""
    center = x.median(0).values
    scale = 1.4826 * (x - center).abs().median(0).values
    return center, scale.clamp_min(1e-6)


def source_directions(image_statistics: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """+1 for each statistic (column of [images, n]) that is higher on the anomalous images, -1 where
    lower (by the sign of its image AUROC - 0.5; +1 when only one class is present)."""
    labels_np = labels.numpy()
    if labels_np.min() == labels_np.max():
        return torch.ones(image_statistics.shape[1])
    return torch.tensor([1.0 if auroc(column.numpy(), labels_np) >= 0.5 else -1.0 for column in image_statistics.T])


def tail_directions(image_statistics: torch.Tensor) -> torch.Tensor:
    """+1 for each statistic (column of [images, n]) whose distribution over the unlabeled images has the
    heavier upper tail (skewness >= 0), -1 for a heavier lower tail. Defects are the minority of a
    target, so they sit in the heavier tail of a statistic that separates them."""
    x = image_statistics.double()
    centred = x - x.mean(0)
    skewness = centred.pow(3).mean(0) / centred.pow(2).mean(0).clamp_min(1e-24).pow(1.5)
    return torch.where(skewness >= 0, 1.0, -1.0).float()


def paired_directions(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """+1 for each statistic (column of [cells, n]) whose median change from ``before`` to ``after`` (the
    same cells once an anomaly is pasted in) is >= 0, -1 where it falls."""
    if before.shape != after.shape:
        raise ValueError(f"paired statistics must have one shape, got {list(before.shape)} and {list(after.shape)}")
    return torch.where((after - before).median(0).values >= 0, 1.0, -1.0)
