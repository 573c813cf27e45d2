"""The fitted CFA transforms of an adapted model, as one value (``align.py`` fits each of them).

Order at inference: target REF -> TA (``positions``) -> DSA (``rotation``, on M's tokens) -> input
alignment (``input_a``, ``input_b``) -> g_phi -> SFA with the statistic flips (``align_a``, ``align_b``)
-> f_psi. Every transform is the identity (input alignment: absent) until ``REFCFA.fit_alignment`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Bundle keys of the transforms every adapted model has; the input alignment's are optional.
TRANSFORMS = ("positions", "rotation", "align_a", "align_b")
INPUT_TRANSFORMS = ("input_a", "input_b")


@dataclass
class FieldAlignment:
    positions: torch.Tensor  # TA: psi, the fractional target step for each source step [K]
    rotation: torch.Tensor  # DSA rotation R [C, C]
    align_a: torch.Tensor  # SFA whiten-recolor z' = A z + b, statistic flips folded in: A diag(flip) [D, D]
    align_b: torch.Tensor  # [D]
    input_a: torch.Tensor | None = None  # input alignment x' = a x + b, [K, F] each (None: off)
    input_b: torch.Tensor | None = None

    @classmethod
    def identity(cls, steps: int, channels: int, signature_dim: int) -> FieldAlignment:
        return cls(torch.arange(steps, dtype=torch.float32), torch.eye(channels), torch.eye(signature_dim),
                   torch.zeros(signature_dim))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {name: getattr(self, name) for name in TRANSFORMS}
        if self.input_a is not None:
            out.update(input_a=self.input_a, input_b=self.input_b)
        return out

    def load_inputs(self, tensors: dict[str, torch.Tensor]) -> None:
        """The input alignment from a bundle's ``tensors`` (None where absent: an older bundle, or adapted
        without it)."""
        for name in INPUT_TRANSFORMS:
            setattr(self, name, tensors[name].cpu() if name in tensors else None)

    def load_transforms(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in TRANSFORMS:
            setattr(self, name, tensors[name].cpu())

    def token_basis(self, basis: torch.Tensor, directional: bool) -> torch.Tensor:
        """Token bases for target fields (R, M, Q): DSA rotates the target's M into the source's
        orientation subspace before projection (R^T B for M); R and Q keep the source basis."""
        if not directional:
            return basis
        return torch.stack([basis, self.rotation.to(basis.device).T @ basis, basis])

    def inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """g_phi's inputs [N, K, F] with the input alignment applied (as they are when it is off)."""
        if self.input_a is None:
            return inputs
        return inputs * self.input_a.to(inputs.device) + self.input_b.to(inputs.device)

    def signatures(self, z: torch.Tensor) -> torch.Tensor:
        """SFA (and the statistic flips when enabled) of signatures z [N, D]; the identity with both off."""
        return z @ self.align_a.to(z.device).T + self.align_b.to(z.device)
