"""The losses that compute their gradients in forward: the sigmoid loss (labels = identity) and,
on the Triton path, DPO / IPO / FB / SPPO.

Their gradient needs no statistic of the logits first, so forward takes the loss and every
gradient in two passes over the logits (one with ``CRL_FAST_SINGLE_PASS=1``) instead of the
three of a forward pass plus ``crl_fast.pair_stats``'s backward, and backward only scales the
saved gradients by grad_output. The ``crl_fast::loss_with_grads`` custom op wraps it as
``crl_fast.pair_stats`` wraps the statistics, on the same row prologue, diagonal and Triton glue.
"""

# No ``from __future__ import annotations``: torch.library infers the op's schema from the
# implementation's annotations, and evaluates string ones in the globals of the function it is
# given, autocast_off's wrapper, i.e. in crl_fast.pair_stats, where this module's names are not.
from typing import Any

import torch

from crl_fast.custom_ops import eager_fast_path, refuse_double_backward
from crl_fast.energy import accumulate_dtype
from crl_fast.pair_stats import (
    PAIR_FB,
    PAIR_NONE,
    REFERENCE_LOSS,
    add_diagonal,
    autocast_off,
    column_buffers,
    diagonal_grad,
    diagonal_scale_grads,
    paired_rows,
    shifted_pair,
    torch_grad_with_diagonal,
    triton_dy,
)
from crl_fast.pair_stats_torch import softplus

Tensor = torch.Tensor
Tensors5 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
Tensors7 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
Needs = tuple[bool, bool, bool]
"""(x_grad, y_grad, scale_grad): which gradients a caller needs."""


def _forward_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 else dtype


@autocast_off
def _loss_with_grads_impl(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, energy: int, pair: int, mean: bool,
    x_grad: bool, y_grad: bool, scale_grad: bool, use_triton: bool,
) -> Tensors5:  # fmt: skip
    """Loss, (dx, dy) and float32 (dscale, dbias) of a loss whose gradient needs no statistic of
    the logits first: the sigmoid loss with labels = identity (``pair`` PAIR_NONE), dloss/dL_ij
    = w sigmoid(L_ij) - w [i == j], w = 1 / (B M) for the mean; DPO / IPO (PAIR_DPO / PAIR_IPO,
    Triton path), dloss/dL_ij = w pair'(L_ij - L_ii) off the diagonal, w = 1 / (B (M - 1)), and
    on it minus the row's sum; FB / SPPO (Triton path), w times their term's slope off the
    diagonal and their diagonal term's on it (:func:`_unshifted_diagonal`). Without
    ``scale_grad`` the kernels skip (dscale, dbias): their off-diagonal part is then zero.
    Without ``y_grad`` no column pass runs (a frozen goal encoder's psi), and dy comes back
    empty; so does dx without ``x_grad`` (the row pass, which sums the loss, runs anyway).

    (dx, dy) come in the input dtype, except float16's, which come in float32: backward scales
    them by grad_output (a GradScaler's 2**16, say) and rounds only then, and the kernels' tiles
    carry the gradient without w, applied to the float32 sums (w H would underflow)."""
    b, m = x.shape[0], y.shape[0]
    w = _term_weight(pair, b, m, mean)
    wide = x.dtype == torch.float16
    g_label = 1.0 if wide else w  # the kernels' weight of every logit's term
    grad_dtype = _forward_grad_dtype(x.dtype)
    needs = (x_grad, y_grad, scale_grad)
    if pair:
        grads = _pair_grads(x, y, scale, bias, energy, pair, g_label, grad_dtype, needs, use_triton)
    else:
        grads = _sigmoid_grads(x, y, scale, bias, energy, g_label, grad_dtype, needs, use_triton)
    loss, dx, dy, dscale, dbias, g_ii, f = grads
    loss = loss * w
    if wide:
        dx, dy = dx * w, dy * w
    if not scale_grad:  # backward returns no gradient for them
        return loss, dx, dy, loss.new_zeros(()), loss.new_zeros(())
    dscale_ii, dbias_ii = diagonal_scale_grads(g_ii, f)
    dscale, dbias = dscale.sum() + dscale_ii, dbias.sum() + dbias_ii
    if shifted_pair(pair):  # the bias cancels in L_ij - L_ii: its gradient is zero, not noise
        dbias = torch.zeros_like(dbias)
    if wide:
        dscale, dbias = dscale * w, dbias * w
    return loss, dx, dy, dscale, dbias


def _term_weight(pair: int, b: int, m: int, mean: bool) -> float:
    """The weight of each off-diagonal term in the loss: the mean's 1 / (B M) for the sigmoid
    loss and SPPO, 1 / (B (M - 1)) for DPO / IPO, FB's 1 / (M - 1) per row (times 1 / B for the
    mean: the mean over rows); 1 for the sum, but FB's 1 / (M - 1)."""
    row = 1.0 / (m - 1) if pair == PAIR_FB else 1.0
    if not mean:
        return row
    return row / b if pair == PAIR_FB else 1.0 / (b * (m - 1) if shifted_pair(pair) else b * m)


def _unshifted_diagonal(pair: int, pos: Tensor, m: int, g_label: float) -> tuple[Tensor, Tensor]:
    """FB's and SPPO's diagonal, in units of the off-diagonal term's weight (``g_label`` per
    term, and the loss's sum, which the caller weighs): its gradient G_ii and the sum of its
    terms. FB: -(M - 1) L_ii (-L_ii against the row's mean of M - 1 others); SPPO:
    M (L_ii - 1)^2, the positive weighted M."""
    if pair == PAIR_FB:
        return torch.full_like(pos, -g_label * (m - 1)), -(m - 1) * pos.sum()
    return g_label * 2 * m * (pos - 1), m * (pos - 1).square().sum()


def _sigmoid_grads(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, energy: int,
                   g_label: float, grad_dtype: torch.dtype, needs: Needs,
                   use_triton: bool) -> Tensors7:  # fmt: skip
    """The sigmoid loss's unweighted sum, (dx, dy) (each empty where ``needs`` = (x_grad,
    y_grad, scale_grad) says so), the off-diagonal (dscale, dbias) partials, the diagonal's
    G_ii and exact energies: two passes over the logits (Triton: one with
    ``CRL_FAST_SINGLE_PASS=1``, or without y_grad), or the chunked PyTorch path."""
    x_grad, y_grad, scale_grad = needs
    empty = x.new_empty(0, dtype=torch.float32)
    if not use_triton:
        x_sq, y_sq, f, slope, pos = paired_rows(x, y, scale, bias, energy, use_triton)
        g_sp = torch.full_like(pos, g_label)
        g_pos = -g_sp * torch.sigmoid(-pos)  # of softplus(-L_ii)
        hd, g_ii = diagonal_grad(
            scale, pos, slope, empty, empty, empty, empty, g_pos, None, None, None, empty, False
        )
        inputs = (x, y, x_sq, y_sq, scale, bias, pos)
        grads = (empty, empty, empty, empty, empty, empty, g_sp, empty)
        dx, dy, dscale, dbias, sp_off = torch_grad_with_diagonal(
            *inputs, *grads, hd, energy, PAIR_NONE, True, x_grad, y_grad
        )
        value = sp_off + softplus(-pos).sum()
        return value, dx.to(grad_dtype), dy.to(grad_dtype), dscale, dbias, g_ii, f
    from crl_fast.kernels import pair_stats as kernels

    s32, b32 = scale.float(), bias.float()
    # One launch: the rows' norms and the diagonal's gradient and loss terms.
    x_sq, y_sq, f, slope, pos, g_ii, hd, sp_diag = kernels.paired_rows(
        x, y, s32, b32, energy=energy, binary_weight=g_label
    )
    g_sp = torch.full_like(pos, g_label)
    stats_and_grads = (empty, empty, empty, empty, empty, empty, g_sp, empty, hd)
    (dx, dscale, dbias, sp_off, _), col, common = _row_pass(
        x, y, x_sq, y_sq, s32, b32, pos, stats_and_grads, energy, PAIR_NONE, y_grad, scale_grad,
        grad_dtype,
    )  # fmt: skip
    dy = triton_dy(
        y, x, y_sq, x_sq, s32, b32, pos, stats_and_grads, col, grad_dtype, common, y_grad
    )
    dx = dx if x_grad else dx.new_empty(0)
    # softplus(L_ij) off the diagonal, softplus(-L_ii) on it
    return (sp_off + sp_diag).sum(), dx, dy, dscale, dbias, g_ii, f


def _pair_grads(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, energy: int, pair: int,
                g_label: float, grad_dtype: torch.dtype, needs: Needs,
                use_triton: bool) -> Tensors7:  # fmt: skip
    """DPO / IPO / FB / SPPO on the Triton path, as :func:`_sigmoid_grads`: two passes (one
    with ``CRL_FAST_SINGLE_PASS=1``, or without y_grad). The row pass sums the loss terms and,
    for DPO / IPO, their slopes (the diagonal's G_ii = -g_label sum_j slope_ij needs the whole
    row), so dx stays float32 until the diagonal's share is added."""
    if not use_triton:  # before the import: without Triton, this error, not an ImportError
        raise ValueError("pair losses with gradients in forward are a Triton-path optimisation")
    from crl_fast.kernels import pair_stats as kernels

    x_grad, y_grad, scale_grad = needs
    s32, b32 = scale.float(), bias.float()
    x_sq, y_sq, f, slope, pos = kernels.paired_rows(x, y, s32, b32, energy=energy)
    empty = x.new_empty(0, dtype=torch.float32)
    g_pair = torch.full_like(pos, g_label)
    grads = (empty, empty, empty, empty, empty, empty, empty, g_pair)
    (dx, dscale, dbias, terms, slopes), col, common = _row_pass(
        x, y, x_sq, y_sq, s32, b32, pos, (*grads, empty), energy, pair, y_grad, scale_grad,
        torch.float32,
    )  # fmt: skip
    diagonal: Tensor | float  # the diagonal terms' sum: none for DPO / IPO
    if shifted_pair(pair):
        g_ii, diagonal = -g_label * slopes, 0.0
    else:
        g_ii, diagonal = _unshifted_diagonal(pair, pos, y.shape[0], g_label)
    hd = g_ii * s32 * slope
    if x_grad:
        add_diagonal(dx, x, y, hd, energy)
    dx = dx.to(grad_dtype) if x_grad else dx.new_empty(0, dtype=grad_dtype)
    dy = triton_dy(y, x, y_sq, x_sq, s32, b32, pos, (*grads, hd), col, grad_dtype, common, y_grad)
    return terms.sum() + diagonal, dx, dy, dscale, dbias, g_ii, f


def _row_pass(x: Tensor, y: Tensor, x_sq: Tensor, y_sq: Tensor, scale: Tensor, bias: Tensor,
              pos: Tensor, stats_and_grads: tuple[Tensor, ...], energy: int, pair: int,
              y_grad: bool, scale_grad: bool, out_dtype: torch.dtype,
              ) -> tuple[Tensors5, tuple[Tensor, Tensor] | None, dict[str, Any]]:  # fmt: skip
    """The Triton row pass of both losses: the x-launch of :func:`kernels.grad` with ``fwd``,
    whose five outputs come first (dx in ``out_dtype``), then for :func:`triton_dy` the column
    sums it also fills in the single pass (``CRL_FAST_SINGLE_PASS=1`` and ``y_grad``; else
    None) and the launch's keywords. ``stats_and_grads`` are the nine tensors after ``pos``."""
    from crl_fast.kernels import pair_stats as kernels
    from crl_fast.kernels import pair_stats_tiling as tiling

    common = {"energy": energy, "mask_diag": False, "pair": pair, "scale_grad": scale_grad}
    single = tiling.single_pass(x.dtype, x.shape[1]) and y_grad
    col = column_buffers(y, energy) if single else None
    outputs: Tensors5 = kernels.grad(
        x, y, x_sq, y_sq, scale, bias, pos, *stats_and_grads, x_is_a=True, fwd=True,
        column_sums=col, out_dtype=out_dtype, **common,
    )  # fmt: skip
    return outputs, col, common


_loss_with_grads_op = torch.library.custom_op(
    "crl_fast::loss_with_grads", _loss_with_grads_impl, mutates_args=()
)


@_loss_with_grads_op.register_fake
def _(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, energy: int, pair: int, mean: bool,
      x_grad: bool, y_grad: bool, scale_grad: bool, use_triton: bool) -> Tensors5:  # fmt: skip
    scalar = x.new_empty((), dtype=accumulate_dtype(x.dtype))
    grad_dtype = _forward_grad_dtype(x.dtype)
    dx, dy = (
        torch.empty_like(t, dtype=grad_dtype) if wanted else t.new_empty(0, dtype=grad_dtype)
        for t, wanted in ((x, x_grad), (y, y_grad))
    )
    return scalar, dx, dy, scalar.clone(), scalar.clone()


def _forward_grads_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensors5) -> None:
    ctx.save_for_backward(*output[1:])
    ctx.dtypes = tuple(t.dtype for t in inputs[:4])
    # The gradients travel as outputs, which nothing downstream uses: no zero tensors for them.
    ctx.set_materialize_grads(False)


def _forward_grads_backward(
    ctx: Any, g_loss: Tensor | None, *_unused: Tensor | None
) -> tuple[Tensor | None, ...]:
    refuse_double_backward("the fused contrastive losses", REFERENCE_LOSS)
    if g_loss is None:
        return (None,) * 11
    grads = [
        (g_loss * g).to(dtype) if needed else None
        for g, dtype, needed in zip(
            ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:4], strict=True
        )
    ]
    return (*grads, *(None,) * 7)


_loss_with_grads = eager_fast_path(
    _loss_with_grads_op, _loss_with_grads_impl, _forward_grads_backward,
    _forward_grads_setup_context, alternative=REFERENCE_LOSS,
)  # fmt: skip


def loss_with_grads(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *, energy: int, pair: int, mean: bool,
    use_triton: bool,
) -> Tensor:  # fmt: skip
    """The sigmoid loss (labels = identity; ``pair`` PAIR_NONE) or a pair loss (DPO / IPO / FB /
    SPPO, Triton path) whose forward also computes every gradient (two passes over the
    logits instead of three); backward only scales them by grad_output."""
    acc = accumulate_dtype(x.dtype)
    grad = torch.is_grad_enabled()
    scale_grad = grad and (scale.requires_grad or bias.requires_grad)
    return _loss_with_grads(
        x.contiguous(), y.contiguous(), scale.to(acc), bias.to(acc), energy, pair, mean,
        grad and x.requires_grad, grad and y.requires_grad, scale_grad, use_triton,
    )[0]  # fmt: skip
