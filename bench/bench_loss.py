"""Fused contrastive loss against eager PyTorch and torch.compile: forward + backward.

    python -m bench.bench_loss                 # every size on the GPU (CPU: small sizes)
    python -m bench.bench_loss --quick         # one size per table
    pytest bench/bench_loss.py --benchmark-only

Times ``loss(phi, psi)`` plus the gradients of phi and psi, median of many runs (CUDA events;
time.perf_counter on the CPU), and the peak extra device memory. ``crl_fast`` is one eager call
(Python, launches and GPU work: small batches measure the host); ``crl_fast-graph`` replays
the same call from a CUDA graph, so it measures the GPU work alone (its memory lives in the
graph's pool: peak is None). Eager and torch.compile materialise the B x B logits: they are
skipped, and say so, where that matrix cannot fit. Writes bench/results/loss-<device>.json.
Issue targets (H100, bf16, d = 64): binary B = 16384 <= 0.30 ms, B = 65536 <= 4.5 ms,
B = 1,048,576 <= 1.2 s; infonce + norm + penalty 0.1 at B = 16384 <= 0.45 ms.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bench.harness import (
    add_device_argument,
    add_name_argument,
    count,
    device_label,
    device_name,
    graphed,
    measure,
    note_cuda_only,
    positive_int,
    print_table,
    tuned_configs,
    write_results,
)
from crl_fast import contrastive_loss, reference_contrastive_loss

GPU_SIZES = (4096, 16384, 65536, 262144, 1048576)
CPU_SIZES = (1024, 4096)
DIMS = (64, 256)
# Every loss with the energy JaxGCRL pairs it with most often, plus its default critic first.
COMBOS = (
    ("infonce", "norm", 0.1),
    ("binary", "dot", 0.0),
    ("infonce", "dot", 0.0),
    ("infonce", "l2", 0.0),
    ("infonce", "cosine", 0.0),
    ("infonce_backward", "norm", 0.0),
    ("symmetric_infonce", "norm", 0.1),
    ("flatnce", "norm", 0.0),
    ("flatnce_backward", "norm", 0.0),
    ("dpo", "dot", 0.0),
    ("ipo", "dot", 0.0),
    ("fb", "dot", 0.0),
    ("sppo", "dot", 0.0),
)
IMPLS = ("crl_fast", "crl_fast-graph", "eager", "compile")
CPU_IMPLS = ("crl_fast", "eager")


def _loss_fn(impl: str) -> Callable:
    if impl.startswith("crl_fast"):
        return contrastive_loss
    if impl == "eager":
        return reference_contrastive_loss
    # A fresh cache per row: one compiled function takes 8 shapes / settings, then dynamo's
    # recompile limit would run the 9th row's "compile" eagerly.
    torch._dynamo.reset()
    return torch.compile(reference_contrastive_loss, dynamic=False)


def make_step(
    impl: str,
    b: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device,
    loss: str = "binary",
    energy: str = "dot",
    penalty: float = 0.0,
    frozen_psi: bool = False,
) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A closure computing the loss and the gradients of phi and psi once (of phi alone with
    ``frozen_psi``: a locked goal or text tower, as in LiT)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    phi = (torch.randn(b, d, generator=g) / d**0.5).to(device, dtype).requires_grad_()
    psi = (torch.randn(b, d, generator=g) / d**0.5).to(device, dtype)
    psi.requires_grad_(not frozen_psi)
    fn = _loss_fn(impl)
    wrt = (phi,) if frozen_psi else (phi, psi)

    def step() -> tuple[torch.Tensor, ...]:
        value = fn(phi, psi, loss=loss, energy=energy, logsumexp_penalty=penalty)
        return torch.autograd.grad(value, wrt)

    return step


def _fits(impl: str, b: int, device: torch.device) -> bool:
    """Whether a materialising implementation's B x B float32 temporaries can fit at all."""
    if impl.startswith("crl_fast"):
        return True
    budget = (
        torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 8 << 30
    )
    return 4 * b * b * 4 < budget


def _backend(device: torch.device, dtype: torch.dtype) -> str:
    """What ``contrastive_loss``'s default backend runs on ``device``: the Triton kernels, or
    (on the CPU, always) the chunked PyTorch path, whose times say nothing of the kernels'."""
    from crl_fast.loss import _use_triton

    return "triton" if _use_triton(torch.empty(0, device=device, dtype=dtype), "auto") else "torch"


def run_one(
    impl: str, b: int, d: int, dtype: torch.dtype, device: torch.device, **combo: Any
) -> dict:
    row = {"impl": impl, "B": b, "d": d, "dtype": str(dtype).removeprefix("torch.")}
    row |= {"loss": combo.get("loss", "binary"), "energy": combo.get("energy", "dot")}
    row["penalty"] = combo.get("penalty", 0.0)
    row["frozen_psi"] = combo.get("frozen_psi", False)
    if impl.startswith("crl_fast"):  # what ran, not what was asked
        row["backend"] = _backend(device, dtype)
    if impl.startswith("crl_fast") and device.type == "cuda":
        from crl_fast.kernels import pair_stats_tiling

        row["single_pass"] = pair_stats_tiling.single_pass(dtype, d)
    if not _fits(impl, b, device):
        return row | {"status": "skipped: B x B logits do not fit"}
    try:
        step: Callable[[], object] = make_step(impl, b, d, dtype, device, **combo)
        if impl.endswith("-graph"):
            step = graphed(step, device)
        t0 = time.perf_counter()
        step()  # compiles (Triton / torch.compile) and sizes the repetitions
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first = time.perf_counter() - t0
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        once = time.perf_counter() - t0 - first
        rep = int(min(100, max(3, 2.0 / max(once, 1e-6))))
        result = measure(step, device=device, warmup=2, rep=rep, memory=not impl.endswith("-graph"))
    except torch.OutOfMemoryError:
        return row | {"status": "out of memory"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row | result | {"status": "ok"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_argument(parser)
    parser.add_argument("--quick", action="store_true", help="one size per table")
    parser.add_argument(
        "--fp32-precision",
        default="high",
        choices=("highest", "high"),
        help="torch.set_float32_matmul_precision for float32 runs (high = tf32), all impls",
    )
    parser.add_argument(
        "--autotune",
        action="store_true",
        help="CRL_FAST_AUTOTUNE=1: time tile candidates per shape; the winners go in the JSON",
    )
    parser.add_argument(
        "--sizes", type=positive_int, nargs="+", help="batch sizes B (default per device)"
    )
    parser.add_argument("--dims", type=positive_int, nargs="+", help="d (default 64, 256 on GPUs)")
    parser.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="default: all the device has")
    parser.add_argument(
        "--combos",
        type=count,
        help=f"first N of the {len(COMBOS)} loss combos, at B = 16384 (CPU: 1024; with --sizes, "
        "the largest)",
    )
    parser.add_argument(
        "--frozen-psi",
        action="store_true",
        help="psi needs no gradient (a locked goal or text tower, as in LiT): phi's alone",
    )
    add_name_argument(parser, "loss, plus the experimental switches on")
    args = parser.parse_args()
    if args.autotune:
        os.environ["CRL_FAST_AUTOTUNE"] = "1"
    args.autotune = os.environ.get("CRL_FAST_AUTOTUNE") == "1"  # the switch, however set
    device = torch.device(args.device)
    torch.set_float32_matmul_precision(args.fp32_precision)
    cuda = device.type == "cuda"
    sizes: Sequence[int] = GPU_SIZES if cuda else CPU_SIZES
    sizes = sizes[1:2] if (args.quick and cuda) else sizes[:1] if args.quick else sizes
    sizes = args.sizes or sizes
    dims = args.dims or (DIMS[:1] if args.quick or not cuda else DIMS)
    dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float32) if cuda else (torch.float32,)
    dtypes = [getattr(torch, name) for name in args.dtypes] if args.dtypes else dtypes
    impls = args.impls or (IMPLS if cuda else CPU_IMPLS)
    if not cuda and "crl_fast-graph" in impls:
        parser.error("--impls crl_fast-graph replays a CUDA graph: it needs a CUDA device")
    if not args.impls:
        note_cuda_only(
            device,
            "the crl_fast-graph rows (they replay a CUDA graph) and, by default, compile's "
            "(--impls compile runs them)",
        )
    combos = COMBOS[: args.combos if args.combos is not None else 2 if args.quick else None]
    label = f" on {device_label(device)}"
    # The experimental kernel paths (kernels/pair_stats_tiling.py) each write a file of their own.
    variants = {
        "autotuned": args.autotune,
        "tma": os.environ.get("CRL_FAST_TMA") == "1",
        "single-pass": os.environ.get("CRL_FAST_SINGLE_PASS") == "1",
        "frozen-psi": args.frozen_psi,
    }
    if variants["single-pass"] and (block_rows := os.environ.get("CRL_FAST_SINGLE_PASS_ROWS")):
        variants[f"rows{block_rows}"] = True
    extra: dict[str, object] = {
        "fp32_matmul_precision": args.fp32_precision,
        "autotune": args.autotune,
    }
    extra |= {"tma": variants["tma"], "single_pass": variants["single-pass"]}
    extra["single_pass_rows"] = os.environ.get("CRL_FAST_SINGLE_PASS_ROWS")
    name = args.name or "-".join(["loss", *(k for k, on in variants.items() if on)])
    rows: list[dict] = []

    def record(row: dict) -> dict:
        """Print and save after every row, so a run stopped by a time limit keeps its rows."""
        rows.append(row)
        print(row, flush=True)
        if args.autotune:
            extra["tuned_configs"] = tuned_configs()
        write_results(name, device, rows, extra=extra, complete=False)
        return row

    # The issues' tables first (bf16, d = 64, with every loss), then the others.
    tables = [(dtype, d) for dtype in dtypes for d in dims]
    combo_b = max(args.sizes) if args.sizes else 16384 if cuda else 1024
    cols = ["impl", "backend", "loss", "energy", "penalty", "B", "d", "dtype", "median_ms"]
    cols.append("host_ms")
    cols.append("peak_mem_mb")
    cols.append("status")
    # crl-fast's rows first (the issues' targets: the first table and every loss), then the
    # materialising implementations (torch.compile takes ~20 s a graph), so a time limit that
    # cuts the run keeps the targets.
    ours = [impl for impl in impls if impl.startswith("crl_fast")]
    groups = (ours, [impl for impl in impls if impl not in ours])
    for index, (dtype, d) in enumerate(tables):
        table, every_loss = [], []
        for group in groups:
            frozen = {"frozen_psi": args.frozen_psi}
            table += [
                record(run_one(impl, b, d, dtype, device, **frozen))
                for impl in group
                for b in sizes
            ]
            for impl in group if index == 0 else ():
                for n, (loss, energy, penalty) in enumerate(combos):
                    if impl == "compile" and n >= 2:  # ~20 s a graph: the two default critics
                        continue
                    combo = {"loss": loss, "energy": energy, "penalty": penalty, **frozen}
                    row = record(run_one(impl, combo_b, 64, dtype, device, **combo))
                    every_loss.append((n, row))
        table.sort(key=lambda row: row["B"])  # stable: impls in their order within a size
        print_table(table, cols, title=f"binary + dot, forward + backward{label}")
        if every_loss:
            every_loss.sort(key=lambda pair: pair[0])
            title = f"every loss, B={combo_b}, d=64{label}"
            print_table([row for _, row in every_loss], cols, title=title)
    if rows:
        write_results(name, device, rows, extra=extra)  # the run finished: complete


# --------------------------------------------------------------- pytest-benchmark entry points

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_B = 16384 if _DEVICE.type == "cuda" else 1024
_DTYPE = torch.bfloat16 if _DEVICE.type == "cuda" else torch.float32


try:  # the entry points need pytest (the test extra); the script does not
    import pytest
except ImportError:
    HAS_PYTEST = False
else:
    HAS_PYTEST = True

if HAS_PYTEST:

    @pytest.mark.parametrize("impl", CPU_IMPLS)
    @pytest.mark.parametrize(("loss", "energy", "penalty"), COMBOS[:2])
    def test_loss_forward_backward(
        benchmark: Any, impl: str, loss: str, energy: str, penalty: float
    ) -> None:
        step = make_step(impl, _B, 64, _DTYPE, _DEVICE, loss=loss, energy=energy, penalty=penalty)
        # pytest-benchmark's JSON records the host, not the device: a CPU fallback says so
        benchmark.extra_info |= {"device": device_name(_DEVICE), "B": _B, "dtype": str(_DTYPE)}
        step()  # Triton JIT / first-call work, outside pytest-benchmark's calibration and rounds

        def call() -> None:
            step()
            if _DEVICE.type == "cuda":
                torch.cuda.synchronize()

        benchmark(call)


if __name__ == "__main__":
    main()
