"""Row and column statistics of a logit matrix that is never materialised, with gradients.

Every critic loss is a small function of O(B) statistics of ``L = scale * f(x, y) + bias``
(see ``kernels/pair_stats.py`` for the exact list and the gradient formula). This module wraps
the statistics as ``torch.library`` custom ops (forward and backward), so they work under
autograd, ``torch.compile`` and CUDA-graph capture (eager calls run the same code without the
ops' dispatch), and dispatches each call to

* the Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), through the glue
  below, or
* the chunked PyTorch implementation of the same maths in ``crl_fast.pair_stats_torch`` (CPU,
  float64, no Triton), which holds a bounded number of logits at a time and recomputes them in
  backward.

The diagonal ``L_ii`` never comes from the B x M products: for l2 and norm the expanded
``|x|^2 + |y|^2 - 2 x.y`` cancels exactly where a trained critic puts its positives (x_i close
to y_i). Both paths take the positives from ``x_i - y_i`` (O(B d), in row chunks), put them in
place of the diagonal in every statistic and leave the diagonal out of the gradient products;
its share ``H_ii (y_i - x_i)``, with ``H_ii`` computed here exactly, is added to each row of the
float32 accumulator (in the kernel on the Triton path) before the one rounding to the input
dtype.

The sigmoid loss and DPO / IPO / FB / SPPO, which need no statistic before their gradients,
compute those in forward instead: ``crl_fast.loss_with_grads``, built on the helpers here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, ParamSpec, TypeVar, cast

import torch

from crl_fast.custom_ops import eager_fast_path, refuse_double_backward, refuse_transforms
from crl_fast.energy import accumulate_dtype, paired_energy
from crl_fast.pair_stats_torch import shifted_pair, softmax_weight, torch_grad, torch_stats

PAIR_NONE, PAIR_DPO, PAIR_IPO, PAIR_FB, PAIR_SPPO = 0, 1, 2, 3, 4
"""The pair losses' codes (the kernels' PAIR): a sum over j != i of a term of L_ij - L_ii (DPO,
IPO: :func:`shifted_pair`), or of L_ij alone (FB, SPPO: the loss adds their diagonal terms)."""
REFERENCE_LOSS = "crl_fast.reference_contrastive_loss"
"""What the ops' errors (torch.func transforms, double backward) tell the caller to use."""

Tensor = torch.Tensor
P_ = ParamSpec("P_")
R_ = TypeVar("R_")
Tensors4 = tuple[Tensor, Tensor, Tensor, Tensor]
Tensors18 = tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
]  # fmt: skip


class PairStats(NamedTuple):
    """Statistics over j of each row i (``pos`` and ``row_*``: length B) or over i of each
    column (``col_lse``: length M); empty when not asked for. ``online_*`` are the softmax-
    weighted off-diagonal row sums the Triton path keeps for the row-lse gradient; the last four
    are the prologue backward reuses (see :class:`Rows`). ``row_softplus`` sums softplus(L_ij)
    over j != i only.

    Each logsumexp is kept relative to an offset, ``row_max`` / ``col_max``, the largest logit
    it sums (0 where none is kept): ``row_lse`` is ``logsumexp_j L_ij - row_max_i``, a number of
    order log M, so that backward's weights ``exp((L_ij - row_max_i) - row_lse_i)`` sum to 1 to
    float32's last bits; one float32 logsumexp of 1e4 is 2**-11 off, and so would the weights'
    sum be. The offsets are constants for autograd (the full softmax is ``row_lse``'s
    gradient), so use them only added to it."""

    pos: Tensor
    row_lse: Tensor
    col_lse: Tensor
    row_max: Tensor
    col_max: Tensor
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


_STATISTICS = PairStats._fields[1 : PairStats._fields.index("x_sq")]
"""The statistics each path computes (``row_lse`` to ``online_w``), in ``PairStats`` order."""


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


def paired_rows(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, energy: int, use_triton: bool
) -> Rows:
    """:class:`Rows`: one kernel launch on the Triton path, a few PyTorch ops otherwise."""
    if use_triton:
        from crl_fast.kernels import pair_stats as kernels

        return Rows(*kernels.paired_rows(x, y, scale.float(), bias.float(), energy=energy))
    f, slope = _paired(x, y[: x.shape[0]], energy)
    pos = scale.to(f.dtype) * f + bias.to(f.dtype)
    return Rows(_squared_norms(x, energy), _squared_norms(y, energy), f, slope, pos)


# ------------------------------------------------------------------------------ the diagonal


def diagonal_grad(scale: Tensor, pos: Tensor, slope: Tensor, row_lse: Tensor, col_lse: Tensor,
                  row_max: Tensor, col_max: Tensor, g_pos: Tensor | None, g_rl: Tensor | None,
                  g_cl: Tensor | None, g_pair: Tensor | None, pair_slope: Tensor,
                  mask_diag: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The diagonal's gradient ``(H_ii, G_ii)`` per row: ``H_ii = G_ii scale f'_ii`` is what the
    kernels add as ``H_ii (y_i - x_i)`` (or ``H_ii y_i`` for dot); the diagonal's share of
    (dscale, dbias) is ``(sum G_ii f_ii, sum G_ii)``, :func:`diagonal_scale_grads`.

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
        g += g_rl * softmax_weight(pos, row_max, row_lse)
    if g_cl is not None and not mask_diag:
        g += g_cl[:b] * softmax_weight(pos, col_max[:b], col_lse[:b])
    return g * scale.to(g.dtype) * slope, g


def diagonal_scale_grads(g: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
    """The diagonal's share of (dscale, dbias), from its ``G_ii`` and exact energies."""
    return (g * f).sum(), g.sum()


def _diagonal_term(a: Tensor, other: Tensor, hd: Tensor, energy: int) -> Tensor:
    """``hd_i (other_i - a_i)`` (l2, norm) or ``hd_i other_i`` (dot), for paired rows: the
    diagonal's share of dA, as the kernels add it."""
    other = other.to(hd.dtype)
    return hd[:, None] * (other - a.to(hd.dtype) if energy else other)


_DIAGONAL_CHUNK = 1 << 16
"""Rows per chunk of :func:`add_diagonal`: bounds its float32 temporaries."""


def add_diagonal(grad: Tensor, a: Tensor, other: Tensor, hd: Tensor, energy: int) -> None:
    """``grad[:len(hd)] += hd_i (other_i - a_i)`` (``hd_i other_i`` for dot) in place, float32,
    from the exact difference of the paired rows, in chunks of ``_DIAGONAL_CHUNK`` rows."""
    b = hd.shape[0]
    for i in range(0, b, _DIAGONAL_CHUNK):
        rows = slice(i, min(i + _DIAGONAL_CHUNK, b))
        grad[rows] += _diagonal_term(a[rows], other[rows], hd[rows], energy)


def torch_grad_with_diagonal(x: Tensor, y: Tensor, x_sq: Tensor, y_sq: Tensor, scale: Tensor,
                             bias: Tensor, pos: Tensor, row_lse: Tensor, col_lse: Tensor,
                             row_max: Tensor, col_max: Tensor, g_row_lse: Tensor,
                             g_col_lse: Tensor, g_softplus: Tensor, g_pair: Tensor, hd: Tensor,
                             energy: int, pair: int, softplus_sum: bool = False,
                             need_dx: bool = True, need_dy: bool = True,
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """:func:`torch_grad` (the chunked PyTorch path: float32 or wider (dx, dy, dscale, dbias),
    dx or dy empty unless needed, and the softplus sum) with the diagonal's share ``hd`` added
    to dx and dy."""
    dx, dy, dscale, dbias, value = torch_grad(
        x, y, x_sq, y_sq, scale, bias, pos, row_lse, col_lse, row_max, col_max, g_row_lse,
        g_col_lse, g_softplus, g_pair, energy, pair, softplus_sum, need_dx, need_dy,
    )  # fmt: skip
    if need_dx:
        add_diagonal(dx, x, y, hd, energy)
    if need_dy:
        add_diagonal(dy, y, x, hd, energy)
    return dx, dy, dscale, dbias, value


# ---------------------------------------------------------------------------- Triton path


def _triton_stats(x: Tensor, y: Tensor, x_sq: Tensor, y_sq: Tensor, scale: Tensor, bias: Tensor,
                  pos: Tensor, energy: int, row_lse: bool, col_lse: bool, mask_diag: bool,
                  softplus: bool, pair: int, metrics: bool, online: bool,
                  online_w: bool) -> tuple[Tensor, ...]:  # fmt: skip
    from crl_fast.kernels import pair_stats as kernels

    scale, bias = scale.float(), bias.float()
    rl, rmax, sp, pr, slope, arg, rsum, cnt, u, v, w = kernels.stats(
        x, y, x_sq, y_sq, scale, bias, pos, energy=energy, lse=row_lse, mask_diag=mask_diag,
        softplus=softplus, pair=pair, metrics=metrics, online=online, online_w=online_w,
    )  # fmt: skip
    cl, cmax = rl.new_empty(0), rl.new_empty(0)
    if col_lse:
        cl, cmax = kernels.stats(
            y, x, y_sq, x_sq, scale, bias, pos, energy=energy, lse=True, mask_diag=mask_diag,
            softplus=False, pair=PAIR_NONE, metrics=False,
        )[:2]  # fmt: skip
    return rl, cl, rmax, cmax, sp, pr, slope, arg, rsum, cnt, u, v, w


def _triton_grad(x: Tensor, y: Tensor, x_sq: Tensor, y_sq: Tensor, scale: Tensor, bias: Tensor,
                 pos: Tensor, row_lse: Tensor, col_lse: Tensor, row_max: Tensor,
                 col_max: Tensor, g_row_lse: Tensor, g_col_lse: Tensor, g_softplus: Tensor,
                 g_pair: Tensor, hd: Tensor, energy: int, mask_diag: bool, pair: int,
                 need_dx: bool, need_dy: bool, need_scale: bool) -> Tensors4:  # fmt: skip
    """(dx, dy) in the input dtype with the diagonal's ``hd`` added (each empty unless
    ``need_dx`` / ``need_dy``), and the off-diagonal (dscale, dbias), float32 (zero unless
    ``need_dx`` and ``need_scale``). A row pass for dx and a column pass for dy; with
    ``CRL_FAST_SINGLE_PASS=1`` and both needed, the row pass alone."""
    from crl_fast.kernels import pair_stats as kernels
    from crl_fast.kernels import pair_stats_tiling as tiling

    scale, bias = scale.float(), bias.float()
    stats_and_grads = (row_lse, col_lse, row_max, col_max, g_row_lse, g_col_lse, g_softplus,
                       g_pair, hd)  # fmt: skip
    common = {"energy": energy, "mask_diag": mask_diag, "pair": pair, "scale_grad": need_scale}
    dx, dscale, dbias = x.new_empty(0), scale.new_zeros(1), bias.new_zeros(1)
    # CRL_FAST_SINGLE_PASS=1: the row pass's tiles also give dy's sums, through atomics.
    single = tiling.single_pass(x.dtype, x.shape[1]) and need_dx and need_dy
    col = column_buffers(y, energy) if single else None
    if need_dx:
        dx, dscale, dbias, *_ = kernels.grad(  # empty partials (sum 0) unless need_scale
            x, y, x_sq, y_sq, scale, bias, pos, *stats_and_grads, x_is_a=True, column_sums=col,
            **common,
        )  # fmt: skip
    dy = triton_dy(
        y, x, y_sq, x_sq, scale, bias, pos, stats_and_grads, col, y.dtype, common, need_dy
    )
    return dx, dy, dscale.sum(), dbias.sum()


def triton_dy(
    y: Tensor,
    x: Tensor,
    y_sq: Tensor,
    x_sq: Tensor,
    scale: Tensor,
    bias: Tensor,
    pos: Tensor,
    stats_and_grads: tuple[Tensor, ...],
    col: tuple[Tensor, Tensor] | None,
    out_dtype: torch.dtype,
    common: dict[str, Any],
    needed: bool = True,
) -> Tensor:
    """dy in ``out_dtype``: finished from the column sums ``col`` where the row pass took them
    (single pass), else by the column pass; empty, and no pass, unless ``needed``.
    ``stats_and_grads`` are the nine tensors after ``pos`` that :func:`kernels.grad` takes
    (row_lse ... hd); ``common`` its keywords."""
    if not needed:
        return y.new_empty(0, dtype=out_dtype)
    if col is not None:
        hd = stats_and_grads[-1]
        return _column_grads(y, x, *col, scale, hd, common["energy"]).to(out_dtype)
    from crl_fast.kernels import pair_stats as kernels

    return kernels.grad(
        y, x, y_sq, x_sq, scale, bias, pos, *stats_and_grads, x_is_a=False, out_dtype=out_dtype,
        **common,
    )[0]  # fmt: skip


def column_buffers(y: Tensor, energy: int) -> tuple[Tensor, Tensor]:
    """The single pass's zeroed float32 column sums: (M, d), and (M,) for l2 / norm."""
    f32: dict[str, Any] = {"dtype": torch.float32, "device": y.device}
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
    add_diagonal(hy, y, x, hd, energy)
    return hy


# ----------------------------------------------------------------------------------- the ops


def autocast_off(fn: Callable[P_, R_]) -> Callable[P_, R_]:
    """``fn`` run with autocast off: under ``torch.autocast`` its float32 sums and chunked
    matmuls would otherwise be recast to the autocast dtype. For the ops' implementations: eager
    calls, compiled graphs and backward (inside an autocast region too) all run them."""

    @functools.wraps(fn)
    def wrapper(*args: P_.args, **kwargs: P_.kwargs) -> R_:
        if not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")):
            return fn(*args, **kwargs)
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


@autocast_off
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
) -> Tensors18:
    if online and not use_triton:
        raise ValueError("the online row sums are a Triton-path optimisation")
    rows = paired_rows(x, y, scale, bias, energy, use_triton)
    args = (x, y, rows.x_sq, rows.y_sq, scale, bias, rows.pos)
    flags = (energy, row_lse, col_lse, mask_diag, softplus, pair, metrics)
    if use_triton:
        stats = _triton_stats(*args, *flags, online, online_w)
    else:
        stats = torch_stats(*args, *flags, _STATISTICS)
    # stats: the 13 of _STATISTICS, a length mypy cannot follow
    return cast(Tensors18, (rows.pos, *stats, rows.x_sq, rows.y_sq, rows.f, rows.slope))


_pair_stats_op = torch.library.custom_op("crl_fast::pair_stats", _pair_stats_impl, mutates_args=())


@_pair_stats_op.register_fake
def _(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, energy: int, row_lse: bool,
      col_lse: bool, mask_diag: bool, softplus: bool, pair: int, metrics: bool, online: bool,
      online_w: bool, use_triton: bool) -> Tensors18:  # fmt: skip
    b, m = x.shape[0], y.shape[0]
    acc = accumulate_dtype(x.dtype)

    def vec(n: int, wanted: bool, dtype: torch.dtype = acc) -> Tensor:
        return x.new_empty(n if wanted else 0, dtype=dtype)

    return (
        vec(b, True),
        vec(b, row_lse),
        vec(m, col_lse),
        vec(b, row_lse),
        vec(m, col_lse),
        vec(b, softplus),
        vec(b, pair != PAIR_NONE),
        vec(b, shifted_pair(pair)),
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


@autocast_off
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
    row_max: Tensor,
    col_max: Tensor,
    g_row_lse: Tensor,
    g_col_lse: Tensor,
    g_softplus: Tensor,
    g_pair: Tensor,
    hd: Tensor,
    energy: int,
    mask_diag: bool,
    pair: int,
    need_dx: bool,
    need_dy: bool,
    need_scale: bool,
    use_triton: bool,
) -> Tensors4:
    """(dx, dy) in the input dtypes (each empty unless ``need_dx`` / ``need_dy``), the
    diagonal's ``hd`` included, and the off-diagonal (dscale, dbias) (zero on the Triton path
    unless ``need_dx`` and ``need_scale``)."""
    args = (x, y, x_sq, y_sq, scale, bias, pos, row_lse, col_lse, row_max, col_max, g_row_lse,
            g_col_lse, g_softplus, g_pair)  # fmt: skip
    if use_triton:
        return _triton_grad(*args, hd, energy, mask_diag, pair, need_dx, need_dy, need_scale)
    dx, dy, dscale, dbias, _ = torch_grad_with_diagonal(
        *args, hd, energy, pair, need_dx=need_dx, need_dy=need_dy
    )
    return dx.to(x.dtype), dy.to(y.dtype), dscale, dbias


_pair_stats_backward_op = torch.library.custom_op(
    "crl_fast::pair_stats_backward", _pair_stats_backward_impl, mutates_args=()
)
_pair_stats_backward = eager_fast_path(
    _pair_stats_backward_op, _pair_stats_backward_impl, alternative=REFERENCE_LOSS
)


@_pair_stats_backward_op.register_fake
def _(x: Tensor, y: Tensor, x_sq: Tensor, y_sq: Tensor, scale: Tensor, bias: Tensor, pos: Tensor,
      row_lse: Tensor, col_lse: Tensor, row_max: Tensor, col_max: Tensor, g_row_lse: Tensor,
      g_col_lse: Tensor, g_softplus: Tensor, g_pair: Tensor, hd: Tensor, energy: int,
      mask_diag: bool, pair: int, need_dx: bool, need_dy: bool, need_scale: bool,
      use_triton: bool) -> Tensors4:  # fmt: skip
    scalar = x.new_empty((), dtype=accumulate_dtype(x.dtype))
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dy = torch.empty_like(y) if need_dy else y.new_empty(0)
    return dx, dy, scalar, scalar.clone()


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensors18) -> None:
    x, y, scale, bias, energy, _, _, mask_diag, _, pair, _, online, _, use_triton = inputs
    stats = PairStats(*output)
    ctx.mark_non_differentiable(stats.row_max, stats.col_max)  # offsets: see PairStats
    ctx.save_for_backward(
        x, y, scale, bias, stats.pos, stats.row_lse, stats.col_lse, stats.row_max, stats.col_max,
        stats.row_pair_slope, stats.online_u, stats.online_v, stats.online_w, stats.x_sq,
        stats.y_sq, stats.paired_f, stats.paired_slope,
    )  # fmt: skip
    ctx.options = (energy, mask_diag, pair, online, use_triton)
    ctx.set_materialize_grads(False)


def _online_dx(x: Tensor, y: Tensor, scale: Tensor, energy: int, pos: Tensor, row_lse: Tensor,
               row_max: Tensor, mask_diag: bool, g_rl: Tensor, hd: Tensor, u: Tensor, v: Tensor,
               w: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """dx (input dtype) and the off-diagonal (dscale, dbias) of the row-lse term from the
    forward's online sums: dx_i = scale g_rl_i (U_i - V_i x_i) (the x_i term for l2 and norm
    only) plus the diagonal's row; dbias takes the off-diagonal softmax mass 1 - p_ii.
    O(B d) instead of a pass over the logits."""
    b = x.shape[0]

    def rows_dx(r: slice, x_r: Tensor, y_r: Tensor) -> Tensor:
        x32 = x_r.to(u.dtype)
        part = scale * g_rl[r, None] * (u[r] - v[r, None] * x32 if energy else u[r])
        return part + _diagonal_term(x_r, y_r, hd[r], energy)

    if isinstance(b, torch.SymInt) or torch.compiler.is_compiling():
        # Traced (torch.compile's backward): a Python loop over row chunks would specialise
        # the batch size (one recompile per new size under dynamic=True); the compiler fuses
        # the whole thing anyway.
        dx = rows_dx(slice(None), x, y[:b]).to(x.dtype)
    else:
        dx = torch.empty_like(x)
        step = max(1, ROW_CHUNK_ELEMENTS // x.shape[1])
        for start in range(0, b, step):  # row chunks: float32 temporaries stay small
            r = slice(start, min(start + step, b))
            dx[r] = rows_dx(r, x[r], y[r])
    mass = 1.0 if mask_diag else 1.0 - softmax_weight(pos, row_max, row_lse)
    # W is kept only when the scale needs a gradient (a learnable bias alone needs no W)
    dscale = (g_rl * w).sum() if w.numel() else g_rl.new_zeros(())
    return dx, dscale, (g_rl * mass).sum()


def _backward(ctx: Any, g_pos: Tensor | None, g_rl: Tensor | None, g_cl: Tensor | None,
              _g_row_max: Tensor | None, _g_col_max: Tensor | None, g_sp: Tensor | None,
              g_pair: Tensor | None, *_unused: Tensor | None,
              ) -> tuple[Tensor | None, ...]:  # fmt: skip
    refuse_double_backward("the fused contrastive losses", REFERENCE_LOSS)
    refuse_transforms(REFERENCE_LOSS, g_pos, g_rl, g_cl, g_sp, g_pair)
    x, y, scale, bias, pos, *lse, pair_slope, u, v, w, x_sq, y_sq, f, slope = ctx.saved_tensors
    row_lse, col_lse, row_max, col_max = lse
    energy, mask_diag, pair, online, use_triton = ctx.options
    g_pos, g_rl, g_cl, g_sp, g_pair = (
        g.contiguous() if g is not None and g.numel() else None
        for g in (g_pos, g_rl, g_cl, g_sp, g_pair)
    )
    if all(g is None for g in (g_pos, g_rl, g_cl, g_sp, g_pair)):
        return (None,) * 14
    shifted = shifted_pair(pair)
    hd, g_ii = diagonal_grad(
        scale, pos, slope, row_lse, col_lse, row_max, col_max, g_pos, g_rl, g_cl,
        g_pair if shifted else None, pair_slope, mask_diag,
    )  # fmt: skip
    # With the online sums only the column pass remains: dx comes from O(B d) arithmetic.
    g_online = g_rl if online and g_cl is None and g_sp is None and g_pair is None else None
    empty = pos.new_empty(0)
    g_row_lse, g_col_lse, g_softplus, g_pairs = (
        empty if g is None else g for g in (g_rl, g_cl, g_sp, g_pair)
    )
    need_x, need_y = ctx.needs_input_grad[:2]
    need_scale = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    # On the Triton path the row pass gives dx and the off-diagonal (dscale, dbias), the column
    # pass dy; the chunked path gives (dscale, dbias) with either product, or without both. A
    # side that needs no gradient (a frozen encoder's) costs no pass, no product.
    need_rows = (need_x or (need_scale and use_triton)) and g_online is None
    dx = dy = dscale = dbias = None
    if need_rows or need_y or (need_scale and g_online is None):
        dx, dy, dscale, dbias = _pair_stats_backward(
            x, y, x_sq, y_sq, scale, bias, pos, row_lse, col_lse, row_max, col_max, g_row_lse,
            g_col_lse, g_softplus, g_pairs, hd, energy, mask_diag, pair, need_rows, need_y,
            need_scale, use_triton,
        )  # fmt: skip
    if g_online is not None and (need_x or need_scale):
        dx, dscale, dbias = _online_dx(
            x, y, scale, energy, pos, row_lse, row_max, mask_diag, g_online, hd, u, v, w
        )
    dx, dy = (dx if need_x else None), (dy if need_y else None)
    if not need_scale:
        return dx, dy, None, None, *(None,) * 10
    assert dscale is not None and dbias is not None  # from a pass or the online sums
    dscale_ii, dbias_ii = diagonal_scale_grads(g_ii, f)
    if shifted and g_pair is not None and all(g is None for g in (g_pos, g_rl, g_cl, g_sp)):
        dbias = dbias_ii = torch.zeros_like(dbias_ii)  # DPO / IPO alone: the bias cancels
    return (
        dx,
        dy,
        (dscale + dscale_ii).to(scale.dtype),
        (dbias + dbias_ii).to(bias.dtype),
    ) + (None,) * 10


_pair_stats = eager_fast_path(
    _pair_stats_op, _pair_stats_impl, _backward, _setup_context, alternative=REFERENCE_LOSS
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
