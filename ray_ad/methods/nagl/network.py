"""NAGL's two trained modules: Residual Mining (RM) and Anomaly Feature Learning (AFL).

As in the authors' code: d_model is the backbone's feature dimension C, every layer is one multi-head
attention with a residual connection and a post-LayerNorm, and there is no feed-forward block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from ray_ad.errors import ConfigError
from ray_ad.methods.nagl.scoring import (
    abnormal_residual,
    anomaly_guided_score,
    centred_anomaly_score,
    fused_map,
    normal_guided_score,
    reference_statistics,
    residual,
    standardised,
    top_mean,
)


@lru_cache(maxsize=8)  # one grid per model: built once, not on every training step (callers never write to it)
def sine_positions(cells: int, dim: int) -> torch.Tensor:
    """The 2D sine embedding of a square grid's cells, ``[cells, dim]`` in row-major order (the DETR /
    Mask2Former ``PositionEmbeddingSine`` the authors' code adds to its cross-attention keys, normalised to
    [0, 2 pi] along each axis, temperature 10000): the first half of the channels encodes the row, the
    second half the column, each as interleaved sin / cos pairs."""
    grid = math.isqrt(cells)
    if grid * grid != cells:
        raise ConfigError(f"key positions need a square grid of cells, got {cells} cells")
    if dim % 4:
        raise ConfigError(f"key positions need a feature dimension divisible by 4, got {dim}")
    half = dim // 2
    steps = torch.arange(1, grid + 1, dtype=torch.float32) / (grid + 1e-6) * 2 * math.pi  # 1-based, as cumsum
    frequencies = 10000 ** (2 * (torch.arange(half) // 2) / half)
    angles = steps[:, None] / frequencies  # [grid, half]
    axis = torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)  # [grid, half]
    rows = axis[:, None, :].expand(grid, grid, half)
    columns = axis[None, :, :].expand(grid, grid, half)
    return torch.cat((rows, columns), dim=2).reshape(cells, dim)


class AttentionLayer(nn.Module):
    """``LayerNorm(query + MultiHeadAttention(query, key, value))``: post-norm, no FFN."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        attended, _ = self.attention(query, key, value, attn_mask=attn_mask, need_weights=False)
        return self.norm(query + attended)


def abnormal_attention_mask(mask_a: torch.Tensor, queries: int, heads: int, alpha: float) -> torch.Tensor:
    """M' = alpha (1 - M^a) as the additive attention mask of RM's cross-attention.

    ``mask_a [B, N_a]`` (1 on abnormal-reference cells inside the defect) -> ``[B * heads, queries, N_a]``,
    the layout ``nn.MultiheadAttention`` expects: sample b's mask at rows ``b * heads ... b * heads +
    heads - 1``. Hence ``repeat_interleave``; the authors' ``repeat`` tiles the whole batch per head,
    which gives sample b the mask of sample ``(b * heads + h) mod B``.
    """
    additive = alpha * (1 - mask_a.to(torch.float32))
    return additive[:, None, :].expand(-1, queries, -1).repeat_interleave(heads, dim=0)


class ResidualMining(nn.Module):
    """RM: P~ = SA_1(Softmax(Q_1 K_1^T / sqrt(d) + M') V_1), with Q_1 from the M learnable proxies P,
    K_1 from the abnormal-reference features F^a and V_1 from their residuals Res(F^a, F^n)."""

    def __init__(self, dim: int, proxies: int, heads: int, alpha: float, proxy_std: float = 0.02) -> None:
        super().__init__()
        self.P = nn.Parameter(torch.randn(proxies, dim) * proxy_std)  # the learnable proxies, M x C
        self.cross_attention = AttentionLayer(dim, heads)
        self.self_attention = AttentionLayer(dim, heads)  # SA_1
        self.heads, self.alpha = heads, alpha

    def forward(self, F_a: torch.Tensor, res_a: torch.Tensor, M_a: torch.Tensor,
                key_positions: torch.Tensor | None = None) -> torch.Tensor:
        """``F_a, res_a [B, N_a, C]``, ``M_a [B, N_a]`` -> the residual proxies P~ ``[B, M, C]``.
        ``key_positions [N_a, C]``, if given, is added to the keys K_1 (not to the values)."""
        P = self.P[None].expand(F_a.shape[0], -1, -1)
        mask = abnormal_attention_mask(M_a, P.shape[1], self.heads, self.alpha).to(F_a.dtype)
        keys = F_a if key_positions is None else F_a + key_positions.to(F_a)
        mined = self.cross_attention(P, keys, res_a, attn_mask=mask)
        return self.self_attention(mined, mined, mined)


class AnomalyFeatureLearning(nn.Module):
    """AFL: P^ = SA_2(Softmax(Q_2 K_2^T / sqrt(d)) V_2), with Q_2 from the residual proxies P~, K_2 from
    the query's residuals Res(F^q, F^n) and V_2 from the query's features F^q."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.cross_attention = AttentionLayer(dim, heads)
        self.self_attention = AttentionLayer(dim, heads)  # SA_2

    def forward(self, P_tilde: torch.Tensor, res_q: torch.Tensor, F_q: torch.Tensor,
                key_positions: torch.Tensor | None = None) -> torch.Tensor:
        """``P_tilde [B, M, C]``, ``res_q, F_q [B, N, C]`` -> the anomaly proxies P^ ``[B, M, C]``.
        ``key_positions [N, C]``, if given, is added to the keys K_2 (not to the values)."""
        keys = res_q if key_positions is None else res_q + key_positions.to(res_q)
        found = self.cross_attention(P_tilde, keys, F_q)
        return self.self_attention(found, found, found)


class NAGLNet(nn.Module):
    """RM followed by AFL: the only trained parameters of NAGL.

    With ``key_positions`` the cross-attention keys of both carry the sine embedding of their cell's place
    on the grid (``sine_positions``; the authors' code adds it to K_1 and K_2; the paper does not mention
    it). Each image of several abnormal references gets the same embedding.
    """

    def __init__(self, dim: int, proxies: int, heads: int, alpha: float, proxy_std: float = 0.02,
                 key_positions: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"the feature dimension {dim} is not divisible by heads={heads}; "
                              "pick a head count that divides it")
        if key_positions and dim % 4:
            raise ConfigError(f"key_positions needs a feature dimension divisible by 4, got {dim}")
        self.rm = ResidualMining(dim, proxies, heads, alpha, proxy_std)
        self.afl = AnomalyFeatureLearning(dim, heads)
        self.key_positions = key_positions
        self.dim = dim

    def _positions(self, keys: int, cells: int) -> torch.Tensor | None:
        """The embedding of ``keys`` key cells, images of ``cells`` cells each laid end to end (None: off)."""
        if not self.key_positions:
            return None
        if keys % cells:
            raise ConfigError(f"{keys} key cells are not whole images of {cells} cells")
        return sine_positions(cells, self.dim).repeat(keys // cells, 1)

    def mine(self, F_a: torch.Tensor, res_a: torch.Tensor, M_a: torch.Tensor, cells: int | None = None) -> torch.Tensor:
        """RM alone: the residual proxies P~ of a reference set (computed once per set at inference).
        ``cells``: cells per image (default: a single abnormal image, ``F_a.shape[1]``)."""
        return self.rm(F_a, res_a, M_a, self._positions(F_a.shape[1], cells or F_a.shape[1]))

    def forward(self, res_q: torch.Tensor, F_q: torch.Tensor, P_tilde: torch.Tensor | None = None,
                F_a: torch.Tensor | None = None, res_a: torch.Tensor | None = None,
                M_a: torch.Tensor | None = None) -> torch.Tensor:
        """The anomaly proxies P^ ``[B, M, C]``: RM on the abnormal reference (unless its ``P_tilde`` is
        given), then AFL on the query. One forward for both, so a DDP wrapper sees every parameter."""
        cells = F_q.shape[1]
        if P_tilde is None:
            P_tilde = self.mine(F_a, res_a, M_a, cells)
        return self.afl(P_tilde.expand(F_q.shape[0], -1, -1), res_q, F_q, self._positions(cells, cells))


@dataclass(frozen=True)
class MapScoring:
    """How maps and image scores are made from the features (the config's ``top_fraction``, ``standardise``,
    ``unmasked_region``, ``centre_anomaly_map``)."""

    top_fraction: float = 0.01
    standardise: bool = True
    unmasked_region: float = 0.0  # region estimate for an abnormal reference whose mask is the whole image
    centre_anomaly_map: bool = False


def score_maps(net: nn.Module | None, F_q: torch.Tensor, normal_refs: torch.Tensor, F_a: torch.Tensor | None = None,
               M_a: torch.Tensor | None = None, top_fraction: float = 0.01,
               P_tilde: torch.Tensor | None = None, standardise: bool = True,
               unmasked_region: float = 0.0, centre_anomaly: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused map S ``[B, N]`` and the image score s = T(S) ``[B]`` of queries ``F_q [B, N, C]``
    (``branch_maps`` for the arguments)."""
    S = fused_map(*branch_maps(net, F_q, normal_refs, F_a, M_a, P_tilde, standardise, unmasked_region,
                               centre_anomaly))
    return S, top_mean(S, top_fraction)


def branch_maps(net: nn.Module | None, F_q: torch.Tensor, normal_refs: torch.Tensor, F_a: torch.Tensor | None = None,
                M_a: torch.Tensor | None = None, P_tilde: torch.Tensor | None = None, standardise: bool = True,
                unmasked_region: float = 0.0, centre_anomaly: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The two branches of queries ``F_q [B, N, C]``: S_n ``[B, N]`` and S_a ``[B, N]`` (None without an
    abnormal reference or network).

    ``normal_refs [B or 1, R, C]``: the normal-reference cells. With abnormal references (``F_a [B or 1,
    N_a, C]`` and their cell masks ``M_a``, or their residual proxies ``P_tilde`` mined once before),
    S_a comes from RM and AFL; without (``net`` None or no abnormal reference), only S_n.
    With ``standardise`` every feature is first put in the normal references' per-channel standard units
    (see the README: a CNN's non-negative features leave cosines little room otherwise). An abnormal
    reference whose mask marks every cell gets its defect region estimated (``scoring.abnormal_residual``,
    ``unmasked_region`` > 0), as ``NAGL.set_references`` does for a line's references. ``centre_anomaly``
    measures S_a from each query's median cell (``scoring.centred_anomaly_score``).
    """
    if standardise:
        statistics = reference_statistics(normal_refs)
        normal_refs, F_q = standardised(statistics, normal_refs, F_q)
        if F_a is not None:
            F_a = standardised(statistics, F_a)[0]
    normal_refs = normal_refs.expand(F_q.shape[0], -1, -1)
    with torch.no_grad():  # nearest-neighbour search: no parameter, no gradient
        res_q, s_n = residual(F_q, normal_refs)
    S_a = None
    if net is not None and (P_tilde is not None or F_a is not None):
        res_a = None
        if P_tilde is None:
            with torch.no_grad():
                res_a, M_a = abnormal_residual(F_a, normal_refs[: F_a.shape[0]], M_a, unmasked_region)
        P_hat = net(res_q, F_q, P_tilde, F_a, res_a, M_a)  # RM (unless mined before), then AFL
        S_a = anomaly_guided_score(F_q, P_hat)
        if centre_anomaly:
            S_a = centred_anomaly_score(S_a)
    return normal_guided_score(s_n), S_a


__all__ = [
    "AnomalyFeatureLearning", "AttentionLayer", "MapScoring", "NAGLNet", "ResidualMining", "abnormal_attention_mask",
    "branch_maps", "score_maps",
]
