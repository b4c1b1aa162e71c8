"""Critic energies f(x, y) between a phi row x and a psi row y, and the logits built from them.

Logits are ``L = exp(log_scale) * f(x, y) + bias``. The fused kernels see every energy as a
function of the inner product ``P = x . y`` and per-row squared norms, so this module prepares
those per-row inputs (O(B * d) work, differentiable through autograd) and computes the paired
(diagonal) logits ``L_ii`` that the losses need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ENERGIES = ("dot", "l2", "norm", "cosine")
NORM_EPS = 1e-6
"""Added under the square root of the ``norm`` energy, as JaxGCRL does."""

# Kernel-side energy codes: cosine is a dot product of normalised rows.
ENERGY_CODES = {"dot": 0, "cosine": 0, "l2": 1, "norm": 2}


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); every other float accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_energy(energy: str) -> None:
    if energy not in ENERGIES:
        raise ValueError(f"energy must be one of {ENERGIES}, got {energy!r}")


def energy_inputs(
    phi: torch.Tensor, psi: torch.Tensor, energy: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Return ``(x, y, |x|^2, |y|^2)`` as the kernels consume them (norms ``None`` if unused)."""
    if energy == "cosine":
        return F.normalize(phi, dim=-1), F.normalize(psi, dim=-1), None, None
    if energy in ("l2", "norm"):
        acc = accumulate_dtype(phi.dtype)
        return phi, psi, phi.to(acc).square().sum(-1), psi.to(acc).square().sum(-1)
    return phi, psi, None, None


def apply_energy(p: torch.Tensor, x_sq: torch.Tensor | None, y_sq: torch.Tensor | None, code: int):
    """Energy from inner products ``p`` and squared norms (broadcastable); float32 or wider."""
    if code == 0:
        return p
    if code == 1:
        return 2.0 * p - x_sq - y_sq
    return -torch.sqrt((x_sq + y_sq - 2.0 * p).clamp_min(0.0) + NORM_EPS)


def pairwise_energy(
    phi: torch.Tensor,
    psi: torch.Tensor,
    energy: str = "dot",
    log_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``L_ii`` of paired rows ``(phi_i, psi_i)``: shape (B,), float32 (float64 stays).

    This is the critic value the actor maximises; ``contrastive_loss`` uses it for positives.
    """
    check_energy(energy)
    if phi.ndim != 2 or psi.ndim != 2 or psi.shape[0] < phi.shape[0]:
        raise ValueError(
            f"pairwise_energy needs phi (B, d) and psi (M >= B, d), "
            f"got {tuple(phi.shape)} and {tuple(psi.shape)}"
        )
    x, y, x_sq, y_sq = energy_inputs(phi, psi[: phi.shape[0]], energy)
    acc = accumulate_dtype(x.dtype)
    f = apply_energy((x.to(acc) * y.to(acc)).sum(-1), x_sq, y_sq, ENERGY_CODES[energy])
    if log_scale is not None:
        f = f * log_scale.exp()
    if bias is not None:
        f = f + bias
    return f
