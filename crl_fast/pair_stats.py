"""Row and column statistics of a logit matrix that is never materialised, with gradients.

Every critic loss is a small function of O(B) statistics of ``L = scale * f(x, y) + bias``
(see ``kernels/pair_stats.py`` for the exact list and the gradient formula). This module wraps
the statistics as two ``torch.library`` custom ops (forward and backward), so they work under
autograd, ``torch.compile`` and CUDA-graph capture, and dispatches each call to

* the Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), or
* a chunked PyTorch implementation of the same maths that holds at most ``CHUNK_ELEMENTS``
  logits at a time and recomputes them in backward (CPU, float64, or no Triton).

The positives ``L_ii`` are an output of the op, not computed beside it: their gradient then
joins the others inside the kernel, in float32, before the one rounding to the input dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from crl_fast.energy import accumulate_dtype, energy_and_slope

CHUNK_ELEMENTS = 1 << 20
"""Logits per chunk in the PyTorch path: bounds its extra memory to a few times 4 MiB."""

PAIR_NONE, PAIR_DPO, PAIR_IPO = 0, 1, 2

Tensor = torch.Tensor
Tensors4 = tuple[Tensor, Tensor, Tensor, Tensor]
Tensors5 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
Tensors12 = tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor
]


class PairStats(NamedTuple):
    """Statistics over j of each row i (``pos`` and ``row_*``: length B) or over i of each
    column (``col_lse``: length M); empty when not asked for. ``online_*`` are the softmax-
    weighted row sums the Triton path keeps for the row-lse gradient (see the kernels)."""

    pos: Tensor
    row_lse: Tensor
    col_lse: Tensor
    row_softplus: Tensor
    row_pair: Tensor
    row_pair_slope: Tensor
    row_argmax: Tensor
    row_sum: Tensor
    row_correct: Tensor
    online_u: Tensor
    online_v: Tensor
    online_w: Tensor


def _squared_norms(t: Tensor, energy: int) -> Tensor:
    acc = accumulate_dtype(t.dtype)
    return t.to(acc).square().sum(-1) if energy else t.new_empty(0, dtype=acc)


# --------------------------------------------------------------------- chunked PyTorch path


def _chunk_logits(x, y, x_sq, y_sq, scale, bias, energy: int):
    """Logits, energy and dL/dP slope (before scale) for a block of rows, float32 or wider."""
    if energy:
        x_sq, y_sq = x_sq[:, None], y_sq[None, :]
    f, slope = energy_and_slope(x @ y.T, x_sq, y_sq, energy)
    return scale * f + bias, f, slope


def _chunks(n_rows: int, n_cols: int):
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def _diag_mask(start: int, stop: int, n_cols: int, device) -> Tensor:
    rows = torch.arange(start, stop, device=device)
    return rows[:, None] == torch.arange(n_cols, device=device)[None, :]


def _pair_term(u: Tensor, pair: int) -> tuple[Tensor, Tensor]:
    if pair == PAIR_DPO:
        return F.softplus(u), torch.sigmoid(u)
    return (u + 1.0).square(), 2.0 * (u + 1.0)


def _torch_stats(x, y, scale, bias, energy, pos, row_lse, col_lse, mask_diag, softplus, pair,
                 metrics):  # fmt: skip
    b, m = x.shape[0], y.shape[0]
    acc = accumulate_dtype(x.dtype)
    x, y, scale, bias = x.to(acc), y.to(acc), scale.to(acc), bias.to(acc)
    x_sq, y_sq = _squared_norms(x, energy), _squared_norms(y, energy)
    new = {"dtype": acc, "device": x.device}
    wanted = {
        "pos": pos or pair != PAIR_NONE,
        "row_lse": row_lse,
        "row_softplus": softplus,
        "row_pair": pair != PAIR_NONE,
        "row_pair_slope": pair != PAIR_NONE,
        "row_sum": metrics,
        "row_correct": metrics,
    }
    out = {k: torch.empty(b if wanted.get(k) else 0, **new) for k in PairStats._fields}
    out["row_argmax"] = torch.empty(b if metrics else 0, dtype=torch.int32, device=x.device)
    out["online_u"] = torch.empty((0, x.shape[1]), **new)  # a Triton-path optimisation only
    if wanted["pos"]:
        f, _ = energy_and_slope((x * y[:b]).sum(-1), x_sq, y_sq[:b], energy)
        out["pos"] = scale * f + bias
    col_max = torch.full((m,), float("-inf"), **new)
    col_sum = torch.zeros(m, **new)
    for start, stop in _chunks(b, m):
        rows = slice(start, stop)
        logits, _, _ = _chunk_logits(
            x[rows], y, x_sq[rows] if energy else x_sq, y_sq, scale, bias, energy
        )
        diag = _diag_mask(start, stop, m, x.device)
        lse_in = logits.masked_fill(diag, float("-inf")) if mask_diag else logits
        if row_lse:
            out["row_lse"][rows] = lse_in.logsumexp(1)
        if col_lse:
            new_max = torch.maximum(col_max, lse_in.amax(0))
            safe = torch.where(new_max == float("-inf"), 0.0, new_max)
            col_sum = col_sum * torch.exp(col_max - safe) + torch.exp(lse_in - safe).sum(0)
            col_max = new_max
        if softplus:
            out["row_softplus"][rows] = F.softplus(logits).sum(1)
        if pair:
            term, slope = _pair_term(logits - out["pos"][rows, None], pair)
            out["row_pair"][rows] = term.masked_fill(diag, 0.0).sum(1)
            out["row_pair_slope"][rows] = slope.masked_fill(diag, 0.0).sum(1)
        if metrics:
            out["row_argmax"][rows] = logits.argmax(1).to(torch.int32)
            out["row_sum"][rows] = logits.sum(1)
            out["row_correct"][rows] = ((logits > 0) == diag).sum(1).to(acc)
    if col_lse:
        out["col_lse"] = torch.where(col_max == float("-inf"), 0.0, col_max) + col_sum.log()
    return tuple(out[k] for k in PairStats._fields)


def _torch_grad(x, y, scale, bias, pos, row_lse, col_lse, g_diag, g_row_lse, g_col_lse,
                g_softplus, g_pair, energy, mask_diag, pair):  # fmt: skip
    b, m = x.shape[0], y.shape[0]
    acc = accumulate_dtype(x.dtype)
    in_dtype = x.dtype
    x, y, scale, bias = x.to(acc), y.to(acc), scale.to(acc), bias.to(acc)
    x_sq, y_sq = _squared_norms(x, energy), _squared_norms(y, energy)
    dx = torch.empty_like(x)
    dy = torch.zeros_like(y)
    dscale = torch.zeros((), dtype=acc, device=x.device)
    dbias = torch.zeros((), dtype=acc, device=x.device)
    for start, stop in _chunks(b, m):
        rows = slice(start, stop)
        logits, f, slope = _chunk_logits(
            x[rows], y, x_sq[rows] if energy else x_sq, y_sq, scale, bias, energy
        )
        diag = _diag_mask(start, stop, m, x.device)
        g = torch.zeros_like(logits)
        if g_diag.numel():
            g += diag * g_diag[rows, None]
        if g_row_lse.numel():
            p = torch.exp(logits - row_lse[rows, None])
            g += g_row_lse[rows, None] * (p.masked_fill(diag, 0.0) if mask_diag else p)
        if g_col_lse.numel():
            p = torch.exp(logits - col_lse[None, :])
            g += g_col_lse[None, :] * (p.masked_fill(diag, 0.0) if mask_diag else p)
        if g_softplus.numel():
            g += g_softplus[rows, None] * torch.sigmoid(logits)
        if g_pair.numel():
            _, dterm = _pair_term(logits - pos[rows, None], pair)
            g += (g_pair[rows, None] * dterm).masked_fill(diag, 0.0)
        h = g * scale * slope
        dx[rows] = h @ y
        dy += h.T @ x[rows]
        if energy:  # the squared norms' share: -A_i sum_j H_ij
            dx[rows] -= h.sum(1, keepdim=True) * x[rows]
            dy -= h.sum(0)[:, None] * y
        dscale += (g * f).sum()
        dbias += g.sum()
    return dx.to(in_dtype), dy.to(in_dtype), dscale, dbias


# ----------------------------------------------------------------------------------- the ops


def _triton_stats(x, y, scale, bias, energy, pos, row_lse, col_lse, mask_diag, softplus, pair,
                  metrics, online):  # fmt: skip
    from crl_fast.kernels import pair_stats as kernels

    x_sq, y_sq = _squared_norms(x, energy), _squared_norms(y, energy)
    scale, bias = scale.float(), bias.float()
    pos, rl, sp, pr, slope, arg, rsum, cnt, u, v, w = kernels.stats(
        x, y, x_sq, y_sq, scale, bias, energy=energy, pos=pos, lse=row_lse,
        mask_diag=mask_diag, softplus=softplus, pair=pair, metrics=metrics, online=online,
    )  # fmt: skip
    cl = rl.new_empty(0)
    if col_lse:
        cl = kernels.stats(
            y, x, y_sq, x_sq, scale, bias, energy=energy, pos=False, lse=True,
            mask_diag=mask_diag, softplus=False, pair=PAIR_NONE, metrics=False,
        )[1]  # fmt: skip
    return pos, rl, cl, sp, pr, slope, arg, rsum, cnt, u, v, w


def _triton_grad(x, y, scale, bias, pos, row_lse, col_lse, g_diag, g_row_lse, g_col_lse,
                 g_softplus, g_pair, energy, mask_diag, pair, need_dx=True):  # fmt: skip
    from crl_fast.kernels import pair_stats as kernels

    x_sq, y_sq = _squared_norms(x, energy), _squared_norms(y, energy)
    scale, bias = scale.float(), bias.float()
    grads = (g_diag, g_row_lse, g_col_lse, g_softplus, g_pair)
    dx, dscale, dbias = x.new_empty(0), scale.new_zeros(1), bias.new_zeros(1)
    if need_dx:
        dx, dscale, dbias, _, _ = kernels.grad(
            x, y, x_sq, y_sq, scale, bias, pos, row_lse, col_lse, *grads, energy=energy,
            x_is_a=True, mask_diag=mask_diag, pair=pair,
        )  # fmt: skip
    dy, *_ = kernels.grad(
        y, x, y_sq, x_sq, scale, bias, pos, row_lse, col_lse, *grads, energy=energy,
        x_is_a=False, mask_diag=mask_diag, pair=pair,
    )  # fmt: skip
    return dx, dy, dscale.sum(), dbias.sum()


@torch.library.custom_op("crl_fast::pair_stats", mutates_args=())
def _pair_stats_op(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    bias: Tensor,
    energy: int,
    pos: bool,
    row_lse: bool,
    col_lse: bool,
    mask_diag: bool,
    softplus: bool,
    pair: int,
    metrics: bool,
    online: bool,
    use_triton: bool,
) -> Tensors12:
    flags = (energy, pos, row_lse, col_lse, mask_diag, softplus, pair, metrics)
    if use_triton:
        return tuple(_triton_stats(x, y, scale, bias, *flags, online))
    if online:
        raise ValueError("the online row sums are a Triton-path optimisation")
    return tuple(_torch_stats(x, y, scale, bias, *flags))


@_pair_stats_op.register_fake
def _(x, y, scale, bias, energy, pos, row_lse, col_lse, mask_diag, softplus, pair, metrics,
      online, use_triton):  # fmt: skip
    b, m = x.shape[0], y.shape[0]
    acc = accumulate_dtype(x.dtype)

    def vec(n: int, wanted: bool, dtype=acc):
        return x.new_empty(n if wanted else 0, dtype=dtype)

    paired = pair != PAIR_NONE
    return (
        vec(b, pos or paired),
        vec(b, row_lse),
        vec(m, col_lse),
        vec(b, softplus),
        vec(b, paired),
        vec(b, paired),
        vec(b, metrics, torch.int32),
        vec(b, metrics),
        vec(b, metrics),
        x.new_empty((b, x.shape[1]) if online else (0, x.shape[1]), dtype=acc),
        vec(b, online),
        vec(b, online),
    )


@torch.library.custom_op("crl_fast::pair_stats_backward", mutates_args=())
def _pair_stats_backward_op(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    bias: Tensor,
    pos: Tensor,
    row_lse: Tensor,
    col_lse: Tensor,
    g_diag: Tensor,
    g_row_lse: Tensor,
    g_col_lse: Tensor,
    g_softplus: Tensor,
    g_pair: Tensor,
    energy: int,
    mask_diag: bool,
    pair: int,
    need_dx: bool,
    use_triton: bool,
) -> Tensors4:
    stats = (pos, row_lse, col_lse, g_diag, g_row_lse, g_col_lse, g_softplus, g_pair)
    if use_triton:
        return tuple(_triton_grad(x, y, scale, bias, *stats, energy, mask_diag, pair, need_dx))
    return tuple(_torch_grad(x, y, scale, bias, *stats, energy, mask_diag, pair))


@_pair_stats_backward_op.register_fake
def _(x, y, scale, bias, pos, row_lse, col_lse, g_diag, g_row_lse, g_col_lse, g_softplus,
      g_pair, energy, mask_diag, pair, need_dx, use_triton):  # fmt: skip
    acc = accumulate_dtype(x.dtype)
    scalar = x.new_empty((), dtype=acc)
    dx = torch.empty_like(x) if need_dx or not use_triton else x.new_empty(0)
    return dx, torch.empty_like(y), scalar, scalar.clone()


def _setup_context(ctx, inputs, output):
    x, y, scale, bias, energy, _, _, _, mask_diag, _, pair, _, online, use_triton = inputs
    stats = PairStats(*output)
    ctx.save_for_backward(
        x, y, scale, bias, stats.pos, stats.row_lse, stats.col_lse, stats.row_pair_slope,
        stats.online_u, stats.online_v, stats.online_w,
    )  # fmt: skip
    ctx.options = (energy, mask_diag, pair, online, use_triton)
    ctx.set_materialize_grads(False)


def _online_dx(x, y, scale, energy, g_rl, g_diag, u, v, w):
    """dx, dscale, dbias of the row-lse and diagonal terms from the forward's online sums:
    dx_i = scale (g_rl_i (U_i - V_i x_i) + g_diag_i f'_ii (y_i - x_i)), the x_i terms for l2 and
    norm only; O(B d) work instead of a pass over the logits."""
    acc = accumulate_dtype(x.dtype)
    b = x.shape[0]
    x32, y32 = x.to(acc), y[:b].to(acc)
    g_rl = g_rl if g_rl is not None else x32.new_zeros(b)
    norm_term = energy != 0
    dx = g_rl[:, None] * (u - v[:, None] * x32 if norm_term else u)
    dscale, dbias = (g_rl * w).sum(), g_rl.sum()
    if g_diag is not None:
        x_sq, y_sq = _squared_norms(x32, energy), _squared_norms(y32, energy)
        f_ii, slope_ii = energy_and_slope((x32 * y32).sum(-1), x_sq, y_sq, energy)
        coef = g_diag * slope_ii
        dx = dx + coef[:, None] * (y32 - x32 if norm_term else y32)
        dscale, dbias = dscale + (g_diag * f_ii).sum(), dbias + g_diag.sum()
    return (scale * dx).to(x.dtype), dscale, dbias


def _backward(ctx, g_pos, g_rl, g_cl, g_sp, g_pair, *_unused):
    x, y, scale, bias, pos, row_lse, col_lse, slope, u, v, w = ctx.saved_tensors
    energy, mask_diag, pair, online, use_triton = ctx.options
    empty = pos.new_empty(0)

    def given(g):
        return g is not None and g.numel() > 0

    # Everything acting on L_ii: its own upstream gradient and, for DPO/IPO, the shift's share
    # (u_ij = L_ij - L_ii, so d/dL_ii of sum_j pair(u_ij) is -slope_i).
    g_diag = g_pos.contiguous() if given(g_pos) else None
    if given(g_pair):
        shift = -g_pair * slope
        g_diag = shift if g_diag is None else g_diag + shift
    grads = [g.contiguous() if given(g) else empty for g in (g_rl, g_cl, g_sp, g_pair)]
    if g_diag is None and not any(g.numel() for g in grads):
        return (None,) * 14
    # With the online sums only the column pass remains: dx comes from O(B d) arithmetic.
    online = online and not any(g.numel() for g in grads[1:])
    dx, dy, dscale, dbias = _pair_stats_backward_op(
        x, y, scale, bias, pos, row_lse, col_lse, empty if g_diag is None else g_diag, *grads,
        energy, mask_diag, pair, not online, use_triton,
    )  # fmt: skip
    if online:
        g_rl_given = grads[0] if grads[0].numel() else None
        dx, dscale, dbias = _online_dx(x, y, scale, energy, g_rl_given, g_diag, u, v, w)
    return (dx, dy, dscale.to(scale.dtype), dbias.to(bias.dtype)) + (None,) * 10


torch.library.register_autograd("crl_fast::pair_stats", _backward, setup_context=_setup_context)


# ------------------------------------------------- the sigmoid loss with gradients in forward


def _binary_coefficients(x: Tensor, m: int, mean: bool) -> tuple[Tensor, Tensor, float]:
    """dloss/dL_ij = w sigmoid(L_ij) - w [i == j] as per-row vectors, and the weight w."""
    b = x.shape[0]
    w = 1.0 / (b * m) if mean else 1.0
    g_sp = torch.full((b,), w, dtype=accumulate_dtype(x.dtype), device=x.device)
    return g_sp, -g_sp, w


@torch.library.custom_op("crl_fast::binary_loss", mutates_args=())
def _binary_loss_op(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, energy: int, mean: bool, use_triton: bool
) -> Tensors5:
    g_sp, g_diag, w = _binary_coefficients(x, y.shape[0], mean)
    empty = g_sp.new_empty(0)
    if use_triton:
        from crl_fast.kernels import pair_stats as kernels

        x_sq, y_sq = _squared_norms(x, energy), _squared_norms(y, energy)
        s32, b32 = scale.float(), bias.float()
        grads = (g_diag, empty, empty, g_sp, empty)
        dx, dscale, dbias, sp, pos = kernels.grad(
            x, y, x_sq, y_sq, s32, b32, empty, empty, empty, *grads, energy=energy,
            x_is_a=True, mask_diag=False, pair=PAIR_NONE, fwd=True,
        )  # fmt: skip
        dy, *_ = kernels.grad(
            y, x, y_sq, x_sq, s32, b32, empty, empty, empty, *grads, energy=energy,
            x_is_a=False, mask_diag=False, pair=PAIR_NONE,
        )  # fmt: skip
        dscale, dbias = dscale.sum(), dbias.sum()
    else:
        stats = PairStats(*_torch_stats(x, y, scale, bias, energy, True, False, False, False,
                                        True, PAIR_NONE, False))  # fmt: skip
        sp, pos = stats.row_softplus, stats.pos
        dx, dy, dscale, dbias = _torch_grad(
            x, y, scale, bias, empty, empty, empty, g_diag, empty, empty, g_sp, empty, energy,
            False, PAIR_NONE,
        )  # fmt: skip
    return (sp.sum() - pos.sum()) * w, dx, dy, dscale, dbias


@_binary_loss_op.register_fake
def _(x, y, scale, bias, energy, mean, use_triton):
    scalar = x.new_empty((), dtype=accumulate_dtype(x.dtype))
    return scalar, torch.empty_like(x), torch.empty_like(y), scalar.clone(), scalar.clone()


def _binary_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.dtypes = (inputs[2].dtype, inputs[3].dtype)


def _binary_backward(ctx, g_loss, *_unused):
    dx, dy, dscale, dbias = ctx.saved_tensors
    return (
        (g_loss * dx).to(dx.dtype),
        (g_loss * dy).to(dy.dtype),
        (g_loss * dscale).to(ctx.dtypes[0]),
        (g_loss * dbias).to(ctx.dtypes[1]),
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "crl_fast::binary_loss", _binary_backward, setup_context=_binary_setup_context
)


def binary_loss_with_grads(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *, energy: int, mean: bool,
    use_triton: bool,
) -> Tensor:  # fmt: skip
    """The sigmoid loss (labels = identity) whose forward also computes every gradient (two
    passes over the logits instead of three); backward only scales them by grad_output."""
    acc = accumulate_dtype(x.dtype)
    return _binary_loss_op(
        x.contiguous(), y.contiguous(), scale.to(acc), bias.to(acc), energy, mean, use_triton
    )[0]


def pair_stats(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    bias: Tensor,
    *,
    energy: int,
    pos: bool = False,
    row_lse: bool = False,
    col_lse: bool = False,
    mask_diag: bool = False,
    softplus: bool = False,
    pair: int = PAIR_NONE,
    metrics: bool = False,
    online: bool = False,
    use_triton: bool,
) -> PairStats:
    """Differentiable statistics of ``L = scale * f(x, y) + bias``; inputs already validated.

    ``scale`` and ``bias`` are 0-d tensors; ``pos`` asks for the positives ``L_ii`` (always
    produced for DPO/IPO, whose terms are relative to them). ``online`` (Triton path, row lse,
    d <= 128) keeps the sums that let backward skip the pass over rows for the row-lse terms.
    """
    acc = accumulate_dtype(x.dtype)
    out = _pair_stats_op(
        x.contiguous(), y.contiguous(), scale.to(acc), bias.to(acc), energy, pos, row_lse,
        col_lse, mask_diag, softplus, pair, metrics, online, use_triton,
    )  # fmt: skip
    return PairStats(*out)
