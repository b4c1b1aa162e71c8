"""Plain PyTorch reference for every critic loss: builds the full B x M logit matrix.

This file defines the maths. It is what the tests and benchmarks compare the fused paths
against (in float64 for truth, in the input dtype for "eager PyTorch"). It uses O(B * M)
memory on purpose, so keep it to small batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crl_fast.energy import NORM_EPS
from crl_fast.loss import LossConfig


def reference_logits(
    phi: torch.Tensor,
    psi: torch.Tensor,
    energy: str = "dot",
    log_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The (B, M) logit matrix ``L_ij = exp(log_scale) * f(phi_i, psi_j) + bias``."""
    if energy == "dot":
        f = phi @ psi.T
    elif energy == "cosine":
        f = F.normalize(phi, dim=-1) @ F.normalize(psi, dim=-1).T
    elif energy == "l2":
        f = -(phi[:, None, :] - psi[None, :, :]).square().sum(-1)
    elif energy == "norm":
        f = -torch.sqrt((phi[:, None, :] - psi[None, :, :]).square().sum(-1) + NORM_EPS)
    else:
        raise ValueError(f"unknown energy {energy!r}")
    if log_scale is not None:  # one element, of any shape (as contrastive_loss takes it)
        f = f * log_scale.reshape(()).exp()
    if bias is not None:
        f = f + bias.reshape(())
    return f


def _offdiag_lse(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp along ``dim`` leaving out the diagonal ``i == j``."""
    b = logits.shape[0]
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[torch.arange(b), torch.arange(b)] = True
    return logits.masked_fill(mask, float("-inf")).logsumexp(dim)


def reference_contrastive_loss(
    phi: torch.Tensor,
    psi: torch.Tensor,
    *,
    loss: str = "binary",
    energy: str = "dot",
    log_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    logsumexp_penalty: float = 0.0,
    exclude_positive_from_lse: bool = False,
    reduction: str = "mean",
    return_metrics: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every loss of ``crl_fast.contrastive_loss``, written directly on the logit matrix (its
    options checked as the fused loss checks them): the B row losses, reduced."""
    LossConfig(loss, energy, logsumexp_penalty, exclude_positive_from_lse, reduction)
    logits = reference_logits(phi, psi, energy, log_scale, bias)
    b, m = logits.shape
    pos = logits.diagonal()

    def row_lse(lg: torch.Tensor) -> torch.Tensor:
        return _offdiag_lse(lg, 1) if exclude_positive_from_lse else lg.logsumexp(1)

    def col_lse(lg: torch.Tensor) -> torch.Tensor:
        sq = lg[:, :b]
        return _offdiag_lse(sq, 0) if exclude_positive_from_lse else sq.logsumexp(0)

    # Row i's terms: its pairs' (binary, dpo, ipo), its row's, column i's; and their count.
    eye_m = torch.eye(b, m, dtype=logits.dtype, device=logits.device)
    offdiag = eye_m == 0
    if loss == "binary":
        rows = F.binary_cross_entropy_with_logits(logits, eye_m, reduction="none").sum(1)
        terms = b * m
    elif loss == "infonce":
        rows, terms = row_lse(logits) - pos, b
    elif loss == "infonce_backward":
        rows, terms = col_lse(logits) - pos, b
    elif loss == "symmetric_infonce":
        rows, terms = (row_lse(logits) - pos) + (col_lse(logits) - pos), b
    elif loss in ("flatnce", "flatnce_backward"):
        if loss == "flatnce":
            c = _offdiag_lse(logits - pos[:, None], 1)
        else:
            c = _offdiag_lse(logits[:, :b] - pos[None, :], 0)
        rows, terms = torch.exp(c - c.detach()), b
    elif loss == "dpo":
        rows = (-F.logsigmoid(pos[:, None] - logits)).where(offdiag, 0.0).sum(1)
        terms = b * (m - 1)
    elif loss == "ipo":
        rows = (pos[:, None] - logits - 1.0).square().where(offdiag, 0.0).sum(1)
        terms = b * (m - 1)
    elif loss == "fb":  # alignment -L_ii, uniformity over the row's M - 1 off-diagonal goals
        rows = -pos + 0.5 * logits.square().where(offdiag, 0.0).sum(1) / (m - 1)
        terms = b
    elif loss == "sppo":  # targets 1 on the diagonal (weighted M), -1 off it
        target = 2.0 * eye_m - 1.0
        weight = torch.where(offdiag, 1.0, float(m))
        rows = ((logits - target).square() * weight).sum(1)
        terms = b * m
    else:
        raise ValueError(f"unknown loss {loss!r}")
    penalty = pos.new_zeros(())  # the penalty's B terms, reduced on their own
    if logsumexp_penalty:
        penalty = logsumexp_penalty * row_lse(logits).square()
    if reduction == "none":
        value = rows + penalty
    elif reduction == "sum":
        value = rows.sum() + penalty.sum()
    else:
        value = rows.sum() / terms + penalty.mean()
    if not return_metrics:
        return value
    with torch.no_grad():
        eye = torch.eye(b, m, dtype=torch.bool, device=logits.device)
        metrics = {
            "categorical_accuracy": (logits.argmax(1) == torch.arange(b, device=logits.device))
            .float()
            .mean(),
            "binary_accuracy": ((logits > 0) == eye).float().mean(),
            "logits_pos": pos.mean(),
            "logits_neg": logits[offdiag].mean(),
            "logsumexp_sq": row_lse(logits).square().mean(),
        }
    return value, metrics
