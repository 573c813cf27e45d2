"""S2's optimisation: g_phi and f_psi trained together under L_S (Eq. 10)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ray_ad.methods.ref_cfa.config import HeadConfig
from ray_ad.methods.ref_cfa.fields import FieldSequence, FieldStatistics, image_rows
from ray_ad.methods.ref_cfa.supervision import Supervision
from ray_ad.progress import progress as show_progress

# Fields of some cells -> (signatures z [N, D], their adaptive statistics; None without g_phi).
Signature = Callable[[FieldSequence], tuple[torch.Tensor, FieldStatistics | None]]


def train_head(
    signature: Signature, g_phi: nn.Module, f_psi: nn.Module, fields: FieldSequence, supervision: Supervision,
    config: HeadConfig, *, train_g_phi: bool, top_p: float, stat_scale: torch.Tensor, seed: int,
    device: torch.device, progress: bool,
) -> list[float]:
    """``config.steps`` AdamW steps (cosine learning rate) on batches of whole images drawn with a
    generator seeded by ``seed``; ``signature`` reads ``g_phi`` (when ``train_g_phi``) and feeds ``f_psi``.
    Returns the loss of every step; both networks are left in eval mode."""
    cfg, grid = config, fields.grid
    targets, known, labels = supervision.targets, supervision.known, supervision.labels
    params = list(f_psi.parameters()) + (list(g_phi.parameters()) if train_g_phi else [])
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    cells = grid**2
    top_k = max(1, round(cells * top_p / 100))
    positives = (targets[known] > 0.5).sum().item()
    negatives = known.sum().item() * cells - positives
    pos_weight = torch.tensor(min(20.0, negatives / max(positives, 1)))
    losses: list[float] = []
    g_phi.train()
    f_psi.train()
    bar = show_progress(range(cfg.steps), desc="train g_phi, f_psi", enabled=progress, unit="step")
    for step in bar:
        index = torch.randint(0, len(labels), (min(cfg.batch_images, len(labels)),), generator=generator)
        batch = fields.index(image_rows(index, grid))
        z, stats = signature(batch)
        logits = f_psi(z).view(-1, grid, grid)
        y_hat = torch.sigmoid(logits)
        # L_sup: patch BCE where cell labels are known, image BCE through the top-p pooling elsewhere.
        b_known, b_targets = known[index].to(device), targets[index].to(device)
        b_labels = labels[index].to(device)
        loss_patch = (
            F.binary_cross_entropy_with_logits(logits[b_known], b_targets[b_known], pos_weight=pos_weight)
            if b_known.any() else logits.sum() * 0
        )
        pooled = y_hat.flatten(1).topk(top_k, dim=1).values.mean(1).clamp(1e-6, 1 - 1e-6)
        loss_image = F.binary_cross_entropy(pooled, b_labels)
        loss = loss_patch + loss_image
        if stats is not None and cfg.lambda_stat > 0:
            # L_stat: energy and non-stationarity of normal patches (unitless: / source-normal means).
            normal = (b_targets.flatten() <= 0.5) & b_known.repeat_interleave(grid**2)
            scale = stat_scale.to(device)
            l_stat = (stats.E[normal] / scale[0]).mean() + (stats.NS[normal] / scale[1]).mean()
            loss = loss + cfg.lambda_stat * l_stat
        # L_sp: total-variation spatial prior on the patch probability map.
        tv = (y_hat[:, 1:] - y_hat[:, :-1]).abs().mean() + (y_hat[:, :, 1:] - y_hat[:, :, :-1]).abs().mean()
        loss = loss + cfg.lambda_sp * tv  # Eq. 10: L_S = L_sup + lambda_stat L_stat + lambda_sp L_sp
        for group in optimiser.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    g_phi.eval()
    f_psi.eval()
    return losses
