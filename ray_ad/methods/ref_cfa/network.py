"""The Field Transformer g_phi and the detection head f_psi."""

from __future__ import annotations

import torch
from torch import nn

from ray_ad.diffusion.dit import timestep_embedding


class FieldTransformer(nn.Module):
    """g_phi: the K-step residual sequence of one cell -> temporal attention alpha_t(P) and h(P).

    Tokens are the cell's projected residual vectors at each step plus their log energies; the temporal
    positional encoding is the sinusoidal embedding of the step's diffusion timestep t.
    """

    def __init__(self, in_dim: int, d_model: int, heads: int, layers: int, embed_dim: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.inp = nn.Linear(in_dim, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.attention = nn.Linear(d_model, 1)
        self.embed = nn.Linear(d_model, embed_dim)

    def forward(self, tokens: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [N, K, in_dim], timesteps [K] -> (alpha [N, K] summing to 1 over K, h [N, embed_dim])."""
        position = timestep_embedding(timesteps.to(tokens.device).float(), self.d_model)  # temporal PE
        out = self.norm(self.encoder(self.inp(tokens) + position[None]))
        alpha = self.attention(out).squeeze(-1).softmax(-1)  # normalised temporal attention alpha_t(P)
        h = self.embed((alpha[..., None] * out).sum(1))  # patch embedding h(P)
        return alpha, h


class DetectionHead(nn.Module):
    """f_psi: REF signature [h(P); statistics] -> patch anomaly logit."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1)
        )

    def forward(self, signature: torch.Tensor) -> torch.Tensor:
        return self.net(signature).squeeze(-1)
