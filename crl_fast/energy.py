"""Critic energies f(x, y) between a phi row x and a psi row y, and the logits built from them.

Logits are ``L = exp(log_scale) * f(x, y) + bias``. The fused kernels see every energy as a
function of the inner product ``P = x . y`` and per-row squared norms; this module holds that
function once, for the chunked PyTorch path and for ``pairwise_energy`` (the paired logits
``L_ii`` that the actor maximises).
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


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows scaled to norm 1 (a zero row stays zero), normalised in float32 or wider: in float16
    the norm overflows past 65504 and ``F.normalize``'s eps of 1e-12 rounds to 0."""
    return F.normalize(t.to(accumulate_dtype(t.dtype)), dim=-1).to(t.dtype)


def kernel_inputs(
    phi: torch.Tensor, psi: torch.Tensor, energy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows the fused kernels multiply: cosine normalises them, other energies pass them."""
    if energy == "cosine":
        return _unit_rows(phi), _unit_rows(psi)
    return phi, psi


def energy_and_slope(
    p: torch.Tensor, x_sq: torch.Tensor | None, y_sq: torch.Tensor | None, code: int
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Energy ``f`` and its slope ``df/dP`` from inner products ``p`` and squared norms
    (broadcastable; ``None`` for dot). The slope of ``f`` w.r.t. each squared norm is
    ``-slope / 2`` for l2 and norm. Inputs in float32 or wider."""
    if code == 0:
        return p, 1.0
    assert x_sq is not None and y_sq is not None, "l2 and norm need the squared norms"
    return _energy_of_distance(x_sq + y_sq - 2.0 * p, code)


def _energy_of_distance(sq: torch.Tensor, code: int) -> tuple[torch.Tensor, torch.Tensor | float]:
    """l2's or norm's energy and slope from the squared distance ``sq``."""
    if code == 1:
        return -sq, 2.0
    root = torch.sqrt(sq.clamp_min(0.0) + NORM_EPS)
    return -root, torch.where(sq > 0, 1.0 / root, 0.0)


def paired_energy(
    x: torch.Tensor, y: torch.Tensor, code: int
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """``f(x_i, y_i)`` and its slope for paired rows, exactly (from ``x_i - y_i``: the expanded
    ``|x|^2 + |y|^2 - 2 x.y`` cancels when x is close to y); the rows are kernel inputs (cosine
    already normalised) in float32 or wider."""
    if code == 0:
        return (x * y).sum(-1), 1.0
    return _energy_of_distance((x - y).square().sum(-1), code)


def logit_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """``exp(log_scale)``, 0-d, taken in float32 or wider: a float16 or bfloat16 scale's exp
    rounded to its own dtype would put its rounding error into every logit, and its gradient
    (``dlog_scale / scale``) could overflow float16 where ``dlog_scale`` does not."""
    return log_scale.reshape(()).to(accumulate_dtype(log_scale.dtype)).exp()


def check_scale_and_bias(
    log_scale: torch.Tensor | None, bias: torch.Tensor | None, device: torch.device
) -> None:
    """Each is None or a one-element floating-point tensor on ``device``."""
    for name, t in (("log_scale", log_scale), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point():
            if isinstance(t, torch.Tensor):
                got = f"shape {tuple(t.shape)}, {t.dtype}"
            else:
                got = f"{type(t).__name__} {t!r} (pass torch.tensor({t!r}))"
            raise TypeError(f"{name} must be a floating-point tensor with one element, got {got}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but phi is on {device}")


def pairwise_energy(
    phi: torch.Tensor,
    psi: torch.Tensor,
    energy: str = "dot",
    log_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``L_ii`` of paired rows ``(phi_i, psi_i)``: shape (B,), float32 (float64 stays);
    rows of ``psi`` past B are not read (as ``contrastive_loss`` reads its positives).

    This is the critic value the actor maximises (``contrastive_loss`` computes its positives
    the same way, from ``phi_i - psi_i``, inside its own passes).
    """
    check_energy(energy)
    for name, t in (("phi", phi), ("psi", psi)):
        if not isinstance(t, torch.Tensor):
            kind = type(t).__name__
            raise TypeError(f"pairwise_energy: {name} must be a torch.Tensor, got {kind}")
    check_scale_and_bias(log_scale, bias, phi.device)
    if (
        phi.ndim != 2
        or psi.ndim != 2
        or psi.shape[0] < phi.shape[0]
        or phi.shape[1] != psi.shape[1]
    ):
        raise ValueError(
            f"pairwise_energy needs phi (B, d) and psi (M >= B, d), "
            f"got {tuple(phi.shape)} and {tuple(psi.shape)}"
        )
    if not (phi.is_floating_point() and phi.dtype == psi.dtype and phi.device == psi.device):
        raise TypeError(
            f"pairwise_energy needs floating-point phi and psi of one dtype on one device, got "
            f"{phi.dtype} on {phi.device} and {psi.dtype} on {psi.device}"
        )
    x, y = kernel_inputs(phi, psi[: phi.shape[0]], energy)
    acc = accumulate_dtype(x.dtype)
    f, _ = paired_energy(x.to(acc), y.to(acc), ENERGY_CODES[energy])
    if log_scale is not None:
        f = f * logit_scale(log_scale)
    if bias is not None:
        f = f + bias.reshape(())
    return f
