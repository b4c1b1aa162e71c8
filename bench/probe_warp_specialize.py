"""Design probe: would TMA loads and warp specialization speed up the loss kernels' column loop?

    python -m bench.probe_warp_specialize            # GPU (sm_90): B = 16384, d = 64, bf16
    TRITON_INTERPRET=1 python -m bench.probe_warp_specialize --batch 200 --dim 16   # CPU check

The H200 measured the sigmoid loss at 0.69 ms of GPU work for B = 16384 (2026-11-28), about
twice its instruction count's bound. In its SASS each column tile's logits product is waited for
before the tile's elementwise work, so the tensor cores and the other units take turns. Triton
(3.6 and 3.8) warp-specialises a loop on Hopper, with a TMA producer and two consumer
warpgroups whose products and elementwise work can then overlap, only when its tiles come
through tensor descriptors.

This probe times the row pass of the sigmoid loss (logits, softplus and sigmoid with one exp,
the row sums, dA = sum_j sigmoid(L_ij) B_j through the tensor cores) in three forms:
pointer loads as in ``kernels/pair_stats.py``, tensor-descriptor loads, and descriptors plus
``warp_specialize``. It checks each against PyTorch first. Reuse the kernels' fast paths and the
answer tells whether porting ``stats_kernel`` / ``grad_kernel`` is worth it. Writes
bench/results/probe-ws-<device>.json.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from bench.harness import graphed, measure, positive_int, print_table, write_results
from crl_fast.kernels import runs_on_cpu
from crl_fast.kernels.pair_stats import _softplus_sigmoid

VARIANTS = ("pointers", "tma", "tma+warp_specialize")


@triton.jit
def _row_pass(
    A_ptr, B_ptr, a_desc, b_desc, DA_ptr, SP_ptr, N_A, N_B,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr,
    WS: tl.constexpr,
):  # fmt: skip
    r0 = tl.program_id(0) * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, D)
    if TMA:
        a = a_desc.load([r0, 0])
    else:
        a = tl.load(A_ptr + rows[:, None] * D + ks[None, :], mask=(rows < N_A)[:, None], other=0.0)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    sp_sum = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in tl.range(0, N_B, BLOCK_N, warp_specialize=WS):
        cols = n0 + tl.arange(0, BLOCK_N)
        if TMA:
            b = b_desc.load([n0, 0])
        else:
            b_mask = (cols < N_B)[:, None]
            b = tl.load(B_ptr + cols[:, None] * D + ks[None, :], mask=b_mask, other=0.0)
        z = tl.dot(a, tl.trans(b))
        sp, sig = _softplus_sigmoid(z)  # the loss kernels' own: one exp, fast log2 and divide
        valid = (cols < N_B)[None, :]
        sp_sum += tl.sum(tl.where(valid, sp, 0.0), 1)
        acc = tl.dot(tl.where(valid, sig, 0.0).to(b.dtype), b, acc)
    mask = rows < N_A
    tl.store(DA_ptr + rows[:, None] * D + ks[None, :], acc, mask=mask[:, None])
    tl.store(SP_ptr + rows, sp_sum, mask=mask)


def row_pass(
    a: torch.Tensor, b: torch.Tensor, variant: str, block_m: int = 64, block_n: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dA, softplus row sums) of the logits a @ b.T, float32, by one of ``VARIANTS``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n_a, d = a.shape
    tma = variant != "pointers"
    a_desc = TensorDescriptor.from_tensor(a, [block_m, d]) if tma else None
    b_desc = TensorDescriptor.from_tensor(b, [block_n, d]) if tma else None
    da = torch.empty(n_a, d, dtype=torch.float32, device=a.device)
    sp = torch.empty(n_a, dtype=torch.float32, device=a.device)
    _row_pass[(triton.cdiv(n_a, block_m),)](
        a, b, a_desc, b_desc, da, sp, n_a, b.shape[0], D=d, BLOCK_M=block_m, BLOCK_N=block_n,
        TMA=tma, WS=variant == "tma+warp_specialize", num_warps=4, num_stages=3,
    )  # fmt: skip
    return da, sp


def _cuda_scratch(size: int, _alignment: int, _stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, default=16384)
    parser.add_argument("--dim", type=positive_int, default=64, help="a power of two >= 16")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not runs_on_cpu(_row_pass):
        parser.error("needs a CUDA device, or TRITON_INTERPRET=1 to check the kernels on the CPU")
    if args.dim < 16 or args.dim & (args.dim - 1):
        parser.error(f"--dim must be a power of two >= 16 (one tile), got {args.dim}")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:  # device-side scratch for descriptors, where a Triton version asks for it
        triton.set_allocator(_cuda_scratch)
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter's bf16 dot is off
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(args.batch, args.dim, generator=g) / args.dim**0.5).to(device, dtype)
    b = (torch.randn(args.batch, args.dim, generator=g) / args.dim**0.5).to(device, dtype)
    z = a.float() @ b.float().T
    want_da, want_sp = torch.sigmoid(z) @ b.float(), torch.nn.functional.softplus(z).sum(1)
    rows = []
    for variant in VARIANTS:
        row = {"variant": variant, "B": args.batch, "d": args.dim, "dtype": str(dtype)[6:]}
        try:
            da, sp = row_pass(a, b, variant)
        except Exception as error:  # a compiler that refuses a variant is an answer too
            rows.append(row | {"status": f"failed: {str(error).splitlines()[0][:120]}"})
            continue
        err = max(
            ((da - want_da).norm() / want_da.norm()).item(),
            ((sp - want_sp).norm() / want_sp.norm()).item(),
        )
        row |= {"rel_error": err, "status": "ok" if err < 2e-2 else "WRONG"}
        if cuda and err < 2e-2:

            def one_pass(v: str = variant) -> tuple[torch.Tensor, torch.Tensor]:
                return row_pass(a, b, v)

            # replayed from a CUDA graph: the TMA variants' host-side descriptors are built at
            # capture, not timed against the pointer variant
            replay = graphed(one_pass, device)
            row |= measure(replay, device=device, warmup=5, rep=50, memory=False)
        rows.append(row)
        print(row, flush=True)
        write_results("probe-ws", device, rows, complete=False)  # kept if a time limit cuts
    path = write_results("probe-ws", device, rows)
    cols = ["variant", "B", "d", "dtype", "rel_error", "median_ms", "status"]
    print_table(rows, cols, title=f"sigmoid row pass, three load schemes ({path.name})")


if __name__ == "__main__":
    main()
