"""Triton kernels for per-row / per-column statistics of a logit matrix that is never stored.

The logits are ``L_ij = scale * f(P_ij, ra_i, rb_j) + bias`` with ``P = A @ B.T`` (tensor cores)
and ``f`` one of three energies of the inner product and squared norms ``ra``, ``rb``:

    ENERGY 0 (dot):  f = P
    ENERGY 1 (l2):   f = 2P - ra - rb
    ENERGY 2 (norm): f = -sqrt(max(ra + rb - 2P, 0) + 1e-6)

Forward (``stats_kernel``), one program per BLOCK_M rows of A, looping over all rows of B:
    lse_i      = logsumexp_j L_ij           (j != i when MASK_DIAG; online max in base 2)
    softplus_i = sum_j softplus(L_ij)
    pair_i     = sum_{j != i} softplus(L_ij - shift_i)       (PAIR 1, DPO)
               = sum_{j != i} (L_ij - shift_i + 1)^2         (PAIR 2, IPO)
    metrics: argmax_j L_ij, sum_j L_ij, #{j : (L_ij > 0) == (i == j)}
Column statistics are row statistics of the transpose: launch with A and B swapped.

Backward (``grad_kernel``): with upstream gradients of those statistics the logit gradient is
    G_ij = g_rlse_i exp(L_ij - rlse_i) + g_clse_j exp(L_ij - clse_j) + g_sp_i sigmoid(L_ij)
           + g_pair_i [j != i] (sigmoid(L_ij - shift_i)  or  2 (L_ij - shift_i + 1))
and with H = G * scale * df/dP (df/dra = -H/2 for l2 and norm):
    dA_i = sum_j H_ij B_j,   dra_i = -1/2 sum_j H_ij,   dshift_i = -sum_j G^pair_ij,
    dscale = sum G_ij f_ij,  dbias = sum G_ij.
One launch with A = x (rows) gives dx, drx, dshift and per-program partials of dscale/dbias;
one with A = y gives dy and dry (X_IS_A = False flips which index the x-indexed vectors follow).
No atomics: both gradients are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NORM_EPS = 1e-6


@triton.jit
def _logits_tile(
    A_ptr,
    B_ptr,
    RA_ptr,
    RB_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    D,
    stride_a,
    stride_b,
    scale,
    bias,
    ENERGY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Logits, energy values and dL/dP for one (BLOCK_M, BLOCK_N) tile, all float32."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_base = A_ptr + rows.to(tl.int64)[:, None] * stride_a
    b_base = B_ptr + cols.to(tl.int64)[:, None] * stride_b
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        a = tl.load(a_base + ks[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_base + ks[None, :], mask=col_mask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if ENERGY == 0:
        f = acc
        dfdp = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
    else:
        ra = tl.load(RA_ptr + rows, mask=row_mask, other=0.0)
        rb = tl.load(RB_ptr + cols, mask=col_mask, other=0.0)
        if ENERGY == 1:
            f = 2.0 * acc - ra[:, None] - rb[None, :]
            dfdp = tl.full((BLOCK_M, BLOCK_N), 2.0, tl.float32)
        else:
            sq = ra[:, None] + rb[None, :] - 2.0 * acc
            inv = 1.0 / tl.sqrt(tl.maximum(sq, 0.0) + NORM_EPS)
            f = -(tl.maximum(sq, 0.0) + NORM_EPS) * inv
            dfdp = tl.where(sq > 0.0, inv, 0.0)
    return scale * f + bias, f, dfdp


@triton.jit
def _softplus_sigmoid(z):
    """softplus(z) and sigmoid(z) sharing one exp: e = exp(-|z|)."""
    e = tl.exp2(-tl.abs(z) * LOG2E)
    # log1p(e) without a log1p: the series is exact to float32 where 1 + e would round.
    log1p_e = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log2(1.0 + e) * LN2)
    r = 1.0 / (1.0 + e)
    return tl.maximum(z, 0.0) + log1p_e, tl.where(z >= 0.0, r, e * r)


@triton.jit
def _by_x(v, X_IS_A: tl.constexpr):
    """Broadcast a vector indexed by x-rows onto the tile: rows if A is x, else columns."""
    if X_IS_A:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def stats_kernel(
    A_ptr,
    B_ptr,
    RA_ptr,
    RB_ptr,
    SHIFT_ptr,
    SCALE_ptr,
    BIAS_ptr,
    LSE_ptr,
    SP_ptr,
    PAIR_ptr,
    ARGMAX_ptr,
    SUM_ptr,
    CORRECT_ptr,
    NA,
    NB,
    D,
    stride_a,
    stride_b,
    ENERGY: tl.constexpr,
    LSE: tl.constexpr,
    MASK_DIAG: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    PAIR: tl.constexpr,
    METRICS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < NA
    scale = tl.load(SCALE_ptr).to(tl.float32)
    bias = tl.load(BIAS_ptr).to(tl.float32)
    if PAIR != 0:
        shift = tl.load(SHIFT_ptr + rows, mask=row_mask, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    sp_i = tl.zeros((BLOCK_M,), tl.float32)
    pair_i = tl.zeros((BLOCK_M,), tl.float32)
    best_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    arg_i = tl.zeros((BLOCK_M,), tl.int32)
    sum_i = tl.zeros((BLOCK_M,), tl.float32)
    cnt_i = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, NB, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < NB
        logits, _, _ = _logits_tile(
            A_ptr,
            B_ptr,
            RA_ptr,
            RB_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            D,
            stride_a,
            stride_b,
            scale,
            bias,
            ENERGY,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            PRECISION,
        )
        valid = row_mask[:, None] & col_mask[None, :]
        diag = rows[:, None] == cols[None, :]
        if LSE:
            if MASK_DIAG:
                keep = valid & ~diag
            else:
                keep = valid
            z = tl.where(keep, logits * LOG2E, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_i = s_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(z - m_safe[:, None]), 1)
            m_i = m_new
        if SOFTPLUS:
            sp, _ = _softplus_sigmoid(logits)
            sp_i += tl.sum(tl.where(valid, sp, 0.0), 1)
        if PAIR != 0:
            u = logits - shift[:, None]
            if PAIR == 1:
                term, _ = _softplus_sigmoid(u)
            else:
                term = (u + 1.0) * (u + 1.0)
            pair_i += tl.sum(tl.where(valid & ~diag, term, 0.0), 1)
        if METRICS:
            lv = tl.where(valid, logits, float("-inf"))
            tile_best = tl.max(lv, 1)
            tile_arg = tl.argmax(lv, 1).to(tl.int32) + n0
            better = tile_best > best_i
            arg_i = tl.where(better, tile_arg, arg_i)
            best_i = tl.where(better, tile_best, best_i)
            sum_i += tl.sum(tl.where(valid, logits, 0.0), 1)
            hit = (logits > 0.0) == diag
            cnt_i += tl.sum(tl.where(valid & hit, 1.0, 0.0), 1)
    if LSE:
        # Rows past NA have s_i = 0; keep log2 finite there (they are never stored).
        lse = (m_i + tl.log2(tl.where(row_mask, s_i, 1.0))) * LN2
        tl.store(LSE_ptr + rows, lse, mask=row_mask)
    if SOFTPLUS:
        tl.store(SP_ptr + rows, sp_i, mask=row_mask)
    if PAIR != 0:
        tl.store(PAIR_ptr + rows, pair_i, mask=row_mask)
    if METRICS:
        tl.store(ARGMAX_ptr + rows, arg_i, mask=row_mask)
        tl.store(SUM_ptr + rows, sum_i, mask=row_mask)
        tl.store(CORRECT_ptr + rows, cnt_i, mask=row_mask)


@triton.jit
def grad_kernel(
    A_ptr,
    B_ptr,
    RA_ptr,
    RB_ptr,
    SHIFT_ptr,
    SCALE_ptr,
    BIAS_ptr,
    XLSE_ptr,
    YLSE_ptr,
    G_XLSE_ptr,
    G_YLSE_ptr,
    G_SP_ptr,
    G_PAIR_ptr,
    DA_ptr,
    DRA_ptr,
    DSHIFT_ptr,
    DSCALE_ptr,
    DBIAS_ptr,
    NA,
    NB,
    D,
    stride_a,
    stride_b,
    stride_da,
    ENERGY: tl.constexpr,
    X_IS_A: tl.constexpr,
    MASK_DIAG: tl.constexpr,
    XLSE: tl.constexpr,
    YLSE: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    PAIR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < NA
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds < D
    scale = tl.load(SCALE_ptr).to(tl.float32)
    bias = tl.load(BIAS_ptr).to(tl.float32)
    # Vectors that follow the outer (A) index are loaded once.
    if X_IS_A:
        if XLSE:
            xlse_o = tl.load(XLSE_ptr + rows, mask=row_mask, other=0.0)
            g_xlse_o = tl.load(G_XLSE_ptr + rows, mask=row_mask, other=0.0)
        if SOFTPLUS:
            g_sp_o = tl.load(G_SP_ptr + rows, mask=row_mask, other=0.0)
        if PAIR != 0:
            shift_o = tl.load(SHIFT_ptr + rows, mask=row_mask, other=0.0)
            g_pair_o = tl.load(G_PAIR_ptr + rows, mask=row_mask, other=0.0)
    else:
        if YLSE:
            ylse_o = tl.load(YLSE_ptr + rows, mask=row_mask, other=0.0)
            g_ylse_o = tl.load(G_YLSE_ptr + rows, mask=row_mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dra = tl.zeros((BLOCK_M,), tl.float32)
    dshift = tl.zeros((BLOCK_M,), tl.float32)
    dscale = tl.zeros((BLOCK_M,), tl.float32)
    dbias = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, NB, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < NB
        logits, f, dfdp = _logits_tile(
            A_ptr,
            B_ptr,
            RA_ptr,
            RB_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            D,
            stride_a,
            stride_b,
            scale,
            bias,
            ENERGY,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            PRECISION,
        )
        valid = row_mask[:, None] & col_mask[None, :]
        diag = rows[:, None] == cols[None, :]
        if MASK_DIAG:
            lse_keep = valid & ~diag
        else:
            lse_keep = valid
        g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if XLSE:
            if X_IS_A:
                xlse, g_xlse = xlse_o, g_xlse_o
            else:
                xlse = tl.load(XLSE_ptr + cols, mask=col_mask, other=0.0)
                g_xlse = tl.load(G_XLSE_ptr + cols, mask=col_mask, other=0.0)
            p = tl.exp2((logits - _by_x(xlse, X_IS_A)) * LOG2E)
            g += tl.where(lse_keep, _by_x(g_xlse, X_IS_A) * p, 0.0)
        if YLSE:
            if X_IS_A:
                ylse = tl.load(YLSE_ptr + cols, mask=col_mask, other=0.0)
                g_ylse = tl.load(G_YLSE_ptr + cols, mask=col_mask, other=0.0)
                p = tl.exp2((logits - ylse[None, :]) * LOG2E)
                g += tl.where(lse_keep, g_ylse[None, :] * p, 0.0)
            else:
                p = tl.exp2((logits - ylse_o[:, None]) * LOG2E)
                g += tl.where(lse_keep, g_ylse_o[:, None] * p, 0.0)
        if SOFTPLUS:
            if X_IS_A:
                g_sp = g_sp_o
            else:
                g_sp = tl.load(G_SP_ptr + cols, mask=col_mask, other=0.0)
            _, sig = _softplus_sigmoid(logits)
            g += tl.where(valid, _by_x(g_sp, X_IS_A) * sig, 0.0)
        if PAIR != 0:
            if X_IS_A:
                shift, g_pair = shift_o, g_pair_o
            else:
                shift = tl.load(SHIFT_ptr + cols, mask=col_mask, other=0.0)
                g_pair = tl.load(G_PAIR_ptr + cols, mask=col_mask, other=0.0)
            u = logits - _by_x(shift, X_IS_A)
            if PAIR == 1:
                _, dterm = _softplus_sigmoid(u)
            else:
                dterm = 2.0 * (u + 1.0)
            gp = tl.where(valid & ~diag, _by_x(g_pair, X_IS_A) * dterm, 0.0)
            g += gp
            if X_IS_A:
                dshift -= tl.sum(gp, 1)
        h = g * scale * dfdp
        b = tl.load(
            B_ptr + cols.to(tl.int64)[:, None] * stride_b + ds[None, :],
            mask=col_mask[:, None] & dmask[None, :],
            other=0.0,
        )
        acc = tl.dot(h.to(b.dtype), b, acc, input_precision=PRECISION)
        if ENERGY != 0:
            dra -= 0.5 * tl.sum(h, 1)
        if X_IS_A:
            dscale += tl.sum(g * f, 1)
            dbias += tl.sum(g, 1)
    tl.store(
        DA_ptr + rows.to(tl.int64)[:, None] * stride_da + ds[None, :],
        acc.to(DA_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dmask[None, :],
    )
    if pid_d == 0:
        if ENERGY != 0:
            tl.store(DRA_ptr + rows, dra, mask=row_mask)
        if X_IS_A:
            if PAIR != 0:
                tl.store(DSHIFT_ptr + rows, dshift, mask=row_mask)
            tl.store(DSCALE_ptr + pid, tl.sum(dscale, 0))
            tl.store(DBIAS_ptr + pid, tl.sum(dbias, 0))


# ----------------------------------------------------------------------------------- launchers


def _config(n_a: int, d: int) -> dict[str, int]:
    """Fixed tile shapes: the K loop covers d in chunks; BLOCK_D tiles the gradient's columns."""
    block_k = max(16, min(triton.next_power_of_2(d), 64))
    return {
        "BLOCK_M": 64 if n_a >= 64 else max(16, triton.next_power_of_2(n_a)),
        "BLOCK_N": 64,
        "BLOCK_K": block_k,
        "BLOCK_D": max(16, min(triton.next_power_of_2(d), 128)),
    }


def _precision(dtype: torch.dtype) -> str:
    """tf32 for float32 only when torch's matmul precision setting allows it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def stats(
    a: torch.Tensor,
    b: torch.Tensor,
    ra: torch.Tensor,
    rb: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    energy: int,
    lse: bool,
    mask_diag: bool,
    softplus: bool,
    pair: int,
    metrics: bool,
) -> tuple[torch.Tensor, ...]:
    """Row statistics of the logits of (a, b): (lse, softplus, pair, argmax, sum, correct).

    Statistics that are not asked for come back as empty tensors.
    """
    n_a, d = a.shape
    n_b = b.shape[0]
    cfg = _config(n_a, d)
    f32 = {"dtype": torch.float32, "device": a.device}

    def out(flag: bool, **kw) -> torch.Tensor:
        return torch.empty(n_a if flag else 0, **(kw or f32))

    lse_o, sp_o, pair_o = out(lse), out(softplus), out(pair != 0)
    arg_o = out(metrics, dtype=torch.int32, device=a.device)
    sum_o, cnt_o = out(metrics), out(metrics)
    grid = (triton.cdiv(n_a, cfg["BLOCK_M"]),)
    stats_kernel[grid](
        a,
        b,
        ra,
        rb,
        shift,
        scale,
        bias,
        lse_o,
        sp_o,
        pair_o,
        arg_o,
        sum_o,
        cnt_o,
        n_a,
        n_b,
        d,
        a.stride(0),
        b.stride(0),
        ENERGY=energy,
        LSE=lse,
        MASK_DIAG=mask_diag,
        SOFTPLUS=softplus,
        PAIR=pair,
        METRICS=metrics,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        PRECISION=_precision(a.dtype),
    )
    return lse_o, sp_o, pair_o, arg_o, sum_o, cnt_o


def grad(
    a: torch.Tensor,
    b: torch.Tensor,
    ra: torch.Tensor,
    rb: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    xlse: torch.Tensor,
    ylse: torch.Tensor,
    g_xlse: torch.Tensor,
    g_ylse: torch.Tensor,
    g_sp: torch.Tensor,
    g_pair: torch.Tensor,
    *,
    energy: int,
    x_is_a: bool,
    mask_diag: bool,
    pair: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient for the rows of ``a``: (da, dra, dshift, dscale_partials, dbias_partials).

    A gradient term is active when its upstream gradient is non-empty. ``dshift`` and the
    dscale/dbias partials are only produced when ``x_is_a``; otherwise they come back empty.
    """
    n_a, d = a.shape
    n_b = b.shape[0]
    cfg = _config(n_a, d)
    n_prog = triton.cdiv(n_a, cfg["BLOCK_M"])
    f32 = {"dtype": torch.float32, "device": a.device}
    pair = pair if g_pair.numel() > 0 else 0
    da = torch.empty_like(a)
    dra = torch.empty(n_a if energy != 0 else 0, **f32)
    dshift = torch.empty(n_a if (x_is_a and pair != 0) else 0, **f32)
    dscale = torch.empty(n_prog if x_is_a else 0, **f32)
    dbias = torch.empty(n_prog if x_is_a else 0, **f32)
    grid = (n_prog, triton.cdiv(d, cfg["BLOCK_D"]))
    grad_kernel[grid](
        a,
        b,
        ra,
        rb,
        shift,
        scale,
        bias,
        xlse,
        ylse,
        g_xlse,
        g_ylse,
        g_sp,
        g_pair,
        da,
        dra,
        dshift,
        dscale,
        dbias,
        n_a,
        n_b,
        d,
        a.stride(0),
        b.stride(0),
        da.stride(0),
        ENERGY=energy,
        X_IS_A=x_is_a,
        MASK_DIAG=mask_diag,
        XLSE=g_xlse.numel() > 0,
        YLSE=g_ylse.numel() > 0,
        SOFTPLUS=g_sp.numel() > 0,
        PAIR=pair,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_D=cfg["BLOCK_D"],
        PRECISION=_precision(a.dtype),
    )
    return da, dra, dshift, dscale, dbias
