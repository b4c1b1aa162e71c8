"""Triton kernels for a lockstep ring of trajectory segments.

``sample`` draws uniform anchor rows and a target row later in the anchor's segment (offset by
inverse CDF), and gathers both, in one launch (the random bits it reads are drawn by a second,
``torch.randint``). ``extend`` appends steps for all streams and updates the segment bookkeeping
in one launch. Both copy rows in chunks of at most ``_MAX_BLOCK_W`` columns, so the tile a program
holds is bounded whatever the row width. The maths is defined by the torch reference in
``crl_fast.buffer``; the kernels compute it with the same float64 operations, but their
log1p/expm1 (libdevice on a GPU, numpy under TRITON_INTERPRET=1) may round differently from
torch's by an ulp (2**-52), which would move an offset lying that close to a boundary by one step
(within the same segment). Anchors, mixing decisions and the bookkeeping are exact.

Layout: ``rows[capacity, streams, width]`` hold ``[anchor_a | anchor_b | target]`` columns;
``segment[capacity, streams]`` the absolute segment index of each row; ``segment_end[capacity,
streams]`` the last absolute step of segment ``s`` at slot ``s % capacity`` (-1 while open);
``step`` a one-element int64 tensor counting steps written per stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from crl_fast.checks import on_device
from crl_fast.kernels import check_unit_column_stride, interpreting, runs_on_cpu
from crl_fast.kernels.grid import cdiv, next_power_of_2

_INV_2_24 = tl.constexpr(1.0 / 16777216.0)
_U_MASK = tl.constexpr(2**38 - 1)
_INV_2_38 = tl.constexpr(2.0**-38)
_MAX_BLOCK_W = 16
"""Columns a program copies per loop iteration: tiles of at most 128 x 16 (sample), 32 x 16
(extend) elements, so wide rows (pixels) neither spill nor slow the compile. Compiled for sm_90,
sample's 29-column observation rows (Ant's) take 96 registers a thread in chunks of 16 and 254
in chunks of 32 (rows whose width is not a multiple of 16 copy element by element, each with
its own 64-bit address), so 16 fits 2.5 times the warps on an SM."""


def _block_w(width: int) -> int:
    return min(_MAX_BLOCK_W, next_power_of_2(width))


if interpreting():  # the interpreter has no libdevice

    @triton.jit
    def _log1p(x):
        """Goldberg: log(1 + x) = log(u) * x / (u - 1) with u = 1 + x rounded (x where u == 1);
        a few ulp, like libdevice's log1p."""
        u = 1.0 + x
        d = tl.where(u == 1.0, 1.0, u - 1.0)
        return tl.where(u == 1.0, x, tl.log(u) * (x / d))

    @triton.jit
    def _expm1(x):
        """Kahan: exp(x) - 1 = (u - 1) * x / log(u) with u = exp(x) rounded (x where u == 1,
        -1 where u - 1 rounds to -1)."""
        u = tl.exp(x)
        ok = (u != 1.0) & (u - 1.0 != -1.0)
        r = (u - 1.0) * (x / tl.log(tl.where(ok, u, 2.0)))
        return tl.where(ok, r, tl.where(u == 1.0, x, -1.0))

else:

    @triton.jit
    def _log1p(x):
        return libdevice.log1p(x)

    @triton.jit
    def _expm1(x):
        return libdevice.expm1(x)


@triton.jit
def _copy_columns(src, dst, m2, width, BLOCK_W: tl.constexpr):
    """``dst[r, c] = src[r, c]`` for ``c < width`` and the rows where ``m2`` ([R, 1]) holds, in
    chunks of BLOCK_W columns; ``src`` and ``dst`` point at each row's first column ([R, 1])."""
    cols = tl.arange(0, BLOCK_W)[None, :]
    for c0 in range(0, width, BLOCK_W):
        mc = m2 & (c0 + cols < width)
        tl.store(dst + (c0 + cols), tl.load(src + (c0 + cols), mask=mc), mask=mc)


@triton.jit
def _sample_kernel(
    bits_ptr,
    step_ptr,
    segment_ptr,
    segment_end_ptr,
    rows_ptr,
    out_a_ptr,
    out_b_ptr,
    out_target_ptr,
    B,
    N,
    CAP,
    A_W,
    B_W,
    T_W,
    log_gamma_hi,
    log_gamma_lo,
    th_rand,
    th_cur,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit: B * width may pass 2**31
    m = offs < B
    r0 = tl.load(bits_ptr + offs * 3, mask=m, other=0)
    r1 = tl.load(bits_ptr + offs * 3 + 1, mask=m, other=0)
    r2 = tl.load(bits_ptr + offs * 3 + 2, mask=m, other=0)

    step = tl.load(step_ptr)
    size = tl.minimum(step, CAP)
    oldest = step - size
    total = tl.maximum(size * N, 1)

    # Anchor: uniform over stored (row, stream) pairs.
    idx = r0 % total
    env = idx % N
    t = oldest + idx // N
    row = t % CAP
    seg = tl.load(segment_ptr + row * N + env, mask=m, other=0)
    end = tl.load(segment_end_ptr + (seg % CAP) * N + env, mask=m, other=0)
    end = tl.where(end < 0, step - 1, end)
    length = end - t + 1

    # Offset k in 1..length by inverse CDF, in float64 (see crl_fast.buffer.sample_reference).
    u = (r2 & _U_MASK).to(tl.float64) * _INV_2_38
    u_mix = ((r2 >> 38) & 0xFFFFFF).to(tl.float32) * _INV_2_24
    len_d = length.to(tl.float64)
    lg = tl.cast(log_gamma_hi, tl.float64) + tl.cast(log_gamma_lo, tl.float64)
    if MODE == 0:  # geometric (MODE: the index in crl_fast.buffer.GOAL_MODES)
        # log(1 - u (1 - gamma^L)) without cancellation for gamma near 1.
        j = _log1p(u * _expm1(len_d * lg)) / lg
    elif MODE == 1:  # clamp
        j = _log1p(-u) / lg
    elif MODE == 2:  # uniform_future
        j = u * len_d
    else:  # final
        j = len_d
    j = tl.minimum(j, len_d - 1.0)
    target_t = t + j.to(tl.int64)

    # Mixing: the current step (previous row of the same segment, else the anchor row) and
    # uniformly random stored rows.
    has_prev = t - 1 >= oldest
    prev = tl.where(has_prev, t - 1, t)
    prev_seg = tl.load(segment_ptr + (prev % CAP) * N + env, mask=m & has_prev, other=-1)
    cur_t = tl.where(has_prev & (prev_seg == seg), prev, t)
    target_t = tl.where(u_mix < th_cur, cur_t, target_t)
    ridx = r1 % total
    is_rand = u_mix < th_rand
    target_t = tl.where(is_rand, oldest + ridx // N, target_t)
    target_env = tl.where(is_rand, ridx % N, env)
    target_row = target_t % CAP

    # Copy in chunks of at most _MAX_BLOCK_W columns: anchor row [a | b] -> out_a, out_b; the
    # target row's t -> out_t.
    W = A_W + B_W + T_W
    m2 = m[:, None]
    src = rows_ptr + ((row * N + env) * W)[:, None]
    tsrc = rows_ptr + ((target_row * N + target_env) * W + (A_W + B_W))[:, None]
    _copy_columns(src, out_a_ptr + offs[:, None] * A_W, m2, A_W, BLOCK_A)
    _copy_columns(src + A_W, out_b_ptr + offs[:, None] * B_W, m2, B_W, BLOCK_B)
    _copy_columns(tsrc, out_target_ptr + offs[:, None] * T_W, m2, T_W, BLOCK_T)


def sample(
    bits: torch.Tensor,
    step: torch.Tensor,
    segment: torch.Tensor,
    segment_end: torch.Tensor,
    rows: torch.Tensor,
    *,
    widths: tuple[int, int, int],
    mode: int,
    log_gamma: tuple[float, float],
    th_rand: float,
    th_cur: float,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather ``(anchor_a, anchor_b, target)`` for ``bits.shape[0]`` draws; one launch.

    ``bits`` is ``[B, 3]`` int64 in ``[0, 2**62)``: anchor draw, random-target draw, and 38 + 24
    bits for the offset and mixing uniforms. A draw goes to a random row if its mixing uniform
    is below ``th_rand``, to the current step if below ``th_cur``, else to the offset target.
    """
    check_unit_column_stride(rows=rows)
    a_w, b_w, t_w = widths
    n_draws = bits.shape[0]
    out = torch.empty(n_draws * (a_w + b_w + t_w), device=rows.device, dtype=rows.dtype)
    na, nb = n_draws * a_w, n_draws * b_w  # one allocation, three contiguous outputs
    out_a = out[:na].view(n_draws, a_w)
    out_b = out[na : na + nb].view(n_draws, b_w)
    out_t = out[na + nb :].view(n_draws, t_w)
    cap, n = segment.shape
    with on_device(rows.device):
        _sample_kernel[(cdiv(n_draws, block),)](
            bits,
            step,
            segment,
            segment_end,
            rows,
            out_a,
            out_b,
            out_t,
            n_draws,
            n,
            cap,
            a_w,
            b_w,
            t_w,
            *log_gamma,
            th_rand,
            th_cur,
            MODE=mode,
            BLOCK=block,
            BLOCK_A=_block_w(a_w),
            BLOCK_B=_block_w(b_w),
            BLOCK_T=_block_w(t_w),
        )
    return out_a, out_b, out_t


@triton.jit(do_not_specialize=["step0", "T"])
def _extend_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    flag0_ptr,
    flag1_ptr,
    rows_ptr,
    flag0_out_ptr,
    flag1_out_ptr,
    segment_ptr,
    segment_end_ptr,
    open_ptr,
    step_ptr,
    T,
    DROP,
    N,
    CAP,
    A_W,
    B_W,
    C_W,
    step0,
    BLOCK_N: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    envs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = envs < N
    seg = tl.load(open_ptr + envs, mask=m, other=0)
    # Steps that a later step of this call overwrites only advance the segment counters.
    for i in range(0, DROP):
        src = tl.cast(i, tl.int64) * N + envs  # 64-bit: T * N may pass 2**31
        f0 = tl.load(flag0_ptr + src, mask=m, other=0)
        f1 = tl.load(flag1_ptr + src, mask=m, other=0)
        seg += ((f0 | f1) != 0).to(tl.int64)

    W = A_W + B_W + C_W
    m2 = m[:, None]
    base = step0.to(tl.int64)
    for i in range(DROP, T):
        s = base + i
        row = s % CAP
        src = tl.cast(i, tl.int64) * N + envs
        f0 = tl.load(flag0_ptr + src, mask=m, other=0)
        f1 = tl.load(flag1_ptr + src, mask=m, other=0)
        done = (f0 | f1) != 0
        # Each row of a segment rewrites its end: -1 (open) until the row that closes it.
        tl.store(segment_end_ptr + (seg % CAP) * N + envs, tl.where(done, s, -1), mask=m)
        dst = row * N + envs
        tl.store(segment_ptr + dst, seg, mask=m)
        tl.store(flag0_out_ptr + dst, f0, mask=m)
        tl.store(flag1_out_ptr + dst, f1, mask=m)
        # Row [a | b | c] in chunks of at most _MAX_BLOCK_W columns.
        out = rows_ptr + (dst * W)[:, None]
        _copy_columns(a_ptr + (src * A_W)[:, None], out, m2, A_W, BLOCK_A)
        _copy_columns(b_ptr + (src * B_W)[:, None], out + A_W, m2, B_W, BLOCK_B)
        _copy_columns(c_ptr + (src * C_W)[:, None], out + (A_W + B_W), m2, C_W, BLOCK_C)
        seg += done.to(tl.int64)
    tl.store(open_ptr + envs, seg, mask=m)
    if pid == 0:
        tl.store(step_ptr, base + T)


def extend(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    flag0: torch.Tensor,
    flag1: torch.Tensor,
    rows: torch.Tensor,
    flag0_out: torch.Tensor,
    flag1_out: torch.Tensor,
    segment: torch.Tensor,
    segment_end: torch.Tensor,
    open_segment: torch.Tensor,
    step: torch.Tensor,
    *,
    step0: int,
    block_n: int = 32,
) -> None:
    """Write ``T`` steps ``[a | b | c]`` to rows ``(step0 + t) % capacity``, one launch.

    A step closes its stream's segment when ``flag0 | flag1``. Only the last ``capacity`` steps
    are written; ``open_segment`` and ``step`` advance past all ``T``.
    """
    steps, n = flag0.shape
    cap = segment.shape[0]
    a_w, b_w, c_w = a.shape[-1], b.shape[-1], c.shape[-1]
    with on_device(rows.device):
        _extend_kernel[(cdiv(n, block_n),)](
            a.contiguous(),
            b.contiguous(),
            c.contiguous(),
            flag0.contiguous().view(torch.uint8),
            flag1.contiguous().view(torch.uint8),
            rows,
            flag0_out.view(torch.uint8),
            flag1_out.view(torch.uint8),
            segment,
            segment_end,
            open_segment,
            step,
            steps,
            max(steps - cap, 0),
            n,
            cap,
            a_w,
            b_w,
            c_w,
            step0,
            BLOCK_N=block_n,
            BLOCK_A=_block_w(a_w),
            BLOCK_B=_block_w(b_w),
            BLOCK_C=_block_w(c_w),
        )


TAKES_CPU_TENSORS = runs_on_cpu(_sample_kernel)
"""Whether Triton's interpreter built these kernels (TRITON_INTERPRET=1 at import), so that they
take CPU tensors; read once, before anything can wrap a kernel (tests do)."""
