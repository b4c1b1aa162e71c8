"""Row and column statistics of a logit matrix that is never materialised, with gradients.

Every critic loss is a small function of O(B) statistics of ``L = scale * f(x, y) + bias``
(see ``kernels/pair_stats.py`` for the exact list and the gradient formula). This module wraps
the statistics as ``torch.library`` custom ops (forward and backward), so they work under
autograd, ``torch.compile`` and CUDA-graph capture (eager calls run the same code without the
ops' dispatch), and dispatches each call to

* the Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), or
* a chunked PyTorch implementation of the same maths that holds about ``CHUNK_ELEMENTS``
  logits at a time (one row at least) and recomputes them in backward (CPU, float64, no Triton).

The diagonal ``L_ii`` never comes from the B x M products: for l2 and norm the expanded
``|x|^2 + |y|^2 - 2 x.y`` cancels exactly where a trained critic puts its positives (x_i close
to y_i). Both paths take the positives from ``x_i - y_i`` (O(B d), in row chunks), put them in
place of the diagonal in every statistic and leave the diagonal out of the gradient products;
its share ``H_ii (y_i - x_i)``, with ``H_ii`` computed here exactly, is added to each row of the
float32 accumulator (in the kernel on the Triton path) before the one rounding to the input
dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F

from crl_fast.custom_ops import eager_fast_path, refuse_double_backward
from crl_fast.energy import accumulate_dtype, energy_and_slope, paired_energy

CHUNK_ELEMENTS = 1 << 20
"""Logits per chunk in the PyTorch path: bounds its extra memory to a few times 4 MiB."""

PAIR_NONE, PAIR_DPO, PAIR_IPO = 0, 1, 2
_REFERENCE = "crl_fast.reference_contrastive_loss"

Tensor = torch.Tensor
F_ = TypeVar("F_", bound=Callable)
Tensors4 = tuple[Tensor, Tensor, Tensor, Tensor]
Tensors5 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
Tensors16 = tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
    Tensor, Tensor, Tensor, Tensor,
]  # fmt: skip


class PairStats(NamedTuple):
    """Statistics over j of each row i (``pos`` and ``row_*``: length B) or over i of each
    column (``col_lse``: length M); empty when not asked for. ``online_*`` are the softmax-
    weighted off-diagonal row sums the Triton path keeps for the row-lse gradient; the last four
    are the prologue backward reuses (see :class:`Rows`). ``row_softplus`` sums softplus(L_ij)
    over j != i only."""

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
    x_sq: Tensor
    y_sq: Tensor
    paired_f: Tensor
    paired_slope: Tensor


def _squared_norms(t: Tensor, energy: int) -> Tensor:
    acc = accumulate_dtype(t.dtype)
    return t.to(acc).square().sum(-1) if energy else t.new_empty(0, dtype=acc)


ROW_CHUNK_ELEMENTS = 1 << 22
"""Elements per chunk of the O(B d) row-wise work, so its float32 temporaries stay small."""


def _paired(x: Tensor, y: Tensor, energy: int) -> tuple[Tensor, Tensor]:
    """Exact ``f(x_i, y_i)`` and slope ``df/dP`` per row (from ``x_i - y_i``), float32 or wider,
    computed in row chunks: no (B, d) float32 copy of bf16 inputs."""
    b, d = x.shape
    acc = accumulate_dtype(x.dtype)
    f, slope = x.new_empty(b, dtype=acc), x.new_empty(b, dtype=acc)
    step = max(1, ROW_CHUNK_ELEMENTS // d)
    for start in range(0, b, step):
        rows = slice(start, min(start + step, b))
        f[rows], slope[rows] = paired_energy(x[rows].to(acc), y[rows].to(acc), energy)
    return f, slope


class Rows(NamedTuple):
    """The O(B d) prologue of every statistic, computed once per call and kept for backward:
    the squared row norms of x and y (l2, norm; else empty), the exact paired energy
    ``f(x_i, y_i)`` and its slope ``df/dP`` (from ``x_i - y_i``) and the positives
    ``L_ii = scale f + bias``; float32 or wider."""

    x_sq: Tensor
    y_sq: Tensor
    f: Tensor
    slope: Tensor
    pos: Tensor


def _rows(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, energy: int, use_triton: bool) -> Rows:
    """:class:`Rows`: one kernel launch on the Triton path, a few PyTorch ops otherwise."""
    if use_triton:
        from crl_fast.kernels import pair_stats as kernels

        return Rows(*kernels.paired_rows(x, y, scale.float(), bias.float(), energy=energy))
    f, slope = _paired(x, y[: x.shape[0]], energy)
    pos = scale.to(f.dtype) * f + bias.to(f.dtype)
    return Rows(_squared_norms(x, energy), _squared_norms(y, energy), f, slope, pos)


def _diagonal(scale, pos, slope, row_lse, col_lse, g_pos, g_rl, g_cl, g_pair, pair_slope,
              mask_diag):  # fmt: skip
    """The diagonal's gradient ``(H_ii, G_ii)`` per row: ``H_ii = G_ii scale f'_ii`` is what the
    kernels add as ``H_ii (y_i - x_i)`` (or ``H_ii y_i`` for dot); the diagonal's share of
    (dscale, dbias) is ``(sum G_ii f_ii, sum G_ii)``, :func:`_diagonal_scale_grads`.

    ``G_ii`` collects every gradient that acts on ``L_ii``: its own (``g_pos``), the softmax
    terms whose tiles leave the diagonal out (``row_softplus`` has no diagonal term: the
    caller takes softplus(-L_ii) from ``pos``), and for DPO/IPO the shift's share
    (``u_ij = L_ij - L_ii``, so d/dL_ii of sum_j pair(u_ij) is -slope_i). Absent gradients are
    None. ``slope`` is the exact paired energy's slope (:class:`Rows`).
    """
    b = pos.shape[0]
    g = torch.zeros_like(pos) if g_pos is None else g_pos.clone()
    if g_pair is not None:
        g -= g_pair * pair_slope
    if g_rl is not None and not mask_diag:
        g += g_rl * torch.exp(pos - row_lse)
    if g_cl is not None and not mask_diag:
        g += g_cl[:b] * torch.exp(pos - col_lse[:b])
    return g * scale.to(g.dtype) * slope, g


def _diagonal_scale_grads(g: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
    """The diagonal's share of (dscale, dbias), from its ``G_ii`` and exact energies."""
    return (g * f).sum(), g.sum()


def _diagonal_term(a: Tensor, other: Tensor, hd: Tensor, energy: int) -> Tensor:
    """``hd_i (other_i - a_i)`` (l2, norm) or ``hd_i other_i`` (dot), for paired rows: the
    diagonal's share of dA, as the kernels add it."""
    other = other.to(hd.dtype)
    return hd[:, None] * (other - a.to(hd.dtype) if energy else other)


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


def _diagonal_of(block: Tensor, start: int) -> Tensor:
    """The entries ``(i, i)`` of a block holding rows ``start..`` of a B x M matrix: a view, so
    the diagonal is read and written in place with O(rows) work, no B x M mask."""
    return block[:, start : start + block.shape[0]].diagonal()


def _pair_term(u: Tensor, pair: int) -> tuple[Tensor, Tensor]:
    if pair == PAIR_DPO:
        return F.softplus(u), torch.sigmoid(u)
    return (u + 1.0).square(), 2.0 * (u + 1.0)


def _torch_stats(x, y, x_sq, y_sq, scale, bias, pos, energy, row_lse, col_lse, mask_diag,
                 softplus, pair, metrics):  # fmt: skip
    """The statistics from ``row_lse`` to ``online_w``, in ``PairStats`` order."""
    b, m = x.shape[0], y.shape[0]
    acc = accumulate_dtype(x.dtype)
    x, y, scale, bias = x.to(acc), y.to(acc), scale.to(acc), bias.to(acc)
    new = {"dtype": acc, "device": x.device}
    wanted = {
        "row_lse": row_lse,
        "row_softplus": softplus,
        "row_pair": pair != PAIR_NONE,
        "row_pair_slope": pair != PAIR_NONE,
        "row_sum": metrics,
        "row_correct": metrics,
    }
    fields = PairStats._fields[1 : PairStats._fields.index("x_sq")]
    out = {k: torch.empty(b if wanted.get(k) else 0, **new) for k in fields}
    out["row_argmax"] = torch.empty(b if metrics else 0, dtype=torch.int32, device=x.device)
    out["online_u"] = torch.empty((0, x.shape[1]), **new)  # a Triton-path optimisation only
    col_max = torch.full((m,), float("-inf"), **new)
    col_sum = torch.zeros(m, **new)
    for start, stop in _chunks(b, m):
        rows = slice(start, stop)
        logits, _, _ = _chunk_logits(
            x[rows], y, x_sq[rows] if energy else x_sq, y_sq, scale, bias, energy
        )
        _diagonal_of(logits, start).copy_(pos[rows])
        lse_in = logits
        if mask_diag:
            lse_in = logits.clone()
            _diagonal_of(lse_in, start).fill_(float("-inf"))
        if row_lse:
            out["row_lse"][rows] = lse_in.logsumexp(1)
        if col_lse:
            new_max = torch.maximum(col_max, lse_in.amax(0))
            safe = torch.where(new_max == float("-inf"), 0.0, new_max)
            col_sum = col_sum * torch.exp(col_max - safe) + torch.exp(lse_in - safe).sum(0)
            col_max = new_max
        if softplus:
            out["row_softplus"][rows] = _off_diagonal_softplus(logits, start).sum(1)
        if pair:
            term, slope = _pair_term(logits - pos[rows, None], pair)
            for t in (term, slope):
                _diagonal_of(t, start).zero_()
            out["row_pair"][rows], out["row_pair_slope"][rows] = term.sum(1), slope.sum(1)
        if metrics:
            out["row_argmax"][rows] = logits.argmax(1).to(torch.int32)
            out["row_sum"][rows] = logits.sum(1)
            correct = ~(logits > 0)  # the label: 1 on the diagonal, 0 off it (NaN: not > 0)
            _diagonal_of(correct, start).logical_not_()
            out["row_correct"][rows] = correct.sum(1).to(acc)
    if col_lse:
        out["col_lse"] = torch.where(col_max == float("-inf"), 0.0, col_max) + col_sum.log()
    return tuple(out[k] for k in fields)


def _off_diagonal_softplus(logits: Tensor, start: int) -> Tensor:
    """softplus(L_ij) of a block of rows ``start..``, 0 on the diagonal."""
    sp = F.softplus(logits)
    _diagonal_of(sp, start).zero_()
    return sp


def _torch_grad(x, y, x_sq, y_sq, scale, bias, pos, row_lse, col_lse, g_row_lse, g_col_lse,
                g_softplus, g_pair, energy, pair, softplus_sum=False):  # fmt: skip
    """Off-diagonal (dx, dy, dscale, dbias) in float32 or wider, and the sum of softplus(L_ij)
    over j != i when ``softplus_sum`` (else 0): the sigmoid loss's value from the same logits,
    so that loss takes one pass."""
    b, m = x.shape[0], y.shape[0]
    acc = accumulate_dtype(x.dtype)
    x, y, scale, bias = x.to(acc), y.to(acc), scale.to(acc), bias.to(acc)
    dx = torch.empty_like(x)
    dy = torch.zeros_like(y)
    dscale = torch.zeros((), dtype=acc, device=x.device)
    dbias = torch.zeros((), dtype=acc, device=x.device)
    value = torch.zeros((), dtype=acc, device=x.device)
    for start, stop in _chunks(b, m):
        rows = slice(start, stop)
        logits, f, slope = _chunk_logits(
            x[rows], y, x_sq[rows] if energy else x_sq, y_sq, scale, bias, energy
        )
        if softplus_sum:
            value += _off_diagonal_softplus(logits, start).sum()
        terms = []  # dloss/dL of each statistic's term, summed below without a zero tensor
        if g_row_lse.numel():
            terms.append(g_row_lse[rows, None] * torch.exp(logits - row_lse[rows, None]))
        if g_col_lse.numel():
            terms.append(g_col_lse[None, :] * torch.exp(logits - col_lse[None, :]))
        if g_softplus.numel():
            terms.append(g_softplus[rows, None] * torch.sigmoid(logits))
        if g_pair.numel():
            terms.append(g_pair[rows, None] * _pair_term(logits - pos[rows, None], pair)[1])
        g = terms[0] if terms else torch.zeros_like(logits)
        for term in terms[1:]:
            g += term
        _diagonal_of(g, start).zero_()
        h = g * (scale * slope)  # dot: slope is 1.0, so one B x M product
        dx[rows] = h @ y
        dy += h.T @ x[rows]
        if energy:  # the squared norms' share: -A_i sum_j H_ij
            dx[rows] -= h.sum(1, keepdim=True) * x[rows]
            dy -= h.sum(0)[:, None] * y
        dscale += (g * f).sum()
        dbias += g.sum()
    return dx, dy, dscale, dbias, value


# ---------------------------------------------------------------------------- Triton path


def _triton_stats(x, y, x_sq, y_sq, scale, bias, pos, energy, row_lse, col_lse, mask_diag,
                  softplus, pair, metrics, online, online_w):  # fmt: skip
    from crl_fast.kernels import pair_stats as kernels

    scale, bias = scale.float(), bias.float()
    rl, sp, pr, slope, arg, rsum, cnt, u, v, w = kernels.stats(
        x, y, x_sq, y_sq, scale, bias, pos, energy=energy, lse=row_lse, mask_diag=mask_diag,
        softplus=softplus, pair=pair, metrics=metrics, online=online, online_w=online_w,
    )  # fmt: skip
    cl = rl.new_empty(0)
    if col_lse:
        cl = kernels.stats(
            y, x, y_sq, x_sq, scale, bias, pos, energy=energy, lse=True, mask_diag=mask_diag,
            softplus=False, pair=PAIR_NONE, metrics=False,
        )[0]  # fmt: skip
    return rl, cl, sp, pr, slope, arg, rsum, cnt, u, v, w


def _triton_grad(x, y, x_sq, y_sq, scale, bias, pos, row_lse, col_lse, g_row_lse, g_col_lse,
                 g_softplus, g_pair, hd, energy, mask_diag, pair, need_dx, need_scale):  # fmt: skip
    """(dx or empty, dy) in the input dtype with the diagonal's ``hd`` added, and the
    off-diagonal (dscale, dbias), float32 (zero unless ``need_dx`` and ``need_scale``). A row
    pass and a column pass; with ``CRL_FAST_SINGLE_PASS=1`` and dx needed, the row pass alone."""
    from crl_fast.kernels import pair_stats as kernels

    scale, bias = scale.float(), bias.float()
    grads = (g_row_lse, g_col_lse, g_softplus, g_pair, hd)
    common = {"energy": energy, "mask_diag": mask_diag, "pair": pair, "scale_grad": need_scale}
    dx, dscale, dbias = x.new_empty(0), scale.new_zeros(1), bias.new_zeros(1)
    # CRL_FAST_SINGLE_PASS=1: the row pass's tiles also give dy's sums, through atomics.
    single = need_dx and kernels.single_pass(x.dtype, x.shape[1])
    col = _column_buffers(y, energy) if single else None
    if need_dx:
        dx, dscale, dbias, *_ = kernels.grad(  # empty partials (sum 0) unless need_scale
            x, y, x_sq, y_sq, scale, bias, pos, row_lse, col_lse, *grads, x_is_a=True,
            column_sums=col, **common,
        )  # fmt: skip
    dy = _dy(y, x, y_sq, x_sq, scale, bias, pos, (row_lse, col_lse, *grads), col, y.dtype, common)
    return dx, dy, dscale.sum(), dbias.sum()


# ----------------------------------------------------------------------------------- the ops


def _autocast_off(fn: F_) -> F_:
    """``fn`` run with autocast off: under ``torch.autocast`` its float32 sums and chunked
    matmuls would otherwise be recast to the autocast dtype. For the ops' implementations: eager
    calls, compiled graphs and backward (inside an autocast region too) all run them."""

    @functools.wraps(fn)
    def wrapper(*args):
        if not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")):
            return fn(*args)
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args)

    return wrapper


@_autocast_off
def _pair_stats_impl(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    bias: Tensor,
    energy: int,
    row_lse: bool,
    col_lse: bool,
    mask_diag: bool,
    softplus: bool,
    pair: int,
    metrics: bool,
    online: bool,
    online_w: bool,
    use_triton: bool,
) -> Tensors16:
    if online and not use_triton:
        raise ValueError("the online row sums are a Triton-path optimisation")
    rows = _rows(x, y, scale, bias, energy, use_triton)
    args = (x, y, rows.x_sq, rows.y_sq, scale, bias, rows.pos)
    flags = (energy, row_lse, col_lse, mask_diag, softplus, pair, metrics)
    if use_triton:
        stats = _triton_stats(*args, *flags, online, online_w)
    else:
        stats = _torch_stats(*args, *flags)
    return rows.pos, *stats, rows.x_sq, rows.y_sq, rows.f, rows.slope


_pair_stats_op = torch.library.custom_op("crl_fast::pair_stats", _pair_stats_impl, mutates_args=())


@_pair_stats_op.register_fake
def _(x, y, scale, bias, energy, row_lse, col_lse, mask_diag, softplus, pair, metrics, online,
      online_w, use_triton):  # fmt: skip
    b, m = x.shape[0], y.shape[0]
    acc = accumulate_dtype(x.dtype)

    def vec(n: int, wanted: bool, dtype=acc):
        return x.new_empty(n if wanted else 0, dtype=dtype)

    paired = pair != PAIR_NONE
    return (
        vec(b, True),
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
        vec(b, online and online_w),
        vec(b, energy != 0),
        vec(m, energy != 0),
        vec(b, True),
        vec(b, True),
    )


@_autocast_off
def _pair_stats_backward_impl(
    x: Tensor,
    y: Tensor,
    x_sq: Tensor,
    y_sq: Tensor,
    scale: Tensor,
    bias: Tensor,
    pos: Tensor,
    row_lse: Tensor,
    col_lse: Tensor,
    g_row_lse: Tensor,
    g_col_lse: Tensor,
    g_softplus: Tensor,
    g_pair: Tensor,
    hd: Tensor,
    energy: int,
    mask_diag: bool,
    pair: int,
    need_dx: bool,
    need_scale: bool,
    use_triton: bool,
) -> Tensors4:
    """(dx or empty unless ``need_dx``, dy) in the input dtypes, the diagonal's ``hd`` included,
    and the off-diagonal (dscale, dbias) (zero on the Triton path unless ``need_scale``)."""
    args = (x, y, x_sq, y_sq, scale, bias, pos, row_lse, col_lse)
    args += (g_row_lse, g_col_lse, g_softplus, g_pair)
    if use_triton:
        return _triton_grad(*args, hd, energy, mask_diag, pair, need_dx, need_scale)
    dx, dy, dscale, dbias, _ = _torch_grad(*args, energy, pair)
    _add_diagonal(dx, x, y, hd, energy)
    _add_diagonal(dy, y, x, hd, energy)
    return dx.to(x.dtype) if need_dx else x.new_empty(0), dy.to(y.dtype), dscale, dbias


_pair_stats_backward_op = torch.library.custom_op(
    "crl_fast::pair_stats_backward", _pair_stats_backward_impl, mutates_args=()
)
_pair_stats_backward = eager_fast_path(
    _pair_stats_backward_op, _pair_stats_backward_impl, alternative=_REFERENCE
)


@_pair_stats_backward_op.register_fake
def _(x, y, x_sq, y_sq, scale, bias, pos, row_lse, col_lse, g_row_lse, g_col_lse, g_softplus,
      g_pair, hd, energy, mask_diag, pair, need_dx, need_scale, use_triton):  # fmt: skip
    scalar = x.new_empty((), dtype=accumulate_dtype(x.dtype))
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(y), scalar, scalar.clone()


def _setup_context(ctx, inputs, output):
    x, y, scale, bias, energy, _, _, mask_diag, _, pair, _, online, _, use_triton = inputs
    stats = PairStats(*output)
    ctx.save_for_backward(
        x, y, scale, bias, stats.pos, stats.row_lse, stats.col_lse, stats.row_pair_slope,
        stats.online_u, stats.online_v, stats.online_w, stats.x_sq, stats.y_sq, stats.paired_f,
        stats.paired_slope,
    )  # fmt: skip
    ctx.options = (energy, mask_diag, pair, online, use_triton)
    ctx.set_materialize_grads(False)


def _online_dx(x, y, scale, energy, pos, row_lse, mask_diag, g_rl, hd, u, v, w):
    """dx (input dtype) and the off-diagonal (dscale, dbias) of the row-lse term from the
    forward's online sums: dx_i = scale g_rl_i (U_i - V_i x_i) (the x_i term for l2 and norm
    only) plus the diagonal's row; dbias takes the off-diagonal softmax mass 1 - p_ii.
    O(B d) instead of a pass over the logits."""
    dx = torch.empty_like(x)
    step = max(1, ROW_CHUNK_ELEMENTS // x.shape[1])
    for start in range(0, x.shape[0], step):  # row chunks: float32 temporaries stay small
        r = slice(start, min(start + step, x.shape[0]))
        x32 = x[r].to(u.dtype)
        part = scale * g_rl[r, None] * (u[r] - v[r, None] * x32 if energy else u[r])
        dx[r] = part + _diagonal_term(x[r], y[r], hd[r], energy)
    mass = 1.0 if mask_diag else 1.0 - torch.exp(pos - row_lse)
    # W is kept only when the scale needs a gradient (a learnable bias alone needs no W)
    dscale = (g_rl * w).sum() if w.numel() else g_rl.new_zeros(())
    return dx, dscale, (g_rl * mass).sum()


def _backward(ctx, g_pos, g_rl, g_cl, g_sp, g_pair, *_unused):
    refuse_double_backward("the fused contrastive losses", _REFERENCE)
    x, y, scale, bias, pos, row_lse, col_lse, pair_slope, u, v, w, *rows = ctx.saved_tensors
    x_sq, y_sq, f, slope = rows
    energy, mask_diag, pair, online, use_triton = ctx.options
    g_pos, g_rl, g_cl, g_sp, g_pair = (
        g.contiguous() if g is not None and g.numel() else None
        for g in (g_pos, g_rl, g_cl, g_sp, g_pair)
    )
    if all(g is None for g in (g_pos, g_rl, g_cl, g_sp, g_pair)):
        return (None,) * 14
    hd, g_ii = _diagonal(
        scale, pos, slope, row_lse, col_lse, g_pos, g_rl, g_cl, g_pair, pair_slope, mask_diag,
    )  # fmt: skip
    # With the online sums only the column pass remains: dx comes from O(B d) arithmetic.
    online = online and g_rl is not None and g_cl is None and g_sp is None and g_pair is None
    empty = pos.new_empty(0)
    grads = [empty if g is None else g for g in (g_rl, g_cl, g_sp, g_pair)]
    need_scale = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    dx, dy, dscale, dbias = _pair_stats_backward(
        x, y, x_sq, y_sq, scale, bias, pos, row_lse, col_lse, *grads, hd, energy, mask_diag,
        pair, not online, need_scale, use_triton,
    )  # fmt: skip
    if online:
        dx, dscale, dbias = _online_dx(
            x, y, scale, energy, pos, row_lse, mask_diag, g_rl, hd, u, v, w
        )
    if not need_scale:
        return dx, dy, None, None, *(None,) * 10
    dscale_ii, dbias_ii = _diagonal_scale_grads(g_ii, f)
    if g_pair is not None and all(g is None for g in (g_pos, g_rl, g_cl, g_sp)):
        dbias = dbias_ii = torch.zeros_like(dbias_ii)  # DPO / IPO alone: the bias cancels
    return (
        dx,
        dy,
        (dscale + dscale_ii).to(scale.dtype),
        (dbias + dbias_ii).to(bias.dtype),
    ) + (None,) * 10


_pair_stats = eager_fast_path(
    _pair_stats_op, _pair_stats_impl, _backward, _setup_context, alternative=_REFERENCE
)


def pair_stats(
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    bias: Tensor,
    *,
    energy: int,
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

    ``scale`` and ``bias`` are 0-d tensors; the positives ``pos`` always come back. ``online``
    (Triton path, row lse, d <= 128) keeps the sums that let backward skip the pass over rows
    for the row-lse terms (the one for dscale only when ``scale`` requires a gradient).
    """
    acc = accumulate_dtype(x.dtype)
    online_w = online and torch.is_grad_enabled() and scale.requires_grad
    out = _pair_stats(
        x.contiguous(), y.contiguous(), scale.to(acc), bias.to(acc), energy, row_lse, col_lse,
        mask_diag, softplus, pair, metrics, online, online_w, use_triton,
    )  # fmt: skip
    return PairStats(*out)


# ---------------------------------------------- the losses that take their gradients in forward


@_autocast_off
def _loss_with_grads_impl(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, energy: int, pair: int, mean: bool,
    scale_grad: bool, use_triton: bool,
) -> Tensors5:  # fmt: skip
    """Loss, (dx, dy) and float32 (dscale, dbias) of a loss whose gradient needs no statistic of
    the logits first: the sigmoid loss with labels = identity (``pair`` PAIR_NONE), dloss/dL_ij
    = w sigmoid(L_ij) - w [i == j], w = 1 / (B M) for the mean; DPO / IPO (PAIR_DPO / PAIR_IPO,
    Triton path), dloss/dL_ij = w pair'(L_ij - L_ii) off the diagonal, w = 1 / (B (M - 1)), and
    on it minus the row's sum. Without ``scale_grad`` the kernels skip (dscale, dbias): their
    off-diagonal part is then zero.

    (dx, dy) come in the input dtype, except float16's, which come in float32: backward scales
    them by grad_output (a GradScaler's 2**16, say) and rounds only then, and the kernels' tiles
    carry the gradient without w, applied to the float32 sums (w H would underflow)."""
    b, m = x.shape[0], y.shape[0]
    w = 1.0 / (b * (m - 1) if pair else b * m) if mean else 1.0
    wide = x.dtype == torch.float16
    g_label = 1.0 if wide else w  # the kernels' weight of every logit's term
    grads_of = _pair_grads if pair else _sigmoid_grads
    loss, dx, dy, dscale, dbias, g_ii, f = grads_of(
        x, y, scale, bias, energy, pair, g_label, _forward_grad_dtype(x.dtype), scale_grad,
        use_triton,
    )  # fmt: skip
    loss = loss * w
    if wide:
        dx, dy = dx * w, dy * w
    if not scale_grad:  # backward returns no gradient for them
        return loss, dx, dy, loss.new_zeros(()), loss.new_zeros(())
    dscale_ii, dbias_ii = _diagonal_scale_grads(g_ii, f)
    dscale, dbias = dscale.sum() + dscale_ii, dbias.sum() + dbias_ii
    if pair:  # the bias cancels in L_ij - L_ii: its gradient is zero, not rounding noise
        dbias = torch.zeros_like(dbias)
    if wide:
        dscale, dbias = dscale * w, dbias * w
    return loss, dx, dy, dscale, dbias


def _sigmoid_grads(x, y, scale, bias, energy, pair, g_label, grad_dtype, scale_grad, use_triton):
    """The sigmoid loss's unweighted sum, (dx, dy), the off-diagonal (dscale, dbias) partials,
    the diagonal's G_ii and exact energies: two passes over the logits (Triton: one with
    ``CRL_FAST_SINGLE_PASS=1``), or the chunked PyTorch path."""
    empty = x.new_empty(0, dtype=torch.float32)
    if not use_triton:
        x_sq, y_sq, f, slope, pos = _rows(x, y, scale, bias, energy, use_triton)
        g_sp = torch.full_like(pos, g_label)
        g_pos = -g_sp * torch.sigmoid(-pos)  # of softplus(-L_ii)
        hd, g_ii = _diagonal(scale, pos, slope, None, None, g_pos, None, None, None, None, False)
        inputs = (x, y, x_sq, y_sq, scale, bias, pos)
        grads = (empty, empty, empty, empty, g_sp, empty)
        dx, dy, dscale, dbias, sp_off = _torch_grad(
            *inputs, *grads, energy, PAIR_NONE, softplus_sum=True
        )
        _add_diagonal(dx, x, y, hd, energy)
        _add_diagonal(dy, y, x, hd, energy)
        value = sp_off + F.softplus(-pos).sum()
        return value, dx.to(grad_dtype), dy.to(grad_dtype), dscale, dbias, g_ii, f
    from crl_fast.kernels import pair_stats as kernels

    s32, b32 = scale.float(), bias.float()
    # One launch: the rows' norms and the diagonal's gradient and loss terms.
    x_sq, y_sq, f, slope, pos, g_ii, hd, sp_diag = kernels.paired_rows(
        x, y, s32, b32, energy=energy, binary_weight=g_label
    )
    g_sp = torch.full_like(pos, g_label)
    grads = (empty, empty, empty, empty, g_sp, empty, hd)
    common = {"energy": energy, "mask_diag": False, "pair": PAIR_NONE, "scale_grad": scale_grad}
    col = _column_buffers(y, energy) if kernels.single_pass(x.dtype, x.shape[1]) else None
    dx, dscale, dbias, sp_off, _ = kernels.grad(
        x, y, x_sq, y_sq, s32, b32, pos, *grads, x_is_a=True, fwd=True, column_sums=col,
        out_dtype=grad_dtype, **common,
    )  # fmt: skip
    dy = _dy(y, x, y_sq, x_sq, s32, b32, pos, grads, col, grad_dtype, common)
    # softplus(L_ij) off the diagonal, softplus(-L_ii) on it
    return (sp_off + sp_diag).sum(), dx, dy, dscale, dbias, g_ii, f


def _pair_grads(x, y, scale, bias, energy, pair, g_label, grad_dtype, scale_grad, use_triton):
    """DPO / IPO on the Triton path, as :func:`_sigmoid_grads`: two passes (one with
    ``CRL_FAST_SINGLE_PASS=1``). The row pass sums the loss terms and their slopes (the
    diagonal's G_ii = -g_label sum_j slope_ij needs the whole row), so dx stays float32 until
    the diagonal's share is added."""
    from crl_fast.kernels import pair_stats as kernels

    if not use_triton:
        raise ValueError("DPO / IPO with gradients in forward are a Triton-path optimisation")
    s32, b32 = scale.float(), bias.float()
    x_sq, y_sq, f, slope, pos = kernels.paired_rows(x, y, s32, b32, energy=energy)
    empty = x.new_empty(0, dtype=torch.float32)
    g_pair = torch.full_like(pos, g_label)
    common = {"energy": energy, "mask_diag": False, "pair": pair, "scale_grad": scale_grad}
    col = _column_buffers(y, energy) if kernels.single_pass(x.dtype, x.shape[1]) else None
    grads = (empty, empty, empty, empty, empty, g_pair)
    dx, dscale, dbias, terms, slopes = kernels.grad(
        x, y, x_sq, y_sq, s32, b32, pos, *grads, empty, x_is_a=True, fwd=True,
        out_dtype=torch.float32, column_sums=col, **common,
    )  # fmt: skip
    g_ii = -g_label * slopes
    hd = g_ii * s32 * slope
    _add_diagonal(dx, x, y, hd, energy)
    dy = _dy(y, x, y_sq, x_sq, s32, b32, pos, (*grads, hd), col, grad_dtype, common)
    return terms.sum(), dx.to(grad_dtype), dy, dscale, dbias, g_ii, f


def _dy(y, x, y_sq, x_sq, scale, bias, pos, stats_and_grads, col, out_dtype, common) -> Tensor:
    """dy in ``out_dtype``: finished from the column sums ``col`` where the row pass took them
    (single pass), else by the column pass. ``stats_and_grads`` are the seven tensors after
    ``pos`` that :func:`kernels.grad` takes (row_lse ... hd); ``common`` its keywords."""
    if col is not None:
        hd = stats_and_grads[-1]
        return _column_grads(y, x, *col, scale, hd, common["energy"]).to(out_dtype)
    from crl_fast.kernels import pair_stats as kernels

    return kernels.grad(
        y, x, y_sq, x_sq, scale, bias, pos, *stats_and_grads, x_is_a=False, out_dtype=out_dtype,
        **common,
    )[0]  # fmt: skip


def _column_buffers(y: Tensor, energy: int) -> tuple[Tensor, Tensor]:
    """The single pass's zeroed float32 column sums: (M, d), and (M,) for l2 / norm."""
    f32 = {"dtype": torch.float32, "device": y.device}
    return torch.zeros(y.shape, **f32), torch.zeros(y.shape[0] if energy else 0, **f32)


def _column_grads(
    y: Tensor, x: Tensor, hy: Tensor, hcol: Tensor, scale: Tensor, hd: Tensor, energy: int
) -> Tensor:
    """dy from the single pass's column sums ``hy_j = sum_i H_ij x_i`` and ``hcol_j = sum_i
    H_ij``: ``scale (hy_j - [l2, norm] y_j hcol_j)`` plus the diagonal's share
    (:func:`_diagonal_term`, from the exact difference of the paired rows), float32, computed in
    ``hy``'s memory: temporaries of at most ``_DIAGONAL_CHUNK`` rows."""
    if energy:
        hy.addcmul_(y, hcol[:, None], value=-1.0)
    hy.mul_(scale)
    _add_diagonal(hy, y, x, hd, energy)
    return hy


def _add_diagonal(grad: Tensor, a: Tensor, other: Tensor, hd: Tensor, energy: int) -> None:
    """``grad[:len(hd)] += hd_i (other_i - a_i)`` (``hd_i other_i`` for dot) in place, float32,
    from the exact difference of the paired rows, in chunks of ``_DIAGONAL_CHUNK`` rows."""
    b = hd.shape[0]
    for i in range(0, b, _DIAGONAL_CHUNK):
        rows = slice(i, min(i + _DIAGONAL_CHUNK, b))
        grad[rows] += _diagonal_term(a[rows], other[rows], hd[rows], energy)


_DIAGONAL_CHUNK = 1 << 16


def _forward_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 else dtype


_loss_with_grads_op = torch.library.custom_op(
    "crl_fast::loss_with_grads", _loss_with_grads_impl, mutates_args=()
)


@_loss_with_grads_op.register_fake
def _(x, y, scale, bias, energy, pair, mean, scale_grad, use_triton):
    scalar = x.new_empty((), dtype=accumulate_dtype(x.dtype))
    grad_dtype = _forward_grad_dtype(x.dtype)
    dx, dy = torch.empty_like(x, dtype=grad_dtype), torch.empty_like(y, dtype=grad_dtype)
    return scalar, dx, dy, scalar.clone(), scalar.clone()


def _forward_grads_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.dtypes = tuple(t.dtype for t in inputs[:4])
    # The gradients travel as outputs, which nothing downstream uses: no zero tensors for them.
    ctx.set_materialize_grads(False)


def _forward_grads_backward(ctx, g_loss, *_unused):
    refuse_double_backward("the fused contrastive losses", _REFERENCE)
    if g_loss is None:
        return (None,) * 9
    grads = [
        (g_loss * g).to(dtype) if needed else None
        for g, dtype, needed in zip(
            ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:4], strict=True
        )
    ]
    return (*grads, None, None, None, None, None)


_loss_with_grads = eager_fast_path(
    _loss_with_grads_op, _loss_with_grads_impl, _forward_grads_backward,
    _forward_grads_setup_context, alternative=_REFERENCE,
)  # fmt: skip


def loss_with_grads(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *, energy: int, pair: int, mean: bool,
    use_triton: bool,
) -> Tensor:  # fmt: skip
    """The sigmoid loss (labels = identity; ``pair`` PAIR_NONE) or DPO / IPO (PAIR_DPO /
    PAIR_IPO, Triton path) whose forward also computes every gradient (two passes over the
    logits instead of three); backward only scales them by grad_output."""
    acc = accumulate_dtype(x.dtype)
    scale_grad = torch.is_grad_enabled() and (scale.requires_grad or bias.requires_grad)
    return _loss_with_grads(
        x.contiguous(), y.contiguous(), scale.to(acc), bias.to(acc), energy, pair, mean,
        scale_grad, use_triton,
    )[0]  # fmt: skip
