"""A small unconditional DiT (Peebles & Xie) with adaLN-Zero over a feature grid, patch size 1.

Each cell of the ``[B, C, H, W]`` feature grid is one token; the network predicts epsilon with the same
shape. adaLN-Zero: every block's shift/scale/gate come from the timestep embedding, and the gates and
the output layer start at zero so the untrained network is the zero map (stable early training).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding ``[H*W, dim]``."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter) / quarter)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    out_y = ys.flatten()[:, None].float() * omega[None]
    out_x = xs.flatten()[:, None].float() * omega[None]
    emb = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)
    return F.pad(emb, (0, dim - emb.shape[1]))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """epsilon_theta(x_t, t) for feature grids ``[B, C, H, W]``."""

    def __init__(
        self,
        in_channels: int,
        grid_size: int,
        hidden: int = 256,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if hidden % heads or hidden % 4:
            raise ValueError(f"hidden={hidden} must be divisible by heads={heads} and by 4")
        self.in_channels, self.grid_size, self.hidden = in_channels, grid_size, hidden
        self.embed = nn.Linear(in_channels, hidden)
        self.register_buffer("pos", sincos_2d(grid_size, grid_size, hidden)[None], persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out = nn.Linear(hidden, in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.t_mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_mlp[2].weight, std=0.02)
        # adaLN-Zero: gates and the output layer start at zero.
        for block in self.blocks:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        nn.init.zeros_(self.final_ada[-1].weight)
        nn.init.zeros_(self.final_ada[-1].bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if (h, w) != (self.grid_size, self.grid_size) or c != self.in_channels:
            raise ValueError(
                f"DiT expects [B, {self.in_channels}, {self.grid_size}, {self.grid_size}], got {list(x.shape)}"
            )
        tokens = self.embed(x.flatten(2).transpose(1, 2)) + self.pos
        cond = self.t_mlp(timestep_embedding(t.expand(b) if t.dim() == 0 else t, self.hidden))
        for block in self.blocks:
            tokens = block(tokens, cond)
        shift, scale = self.final_ada(cond).chunk(2, dim=-1)
        out = self.out(modulate(self.final_norm(tokens), shift, scale))
        return out.transpose(1, 2).reshape(b, c, h, w)
