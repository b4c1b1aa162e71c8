"""Triton kernels for a lockstep ring of trajectory segments.

``sample`` draws, in one launch, uniform anchor rows and a target row later in the anchor's
segment (offset by inverse CDF), and gathers both. ``extend`` appends steps for all streams and
updates the segment bookkeeping in one launch. The maths is defined by the torch reference in
``crl_fast.buffer``: under TRITON_INTERPRET=1 the kernels match it bit for bit; on a GPU the
float32 exp/log may round differently, moving a rare offset that sits on a boundary by one.

Layout: ``rows[capacity, streams, width]`` hold ``[anchor_a | anchor_b | target]`` columns;
``segment[capacity, streams]`` the absolute segment index of each row; ``segment_end[capacity,
streams]`` the last absolute step of segment ``s`` at slot ``s % capacity`` (-1 while open);
``step`` a one-element int64 tensor counting steps written per stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GEOMETRIC, CLAMP, UNIFORM, FINAL = 0, 1, 2, 3
_INV_2_24 = tl.constexpr(1.0 / 16777216.0)


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
    log_gamma,
    inv_log_gamma,
    th_rand,
    th_cur,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_AB: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
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
    len_f = length.to(tl.float32)

    # Offset k in 1..length by inverse CDF.
    u = (r2 & 0xFFFFFF).to(tl.float32) * _INV_2_24
    u_mix = ((r2 >> 24) & 0xFFFFFF).to(tl.float32) * _INV_2_24
    if MODE == 0:
        x = u * (1.0 - tl.exp(len_f * log_gamma))
        j = tl.log(1.0 - x) * inv_log_gamma
    elif MODE == 1:
        j = tl.log(1.0 - u) * inv_log_gamma
    elif MODE == 2:
        j = u * len_f
    else:
        j = len_f
    j = tl.minimum(j, len_f - 1.0)
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

    W = A_W + B_W + T_W
    cols = tl.arange(0, BLOCK_AB)
    src = rows_ptr + (row * N + env)[:, None] * W + cols[None, :]
    vals = tl.load(src, mask=m[:, None] & (cols < A_W + B_W)[None, :], other=0.0)
    ma = m[:, None] & (cols < A_W)[None, :]
    tl.store(out_a_ptr + offs[:, None] * A_W + cols[None, :], vals, mask=ma)
    mb = m[:, None] & ((cols >= A_W) & (cols < A_W + B_W))[None, :]
    tl.store(out_b_ptr + offs[:, None] * B_W + (cols - A_W)[None, :], vals, mask=mb)

    tcols = tl.arange(0, BLOCK_T)
    mt = m[:, None] & (tcols < T_W)[None, :]
    tsrc = rows_ptr + (target_row * N + target_env)[:, None] * W + (A_W + B_W) + tcols[None, :]
    tvals = tl.load(tsrc, mask=mt, other=0.0)
    tl.store(out_target_ptr + offs[:, None] * T_W + tcols[None, :], tvals, mask=mt)


def sample(
    bits: torch.Tensor,
    step: torch.Tensor,
    segment: torch.Tensor,
    segment_end: torch.Tensor,
    rows: torch.Tensor,
    *,
    widths: tuple[int, int, int],
    mode: int,
    log_gamma: float,
    inv_log_gamma: float,
    th_rand: float,
    th_cur: float,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather ``(anchor_a, anchor_b, target)`` for ``bits.shape[0]`` draws; one launch.

    ``bits`` is ``[B, 3]`` int64 in ``[0, 2**62)``: anchor draw, random-target draw, and 2 x 24
    bits for the offset and mixing uniforms. A draw goes to a random row if its mixing uniform
    is below ``th_rand``, to the current step if below ``th_cur``, else to the offset target.
    """
    a_w, b_w, t_w = widths
    n_draws = bits.shape[0]
    out = torch.empty(n_draws * (a_w + b_w + t_w), device=rows.device, dtype=rows.dtype)
    na, nb = n_draws * a_w, n_draws * b_w  # one allocation, three contiguous outputs
    out_a = out[:na].view(n_draws, a_w)
    out_b = out[na : na + nb].view(n_draws, b_w)
    out_t = out[na + nb :].view(n_draws, t_w)
    cap, n = segment.shape
    _sample_kernel[(triton.cdiv(n_draws, block),)](
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
        log_gamma,
        inv_log_gamma,
        th_rand,
        th_cur,
        MODE=mode,
        BLOCK=block,
        BLOCK_AB=triton.next_power_of_2(a_w + b_w),
        BLOCK_T=triton.next_power_of_2(t_w),
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
    BLOCK_W: tl.constexpr,
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
    cols = tl.arange(0, BLOCK_W)
    in_a = cols < A_W
    in_b = (cols >= A_W) & (cols < A_W + B_W)
    in_c = (cols >= A_W + B_W) & (cols < W)
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
        va = tl.load(a_ptr + src[:, None] * A_W + cols[None, :], mask=m2 & in_a[None, :])
        vb = tl.load(b_ptr + src[:, None] * B_W + (cols - A_W)[None, :], mask=m2 & in_b[None, :])
        vc = tl.load(
            c_ptr + src[:, None] * C_W + (cols - A_W - B_W)[None, :], mask=m2 & in_c[None, :]
        )
        v = tl.where(in_a[None, :], va, tl.where(in_b[None, :], vb, vc))
        tl.store(rows_ptr + dst[:, None] * W + cols[None, :], v, mask=m2 & (cols < W)[None, :])
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
    width = rows.shape[-1]
    _extend_kernel[(triton.cdiv(n, block_n),)](
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
        a.shape[-1],
        b.shape[-1],
        c.shape[-1],
        step0,
        BLOCK_N=block_n,
        BLOCK_W=triton.next_power_of_2(width),
    )
