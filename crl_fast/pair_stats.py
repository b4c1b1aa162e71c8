"""Row and column statistics of a logit matrix that is never materialised, with gradients.

Every critic loss is a small function of O(B) statistics of ``L = scale * f(x, y) + bias``
(see ``kernels/pair_stats.py`` for the exact list and the gradient formula). This module wraps
the statistics as two ``torch.library`` custom ops (forward and backward), so they work under
autograd, ``torch.compile`` and CUDA-graph capture, and dispatches each call to

* the Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), or
* a chunked PyTorch implementation of the same maths that holds at most ``CHUNK_ELEMENTS``
  logits at a time and recomputes them in backward (CPU, float64, or no Triton).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from crl_fast.energy import NORM_EPS, accumulate_dtype

CHUNK_ELEMENTS = 1 << 20
"""Logits per chunk in the PyTorch path: bounds its extra memory to a few times 4 MiB."""

PAIR_NONE, PAIR_DPO, PAIR_IPO = 0, 1, 2

Tensor = torch.Tensor
Tensors7 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


class PairStats(NamedTuple):
    """Statistics over j of each row i (``row_*``: length B) or over i of each column (M)."""

    row_lse: torch.Tensor
    col_lse: torch.Tensor
    row_softplus: torch.Tensor
    row_pair: torch.Tensor
    row_argmax: torch.Tensor
    row_sum: torch.Tensor
    row_correct: torch.Tensor


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0, dtype=accumulate_dtype(like.dtype))


# --------------------------------------------------------------------- chunked PyTorch path


def _chunk_logits(x, y, x_sq, y_sq, scale, bias, energy: int):
    """Logits, energy and dL/dP slope for a block of rows, in the accumulation dtype."""
    acc = accumulate_dtype(x.dtype)
    p = x.to(acc) @ y.to(acc).T
    if energy == 0:
        f, slope = p, None
    elif energy == 1:
        f, slope = 2.0 * p - x_sq.to(acc)[:, None] - y_sq.to(acc)[None, :], 2.0
    else:
        sq = x_sq.to(acc)[:, None] + y_sq.to(acc)[None, :] - 2.0 * p
        root = torch.sqrt(sq.clamp_min(0.0) + NORM_EPS)
        f, slope = -root, torch.where(sq > 0, 1.0 / root, 0.0)
    return scale.to(acc) * f + bias.to(acc), f, slope


def _chunks(n_rows: int, n_cols: int):
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def _diag_mask(start: int, stop: int, n_cols: int, device) -> torch.Tensor:
    rows = torch.arange(start, stop, device=device)
    return rows[:, None] == torch.arange(n_cols, device=device)[None, :]


def _torch_stats(
    x,
    y,
    x_sq,
    y_sq,
    shift,
    scale,
    bias,
    energy,
    row_lse,
    col_lse,
    mask_diag,
    softplus,
    pair,
    metrics,
):
    b, m = x.shape[0], y.shape[0]
    acc = accumulate_dtype(x.dtype)
    new = {"dtype": acc, "device": x.device}
    out = {k: torch.empty(0, **new) for k in PairStats._fields}
    if row_lse:
        out["row_lse"] = torch.empty(b, **new)
    if softplus:
        out["row_softplus"] = torch.empty(b, **new)
    if pair:
        out["row_pair"] = torch.empty(b, **new)
    if metrics:
        out["row_argmax"] = torch.empty(b, dtype=torch.int32, device=x.device)
        out["row_sum"] = torch.empty(b, **new)
        out["row_correct"] = torch.empty(b, **new)
    col_max = torch.full((m,), float("-inf"), **new)
    col_sum = torch.zeros(m, **new)
    for start, stop in _chunks(b, m):
        xs = x[start:stop]
        xs_sq = x_sq[start:stop] if x_sq.numel() else x_sq
        logits, _, _ = _chunk_logits(xs, y, xs_sq, y_sq, scale, bias, energy)
        diag = _diag_mask(start, stop, m, x.device)
        lse_in = logits.masked_fill(diag, float("-inf")) if mask_diag else logits
        if row_lse:
            out["row_lse"][start:stop] = lse_in.logsumexp(1)
        if col_lse:
            new_max = torch.maximum(col_max, lse_in.amax(0))
            safe = torch.where(new_max == float("-inf"), 0.0, new_max)
            col_sum = col_sum * torch.exp(col_max - safe) + torch.exp(lse_in - safe).sum(0)
            col_max = new_max
        if softplus:
            out["row_softplus"][start:stop] = F.softplus(logits).sum(1)
        if pair:
            u = logits - shift[start:stop, None].to(acc)
            term = F.softplus(u) if pair == PAIR_DPO else (u + 1.0).square()
            out["row_pair"][start:stop] = term.masked_fill(diag, 0.0).sum(1)
        if metrics:
            out["row_argmax"][start:stop] = logits.argmax(1).to(torch.int32)
            out["row_sum"][start:stop] = logits.sum(1)
            out["row_correct"][start:stop] = ((logits > 0) == diag).sum(1).to(acc)
    if col_lse:
        out["col_lse"] = torch.where(col_max == float("-inf"), 0.0, col_max) + col_sum.log()
    return tuple(out[k] for k in PairStats._fields)


def _torch_grad(
    x,
    y,
    x_sq,
    y_sq,
    shift,
    scale,
    bias,
    row_lse,
    col_lse,
    g_row_lse,
    g_col_lse,
    g_softplus,
    g_pair,
    energy,
    mask_diag,
    pair,
):
    b, m = x.shape[0], y.shape[0]
    acc = accumulate_dtype(x.dtype)
    dx = torch.empty(x.shape, dtype=acc, device=x.device)
    dy = torch.zeros(y.shape, dtype=acc, device=x.device)
    dx_sq = torch.empty(b if energy else 0, dtype=acc, device=x.device)
    dy_sq = torch.zeros(m if energy else 0, dtype=acc, device=x.device)
    dshift = torch.empty(b if g_pair.numel() else 0, dtype=acc, device=x.device)
    dscale = torch.zeros((), dtype=acc, device=x.device)
    dbias = torch.zeros((), dtype=acc, device=x.device)
    y_acc = y.to(acc)
    for start, stop in _chunks(b, m):
        rows = slice(start, stop)
        xs = x[rows].to(acc)
        logits, f, slope = _chunk_logits(
            xs, y_acc, x_sq[rows] if energy else x_sq, y_sq, scale, bias, energy
        )
        diag = _diag_mask(start, stop, m, x.device)
        g = torch.zeros_like(logits)
        if g_row_lse.numel():
            p = torch.exp(logits - row_lse[rows, None])
            g += g_row_lse[rows, None] * (p.masked_fill(diag, 0.0) if mask_diag else p)
        if g_col_lse.numel():
            p = torch.exp(logits - col_lse[None, :])
            g += g_col_lse[None, :] * (p.masked_fill(diag, 0.0) if mask_diag else p)
        if g_softplus.numel():
            g += g_softplus[rows, None] * torch.sigmoid(logits)
        if g_pair.numel():
            u = logits - shift[rows, None].to(acc)
            dterm = torch.sigmoid(u) if pair == PAIR_DPO else 2.0 * (u + 1.0)
            gp = (g_pair[rows, None] * dterm).masked_fill(diag, 0.0)
            g += gp
            dshift[rows] = -gp.sum(1)
        h = g * scale.to(acc) if slope is None else g * scale.to(acc) * slope
        dx[rows] = h @ y_acc
        dy += h.T @ xs
        if energy:
            dx_sq[rows] = -0.5 * h.sum(1)
            dy_sq -= 0.5 * h.sum(0)
        dscale += (g * f).sum()
        dbias += g.sum()
    return dx.to(x.dtype), dy.to(y.dtype), dx_sq, dy_sq, dshift, dscale, dbias


# ----------------------------------------------------------------------------------- the ops


def _triton_stats(
    x,
    y,
    x_sq,
    y_sq,
    shift,
    scale,
    bias,
    energy,
    row_lse,
    col_lse,
    mask_diag,
    softplus,
    pair,
    metrics,
):
    from crl_fast.kernels import pair_stats as kernels

    s32, b32 = scale.float(), bias.float()
    rl, sp, pr, arg, rsum, cnt = kernels.stats(
        x,
        y,
        x_sq,
        y_sq,
        shift,
        s32,
        b32,
        energy=energy,
        lse=row_lse,
        mask_diag=mask_diag,
        softplus=softplus,
        pair=pair,
        metrics=metrics,
    )
    cl = _empty(x)
    if col_lse:
        cl = kernels.stats(
            y,
            x,
            y_sq,
            x_sq,
            shift,
            s32,
            b32,
            energy=energy,
            lse=True,
            mask_diag=mask_diag,
            softplus=False,
            pair=PAIR_NONE,
            metrics=False,
        )[0]
    return rl, cl, sp, pr, arg, rsum, cnt


def _triton_grad(
    x,
    y,
    x_sq,
    y_sq,
    shift,
    scale,
    bias,
    row_lse,
    col_lse,
    g_row_lse,
    g_col_lse,
    g_softplus,
    g_pair,
    energy,
    mask_diag,
    pair,
):
    from crl_fast.kernels import pair_stats as kernels

    s32, b32 = scale.float(), bias.float()
    dx, dx_sq, dshift, dscale, dbias = kernels.grad(
        x,
        y,
        x_sq,
        y_sq,
        shift,
        s32,
        b32,
        row_lse,
        col_lse,
        g_row_lse,
        g_col_lse,
        g_softplus,
        g_pair,
        energy=energy,
        x_is_a=True,
        mask_diag=mask_diag,
        pair=pair,
    )
    dy, dy_sq, _, _, _ = kernels.grad(
        y,
        x,
        y_sq,
        x_sq,
        shift,
        s32,
        b32,
        row_lse,
        col_lse,
        g_row_lse,
        g_col_lse,
        g_softplus,
        g_pair,
        energy=energy,
        x_is_a=False,
        mask_diag=mask_diag,
        pair=pair,
    )
    return dx, dy, dx_sq, dy_sq, dshift, dscale.sum(), dbias.sum()


@torch.library.custom_op("crl_fast::pair_stats", mutates_args=())
def _pair_stats_op(
    x: torch.Tensor,
    y: torch.Tensor,
    x_sq: torch.Tensor,
    y_sq: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    energy: int,
    row_lse: bool,
    col_lse: bool,
    mask_diag: bool,
    softplus: bool,
    pair: int,
    metrics: bool,
    use_triton: bool,
) -> Tensors7:
    impl = _triton_stats if use_triton else _torch_stats
    args = (x, y, x_sq, y_sq, shift, scale, bias, energy, row_lse, col_lse, mask_diag, softplus)
    return tuple(impl(*args, pair, metrics))


@_pair_stats_op.register_fake
def _(
    x,
    y,
    x_sq,
    y_sq,
    shift,
    scale,
    bias,
    energy,
    row_lse,
    col_lse,
    mask_diag,
    softplus,
    pair,
    metrics,
    use_triton,
):
    b, m = x.shape[0], y.shape[0]
    acc = accumulate_dtype(x.dtype)

    def vec(n: int, flag: bool, dtype=acc):
        return x.new_empty(n if flag else 0, dtype=dtype)

    return (
        vec(b, row_lse),
        vec(m, col_lse),
        vec(b, softplus),
        vec(b, pair != PAIR_NONE),
        vec(b, metrics, torch.int32),
        vec(b, metrics),
        vec(b, metrics),
    )


@torch.library.custom_op("crl_fast::pair_stats_backward", mutates_args=())
def _pair_stats_backward_op(
    x: torch.Tensor,
    y: torch.Tensor,
    x_sq: torch.Tensor,
    y_sq: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    g_row_lse: torch.Tensor,
    g_col_lse: torch.Tensor,
    g_softplus: torch.Tensor,
    g_pair: torch.Tensor,
    energy: int,
    mask_diag: bool,
    pair: int,
    use_triton: bool,
) -> Tensors7:
    impl = _triton_grad if use_triton else _torch_grad
    return tuple(
        impl(
            x,
            y,
            x_sq,
            y_sq,
            shift,
            scale,
            bias,
            row_lse,
            col_lse,
            g_row_lse,
            g_col_lse,
            g_softplus,
            g_pair,
            energy,
            mask_diag,
            pair,
        )
    )


@_pair_stats_backward_op.register_fake
def _(
    x,
    y,
    x_sq,
    y_sq,
    shift,
    scale,
    bias,
    row_lse,
    col_lse,
    g_row_lse,
    g_col_lse,
    g_softplus,
    g_pair,
    energy,
    mask_diag,
    pair,
    use_triton,
):
    acc = accumulate_dtype(x.dtype)
    b, m = x.shape[0], y.shape[0]
    return (
        torch.empty_like(x),
        torch.empty_like(y),
        x.new_empty(b if energy else 0, dtype=acc),
        x.new_empty(m if energy else 0, dtype=acc),
        x.new_empty(b if g_pair.numel() else 0, dtype=acc),
        x.new_empty((), dtype=acc),
        x.new_empty((), dtype=acc),
    )


def _setup_context(ctx, inputs, output):
    x, y, x_sq, y_sq, shift, scale, bias, energy, _, _, mask_diag, _, pair, _, use_triton = inputs
    ctx.save_for_backward(x, y, x_sq, y_sq, shift, scale, bias, output[0], output[1])
    ctx.options = (energy, mask_diag, pair, use_triton)
    ctx.set_materialize_grads(False)


def _backward(ctx, g_rl, g_cl, g_sp, g_pair, *_metrics):
    x, y, x_sq, y_sq, shift, scale, bias, row_lse, col_lse = ctx.saved_tensors
    energy, mask_diag, pair, use_triton = ctx.options
    # An absent upstream gradient travels as an empty tensor: its term is skipped.
    grads = tuple(
        g.contiguous() if g is not None and g.numel() else _empty(x)
        for g in (g_rl, g_cl, g_sp, g_pair)
    )
    if not any(g.numel() for g in grads):
        return (None,) * 15
    dx, dy, dx_sq, dy_sq, dshift, dscale, dbias = _pair_stats_backward_op(
        x,
        y,
        x_sq,
        y_sq,
        shift,
        scale,
        bias,
        row_lse,
        col_lse,
        *grads,
        energy,
        mask_diag,
        pair,
        use_triton,
    )
    none_if_empty = [g if g.numel() else None for g in (dx_sq, dy_sq, dshift)]
    return (dx, dy, *none_if_empty, dscale.to(scale.dtype), dbias.to(bias.dtype)) + (None,) * 8


torch.library.register_autograd("crl_fast::pair_stats", _backward, setup_context=_setup_context)


def pair_stats(
    x: torch.Tensor,
    y: torch.Tensor,
    x_sq: torch.Tensor | None,
    y_sq: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    energy: int,
    row_lse: bool = False,
    col_lse: bool = False,
    mask_diag: bool = False,
    softplus: bool = False,
    pair: int = PAIR_NONE,
    metrics: bool = False,
    use_triton: bool,
) -> PairStats:
    """Differentiable statistics of ``L = scale * f(x, y) + bias``; inputs already validated."""
    acc = accumulate_dtype(x.dtype)
    none = x.new_empty(0, dtype=acc)
    out = _pair_stats_op(
        x.contiguous(),
        y.contiguous(),
        none if x_sq is None else x_sq.to(acc).contiguous(),
        none if y_sq is None else y_sq.to(acc).contiguous(),
        none if shift is None else shift.to(acc).contiguous(),
        scale.to(acc),
        bias.to(acc),
        energy,
        row_lse,
        col_lse,
        mask_diag,
        softplus,
        pair,
        metrics,
        use_triton,
    )
    return PairStats(*out)
