"""Residual Evolution Fields: R, M and Q along K reverse-diffusion steps, and their statistics.

Equation numbers follow the order of the displayed equations in the paper's method section
(Key Design 1 and 2); ``README.md`` lists them. All tensors are per cell: a cell of the backbone
grid is the paper's patch P.

The reverse chain costs exactly K score-network calls per image. Step k is evaluated at y_k; its
Tweedie projection P_k (Eq. 1) is carried to the next, smaller timestep on its own mean path,
y_{k+1} = sqrt(alpha_bar_{k+1} / alpha_bar_k) P_k, so the call that advances the chain is also the
score at the projection that Eq. 2 asks for (at the next timestep rather than the same one; see
README). The last step has no next call and keeps the previous reference direction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ray_ad.diffusion import NoiseSchedule
from ray_ad.errors import ConfigError
from ray_ad.progress import progress as show_progress

COMPONENTS = ("R", "M", "Q")


@dataclass
class FieldConfig:
    # t_1 .. t_K of the reverse chain, largest first (the chain runs from noisy to clean).
    timesteps: tuple[int, ...] = (400, 350, 300, 250, 200, 150, 100, 50)
    components: tuple[str, ...] = COMPONENTS  # ablations drop R, M or Q
    representation: Literal["ref", "raw"] = "ref"  # "raw": the head sees raw residuals (ablation w/o REF)
    token_dim: int = 16  # each residual vector is projected on this many principal directions for g_phi
    ridge: float = 1e-3  # epsilon_rid of Eq. 7
    # v_K of the last step. "projection": one more score-network call, at the last projection P_K and
    # t_K (Eq. 2 as written; K + 1 calls per image). "previous": reuse the last call's score, which
    # was taken at y_K itself and so is parallel to R_K: M_K = 0 up to rounding, and the turn into
    # step K is the angle of rounding noise, enough to move an image's score by 5e-3 with the other
    # images of its batch. Bundles saved before this option used "previous" (REFCFA.STORED_DEFAULTS).
    last_reference: Literal["projection", "previous"] = "projection"

    def __post_init__(self) -> None:
        steps = list(self.timesteps)
        if len(steps) < 2:
            raise ValueError(f"fields.timesteps needs at least 2 steps, got {steps}")
        decreasing = all(a > b for a, b in zip(steps, steps[1:]))
        if any(not 0 <= t < 1000 for t in steps) or not decreasing:
            raise ValueError(f"fields.timesteps must be distinct, in [0, 999] and decreasing, got {steps}")
        unknown = set(self.components) - set(COMPONENTS)
        if unknown or not self.components:
            raise ValueError(f"fields.components must be a non-empty subset of {COMPONENTS}, got {self.components}")
        if self.representation not in ("ref", "raw"):
            raise ValueError(f"fields.representation must be 'ref' or 'raw', got {self.representation!r}")
        if self.token_dim < 1:
            raise ValueError(f"fields.token_dim must be >= 1, got {self.token_dim}")
        if self.last_reference not in ("projection", "previous"):
            raise ValueError(f"fields.last_reference must be 'projection' or 'previous', got {self.last_reference!r}")


@dataclass
class ResidualStep:
    """One reverse step for a batch: normalised residual vectors ``[B, C, G, G]``."""

    R: torch.Tensor  # magnitude residual, Eq. 3
    M: torch.Tensor  # component orthogonal to the reference direction v_t, Eq. 4
    Q: torch.Tensor  # cumulative drift of the chain from the input's own mean path, Eq. 5


@torch.no_grad()
def reverse_residuals(
    score_net: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, timesteps: Sequence[int],
    last_reference: str = "projection",
) -> Iterator[ResidualStep]:
    """Yield (R_bar, M_bar, Q_bar) for each step of the reverse chain; K score-network calls in all,
    plus one for the last step's reference direction with ``last_reference="projection"``.

    Residuals are divided by sigma_t = sqrt(1 - alpha_bar_t) (the bars of the paper) so that steps at
    different noise levels are comparable; with that scaling R_bar is the predicted noise itself.
    """
    device = x0.device
    alpha_bar = [schedule.alpha_bar(int(t), device) for t in timesteps]
    y = alpha_bar[0].sqrt() * x0  # start on the input's mean path (deterministic, as OSD-IRF's Eq. 7)
    pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (R_bar, Q_bar) of step k-1, waiting for its v
    v_prev: torch.Tensor | None = None
    for k, t in enumerate(timesteps):
        sigma = (1 - alpha_bar[k]).sqrt()
        eps = score_net(y, torch.full((x0.shape[0],), int(t), device=device))
        score = -eps / sigma  # S_theta(y, t) of an epsilon-prediction network
        projection = y + sigma**2 * score  # Eq. 1: Tweedie projection P_t(y)
        r_bar = (y - projection) / sigma  # Eq. 3: R_t = y_t - P_t(y_t), scaled by 1/sigma_t
        q_bar = (y - alpha_bar[k].sqrt() * x0) / sigma  # Eq. 5: drift accumulated along the chain so far
        if pending is not None:
            # Eq. 2: v_{k-1} = S_theta(P_{k-1}(y_{k-1}), .): this call's input is the carried projection.
            yield _finish(*pending, v=score)
            v_prev = score
        pending = (r_bar, q_bar)
        if k + 1 < len(timesteps):
            y = (alpha_bar[k + 1] / alpha_bar[k]).sqrt() * projection
    assert pending is not None and v_prev is not None
    if last_reference == "projection":
        # Eq. 2 at the last step: v_K = S_theta(P_K(y_K), t_K), the score at the projection itself.
        t_last = timesteps[-1]
        v_prev = -score_net(projection, torch.full((x0.shape[0],), int(t_last), device=device)) / sigma
    yield _finish(*pending, v=v_prev)


def project_out(w: torch.Tensor, v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """w - Pi_v[w], Pi_v[w] = <w, v> / ||v||^2 v over the channel axis (dim 1)."""
    coefficient = (w * v).sum(1, keepdim=True) / v.pow(2).sum(1, keepdim=True).clamp_min(eps)
    return w - coefficient * v


def _finish(r_bar: torch.Tensor, q_bar: torch.Tensor, v: torch.Tensor) -> ResidualStep:
    m_bar = project_out(r_bar, v)  # Eq. 4: M_t = R_t - Pi_{v_t}[R_t]
    return ResidualStep(R=r_bar, M=m_bar, Q=q_bar)


@dataclass
class FieldSequence:
    """Per-cell sequences over the K steps, flattened over images and cells (N = B * G * G).

    Only what the statistics and the Field Transformer need is kept, so a whole dataset fits in memory:
    per step the squared norm of each component, the squared change from the previous step, the cosine
    between consecutive M directions, and each vector projected on ``token_dim`` principal directions.
    """

    energy: torch.Tensor  # [N, K, 3] ||X_t||^2 for X = R, M, Q
    change: torch.Tensor  # [N, K, 3] ||X_t - X_{t-1}||^2 (0 at the first step)
    turn: torch.Tensor  # [N, K] 1 - cos(M_t, M_{t-1}) (0 at the first step)
    tokens: torch.Tensor | None  # [N, K, 3, token_dim], or None when no basis was given
    grid: int

    def __len__(self) -> int:
        return self.energy.shape[0]

    @staticmethod
    def cat(parts: list[FieldSequence]) -> FieldSequence:
        tokens = None if parts[0].tokens is None else torch.cat([p.tokens for p in parts])
        return FieldSequence(
            torch.cat([p.energy for p in parts]), torch.cat([p.change for p in parts]),
            torch.cat([p.turn for p in parts]), tokens, parts[0].grid,
        )

    def index(self, rows: torch.Tensor | slice) -> FieldSequence:
        tokens = None if self.tokens is None else self.tokens[rows]
        return FieldSequence(self.energy[rows], self.change[rows], self.turn[rows], tokens, self.grid)

    def to(self, device: torch.device) -> FieldSequence:
        tokens = None if self.tokens is None else self.tokens.to(device)
        return FieldSequence(self.energy.to(device), self.change.to(device), self.turn.to(device), tokens, self.grid)

    def images(self, start: int, stop: int) -> FieldSequence:
        """Rows of images ``start:stop`` (cells of one image are contiguous)."""
        cells = self.grid * self.grid
        return self.index(slice(start * cells, stop * cells))

    def resample(self, positions: torch.Tensor) -> FieldSequence:
        """Linear interpolation along the step axis at fractional ``positions`` [K'] (temporal alignment)."""
        low = positions.floor().long().clamp(0, self.energy.shape[1] - 1)
        high = (low + 1).clamp(max=self.energy.shape[1] - 1)
        frac = (positions - low.float()).to(self.energy.dtype)

        def lerp(x: torch.Tensor) -> torch.Tensor:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return x[:, low] + (x[:, high] - x[:, low]) * frac.view(shape)

        tokens = None if self.tokens is None else lerp(self.tokens)
        return FieldSequence(lerp(self.energy), lerp(self.change), lerp(self.turn), tokens, self.grid)


def _cells(x: torch.Tensor) -> torch.Tensor:
    """[B, C, G, G] -> [B * G * G, C]."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def summarise_steps(steps: list[ResidualStep], basis: torch.Tensor | None, grid: int) -> FieldSequence:
    """Collapse full residual vectors to the per-step quantities of ``FieldSequence``.

    ``basis`` [C, token_dim] projects R, M and Q alike; [3, C, token_dim] gives each its own basis.
    """
    energy, change, turn, tokens = [], [], [], []
    previous: list[torch.Tensor] | None = None
    for step in steps:
        vectors = [_cells(step.R), _cells(step.M), _cells(step.Q)]
        energy.append(torch.stack([v.pow(2).sum(1) for v in vectors], 1))
        if previous is None:
            change.append(torch.zeros_like(energy[-1]))
            turn.append(torch.zeros(vectors[0].shape[0], device=vectors[0].device))
        else:
            change.append(torch.stack([(v - p).pow(2).sum(1) for v, p in zip(vectors, previous)], 1))
            cos = torch.nn.functional.cosine_similarity(vectors[1], previous[1], dim=1, eps=1e-8)
            turn.append(1 - cos)
        if basis is not None:
            bases = basis if basis.dim() == 3 else [basis] * 3  # one basis per component, or shared
            tokens.append(torch.stack([v @ b for v, b in zip(vectors, bases)], 1))
        previous = vectors
    return FieldSequence(
        torch.stack(energy, 1).cpu(), torch.stack(change, 1).cpu(), torch.stack(turn, 1).cpu(),
        torch.stack(tokens, 1).cpu() if basis is not None else None, grid,
    )


@torch.no_grad()
def residual_fields(
    score_net: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, timesteps: Sequence[int],
    basis: torch.Tensor | None, last_reference: str, device: torch.device, progress: bool = False,
    grams: bool = False, desc: str = "fields",
) -> tuple[FieldSequence, dict[str, torch.Tensor]]:
    """REF of normalised features ``x0`` [B, C, G, G], in chunks of 32 images on ``device``.

    With ``grams``, also the Gram matrices X X^T of the stacked R and M vectors (over cells and steps),
    accumulated in float64 on the CPU.
    """
    channels, grid = x0.shape[1], x0.shape[-1]
    parts, gram = [], {"R": torch.zeros(channels, channels, dtype=torch.float64),
                       "M": torch.zeros(channels, channels, dtype=torch.float64)}
    basis = None if basis is None else basis.to(device)
    for chunk in show_progress(x0.split(32), desc=desc, enabled=progress, leave=False):
        steps = list(reverse_residuals(score_net, schedule, chunk.to(device), timesteps, last_reference))
        if grams:
            for step in steps:
                for name in ("R", "M"):
                    cells = getattr(step, name).permute(0, 2, 3, 1).reshape(-1, channels).double()
                    gram[name] += (cells.T @ cells).cpu()
        parts.append(summarise_steps(steps, basis, grid))
    return FieldSequence.cat(parts), gram


def token_basis(gram_r: torch.Tensor, count: int, token_dim: int) -> torch.Tensor:
    """The top ``token_dim`` principal directions of the R vectors whose Gram matrix over ``count``
    cell-steps is ``gram_r``, whitened so that tokens have unit scale: [C, token_dim]."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram_r / count)
    order = eigenvalues.argsort(descending=True)[:token_dim]
    if len(order) < token_dim:
        raise ConfigError(f"fields.token_dim={token_dim} exceeds the {gram_r.shape[0]} feature channels")
    return (eigenvectors[:, order] / eigenvalues[order].clamp_min(1e-8).sqrt()).float()


def image_rows(images: torch.Tensor, grid: int) -> torch.Tensor:
    """Row indices of every cell of the given images in a FieldSequence."""
    cells = grid * grid
    return (images[:, None] * cells + torch.arange(cells)[None]).flatten()


@dataclass
class FieldStatistics:
    """The REF statistics of Eqs. 6-8 for weights w_t (fixed) or alpha_t (adaptive)."""

    E: torch.Tensor  # [N, 3] energies E_R, E_M, E_Q
    NS: torch.Tensor  # [N, 3] non-stationarity NS_R, NS_M, NS_Q
    DV: torch.Tensor  # [N] directional variability


def field_statistics(fields: FieldSequence, weights: torch.Tensor, ridge: float) -> FieldStatistics:
    """Time-weighted energy, non-stationarity and directional variability per cell.

    ``weights`` [N, K] (or [K]) sum to one over steps: the fixed w_t of Eqs. 6-7 or the Field
    Transformer's alpha_t(P) of Eq. 8.
    """
    w = weights if weights.dim() == 2 else weights.expand(len(fields), -1)
    energy = (w[..., None] * fields.energy).sum(1)  # Eq. 6: E_X(P) = sum_t w_t ||X_t(P)||^2
    change = (w[..., None] * fields.change).sum(1)
    ns = change / (energy + ridge)  # Eq. 7: NS_X(P) = sum_t w_t ||X_t - X_{t-1}||^2 / (E_X(P) + eps_rid)
    dv = (w * fields.turn).sum(1)  # Eq. 8: DV(P) = sum_t w_t (1 - cos(M_t, M_{t-1}))
    return FieldStatistics(energy, ns, dv)


def uniform_weights(steps: int) -> torch.Tensor:
    return torch.full((steps,), 1.0 / steps)
