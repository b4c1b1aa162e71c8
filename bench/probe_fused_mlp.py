"""Design probe: would one fused kernel per MLP cut the update's time on the GPU?

    python -m bench.probe_fused_mlp                          # GPU: batch 256 and 4096
    TRITON_INTERPRET=1 python -m bench.probe_fused_mlp --batch 40 --width 32   # CPU check

The compiled, CUDA-graphed update of JaxGCRL's networks took 366 us at batch 256 on an H200
(2026-11-28), about 5 us for each of its ~75 kernels (33 of them matmuls): at 256 rows every
matmul is a few tiles, so each kernel's start and tail, not its arithmetic, sets the time. The
target (13,000 updates/s) leaves 77 us. One kernel per network pass would remove most of them.

This probe times the forward pass of one encoder (``in -> width -> width -> out``, swish) in
two forms, each replayed from a CUDA graph that holds ``--graph-reps`` passes (so the graph's
own launch is spread over them): PyTorch (three addmm and two silu kernels) and one Triton
kernel in which each program takes ``BLOCK_M`` rows through all three layers, streaming the
second layer's output in column blocks straight into the third layer's product, so the hidden
activations never leave the chip. It checks the kernel against PyTorch in float64 first. A
fused forward well under the five kernels' time says fused passes (forward and backward) are
the road to the target; a tie says the time is elsewhere. Writes
bench/results/probe-mlp-<device>.json.
"""

from __future__ import annotations

import argparse
import copy
from functools import partial

import torch
import triton
import triton.language as tl

from bench.harness import measure, print_table, write_results
from crl_fast.kernels.grid import next_power_of_2
from crl_fast.networks import MLP

IN_DIM, OUT_DIM = 35, 64  # the state-action encoder of bench_update: state 27 + action 8 -> 64
TILES = ((16, 8), (32, 8))
"""(rows per program, warps) of the fused kernel: at width 256 these compile for sm_90 without
register spills in bfloat16 and float32 (``ptxas -v``, 2026-12-06); 64 rows spill in float32."""


@triton.jit
def _swish(z):
    return z / (1.0 + tl.exp(-z))


@triton.jit
def _fused_mlp_forward(
    X, W1, B1, W2, B2, W3, B3, Y, M, IN,
    IN_PAD: tl.constexpr, WIDTH: tl.constexpr, OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Y = W3 swish(W2 swish(W1 X + b1) + b2) + b3 for BLOCK_M rows of X (weights as nn.Linear
    stores them, out x in, read transposed); float32 accumulation, products in X's dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ks = tl.arange(0, IN_PAD)
    hidden = tl.arange(0, WIDTH)
    outs = tl.arange(0, OUT)
    x_ok = row_ok[:, None] & (ks < IN)[None, :]
    x = tl.load(X + rows[:, None] * IN + ks[None, :], mask=x_ok, other=0.0)
    w1 = tl.load(W1 + hidden[None, :] * IN + ks[:, None], mask=(ks < IN)[:, None], other=0.0)
    h1 = _swish(tl.dot(x, w1) + tl.load(B1 + hidden)[None, :]).to(x.dtype)
    acc = tl.zeros((BLOCK_M, OUT), tl.float32)
    for n0 in tl.range(0, WIDTH, BLOCK_N):  # a column block of layer 2 = a K block of 3
        cols = n0 + tl.arange(0, BLOCK_N)
        w2 = tl.load(W2 + cols[None, :] * WIDTH + hidden[:, None])
        h2 = _swish(tl.dot(h1, w2) + tl.load(B2 + cols)[None, :]).to(x.dtype)
        acc = tl.dot(h2, tl.load(W3 + outs[None, :] * WIDTH + cols[:, None]), acc)
    y = acc + tl.load(B3 + outs)[None, :]
    y_ptrs = Y + rows[:, None] * OUT + outs[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=row_ok[:, None])


def fused_forward(mlp: MLP, x: torch.Tensor, block_m: int = 32, num_warps: int = 8) -> torch.Tensor:
    """The forward pass of a 2-hidden-layer swish ``mlp`` in one launch (x: contiguous)."""
    first, second, last = (layer for layer in mlp if isinstance(layer, torch.nn.Linear))
    width, out_dim = second.in_features, last.out_features
    if width != next_power_of_2(width) or out_dim != next_power_of_2(out_dim):
        raise ValueError(f"the probe needs power-of-2 width and output, got {width}, {out_dim}")
    m, in_dim = x.shape
    y = torch.empty(m, out_dim, device=x.device, dtype=x.dtype)
    _fused_mlp_forward[(triton.cdiv(m, block_m),)](
        x, first.weight, first.bias, second.weight, second.bias, last.weight, last.bias, y,
        m, in_dim, IN_PAD=max(16, next_power_of_2(in_dim)), WIDTH=width, OUT=out_dim,
        BLOCK_M=block_m, BLOCK_N=min(64, width), num_warps=num_warps,
    )  # fmt: skip
    return y


def graphed(fn, reps: int):
    """``reps`` calls of ``fn`` captured in one CUDA graph; returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up: compiles, sets up cuBLAS
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return graph.replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--graph-reps", type=int, default=50)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtypes = [torch.bfloat16, torch.float32] if cuda else [torch.float32]
    torch.manual_seed(0)
    mlp = MLP(IN_DIM, OUT_DIM, width=args.width, depth=2).to(device)
    for layer in mlp[::2]:  # the Linears: non-zero biases, so that the check covers them
        torch.nn.init.normal_(layer.bias, std=0.1)
    exact = copy.deepcopy(mlp).double()
    rows = []
    for dtype in dtypes:
        net = copy.deepcopy(mlp).to(dtype)
        for batch in args.batch:
            xd = torch.randn(batch, IN_DIM, device=device, dtype=dtype)
            impls = {"torch": partial(net, xd)}
            for block_m, warps in TILES:
                impls[f"fused {block_m}x{warps}"] = partial(fused_forward, net, xd, block_m, warps)
            with torch.no_grad():  # errors against float64, PyTorch's own in the same dtype too
                want = exact(xd.double())
                errors = {
                    k: ((f().double() - want).norm() / want.norm()).item() for k, f in impls.items()
                }
            ok = all(err <= 2 * errors["torch"] + 1e-6 for err in errors.values())
            for impl, fn in impls.items():
                row = {"impl": impl, "B": batch, "width": args.width, "dtype": str(dtype)[6:]}
                row |= {"rel_error": errors[impl], "status": "ok" if ok else "WRONG"}
                if cuda and ok:
                    with torch.no_grad():
                        replay = graphed(fn, args.graph_reps)
                        timing = measure(replay, device=device, warmup=3, rep=30, memory=False)
                    row["us_per_pass"] = timing["median_ms"] * 1e3 / args.graph_reps
                rows.append(row)
                print(row, flush=True)
    path = write_results("probe-mlp", device, rows)
    cols = ["impl", "B", "width", "dtype", "rel_error", "us_per_pass", "status"]
    print_table(rows, cols, title=f"encoder forward, 5 kernels against 1 ({path.name})")


if __name__ == "__main__":
    main()
