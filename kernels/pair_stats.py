"""Triton kernels for per-row / per-column statistics of a logit matrix that is never stored.

The logits are ``L_ij = scale * f(P_ij, ra_i, rb_j) + bias`` with ``P = A @ B.T`` (tensor cores)
and ``f`` one of three energies of the inner product and the squared row norms ``ra``, ``rb``:

    ENERGY 0 (dot):  f = P
    ENERGY 1 (l2):   f = 2P - ra - rb
    ENERGY 2 (norm): f = -sqrt(max(ra + rb - 2P, 0) + 1e-6)

The diagonal i == j is special: there |x_i - y_i| can be far below |x_i| and |y_i|, and the
expanded form above loses it to cancellation. So the diagonal never comes from a tile: the exact
positives ``pos_i = L_ii`` (from x_i - y_i, O(B d), computed by the caller) replace it in every
statistic; the gradient tiles leave it out, and each program adds the diagonal's share from its
paired rows, H_ii (B_i - A_i), with the exact H_ii the caller passes (one float per row).

Forward (``stats_kernel``), one program per BLOCK_M rows of A, looping over all rows of B:
    max_i      = max_j L_ij,  lse_i = logsumexp_j L_ij - max_i      (j != i when MASK_DIAG)
    softplus_i = sum_j softplus(L_ij)
    pair_i     = sum_{j != i} softplus(u_ij)  or  (u_ij + 1)^2,   u_ij = L_ij - L_ii  (PAIR 1/2)
    slope_i    = sum_{j != i} sigmoid(u_ij)   or  2 (u_ij + 1)    (d pair_i / d u_ij; PAIR 1/2)
                 FB (PAIR 3): L_ij^2 / 2 and SPPO (PAIR 4): (L_ij + 1)^2 take u_ij = L_ij, no shift,
                 so no slope sum: their diagonal terms are the caller's, from L_ii
    metrics: argmax_j L_ij, sum_j L_ij, #{j : (L_ij > 0) == (i == j)}
With ONLINE (row lse only, d <= BLOCK_D), also the softmax-weighted sums, p_ij = exp(L_ij - lse_i):
    U_i = sum_{j != i} p_ij f'_ij B_j,  V_i = sum_{j != i} p_ij f'_ij,  W_i = sum_{j != i} p_ij f_ij
accumulated online with the running max (as flash attention does), so that the off-diagonal
row-lse part of dA_i is g_lse_i scale (U_i - [l2, norm] V_i A_i) without a pass over the rows.
Column statistics are row statistics of the transpose: launch with A and B swapped.
Each logsumexp is stored as the row's largest logit max_i (0 for a row with none) and the rest,
lse_i, a number of order log M whose float32 rounding is ~1e-7: one float32 logsumexp of 1e4 is
2**-11 off, and so would every softmax weight of backward be.

Backward (``grad_kernel``): with upstream gradients of those statistics the logit gradient is
    G_ij = g_rlse_i exp(L_ij - rmax_i - rlse_i) + g_clse_j exp(L_ij - cmax_j - clse_j)
           + g_sp_i sigmoid(L_ij)
           + g_pair_i dpair(u_ij)                                          (i != j only)
With H = G * df/dP (and df/dra = -df/dP / 2 for l2 and norm, d ra / dA = 2A):
    dA_i = scale (sum_j H_ij B_j - A_i sum_j H_ij [l2, norm]),  dscale = sum G f,  dbias = sum G.
``scale`` multiplies the program's sums once, not every logit. One launch with A = x gives dx
and, with DSCALE, per-program partials of dscale/dbias; one with A = y gives dy (X_IS_A = False
flips which index the x-indexed vectors follow). No atomics (but see DB_ATOMIC below):
deterministic.
The caller passes the diagonal's H_ii (exact, O(B)); each program adds H_ii (B_i - A_i) (l2, norm)
or H_ii B_i (dot) from the loaded rows themselves, so dA is accumulated in float32 and rounded once
to the input dtype when stored. The tile H is rounded to the input dtype before its tensor-core
product, as flash attention does.

Each program walks its column tiles in two phases: first the interior tiles, full and off the
diagonal band, whose validity and diagonal masks are constants the compiler folds away (their
loads keep their bounds checks); then the checked ones (the band, the partial last tile, every
tile when the program's rows run past NA). Statistics do not
depend on the order (argmax takes the first index among ties, as torch.argmax does).

The sigmoid loss and the pair losses (DPO / IPO / FB / SPPO) need no statistic before their
gradients, so with FWD the x-launch of ``grad_kernel`` also sums their terms off the diagonal
(softplus(L_ij) from the exp it already has): loss and both gradients then take two passes over
the logits instead of three. With DB_ATOMIC
(experimental, ``CRL_FAST_SINGLE_PASS=1``; d in one tile) that launch also adds each tile's
H.T @ A to a float32 dB with atomics, so one pass gives everything: the column pass's logits
product and special-function work (2 MUFU ops per logit of its 5 in all) are saved, at the
price of one atomic float per two logits (128-row programs) and last bits of dB that vary from
run to run. Programs then start their column loop at different tiles, to spread the atomics.

The launchers at the end take their tile shapes, and the experimental options' switches, from
``pair_stats_tiling.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from crl_fast.checks import on_device
from crl_fast.energy import NORM_EPS as _NORM_EPS
from crl_fast.kernels import check_unit_column_stride, dot, interpreting, runs_on_cpu
from crl_fast.kernels import pair_stats_tiling as tiling
from crl_fast.kernels.dot import round_to_bfloat16, round_to_tf32
from crl_fast.kernels.grid import cdiv, next_power_of_2
from crl_fast.pair_stats_torch import shifted_pair

ONLINE_MAX_D = 128
"""The online row sums keep a (BLOCK_M, d) accumulator in registers: d up to this."""

# Globals read inside @triton.jit must be constexpr: the compiler rejects plain floats (the
# interpreter does not, so only a real compile catches it; tests/test_kernels_compile.py does).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NORM_EPS = tl.constexpr(_NORM_EPS)


@triton.jit
def _energy(p, ra, rb, scale, bias, ENERGY: tl.constexpr):
    """Logits, energy and dL/dP slope (before ``scale``) from inner products; float32.

    Symmetric in (ra, rb) to the last bit (ra + rb, never ra - rb or ra + eps first): a launch
    with A = y (column statistics, dy) must form each logit as the launch with A = x rounded
    it, or the softmax weights exp(L - lse) of one pass take the other's lse off by the
    rounding (a dominant logit's weight 1 - 8e-3, tests/test_loss.py's transposed pass)."""
    if ENERGY == 0:
        f = p
        dfdp = tl.full(p.shape, 1.0, tl.float32)
    elif ENERGY == 1:
        f = 2.0 * p - (ra + rb)
        dfdp = tl.full(p.shape, 2.0, tl.float32)
    else:
        # max(|x - y|^2, 0) + eps as torch's energy_and_slope rounds it; a NaN stays NaN
        # (tl.maximum's default returns the other operand)
        sq = (ra + rb) - 2.0 * p
        q = tl.maximum(sq, 0.0, propagate_nan=tl.PropagateNan.ALL) + NORM_EPS
        inv = tl.math.rsqrt(q)  # one special-function op gives both the root and its inverse
        f = -q * inv
        dfdp = tl.where(sq > 0.0, inv, 0.0)
    return scale * f + bias, f, dfdp


@triton.jit
def _tile_count(phase: tl.constexpr, r0, NA, NB, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """How many column tiles a program with rows r0.. visits in ``phase``: 0, the full tiles
    off the diagonal band when all its rows are valid; 1, the rest (checked with masks)."""
    n_full = NB // BLOCK_N
    band = tl.minimum(tl.cdiv(r0 + BLOCK_M, BLOCK_N), n_full) - tl.minimum(r0 // BLOCK_N, n_full)
    rows_ok = r0 + BLOCK_M <= NA
    if phase == 0:
        return tl.where(rows_ok, n_full - band, 0)
    else:
        return tl.where(rows_ok, band, n_full) + tl.cdiv(NB, BLOCK_N) - n_full


@triton.jit
def _tile_start(t, phase: tl.constexpr, r0, NA, NB, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """First column of the ``t``-th tile of ``phase`` (see :func:`_tile_count`): phase 0 skips
    the band of tiles [lo, hi) that hold the diagonal; phase 1 visits that band, then the partial
    last tile, or every tile in order when some rows are past NA."""
    n_full = NB // BLOCK_N
    lo = tl.minimum(r0 // BLOCK_N, n_full)
    hi = tl.minimum(tl.cdiv(r0 + BLOCK_M, BLOCK_N), n_full)
    if phase == 0:
        c = t + tl.where(t >= lo, hi - lo, 0)
    else:
        c = tl.where(r0 + BLOCK_M <= NA, tl.where(t < hi - lo, lo + t, n_full), t)
    return c * BLOCK_N


@triton.jit
def _load_rows(ptr, idx, mask, ks, D, stride, UPCAST: tl.constexpr):
    """Rows ``idx`` and columns ``ks`` of a row-major matrix, zero outside (float32 if UPCAST)."""
    t = tl.load(
        ptr + idx.to(tl.int64)[:, None] * stride + ks[None, :],
        mask=mask[:, None] & (ks < D)[None, :],
        other=0.0,
    )
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _tile_rows(
    ptr, desc, start, idx, mask, BLOCK_K: tl.constexpr, D, stride, TMA: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Rows ``idx`` (= start + arange) of a row-major matrix, its first BLOCK_K columns, zero
    outside: through the tensor descriptor with TMA (the copy engine zero-fills rows past the
    end and columns past D), else by masked pointer loads; float32 if UPCAST."""
    if TMA:
        t = desc.load([start, 0])
        if UPCAST:
            t = t.to(tl.float32)
        return t
    else:
        return _load_rows(ptr, idx, mask, tl.arange(0, BLOCK_K), D, stride, UPCAST)


@triton.jit
def _program_rows(
    A_ptr, A_desc, r0, rows, row_mask, D, stride_a, BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The program's A rows, loaded once (SINGLE_K; through the tensor descriptor with TMA),
    else a placeholder: K is then chunked."""
    if SINGLE_K:
        return _tile_rows(A_ptr, A_desc, r0, rows, row_mask, BLOCK_K, D, stride_a, TMA, UPCAST)
    else:
        return tl.zeros((1, 1), tl.float32)


@triton.jit
def _logits_tile(
    a_rows, A_ptr, B_ptr, B_desc, RA_ptr, RB_ptr, rows, n0, cols, row_mask, col_mask, D,
    stride_a, stride_b, scale, bias, ENERGY: tl.constexpr, MASK_DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr, CHECK: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Logits, energy values and dL/dP for one (BLOCK_M, BLOCK_N) tile, with its masks (valid
    entries, the diagonal i == j, the entries the logsumexp keeps) and the B rows it loaded.

    SINGLE_K (d <= BLOCK_K): ``a_rows`` holds the program's A rows, loaded once before the loop
    over column tiles, and the B tile comes back for the caller's second product; the column loop
    is then the innermost loop, the one Triton's pipeliner overlaps with the loads ahead. Else K
    is walked in BLOCK_K chunks (A reloaded per tile) and no B tile comes back."""
    if SINGLE_K:
        b = _tile_rows(B_ptr, B_desc, n0, cols, col_mask, BLOCK_K, D, stride_b, TMA, UPCAST)
        acc = tl.dot(a_rows, tl.trans(b), input_precision=PRECISION, out_dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a_k = _load_rows(A_ptr, rows, row_mask, ks, D, stride_a, UPCAST)
            b_k = _load_rows(B_ptr, cols, col_mask, ks, D, stride_b, UPCAST)
            acc = tl.dot(a_k, tl.trans(b_k), acc, input_precision=PRECISION)
        b = tl.zeros((1, 1), tl.float32)  # unused: the caller loads B's rows by BLOCK_D
    ra = tl.zeros((BLOCK_M,), tl.float32)
    rb = tl.zeros((BLOCK_N,), tl.float32)
    if ENERGY != 0:
        ra = tl.load(RA_ptr + rows, mask=row_mask, other=0.0)
        rb = tl.load(RB_ptr + cols, mask=col_mask, other=0.0)
    logits, f, dfdp = _energy(acc, ra[:, None], rb[None, :], scale, bias, ENERGY)
    if CHECK:
        valid = row_mask[:, None] & col_mask[None, :]
        diag = rows[:, None] == cols[None, :]
    else:  # an interior tile: constant masks, which the compiler folds away
        valid = tl.full((BLOCK_M, BLOCK_N), True, tl.int1)
        diag = tl.full((BLOCK_M, BLOCK_N), False, tl.int1)
    if MASK_DIAG:
        keep = valid & ~diag
    else:
        keep = valid
    return logits, f, dfdp, valid, diag, keep, b


@triton.jit
def _weighted_rows(
    w, b_rows, B_ptr, cols, col_mask, ds, D, stride_b, acc, SINGLE_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """(``acc + w @ B[cols, ds]``, the weights as the product took them): the tile's weights
    rounded to B's dtype for the tensor cores (as flash attention rounds P), B's rows reused
    from the logits' product when SINGLE_K. float16 is the exception (see ``_tile_weights``).
    A sum of the weights that must cancel against the product (l2 and norm:
    sum_j w_ij (B_j - A_i)) sums the rounded ones: the unrounded sum leaves an error of 2**-9
    |B_j| per weight in bfloat16, large next to a small |B_j - A_i| (two goals close by)."""
    if SINGLE_K:
        b = b_rows
    else:
        b = _load_rows(B_ptr, cols, col_mask, ds, D, stride_b, UPCAST)
    w_in, b = _tile_weights(w, b, UPCAST)
    return tl.dot(w_in, b, acc, input_precision=PRECISION), w_in.to(tl.float32)


@triton.jit
def _tile_weights(w, rows, UPCAST: tl.constexpr):
    """The float32 weights ``w`` and the input rows ``rows`` they multiply, as the tensor cores
    take them: ``w`` rounded to the rows' dtype (bfloat16 under the interpreter: rounded, then
    both in float32, see ``dot.upcast``), except for float16 rows. A float16 weight overflows past
    65504 (IPO's slope has no bound) and flushes below 6e-8 (a small loss weight), so float16
    products run in tf32 (the precision float16 inputs get): float32's range, float16's 10-bit
    mantissa; ``w`` is rounded to it here, so that its sums match the product."""
    if rows.dtype == tl.float16:  # (one return: Triton compiles code after a returning branch)
        w_in = round_to_tf32(w)
        rows_in = rows.to(tl.float32)
    else:
        w_in = round_to_bfloat16(w) if UPCAST else w.to(rows.dtype)
        rows_in = rows
    return w_in, rows_in


if interpreting():  # the interpreter has no libdevice

    @triton.jit
    def _log2_approx(x):
        return tl.log2(x)

    @triton.jit
    def _div_approx(x, y):
        return x / y

else:

    @triton.jit
    def _log2_approx(x):
        """log2 in one special-function op (lg2.approx: absolute error below 2**-22 on [1, 2]);
        ``tl.log2`` is libdevice's exact log2f, about 25 instructions per element."""
        return libdevice.fast_log2f(x)

    @triton.jit
    def _div_approx(x, y):
        """x / y as one reciprocal and a multiply (div.approx, 2 ulp) for y in [1, 2]; ``/`` is
        div.full, whose range checks add three instructions per element."""
        return libdevice.fast_dividef(x, y)


@triton.jit
def _softplus_sigmoid(z):
    """softplus(z) and sigmoid(z) sharing one exp: e = exp(-|z|), 1 + e in [1, 2]."""
    e = tl.exp2(-tl.abs(z) * LOG2E)
    # log1p(e) without a log1p. log2(1 + e) is off by 2**-24 (1 + e rounded) plus 2**-22 on a
    # GPU (lg2.approx's absolute error): relative errors of 2**-22 / e, 2e-3 at e = 1e-4. Below
    # 1/16, five terms of the series keep float32's relative precision (e**5 / 6 < 2e-7).
    series = e * (1.0 - e * (0.5 - e * (0.3333333333333333 - e * (0.25 - 0.2 * e))))
    log1p_e = tl.where(e < 0.0625, series, _log2_approx(1.0 + e) * LN2)
    sigmoid = _div_approx(tl.where(z >= 0.0, 1.0, e), 1.0 + e)
    return tl.maximum(z, 0.0) + log1p_e, sigmoid


@triton.jit
def _softmax_weight(logits, offset, neg_lse2):
    """exp((L - offset) - lse) from the tile's logits, rounded as the statistics pass rounded
    those it took its largest, ``offset``, and lse from, so that a row's one dominant logit
    weighs 1, as in eager PyTorch; ``neg_lse2`` is ``-lse * LOG2E``, once per row, so that a
    logit takes one FADD and one FFMA. Folding the bias into the shift,
    ``scale f + (bias - offset)``, would round ``bias - offset`` on its own: a weight up to
    |offset| 2**-24 off, 1.2e-4 at |L| ~ 1500 (tests/test_loss.py's rounding tie)."""
    return tl.exp2(tl.fma(logits - offset, LOG2E, neg_lse2))


@triton.jit
def _pair_term(logits, pos, PAIR: tl.constexpr):
    """An off-diagonal pair term and its slope d/dL_ij. DPO (PAIR 1): softplus(u) and sigmoid(u);
    IPO (PAIR 2): (u + 1)^2 and 2 (u + 1), with u = L_ij - L_ii (``pos``); FB (PAIR 3): L_ij^2 / 2
    and L_ij; SPPO (PAIR 4): (L_ij + 1)^2 and 2 (L_ij + 1), of the logit alone (``pos`` unused)."""
    if PAIR == 1:
        term, slope = _softplus_sigmoid(logits - pos)
    elif PAIR == 3:
        term = 0.5 * logits * logits
        slope = logits
    else:
        u = logits - pos if PAIR == 2 else logits
        term = (u + 1.0) * (u + 1.0)
        slope = 2.0 * (u + 1.0)
    return term, slope


@triton.jit
def _by_x(v, X_IS_A: tl.constexpr):
    """Broadcast a vector indexed by x-rows onto the tile: rows if A is x, else columns."""
    if X_IS_A:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def stats_kernel(
    A_ptr, B_ptr, A_desc, B_desc, RA_ptr, RB_ptr, SCALE_ptr, BIAS_ptr, POS_ptr,
    LSE_ptr, MAX_ptr, SP_ptr, PAIR_ptr, SLOPE_ptr, ARGMAX_ptr, SUM_ptr, CORRECT_ptr,
    U_ptr, V_ptr, W_ptr,
    NA, NB, NPOS, D, stride_a, stride_b,
    ENERGY: tl.constexpr, LSE: tl.constexpr, MASK_DIAG: tl.constexpr,
    SOFTPLUS: tl.constexpr, PAIR: tl.constexpr, METRICS: tl.constexpr, ONLINE: tl.constexpr,
    ONLINE_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, SINGLE_K: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < NA
    scale = tl.load(SCALE_ptr).to(tl.float32)
    bias = tl.load(BIAS_ptr).to(tl.float32)
    # The exact positives replace the tiles' diagonal (on it, row index = column index).
    pos = tl.load(POS_ptr + rows, mask=rows < NPOS, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    sp_i = tl.zeros((BLOCK_M,), tl.float32)
    pair_i = tl.zeros((BLOCK_M,), tl.float32)
    slope_i = tl.zeros((BLOCK_M,), tl.float32)
    best_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    arg_i = tl.zeros((BLOCK_M,), tl.int32)
    sum_i = tl.zeros((BLOCK_M,), tl.float32)
    cnt_i = tl.zeros((BLOCK_M,), tl.float32)
    ds = tl.arange(0, BLOCK_D)
    a_rows = _program_rows(
        A_ptr, A_desc, pid * BLOCK_M, rows, row_mask, D, stride_a, BLOCK_K, SINGLE_K, TMA, UPCAST
    )
    u_acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    v_acc = tl.zeros((BLOCK_M,), tl.float32)
    w_acc = tl.zeros((BLOCK_M,), tl.float32)
    # Interior tiles first, without masks (every entry valid, none on the diagonal), then
    # the checked ones: the diagonal band, the last partial tile, all tiles of partial rows.
    for phase in tl.static_range(2):
        r0 = pid * BLOCK_M
        for t in range(0, _tile_count(phase, r0, NA, NB, BLOCK_M, BLOCK_N)):
            n0 = _tile_start(t, phase, r0, NA, NB, BLOCK_M, BLOCK_N)
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < NB
            logits, f, dfdp, valid, diag, keep, b_rows = _logits_tile(
                a_rows, A_ptr, B_ptr, B_desc, RA_ptr, RB_ptr, rows, n0, cols, row_mask, col_mask,
                D, stride_a, stride_b, scale, bias, ENERGY, MASK_DIAG, BLOCK_M, BLOCK_N, BLOCK_K,
                SINGLE_K, phase == 1, PRECISION, TMA, UPCAST,
            )  # fmt: skip
            logits = tl.where(diag, pos[:, None], logits)
            if LSE:
                # Subtract the running max before going to base 2: scaling large logits first
                # would round away their low bits (|L| ~ 1e4 loses 1e-3).
                z = tl.where(keep, logits, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(z, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2((m_i - m_safe) * LOG2E)
                e = tl.exp2((z - m_safe[:, None]) * LOG2E)
                s_i = s_i * alpha + tl.sum(e, 1)
                if ONLINE:  # softmax-weighted sums for dA, rescaled as the running max moves
                    e = tl.where(diag, 0.0, e)  # the diagonal's share is added exactly outside
                    w = e * dfdp
                    u_acc, w_used = _weighted_rows(
                        w, b_rows, B_ptr, cols, col_mask, ds, D, stride_b, u_acc * alpha[:, None],
                        SINGLE_K, PRECISION, UPCAST,
                    )  # fmt: skip
                    if ENERGY != 0:  # V serves l2 and norm only (see _online_dx)
                        v_acc = v_acc * alpha + tl.sum(w_used, 1)
                    if ONLINE_W:  # for dscale only
                        w_acc = w_acc * alpha + tl.sum(e * f, 1)
                m_i = m_new
            if SOFTPLUS:
                sp, _ = _softplus_sigmoid(logits)
                sp_i += tl.sum(tl.where(valid & ~diag, sp, 0.0), 1)  # L_ii: the caller's
            if PAIR != 0:
                term, slope = _pair_term(logits, pos[:, None], PAIR)
                off = valid & ~diag
                pair_i += tl.sum(tl.where(off, term, 0.0), 1)
                if PAIR < 3:  # the shift's share of the diagonal's gradient (DPO / IPO)
                    slope_i += tl.sum(tl.where(off, slope, 0.0), 1)
            if METRICS:
                lv = tl.where(valid, logits, float("-inf"))
                tile_best = tl.max(lv, 1)  # NaN-skipping, NaN only for a row of NaN
                # The first column holding the max, as torch.argmax takes (max and compare:
                # the interpreter's tl.argmax raises on a row of NaN).
                tile_arg = tl.min(tl.where(lv == tile_best[:, None], cols[None, :], NB), 1)
                # The first index among ties, as torch.argmax, whatever the order of tiles.
                better = (tile_best > best_i) | ((tile_best == best_i) & (tile_arg < arg_i))
                arg_i = tl.where(better, tile_arg, arg_i)
                best_i = tl.where(better, tile_best, best_i)
                sum_i += tl.sum(tl.where(valid, logits, 0.0), 1)
                hit = (logits > 0.0) == diag
                cnt_i += tl.sum(tl.where(valid & hit, 1.0, 0.0), 1)
    if LSE:
        # Rows past NA have s_i = 0; keep log2 finite there (they are never stored).
        s_safe = tl.where(row_mask, s_i, 1.0)
        # s_i sums exp(L - m) from the largest logit m (0 where none): lse less m, and m apart
        tl.store(LSE_ptr + rows, tl.log2(s_safe) * LN2, mask=row_mask)
        tl.store(MAX_ptr + rows, tl.where(m_i == float("-inf"), 0.0, m_i), mask=row_mask)
        if ONLINE:
            u_ptrs = U_ptr + rows.to(tl.int64)[:, None] * D + ds[None, :]
            u_mask = row_mask[:, None] & (ds < D)[None, :]
            tl.store(u_ptrs, u_acc / s_safe[:, None], mask=u_mask)
            tl.store(V_ptr + rows, v_acc / s_safe, mask=row_mask)
            if ONLINE_W:
                tl.store(W_ptr + rows, w_acc / s_safe, mask=row_mask)
    if SOFTPLUS:
        tl.store(SP_ptr + rows, sp_i, mask=row_mask)
    if PAIR != 0:
        tl.store(PAIR_ptr + rows, pair_i, mask=row_mask)
        if PAIR < 3:
            tl.store(SLOPE_ptr + rows, slope_i, mask=row_mask)
    if METRICS:
        tl.store(ARGMAX_ptr + rows, arg_i, mask=row_mask)
        tl.store(SUM_ptr + rows, sum_i, mask=row_mask)
        tl.store(CORRECT_ptr + rows, cnt_i, mask=row_mask)


@triton.jit
def _add_column_grads(
    h, a_rows, DB_ptr, HCOL_ptr, cols, col_mask, ds, D, ENERGY: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``DB[cols] += H.T @ A[rows]`` and, for l2 / norm, ``HCOL[cols] += sum_i H_ij``, with
    float32 atomics (SINGLE_K: the program's A rows are ``a_rows``). The caller finishes dB_j as
    ``scale (DB_j - [l2, norm] B_j HCOL_j)`` plus the diagonal."""
    h_in, a_in = _tile_weights(h, a_rows, UPCAST)
    db = tl.dot(tl.trans(h_in), a_in, input_precision=PRECISION, out_dtype=tl.float32)
    db_ptrs = DB_ptr + cols.to(tl.int64)[:, None] * D + ds[None, :]
    tl.atomic_add(db_ptrs, db, mask=col_mask[:, None] & (ds < D)[None, :], sem="relaxed")
    if ENERGY != 0:  # the weights as the product took them (see _weighted_rows)
        hcol = tl.sum(h_in.to(tl.float32), 0)
        tl.atomic_add(HCOL_ptr + cols, hcol, mask=col_mask, sem="relaxed")


@triton.jit
def grad_kernel(
    A_ptr, B_ptr, A_desc, B_desc, RA_ptr, RB_ptr, SCALE_ptr, BIAS_ptr,
    POS_ptr, XLSE_ptr, YLSE_ptr, XMAX_ptr, YMAX_ptr, G_XLSE_ptr, G_YLSE_ptr, G_SP_ptr,
    G_PAIR_ptr, HD_ptr,
    DA_ptr, DSCALE_ptr, DBIAS_ptr, SP_ptr, PS_ptr, DB_ptr, HCOL_ptr,
    NA, NB, NHD, D, stride_a, stride_b, stride_da,
    ENERGY: tl.constexpr, X_IS_A: tl.constexpr, MASK_DIAG: tl.constexpr, FWD: tl.constexpr,
    HAS_HD: tl.constexpr, DSCALE: tl.constexpr, DB_ATOMIC: tl.constexpr,
    XLSE: tl.constexpr, YLSE: tl.constexpr, SOFTPLUS: tl.constexpr, PAIR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, SINGLE_K: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < NA
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds < D
    scale = tl.load(SCALE_ptr).to(tl.float32)
    bias = tl.load(BIAS_ptr).to(tl.float32)
    # x-indexed vectors follow the outer index when A is x (loaded once), else the inner one.
    if X_IS_A:
        if XLSE:
            xlse_o = tl.load(XLSE_ptr + rows, mask=row_mask, other=0.0) * -LOG2E
            xmax_o = tl.load(XMAX_ptr + rows, mask=row_mask, other=0.0)
            g_xlse_o = tl.load(G_XLSE_ptr + rows, mask=row_mask, other=0.0)
        if SOFTPLUS:
            g_sp_o = tl.load(G_SP_ptr + rows, mask=row_mask, other=0.0)
        if PAIR != 0:
            if PAIR < 3:  # DPO / IPO: u_ij = L_ij - L_ii
                pos_o = tl.load(POS_ptr + rows, mask=row_mask, other=0.0)
            else:
                pos_o = tl.zeros((BLOCK_M,), tl.float32)  # unused: FB / SPPO take L_ij alone
            g_pair_o = tl.load(G_PAIR_ptr + rows, mask=row_mask, other=0.0)
    else:
        if YLSE:
            ylse_o = tl.load(YLSE_ptr + rows, mask=row_mask, other=0.0) * -LOG2E
            ymax_o = tl.load(YMAX_ptr + rows, mask=row_mask, other=0.0)
            g_ylse_o = tl.load(G_YLSE_ptr + rows, mask=row_mask, other=0.0)
    a_rows = _program_rows(
        A_ptr, A_desc, pid * BLOCK_M, rows, row_mask, D, stride_a, BLOCK_K, SINGLE_K, TMA, UPCAST
    )
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    h_sum = tl.zeros((BLOCK_M,), tl.float32)
    dscale = tl.zeros((BLOCK_M,), tl.float32)
    dbias = tl.zeros((BLOCK_M,), tl.float32)
    sp_i = tl.zeros((BLOCK_M,), tl.float32)
    ps_i = tl.zeros((BLOCK_M,), tl.float32)
    # Interior tiles first, without masks (every entry valid, none on the diagonal), then
    # the checked ones: the diagonal band, the last partial tile, all tiles of partial rows.
    for phase in tl.static_range(2):
        r0 = pid * BLOCK_M
        n_tiles = _tile_count(phase, r0, NA, NB, BLOCK_M, BLOCK_N)
        for t in range(0, n_tiles):
            tile = t
            if DB_ATOMIC and phase == 0:  # programs start on different tiles: fewer collisions
                tile = (t + pid) % n_tiles
            n0 = _tile_start(tile, phase, r0, NA, NB, BLOCK_M, BLOCK_N)
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < NB
            logits, f, dfdp, valid, diag, lse_keep, b_rows = _logits_tile(
                a_rows, A_ptr, B_ptr, B_desc, RA_ptr, RB_ptr, rows, n0, cols, row_mask, col_mask,
                D, stride_a, stride_b, scale, bias, ENERGY, MASK_DIAG, BLOCK_M, BLOCK_N, BLOCK_K,
                SINGLE_K, phase == 1, PRECISION, TMA, UPCAST,
            )  # fmt: skip
            g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            if XLSE:  # (lse times -LOG2E: see _softmax_weight)
                if X_IS_A:
                    xlse, xmax, g_xlse = xlse_o, xmax_o, g_xlse_o
                else:
                    xlse = tl.load(XLSE_ptr + cols, mask=col_mask, other=0.0) * -LOG2E
                    xmax = tl.load(XMAX_ptr + cols, mask=col_mask, other=0.0)
                    g_xlse = tl.load(G_XLSE_ptr + cols, mask=col_mask, other=0.0)
                p = _softmax_weight(logits, _by_x(xmax, X_IS_A), _by_x(xlse, X_IS_A))
                g += tl.where(lse_keep, _by_x(g_xlse, X_IS_A) * p, 0.0)
            if YLSE:
                if X_IS_A:
                    ylse = tl.load(YLSE_ptr + cols, mask=col_mask, other=0.0) * -LOG2E
                    ymax = tl.load(YMAX_ptr + cols, mask=col_mask, other=0.0)
                    g_ylse = tl.load(G_YLSE_ptr + cols, mask=col_mask, other=0.0)
                    p = _softmax_weight(logits, ymax[None, :], ylse[None, :])
                    g += tl.where(lse_keep, g_ylse[None, :] * p, 0.0)
                else:
                    p = _softmax_weight(logits, ymax_o[:, None], ylse_o[:, None])
                    g += tl.where(lse_keep, g_ylse_o[:, None] * p, 0.0)
            if SOFTPLUS:
                if X_IS_A:
                    g_sp = g_sp_o
                else:
                    g_sp = tl.load(G_SP_ptr + cols, mask=col_mask, other=0.0)
                sp, sig = _softplus_sigmoid(logits)
                g += tl.where(valid, _by_x(g_sp, X_IS_A) * sig, 0.0)
                if FWD:  # the loss's own statistic, from the same exp (off the diagonal)
                    sp_i += tl.sum(tl.where(valid & ~diag, sp, 0.0), 1)
            if PAIR != 0:
                if X_IS_A:
                    pos, g_pair = pos_o, g_pair_o
                else:
                    if PAIR < 3:
                        pos = tl.load(POS_ptr + cols, mask=col_mask, other=0.0)
                    else:
                        pos = tl.zeros((BLOCK_N,), tl.float32)  # unused (see _pair_term)
                    g_pair = tl.load(G_PAIR_ptr + cols, mask=col_mask, other=0.0)
                term, slope = _pair_term(logits, _by_x(pos, X_IS_A), PAIR)
                g += tl.where(valid & ~diag, _by_x(g_pair, X_IS_A) * slope, 0.0)
                if FWD:  # the loss's own statistics (its value, the diagonal's slope sum)
                    sp_i += tl.sum(tl.where(valid & ~diag, term, 0.0), 1)
                    if PAIR < 3:
                        ps_i += tl.sum(tl.where(valid & ~diag, slope, 0.0), 1)
            g = tl.where(diag, 0.0, g)  # the diagonal is added exactly outside the kernel
            h = g * dfdp
            acc, h_used = _weighted_rows(
                h, b_rows, B_ptr, cols, col_mask, ds, D, stride_b, acc, SINGLE_K, PRECISION, UPCAST
            )
            if ENERGY != 0:
                h_sum += tl.sum(h_used, 1)
            if DB_ATOMIC:  # the column pass's product from the same tile, added to dB in float32
                _add_column_grads(h, a_rows, DB_ptr, HCOL_ptr, cols, col_mask, ds, D, ENERGY,
                                  PRECISION, UPCAST)  # fmt: skip
            if DSCALE:
                dscale += tl.sum(g * f, 1)
                dbias += tl.sum(g, 1)
    rows64 = rows.to(tl.int64)[:, None]
    out_mask = row_mask[:, None] & dmask[None, :]
    if ENERGY != 0 or HAS_HD:
        a = tl.load(A_ptr + rows64 * stride_a + ds[None, :], mask=out_mask, other=0.0)
        a = a.to(tl.float32)
    if ENERGY != 0:  # the squared norm's share: d/dA_i of -(ra_i) terms = -A_i sum_j H_ij
        acc -= h_sum[:, None] * a
    acc *= scale
    if HAS_HD:  # the diagonal, from the exact difference of the paired rows
        hd = tl.load(HD_ptr + rows, mask=rows < NHD, other=0.0)
        o_mask = (rows < NB)[:, None] & dmask[None, :]
        o = tl.load(B_ptr + rows64 * stride_b + ds[None, :], mask=o_mask, other=0.0)
        o = o.to(tl.float32)
        if ENERGY != 0:
            acc += hd[:, None] * (o - a)
        else:
            acc += hd[:, None] * o
    da_ptrs = DA_ptr + rows64 * stride_da + ds[None, :]
    if UPCAST:  # bfloat16 under the interpreter, whose casts truncate
        acc = round_to_bfloat16(acc)
    tl.store(da_ptrs, acc.to(DA_ptr.dtype.element_ty), mask=out_mask)
    if DSCALE and pid_d == 0:
        tl.store(DSCALE_ptr + pid, tl.sum(dscale, 0))
        tl.store(DBIAS_ptr + pid, tl.sum(dbias, 0))
    if FWD and pid_d == 0:
        tl.store(SP_ptr + rows, sp_i, mask=row_mask)
        if PAIR != 0 and PAIR < 3:
            tl.store(PS_ptr + rows, ps_i, mask=row_mask)


@triton.jit
def rows_kernel(
    X_ptr, Y_ptr, SCALE_ptr, BIAS_ptr, XSQ_ptr, YSQ_ptr, F_ptr, SLOPE_ptr, POS_ptr,
    G_ptr, HD_ptr, SP_ptr, g_label,
    NX, NY, D, stride_x, stride_y,
    ENERGY: tl.constexpr, BINARY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The O(B d) prologue in one launch: the rows' squared norms (l2, norm) of x (NX rows) and
    y (NY rows), and for the paired rows i < NX the exact energy f(x_i, y_i) (from x_i - y_i,
    no cancellation), its slope df/dP and the positive logit scale f + bias. Float32.

    BINARY: also the sigmoid loss's diagonal (label 1), with ``g_label`` its weight per logit:
    G_ii = dloss/dL_ii = -g_label sigmoid(-L_ii), H_ii = G_ii scale df/dP and the loss term
    softplus(-L_ii)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_x = rows < NX
    in_y = rows < NY
    xy = tl.zeros((BLOCK_R,), tl.float32)
    x_sq = tl.zeros((BLOCK_R,), tl.float32)
    y_sq = tl.zeros((BLOCK_R,), tl.float32)
    dist = tl.zeros((BLOCK_R,), tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        x = _load_rows(X_ptr, rows, in_x, ks, D, stride_x, True)
        y = _load_rows(Y_ptr, rows, in_y, ks, D, stride_y, True)
        if ENERGY == 0:
            xy += tl.sum(x * y, 1)
        else:
            x_sq += tl.sum(x * x, 1)
            y_sq += tl.sum(y * y, 1)
            diff = x - y
            dist += tl.sum(diff * diff, 1)
    if ENERGY != 0:
        tl.store(XSQ_ptr + rows, x_sq, mask=in_x)
        tl.store(YSQ_ptr + rows, y_sq, mask=in_y)
    scale = tl.load(SCALE_ptr).to(tl.float32)
    bias = tl.load(BIAS_ptr).to(tl.float32)
    # The tiles' energy with the exact squared distance in place of ra + rb - 2P (P = 0).
    pos, f, slope = _energy(xy, dist, 0.0, scale, bias, ENERGY)
    tl.store(F_ptr + rows, f, mask=in_x)
    tl.store(SLOPE_ptr + rows, slope, mask=in_x)
    tl.store(POS_ptr + rows, pos, mask=in_x)
    if BINARY:
        sp, sig = _softplus_sigmoid(-pos)
        g = -g_label * sig
        tl.store(G_ptr + rows, g, mask=in_x)
        tl.store(HD_ptr + rows, g * scale * slope, mask=in_x)
        tl.store(SP_ptr + rows, sp, mask=in_x)


# ----------------------------------------------------------------------------------- launchers


def _vector(n: int, wanted: bool, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(n if wanted else 0, dtype=dtype, device=like.device)


def stats(
    a: torch.Tensor,
    b: torch.Tensor,
    ra: torch.Tensor,
    rb: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    pos: torch.Tensor,
    *,
    energy: int,
    lse: bool,
    mask_diag: bool,
    softplus: bool,
    pair: int,
    metrics: bool,
    online: bool = False,
    online_w: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Row statistics of the logits of (a, b), whose diagonal is ``pos`` (the exact L_ii, one per
    row of x): (lse, max, softplus, pair, slope, argmax, sum, correct, U, V, W), the logsumexp
    as lse less its offset max, the largest logit. Statistics not asked for come back empty;
    U, V (``online``: needs ``lse`` and d <= ONLINE_MAX_D) and W (only with ``online_w`` too: it
    serves dscale alone) are float32 (n_a, d), (n_a,), (n_a,) and leave the diagonal out. Asked
    for nothing, it launches nothing."""
    check_unit_column_stride(a=a, b=b)
    n_a, d = a.shape
    if online and not (lse and d <= ONLINE_MAX_D):
        raise ValueError(f"online sums need the row logsumexp and d <= {ONLINE_MAX_D}")
    online_w = online and online_w
    precision = dot.precision(a.dtype)

    def outputs() -> tuple[torch.Tensor, ...]:
        return (
            _vector(n_a, lse, a),
            _vector(n_a, lse, a),
            _vector(n_a, softplus, a),
            _vector(n_a, pair != 0, a),
            _vector(n_a, shifted_pair(pair), a),
            _vector(n_a, metrics, a, torch.int32),
            _vector(n_a, metrics, a),
            _vector(n_a, metrics, a),
            torch.empty((n_a, d) if online else (0, d), dtype=torch.float32, device=a.device),
            _vector(n_a, online, a),
            _vector(n_a, online_w, a),
        )

    if not (lse or softplus or pair or metrics):
        return outputs()

    def launch(cfg: dict[str, int]) -> tuple[torch.Tensor, ...]:
        outs = outputs()
        a_desc, b_desc, cfg = tiling.tma_descriptors(a, b, cfg)
        stats_kernel[(cdiv(n_a, cfg["BLOCK_M"]),)](
            a, b, a_desc, b_desc, ra, rb, scale, bias, pos, *outs, n_a, b.shape[0], pos.shape[0],
            d, a.stride(0), b.stride(0), ENERGY=energy, LSE=lse, MASK_DIAG=mask_diag,
            SOFTPLUS=softplus, PAIR=pair, METRICS=metrics, ONLINE=online, ONLINE_W=online_w,
            PRECISION=precision, UPCAST=dot.upcast(a.dtype, TAKES_CPU_TENSORS), **cfg,
        )  # fmt: skip
        return outs

    flags = (energy, lse, mask_diag, softplus, pair, metrics, online, online_w)
    key = ("stats", a.device, a.dtype, precision, tiling.bucket(n_a), tiling.bucket(b.shape[0]), d)
    key += flags
    with on_device(a.device):  # the autotuner's trial launches too
        return launch(
            tiling.choose_config(key, n_a, d, a.dtype, launch, interpreted=TAKES_CPU_TENSORS)
        )


def grad(
    a: torch.Tensor,
    b: torch.Tensor,
    ra: torch.Tensor,
    rb: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    pos: torch.Tensor,
    xlse: torch.Tensor,
    ylse: torch.Tensor,
    xmax: torch.Tensor,
    ymax: torch.Tensor,
    g_xlse: torch.Tensor,
    g_ylse: torch.Tensor,
    g_sp: torch.Tensor,
    g_pair: torch.Tensor,
    hd: torch.Tensor,
    *,
    energy: int,
    x_is_a: bool,
    mask_diag: bool,
    pair: int,
    scale_grad: bool,
    fwd: bool = False,
    out_dtype: torch.dtype | None = None,
    column_sums: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradient for the rows of ``a`` in their dtype (or ``out_dtype``): (da, dscale_partials,
    dbias_partials, loss_rows, slope_rows), each logsumexp given as :func:`stats` gives it:
    less its offset (``xlse``, ``ylse``), and the offset (``xmax``, ``ymax``). The tiles give
    the off-diagonal part; ``hd`` (one per row of x: the diagonal's dL_ii/dP_ii, from the
    caller) adds ``hd_i (b_i - a_i)`` (l2, norm) or ``hd_i b_i`` (dot) from the exact
    difference of the paired rows.

    A gradient term is active when its upstream gradient is non-empty; the dscale/dbias
    partials (one per program, off-diagonal) are produced only when ``x_is_a`` and
    ``scale_grad`` (else empty: two sums per logit saved). With ``fwd`` (the losses that take
    their gradients in forward) the x-launch also gives the loss's off-diagonal row sums: of
    softplus (sigmoid loss), or of the pair term (DPO / IPO / FB / SPPO) with, for DPO / IPO, as
    ``slope_rows``, that of its slope (which the diagonal's gradient needs); empty otherwise.

    ``column_sums`` (single pass; float32 (len(b), d) and (len(b),) or empty for dot, zeroed):
    the same tiles also add ``sum_i H_ij a_i`` and ``sum_i H_ij`` to them with atomics, the
    column pass's sums, in an order that varies from run to run. Needs d in one tile.
    """
    check_unit_column_stride(a=a, b=b)
    n_a, d = a.shape
    dscale_partials = x_is_a and scale_grad
    pair = pair if g_pair.numel() > 0 else 0
    fwd = fwd and x_is_a and (g_sp.numel() > 0 or pair != 0)
    terms = {
        "XLSE": g_xlse.numel() > 0,
        "YLSE": g_ylse.numel() > 0,
        "SOFTPLUS": g_sp.numel() > 0,
    }
    precision = dot.precision(a.dtype)

    def launch(cfg: dict[str, int]) -> tuple[torch.Tensor, ...]:
        n_prog = cdiv(n_a, cfg["BLOCK_M"])
        da = torch.empty_like(a, dtype=out_dtype or a.dtype)
        dscale = _vector(n_prog, dscale_partials, a)
        dbias = _vector(n_prog, dscale_partials, a)
        sp = _vector(n_a, fwd, a)
        ps = _vector(n_a, fwd and shifted_pair(pair), a)
        a_desc, b_desc, cfg = tiling.tma_descriptors(a, b, cfg)
        if column_sums is not None and not cfg["SINGLE_K"]:
            raise ValueError(f"column_sums need d in one tile, got d = {d}")
        db, hcol = (None, None) if column_sums is None else column_sums
        grad_kernel[(n_prog, cdiv(d, cfg["BLOCK_D"]))](
            a, b, a_desc, b_desc, ra, rb, scale, bias, pos, xlse, ylse, xmax, ymax, g_xlse, g_ylse,
            g_sp, g_pair, hd, da, dscale, dbias, sp, ps, db, hcol, n_a, b.shape[0], hd.shape[0], d,
            a.stride(0), b.stride(0), da.stride(0), ENERGY=energy, X_IS_A=x_is_a,
            MASK_DIAG=mask_diag, FWD=fwd, HAS_HD=hd.numel() > 0, DSCALE=dscale_partials,
            DB_ATOMIC=column_sums is not None, PAIR=pair,
            PRECISION=precision, UPCAST=dot.upcast(a.dtype, TAKES_CPU_TENSORS), **terms, **cfg,
        )  # fmt: skip
        return da, dscale, dbias, sp, ps

    flags = (energy, x_is_a, mask_diag, fwd, dscale_partials, pair, *terms.values())
    flags += (column_sums is not None,)
    key = ("grad", a.device, a.dtype, precision, tiling.bucket(n_a), tiling.bucket(b.shape[0]), d)
    key += flags
    with on_device(a.device):
        return launch(
            tiling.choose_config(
                key, n_a, d, a.dtype, launch, column_sums is not None, interpreted=TAKES_CPU_TENSORS
            )
        )


def paired_rows(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, *, energy: int,
    binary_weight: float | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """(x_sq, y_sq, f, slope, pos), float32, in one launch: the squared norms of the rows of x
    and y (empty for dot) and, for the first len(x) rows of y paired with x, the exact energy
    f(x_i, y_i), its slope df/dP and the positive logit ``scale * f + bias``. With
    ``binary_weight`` (the sigmoid loss's weight per logit) also (G_ii, H_ii, softplus(-L_ii)),
    the loss's diagonal (see :func:`rows_kernel`)."""
    check_unit_column_stride(x=x, y=y)
    n_x, d = x.shape
    n_y = y.shape[0]
    binary = binary_weight is not None
    x_sq, y_sq = _vector(n_x, energy != 0, x), _vector(n_y, energy != 0, x)
    f, slope, pos = _vector(n_x, True, x), _vector(n_x, True, x), _vector(n_x, True, x)
    diagonal = tuple(_vector(n_x, binary, x) for _ in range(3))
    block_r = 32  # 64-wide chunks on 4 warps, loads two deep: no spills (128 spilled 400 B)
    with on_device(x.device):
        rows_kernel[(cdiv(max(n_x, n_y), block_r),)](
            x, y, scale, bias, x_sq, y_sq, f, slope, pos, *diagonal, binary_weight or 0.0, n_x,
            n_y, d, x.stride(0), y.stride(0), ENERGY=energy, BINARY=binary, BLOCK_R=block_r,
            BLOCK_D=min(max(16, next_power_of_2(d)), 64), num_warps=4, num_stages=2,
        )  # fmt: skip
    return (x_sq, y_sq, f, slope, pos, *diagonal) if binary else (x_sq, y_sq, f, slope, pos)


TAKES_CPU_TENSORS = runs_on_cpu(stats_kernel)
"""Whether Triton's interpreter built these kernels (TRITON_INTERPRET=1 at import), so that they
take CPU tensors; read once, before anything can wrap a kernel (tests do)."""
