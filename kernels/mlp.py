"""Triton kernels for an MLP with two hidden layers: forward in one launch, backward in two.

    z1 = W1 x + b1,  z2 = W2 act(z1) + b2,  y = W3 act(z2) + b3,   x = [x1, x2]

act is swish (ACT = 0) or relu (ACT = 1).

Weights are stored as ``nn.Linear`` stores them (out x in, contiguous) and read in any float
dtype; the products take their operands in the compute dtype (that of z1 and z2: the input's, or
autocast's) and accumulate in float32, as cuBLAS does. z1 and z2 are rounded to the compute
dtype, as an autocast ``nn.Linear`` rounds its output, before the activation reads them.

``forward_kernel``: BLOCK_M rows per program through all three layers. Layer 2 is computed in
BLOCK_N column blocks, each fed at once into layer 3's product as a K block, so the hidden
activations never leave the chip. With SAVE it also stores z1 and z2 for backward.

Backward, with dy given (act' from the saved z, h = act(z)):
    dz2 = (dy W3) * act'(z2),   dz1 = (dz2 W2) * act'(z1),   dx = dz1 W1
    dW3 = dy^T h2,  dW2 = dz2^T h1,  dW1 = dz1^T x,  db = column sums of dy, dz2, dz1
``backward_data_kernel`` computes the first line for BLOCK_M rows per program (dz2 again in column
blocks, straight into dz1's product) and stores dz1 and dz2 (STORE_DZ) for the second kernel.
``backward_weight_kernel`` computes one BLOCK_P x BLOCK_Q tile of one weight gradient per
program, looping over all rows: sums in a fixed order, no atomics, deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from crl_fast.checks import on_device
from crl_fast.kernels import check_unit_column_stride, dot, runs_on_cpu
from crl_fast.kernels.dot import round_to_bfloat16
from crl_fast.kernels.grid import cdiv, next_power_of_2

_NO_ACT = tl.constexpr(-1)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        out = z * tl.sigmoid(z)
    else:
        out = tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, as in torch.relu (tl.maximum drops it)
    return out


@triton.jit
def _act_backward(dh, z, ACT: tl.constexpr):
    """dh * act'(z) as torch's backward computes it; relu's passes dh unless z <= 0, so also
    where z is NaN (torch's threshold_backward), and gives exactly 0 elsewhere (not 0 * inf)."""
    if ACT == 0:
        s = tl.sigmoid(z)
        out = dh * (s * (1.0 + z * (1.0 - s)))
    else:
        out = tl.where(z <= 0.0, 0.0, dh)
    return out


@triton.jit
def _round(x, REF, UPCAST: tl.constexpr):
    """``x`` rounded (to nearest even) to REF's element type: the compute dtype, or that of an
    output. Under the interpreter (UPCAST: bfloat16 products there), whose casts truncate, a
    bfloat16 target is rounded by :func:`round_to_bfloat16` first."""
    if UPCAST and REF.dtype.element_ty == tl.bfloat16:
        x = round_to_bfloat16(x.to(tl.float32))
    return x.to(REF.dtype.element_ty)


@triton.jit
def _mm(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in float32 (acc None: a @ b)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_cols(X1, X2, stride1, stride2, N1, N2, rows, row_ok, cols):
    """Columns ``cols`` of [x1, x2] (x1: N1 columns, x2: N2) in ``rows``; 0 outside."""
    r = rows.to(tl.int64)[:, None]
    ok1 = row_ok[:, None] & (cols < N1)[None, :]
    a = tl.load(X1 + r * stride1 + cols[None, :], mask=ok1, other=0.0)
    cols2 = cols - N1
    ok2 = row_ok[:, None] & ((cols2 >= 0) & (cols2 < N2))[None, :]
    return a + tl.load(X2 + r * stride2 + cols2[None, :], mask=ok2, other=0.0)


@triton.jit
def _store_cols(X1, X2, stride1, stride2, N1, N2, rows, row_ok, cols, value, UPCAST: tl.constexpr):
    """Store ``value`` into columns ``cols`` of [x1, x2] (the inverse of :func:`_load_cols`)."""
    r = rows.to(tl.int64)[:, None]
    ok1 = row_ok[:, None] & (cols < N1)[None, :]
    tl.store(X1 + r * stride1 + cols[None, :], _round(value, X1, UPCAST), mask=ok1)
    cols2 = cols - N1
    ok2 = row_ok[:, None] & ((cols2 >= 0) & (cols2 < N2))[None, :]
    tl.store(X2 + r * stride2 + cols2[None, :], _round(value, X2, UPCAST), mask=ok2)


@triton.jit
def _indices(M, WIDTH, OUT, BLOCK_M: tl.constexpr, WIDTH_PAD: tl.constexpr, OUT_PAD: tl.constexpr):
    """A row-block program's rows (and int64 column vector r of them), hidden units and outputs,
    each with its in-range mask."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    hidden = tl.arange(0, WIDTH_PAD)
    outs = tl.arange(0, OUT_PAD)
    return rows, rows < M, rows.to(tl.int64)[:, None], hidden, hidden < WIDTH, outs, outs < OUT


@triton.jit
def _load_weights(ptrs, mask, REF, UPCAST: tl.constexpr):
    """A block of weights (0 outside ``mask``) in the compute dtype, REF's."""
    return _round(tl.load(ptrs, mask=mask, other=0.0), REF, UPCAST)


@triton.jit
def forward_kernel(
    X1, X2, W1, B1, W2, B2, W3, B3, Y, Z1, Z2,
    M, IN1, IN2, stride_x1, stride_x2, WIDTH, OUT,
    ACT: tl.constexpr, SAVE: tl.constexpr, IN_BLOCK: tl.constexpr, WIDTH_PAD: tl.constexpr,
    OUT_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PADDED: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    rows, row_ok, r, hidden, hid_ok, outs, out_ok = _indices(
        M, WIDTH, OUT, BLOCK_M, WIDTH_PAD, OUT_PAD
    )
    n_in = IN1 + IN2

    z1 = tl.zeros((BLOCK_M, WIDTH_PAD), tl.float32)
    for k0 in tl.range(0, n_in, IN_BLOCK):
        ks = k0 + tl.arange(0, IN_BLOCK)
        x = _round(_load_cols(X1, X2, stride_x1, stride_x2, IN1, IN2, rows, row_ok, ks), Z1, UPCAST)
        w1_ok = (ks < n_in)[:, None] & hid_ok[None, :]
        w1 = _load_weights(W1 + hidden[None, :] * n_in + ks[:, None], w1_ok, Z1, UPCAST)
        z1 = _mm(x, w1, z1, PRECISION, UPCAST)
    z1 += tl.load(B1 + hidden, mask=hid_ok, other=0.0)[None, :]
    if PADDED:  # padded units 0, not inf * 0 = NaN, which their zero weights would pass on
        z1 = tl.where(hid_ok[None, :], z1, 0.0)
    z1 = _round(z1, Z1, UPCAST)
    if SAVE:
        tl.store(Z1 + r * WIDTH + hidden[None, :], z1, mask=row_ok[:, None] & hid_ok[None, :])
    h1 = _round(_act(z1.to(tl.float32), ACT), Z1, UPCAST)

    y = tl.zeros((BLOCK_M, OUT_PAD), tl.float32)
    for n0 in tl.range(0, WIDTH_PAD, BLOCK_N):  # a column block of layer 2 = a K block of 3
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < WIDTH
        w2_ok = hid_ok[:, None] & col_ok[None, :]
        w2 = _load_weights(W2 + cols[None, :] * WIDTH + hidden[:, None], w2_ok, Z1, UPCAST)
        z2 = _mm(h1, w2, None, PRECISION, UPCAST)
        z2 += tl.load(B2 + cols, mask=col_ok, other=0.0)[None, :]
        if PADDED:  # as z1
            z2 = tl.where(col_ok[None, :], z2, 0.0)
        z2 = _round(z2, Z1, UPCAST)
        if SAVE:
            tl.store(Z2 + r * WIDTH + cols[None, :], z2, mask=row_ok[:, None] & col_ok[None, :])
        h2 = _round(_act(z2.to(tl.float32), ACT), Z1, UPCAST)
        w3_ok = col_ok[:, None] & out_ok[None, :]
        w3 = _load_weights(W3 + outs[None, :] * WIDTH + cols[:, None], w3_ok, Z1, UPCAST)
        y = _mm(h2, w3, y, PRECISION, UPCAST)
    y += tl.load(B3 + outs, mask=out_ok, other=0.0)[None, :]
    y_ok = row_ok[:, None] & out_ok[None, :]
    tl.store(Y + r * OUT + outs[None, :], _round(y, Y, UPCAST), mask=y_ok)


@triton.jit
def backward_data_kernel(
    DY, W1, W2, W3, Z1, Z2, DZ1, DZ2, DX1, DX2,
    M, IN1, IN2, stride_dx1, stride_dx2, WIDTH, OUT,
    ACT: tl.constexpr, STORE_DZ: tl.constexpr, NEED_DX: tl.constexpr, IN_BLOCK: tl.constexpr,
    WIDTH_PAD: tl.constexpr, OUT_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PADDED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    rows, row_ok, r, hidden, hid_ok, outs, out_ok = _indices(
        M, WIDTH, OUT, BLOCK_M, WIDTH_PAD, OUT_PAD
    )

    dy_ok = row_ok[:, None] & out_ok[None, :]
    dy = _round(tl.load(DY + r * OUT + outs[None, :], mask=dy_ok, other=0.0), Z1, UPCAST)
    dh1 = tl.zeros((BLOCK_M, WIDTH_PAD), tl.float32)
    for n0 in tl.range(0, WIDTH_PAD, BLOCK_N):  # dz2 in column blocks = K blocks of dh1
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < WIDTH
        tile_ok = row_ok[:, None] & col_ok[None, :]
        w3_ok = out_ok[:, None] & col_ok[None, :]
        w3 = _load_weights(W3 + outs[:, None] * WIDTH + cols[None, :], w3_ok, Z1, UPCAST)
        dh2 = _mm(dy, w3, None, PRECISION, UPCAST)
        if PADDED:  # as forward's z1
            dh2 = tl.where(col_ok[None, :], dh2, 0.0)
        z2 = tl.load(Z2 + r * WIDTH + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        dz2 = _round(_act_backward(dh2, z2, ACT), Z1, UPCAST)
        if STORE_DZ:
            tl.store(DZ2 + r * WIDTH + cols[None, :], dz2, mask=tile_ok)
        w2_ok = col_ok[:, None] & hid_ok[None, :]
        w2 = _load_weights(W2 + cols[:, None] * WIDTH + hidden[None, :], w2_ok, Z1, UPCAST)
        dh1 = _mm(dz2, w2, dh1, PRECISION, UPCAST)
    z1_ok = row_ok[:, None] & hid_ok[None, :]
    z1 = tl.load(Z1 + r * WIDTH + hidden[None, :], mask=z1_ok, other=0.0).to(tl.float32)
    if PADDED:
        dh1 = tl.where(hid_ok[None, :], dh1, 0.0)
    dz1 = _round(_act_backward(dh1, z1, ACT), Z1, UPCAST)
    if STORE_DZ:
        tl.store(DZ1 + r * WIDTH + hidden[None, :], dz1, mask=z1_ok)
    if NEED_DX:
        n_in = IN1 + IN2
        for k0 in tl.range(0, n_in, IN_BLOCK):
            ks = k0 + tl.arange(0, IN_BLOCK)
            w1_ok = hid_ok[:, None] & (ks < n_in)[None, :]
            w1 = _load_weights(W1 + hidden[:, None] * n_in + ks[None, :], w1_ok, Z1, UPCAST)
            dx = _mm(dz1, w1, None, PRECISION, UPCAST)
            _store_cols(DX1, DX2, stride_dx1, stride_dx2, IN1, IN2, rows, row_ok, ks, dx, UPCAST)


@triton.jit
def _weight_grad_tile(
    DZ, P, H1, H2, stride_h1, stride_h2, Q1, Q2, DW, DB, M, tile, CD_REF,
    ACT_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Tile ``tile`` (row-major over the tiles) of dW = dz^T h, a P x (Q1 + Q2) matrix, where dz
    (M x P, contiguous) is read in the compute dtype (CD_REF's) and h = act(H) (ACT_H >= 0) or
    [H1, H2]; with the tile's first columns, db = column sums of dz."""
    n_q = Q1 + Q2
    q_tiles = tl.cdiv(n_q, BLOCK_Q)
    ps = (tile // q_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = ps < P
    q0 = (tile % q_tiles) * BLOCK_Q
    qs = q0 + tl.arange(0, BLOCK_Q)
    dw = tl.zeros((BLOCK_P, BLOCK_Q), tl.float32)
    db = tl.zeros((BLOCK_P,), tl.float32)
    for k0 in tl.range(0, M, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        row_ok = rows < M
        dz_ok = row_ok[:, None] & p_ok[None, :]
        dz = tl.load(DZ + rows.to(tl.int64)[:, None] * P + ps[None, :], mask=dz_ok, other=0.0)
        dz = _round(dz, CD_REF, UPCAST)
        h = _load_cols(H1, H2, stride_h1, stride_h2, Q1, Q2, rows, row_ok, qs)
        if ACT_H >= 0:
            h = _act(h.to(tl.float32), ACT_H)
        dw = _mm(tl.trans(dz), _round(h, CD_REF, UPCAST), dw, PRECISION, UPCAST)
        db += tl.sum(dz.to(tl.float32), axis=0)
    dw_ok = p_ok[:, None] & (qs < n_q)[None, :]
    tl.store(DW + ps[:, None] * n_q + qs[None, :], _round(dw, DW, UPCAST), mask=dw_ok)
    if q0 == 0:
        tl.store(DB + ps, _round(db, DB, UPCAST), mask=p_ok)


@triton.jit
def backward_weight_kernel(
    X1, X2, stride_x1, stride_x2, IN1, IN2, DY, Z1, Z2, DZ1, DZ2,
    DW1, DB1, DW2, DB2, DW3, DB3, M, WIDTH, OUT,
    ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Programs [0, t2) take dW2's tiles, [t2, t2 + t1) dW1's, the rest dW3's."""
    pid = tl.program_id(0)
    width_tiles = tl.cdiv(WIDTH, BLOCK_P)
    t2 = width_tiles * tl.cdiv(WIDTH, BLOCK_Q)
    t1 = width_tiles * tl.cdiv(IN1 + IN2, BLOCK_Q)
    if pid < t2:
        _weight_grad_tile(
            DZ2, WIDTH, Z1, Z1, WIDTH, WIDTH, WIDTH, 0, DW2, DB2, M, pid, Z1,
            ACT, BLOCK_P, BLOCK_Q, BLOCK_K, PRECISION, UPCAST,
        )  # fmt: skip
    elif pid < t2 + t1:
        _weight_grad_tile(
            DZ1, WIDTH, X1, X2, stride_x1, stride_x2, IN1, IN2, DW1, DB1, M, pid - t2, Z1,
            _NO_ACT, BLOCK_P, BLOCK_Q, BLOCK_K, PRECISION, UPCAST,
        )  # fmt: skip
    else:
        _weight_grad_tile(
            DY, OUT, Z2, Z2, WIDTH, WIDTH, WIDTH, 0, DW3, DB3, M, pid - t2 - t1, Z1,
            ACT, BLOCK_P, BLOCK_Q, BLOCK_K, PRECISION, UPCAST,
        )  # fmt: skip


FORWARD_TILE = {"BLOCK_M": 16, "num_warps": 8, "num_stages": 2}
"""Rows per program, warps and pipeline depth of the row-parallel kernels. Chosen from sm_90
compiler reports (``tests/compile_kernels.py``, Triton 3.8, 2026-12-06), not yet from timings: at
width 256, two stages take 75-100 KiB of shared memory (two programs per SM) and spill in no
bfloat16 or TF32 variant; three took 146-184 KiB and spilled up to 164 B (float16, 64 inputs)."""
WEIGHT_TILE = {"BLOCK_P": 64, "BLOCK_Q": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
"""Tile of a weight gradient per program, rows per step of its loop over the batch, warps and
pipeline depth: no spills in bfloat16 or TF32 (90 and 213 KiB of shared memory; same reports).
Float32 without TF32 multiplies on the CUDA cores with its operands in registers: it takes 16
rows a step on 8 warps (no spills), as 64 rows on 4 spilled 5.3 KB."""


def _shapes(width: int, out: int, n_in: int) -> dict[str, int]:
    """Padded sizes (powers of two, >= 16 as ``tl.dot`` needs), the layer-2 column block and
    whether the hidden layers have padded units (which the kernels then zero)."""
    width_pad = max(16, next_power_of_2(width))
    return {
        "IN_BLOCK": min(64, max(16, next_power_of_2(n_in))),
        "WIDTH_PAD": width_pad,
        "OUT_PAD": max(16, next_power_of_2(out)),
        "BLOCK_N": min(64, width_pad),
        "PADDED": width < width_pad,
    }


def forward(
    x1: torch.Tensor,
    x2: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    act: int,
    compute_dtype: torch.dtype,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y in x1's dtype, z1, z2 in ``compute_dtype``; empty unless ``save``) for rows of [x1, x2]
    (2-D, unit column stride) and ``params`` = (W1, b1, W2, b2, W3, b3), contiguous."""
    check_unit_column_stride(x1=x1, x2=x2)
    w1, b1, w2, b2, w3, b3 = params
    m, width, out = x1.shape[0], w2.shape[0], w3.shape[0]
    y = torch.empty(m, out, device=x1.device, dtype=x1.dtype)
    rows = m if save else 0
    z1, z2 = (x1.new_empty(rows, width, dtype=compute_dtype) for _ in range(2))
    grid = (cdiv(m, FORWARD_TILE["BLOCK_M"]),)
    with on_device(x1.device):
        forward_kernel[grid](
            x1, x2, w1, b1, w2, b2, w3, b3, y, z1, z2,
            m, x1.shape[1], x2.shape[1], x1.stride(0), x2.stride(0), width, out,
            ACT=act, SAVE=save, **_shapes(width, out, w1.shape[1]), **FORWARD_TILE,
            PRECISION=dot.precision(compute_dtype),
            UPCAST=dot.upcast(compute_dtype, TAKES_CPU_TENSORS),
        )  # fmt: skip
    return y, z1, z2


def backward(
    dy: torch.Tensor,
    x1: torch.Tensor,
    x2: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    z1: torch.Tensor,
    z2: torch.Tensor,
    act: int,
    need_dx: bool,
    need_weights: bool,
) -> tuple[torch.Tensor, ...]:
    """(dx1, dx2, dW1, db1, dW2, db2, dW3, db3) from dy (contiguous), the forward's inputs and its
    saved z1, z2: dx in the inputs' dtypes (empty unless ``need_dx``), the rest in the weights'
    (empty unless ``need_weights``)."""
    check_unit_column_stride(dy=dy, x1=x1, x2=x2)
    w1, w2, w3 = weights
    m, width, out = dy.shape[0], w2.shape[0], w3.shape[0]
    cd = z1.dtype
    shapes = _shapes(width, out, w1.shape[1])
    options = {"PRECISION": dot.precision(cd), "UPCAST": dot.upcast(cd, TAKES_CPU_TENSORS)}
    dz1, dz2 = (torch.empty_like(z) if need_weights else z[:0] for z in (z1, z2))
    dx1, dx2 = (torch.empty_like(x) if need_dx else x.new_empty(0, x.shape[1]) for x in (x1, x2))
    with on_device(dy.device):
        backward_data_kernel[(cdiv(m, FORWARD_TILE["BLOCK_M"]),)](
            dy, w1, w2, w3, z1, z2, dz1, dz2, dx1, dx2,
            m, x1.shape[1], x2.shape[1], dx1.stride(0), dx2.stride(0), width, out,
            ACT=act, STORE_DZ=need_weights, NEED_DX=need_dx, **shapes, **FORWARD_TILE,
            **options,
        )  # fmt: skip
    if not need_weights:
        return dx1, dx2, *(w.new_empty(0) for w in weights for _ in range(2))
    grads = [t for w in weights for t in (torch.empty_like(w), w.new_empty(w.shape[0]))]
    dw1, db1, dw2, db2, dw3, db3 = grads
    tile = WEIGHT_TILE | ({"BLOCK_K": 16, "num_warps": 8} if options["PRECISION"] == "ieee" else {})
    p, q = tile["BLOCK_P"], tile["BLOCK_Q"]
    tiles = cdiv(width, p) * (cdiv(width, q) + cdiv(w1.shape[1], q)) + cdiv(out, p) * cdiv(width, q)
    with on_device(dy.device):
        backward_weight_kernel[(tiles,)](
            x1, x2, x1.stride(0), x2.stride(0), x1.shape[1], x2.shape[1], dy, z1, z2, dz1, dz2,
            dw1, db1, dw2, db2, dw3, db3, m, width, out, ACT=act, **tile, **options,
        )  # fmt: skip
    return dx1, dx2, *grads


TAKES_CPU_TENSORS = runs_on_cpu(forward_kernel)
