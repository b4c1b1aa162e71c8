"""The chunked PyTorch path of ``crl_fast.pair_stats``: the same statistics and gradients as the
Triton kernels, written in PyTorch for CPU, float64 and machines without Triton.

It holds about ``CHUNK_ELEMENTS`` logits at a time (one row at least) and recomputes them in
backward, so its memory stays O(B d) plus a few chunks. The caller (``crl_fast.pair_stats``)
supplies the row prologue (squared norms, exact positives) and adds the diagonal's gradient: the
diagonal ``L_ii`` is read from ``pos`` here, never from the B x M products, and left out of every
gradient product. ``pair`` is the pair-loss code of ``crl_fast.pair_stats``: 0 none, 1 DPO,
2 IPO, 3 FB, 4 SPPO (as in the kernels). Each logsumexp comes as an offset, the largest logit,
and the logsumexp less it (see ``crl_fast.pair_stats.PairStats``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from crl_fast.energy import accumulate_dtype, energy_and_slope

CHUNK_ELEMENTS = 1 << 20
"""Logits per chunk: bounds this path's extra memory to a few times 4 MiB."""

Tensor = torch.Tensor


def _chunk_logits(
    x: Tensor, y: Tensor, x_sq: Tensor, y_sq: Tensor, scale: Tensor, bias: Tensor, energy: int
) -> tuple[Tensor, Tensor, Tensor | float]:
    """Logits, energy and dL/dP slope (before scale) for a block of rows, float32 or wider."""
    if energy:
        x_sq, y_sq = x_sq[:, None], y_sq[None, :]
    f, slope = energy_and_slope(x @ y.T, x_sq, y_sq, energy)
    return scale * f + bias, f, slope


def _chunks(n_rows: int, n_cols: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of row blocks of about ``CHUNK_ELEMENTS`` logits (one row at least)."""
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def _diagonal_of(block: Tensor, start: int) -> Tensor:
    """The entries ``(i, i)`` of a block holding rows ``start..`` of a B x M matrix: a view, so
    the diagonal is read and written in place with O(rows) work, no B x M mask."""
    return block[:, start : start + block.shape[0]].diagonal()


def softplus(t: Tensor) -> Tensor:
    """softplus to ``t``'s own precision: past its threshold (20 by default) ``F.softplus``
    returns ``t`` itself, with slope 1, off by exp(-20) ~ 2e-9: below float32's resolution, ten
    million of float64's ulps; float64 takes the cut at 40, where exp(-40) is below its own."""
    return F.softplus(t, threshold=40.0 if t.dtype == torch.float64 else 20.0)


def offset_of(max_: Tensor) -> Tensor:
    """The offset a logsumexp is kept relative to: the largest logit, 0 where that is infinite
    (no logit kept, or an infinite one), as ``torch.logsumexp`` shifts."""
    return torch.where(max_.abs() == float("inf"), 0.0, max_)


def softmax_weight(logits: Tensor, offset: Tensor, lse: Tensor) -> Tensor:
    """exp(L - logsumexp) as ``exp((L - offset) - lse)``: the logsumexp kept relative to the
    largest logit (``offset``), so that a row's weights sum to 1 to the last bits however large
    the logits (one float32 logsumexp of 1e4 is 2**-11 off)."""
    return torch.exp((logits - offset) - lse)


def shifted_pair(pair: int) -> bool:
    """Whether the pair loss's terms are of ``L_ij - L_ii`` (DPO, IPO), so that L_ii takes minus
    the row's sum of their slopes, which the statistics then keep (``row_pair_slope``)."""
    return pair in (1, 2)


def _pair_term(logits: Tensor, pos: Tensor, pair: int) -> tuple[Tensor, Tensor]:
    """An off-diagonal pair term and its slope d/dL_ij, as the kernels' ``_pair_term``: DPO
    softplus(u) and sigmoid(u), IPO (u + 1)^2 and 2 (u + 1), u = L_ij - L_ii (``pos``); FB
    L_ij^2 / 2 and L_ij; SPPO (L_ij + 1)^2 and 2 (L_ij + 1)."""
    if pair == 1:
        u = logits - pos
        return softplus(u), torch.sigmoid(u)
    if pair == 3:
        return 0.5 * logits.square(), logits
    u = logits - pos if pair == 2 else logits
    return (u + 1.0).square(), 2.0 * (u + 1.0)


def torch_stats(x: Tensor, y: Tensor, x_sq: Tensor, y_sq: Tensor, scale: Tensor, bias: Tensor,
                pos: Tensor, energy: int, row_lse: bool, col_lse: bool, mask_diag: bool,
                softplus: bool, pair: int, metrics: bool,
                fields: Sequence[str]) -> tuple[Tensor, ...]:  # fmt: skip
    """The statistics named ``fields`` (those of ``crl_fast.pair_stats.PairStats`` from
    ``row_lse`` to ``online_w``), in that order."""
    b, m = x.shape[0], y.shape[0]
    acc = accumulate_dtype(x.dtype)
    x, y, scale, bias = x.to(acc), y.to(acc), scale.to(acc), bias.to(acc)
    new: dict[str, Any] = {"dtype": acc, "device": x.device}
    wanted = {
        "row_lse": row_lse,
        "row_max": row_lse,
        "row_softplus": softplus,
        "row_pair": pair != 0,
        "row_pair_slope": shifted_pair(pair),
        "row_sum": metrics,
        "row_correct": metrics,
    }
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
            offset = offset_of(lse_in.amax(1))
            out["row_max"][rows] = offset
            out["row_lse"][rows] = (lse_in - offset[:, None]).exp().sum(1).log()
        if col_lse:
            new_max = torch.maximum(col_max, lse_in.amax(0))
            safe = torch.where(new_max == float("-inf"), 0.0, new_max)
            col_sum = col_sum * torch.exp(col_max - safe) + torch.exp(lse_in - safe).sum(0)
            col_max = new_max
        if softplus:
            out["row_softplus"][rows] = _off_diagonal_softplus(logits, start).sum(1)
        if pair:
            term, slope = _pair_term(logits, pos[rows, None], pair)  # FB's slope: logits
            _diagonal_of(term, start).zero_()
            out["row_pair"][rows] = term.sum(1)
            if shifted_pair(pair):
                _diagonal_of(slope, start).zero_()
                out["row_pair_slope"][rows] = slope.sum(1)
        if metrics:
            out["row_argmax"][rows] = logits.argmax(1).to(torch.int32)
            out["row_sum"][rows] = logits.sum(1)
            correct = ~(logits > 0)  # the label: 1 on the diagonal, 0 off it (NaN: not > 0)
            _diagonal_of(correct, start).logical_not_()
            out["row_correct"][rows] = correct.sum(1).to(acc)
    if col_lse:
        out["col_max"], out["col_lse"] = offset_of(col_max), col_sum.log()
    return tuple(out[k] for k in fields)


def _off_diagonal_softplus(logits: Tensor, start: int) -> Tensor:
    """softplus(L_ij) of a block of rows ``start..``, 0 on the diagonal."""
    sp = softplus(logits)
    _diagonal_of(sp, start).zero_()
    return sp


def torch_grad(x: Tensor, y: Tensor, x_sq: Tensor, y_sq: Tensor, scale: Tensor, bias: Tensor,
               pos: Tensor, row_lse: Tensor, col_lse: Tensor, row_max: Tensor, col_max: Tensor,
               g_row_lse: Tensor, g_col_lse: Tensor, g_softplus: Tensor, g_pair: Tensor,
               energy: int, pair: int, softplus_sum: bool = False, need_dx: bool = True,
               need_dy: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Off-diagonal (dx, dy, dscale, dbias) in float32 or wider (dx or dy empty, its product
    skipped, unless ``need_dx`` / ``need_dy``), and the sum of softplus(L_ij) over j != i when
    ``softplus_sum`` (else 0): the sigmoid loss's value from the same logits, so that loss takes
    one pass. Each logsumexp comes as its offset (``*_max``) and the rest (``*_lse``)."""
    b, m = x.shape[0], y.shape[0]
    acc = accumulate_dtype(x.dtype)
    x, y, scale, bias = x.to(acc), y.to(acc), scale.to(acc), bias.to(acc)
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dy = torch.zeros_like(y) if need_dy else y.new_empty(0)
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
            p = softmax_weight(logits, row_max[rows, None], row_lse[rows, None])
            terms.append(g_row_lse[rows, None] * p)
        if g_col_lse.numel():
            terms.append(g_col_lse[None, :] * softmax_weight(logits, col_max, col_lse))
        if g_softplus.numel():
            terms.append(g_softplus[rows, None] * torch.sigmoid(logits))
        if g_pair.numel():
            terms.append(g_pair[rows, None] * _pair_term(logits, pos[rows, None], pair)[1])
        g = terms[0] if terms else torch.zeros_like(logits)
        for term in terms[1:]:
            g += term
        _diagonal_of(g, start).zero_()
        h = g * (scale * slope)  # dot: slope is 1.0, so one B x M product
        if need_dx:
            dx[rows] = h @ y
            if energy:  # the squared norms' share: -A_i sum_j H_ij
                dx[rows] -= h.sum(1, keepdim=True) * x[rows]
        if need_dy:
            dy += h.T @ x[rows]
            if energy:
                dy -= h.sum(0)[:, None] * y
        dscale += (g * f).sum()
        dbias += g.sum()
    return dx, dy, dscale, dbias, value
