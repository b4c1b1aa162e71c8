"""The launch policy of the pair-statistics kernels (``pair_stats.py``): the tiles, warps and
pipeline stages each launch takes, and the experimental options that change them.

Kept apart from the kernels so that their file holds the Triton code and its launchers. Here:
the fixed configs (:func:`_config`, chosen from sm_90 compiler reports), the single pass
(``CRL_FAST_SINGLE_PASS=1``, ``CRL_FAST_SINGLE_PASS_ROWS``), TMA descriptors
(``CRL_FAST_TMA=1``) and the autotuner (``CRL_FAST_AUTOTUNE=1``: a few candidates per problem
size timed once, the fastest remembered in ``_TUNED``); each variable is read at each call. The
launchers pass what this module cannot know: a ``launch`` to time, and whether Triton's
interpreter built the kernels.
"""

from __future__ import annotations

import os

import torch
import triton

from crl_fast.kernels import dot
from crl_fast.kernels.grid import next_power_of_2

SINGLE_K_MAX_D = 64
"""Up to this d (16 for float32 without TF32), a program holds its whole A rows and takes B's
rows in one chunk: the column loop is innermost, so its loads are pipelined across tiles. At
128-wide tiles on 4 warps, 34 of 194 variants spilled (up to 184 B; compiled with BLOCK_K =
BLOCK_D = 128): d in (64, 128] keeps the chunked loop on 8 warps until a GPU says otherwise."""


def _config(n_a: int, d: int, dtype: torch.dtype, atomics: bool = False) -> dict[str, int]:
    """Fixed tile shapes: K in one chunk (SINGLE_K) or in BLOCK_K chunks; BLOCK_D tiles the
    gradient's columns (one tile with SINGLE_K, whose gradient product reuses B's tile).

    Chosen from sm_90 compiler reports (``tests/compile_kernels.py``), not yet from timings: on
    4 warps a 64 x 64 tile keeps too many values live (255 registers; 22 of 258 bfloat16
    variants spilled, up to 220 B), on 8 warps none spill (occupancy is the same 8 warps per
    SM). Float32 without TF32 multiplies on the CUDA cores with operands in registers: K in
    chunks of 16 cuts its spills from up to 18.9 KB to at most 36 B. With K chunked, the chunk
    loop is the one Triton pipelines and a 64-wide d has one chunk: each column tile then waited
    for its own loads (seen in the SASS), hence SINGLE_K. It runs on 4 warps: with 8, the second
    product's register operand made both warpgroups compute the whole 64 x 64 tile of logits
    (twice the special-function work), and float32 takes 32 columns a tile, as 64 spilled up to
    388 B (the agent's infonce + norm critic with metrics). With K chunked, each BLOCK_D tile of
    the gradient recomputes the whole tile of logits: 16-bit inputs take d up to 256 in one
    (H200, bf16, B = 65536, d = 256: 78 ms with two 128-wide tiles, 2026-11-28); float32 keeps
    128, as 256 spilled up to 140 B (norm energy, TF32).

    ``atomics`` (the single pass: dy through atomics, see :func:`single_pass`): 128 rows
    on 8 warps, one 64-row warpgroup each, halve the atomic traffic of 64 (one float per logit)
    at 25.0 instead of 27.5 instructions per logit (bf16 dot, d = 64, sm_90 SASS), no spills.
    ``CRL_FAST_SINGLE_PASS_ROWS`` (experimental) sets another count: 256 quarters the traffic
    at 22.1 instructions per logit, but with 255 registers (l2 and norm spill). (Counts of
    2026-11-28: the softplus series of 2026-12-07 adds 3 to each.)"""
    width = max(16, next_power_of_2(d))
    ieee = dot.precision(dtype) == "ieee"
    single = width <= (16 if ieee else SINGLE_K_MAX_D)
    rows = single_pass_rows() if atomics else 64
    return {
        "BLOCK_M": rows if n_a >= rows else max(16, next_power_of_2(n_a)),
        "BLOCK_N": 32 if single and dtype == torch.float32 else 64,
        "BLOCK_K": width if single else 16 if ieee else 64,
        "BLOCK_D": width if single else min(width, 256 if dtype.itemsize == 2 else 128),
        "SINGLE_K": single,
        "TMA": single and os.environ.get("CRL_FAST_TMA") == "1",
        "num_warps": 4 if single and not atomics else 8,
        "num_stages": 3,
    }


def single_pass_rows() -> int:
    """The single pass's rows a program: ``CRL_FAST_SINGLE_PASS_ROWS``, a power of two >= 16
    (a tensor-core tile's rows), 128 where unset."""
    text = os.environ.get("CRL_FAST_SINGLE_PASS_ROWS", "128")
    rows = int(text) if text.isdecimal() else 0
    if rows < 16 or rows & (rows - 1):
        raise ValueError(f"CRL_FAST_SINGLE_PASS_ROWS must be a power of two >= 16, got {text!r}")
    return rows


def single_pass(dtype: torch.dtype, d: int) -> bool:
    """Whether the dx pass over the logits also gives dy, through float32 atomics
    (``CRL_FAST_SINGLE_PASS=1``, experimental): the losses with gradients in forward (sigmoid,
    DPO, IPO, FB, SPPO) then take both in one pass, every other loss's backward its dy from its
    dx pass. Only where d fits one tile and torch is not asked for deterministic algorithms (the
    atomics' order varies)."""
    return (
        os.environ.get("CRL_FAST_SINGLE_PASS") == "1"
        and not torch.are_deterministic_algorithms_enabled()
        and _config(1, d, dtype)["SINGLE_K"]
    )


def tma_descriptors(a: torch.Tensor, b: torch.Tensor, cfg: dict[str, int]) -> tuple:
    """(A descriptor, B descriptor, cfg) for cfg's tiles; (None, None, cfg without TMA) when cfg
    asks for none or the copy engine cannot take the tensors (rows not 16-byte aligned).

    ``CRL_FAST_TMA=1`` (experimental, SINGLE_K tiles only; the autotuner also tries it): the
    programs' rows and column tiles come through tensor descriptors, the Hopper copy engine,
    instead of pointer loads. All 168 bf16 ``--quick`` variants compile for sm_90 with it
    (Triton 3.6 and 3.8); not yet timed. Warp-specialising the column loop on top, which needs
    these loads, fails in Triton 3.8's NVGPUWarpSpecialization pass for these kernels;
    ``bench/probe_warp_specialize.py`` times it on a simpler loop, to tell whether restructuring
    the kernels for it would pay."""

    def ready(t: torch.Tensor) -> bool:
        row_bytes = t.stride(0) * t.element_size()
        return t.stride(1) == 1 and row_bytes % 16 == 0 and t.data_ptr() % 16 == 0

    if not cfg["TMA"] or not (ready(a) and ready(b)):
        return None, None, cfg | {"TMA": False}
    from triton.tools.tensor_descriptor import TensorDescriptor

    def desc(t: torch.Tensor, rows: int) -> TensorDescriptor:
        return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [rows, cfg["BLOCK_K"]])

    return desc(a, cfg["BLOCK_M"]), desc(b, cfg["BLOCK_N"]), cfg


_TUNED: dict[tuple, dict[str, int]] = {}
_TILE_CANDIDATES = (
    (32, 32, 4), (32, 64, 4), (64, 32, 4), (64, 64, 4),
    (64, 64, 8), (128, 64, 8), (64, 128, 8), (128, 128, 8),
)  # fmt: skip
"""(BLOCK_M, BLOCK_N, num_warps) the autotuner times. The H200 measured the 64 x 64 default at
half its issue-slot model (2026-11-28) with few warps per SM: at B = 16384 the grid gives each SM
two programs of 4 warps, and their 124-149 registers per thread let at most three share an SM.
Smaller tiles trade a few instructions per logit (bf16 dot: 21.5 -> 23.3 in the row pass with
32 columns) for more resident warps (100 registers: five programs) or a larger grid."""


def choose_config(
    key: tuple, n_a: int, d: int, dtype: torch.dtype, launch, atomics: bool = False, *,
    interpreted: bool,
) -> dict[str, int]:  # fmt: skip
    """The fixed config, or with CRL_FAST_AUTOTUNE=1 (compiled kernels only: not when
    ``interpreted``, Triton's interpreter built them) the fastest of a few candidates for this
    key, each run by ``launch(cfg)``, timed once with ``triton.testing.do_bench`` and
    remembered. Tune before capturing a CUDA graph: timing cannot run inside a capture. The
    single pass is never tuned: each timed launch would add its atomics into the caller's column
    sums. Nor is anything under deterministic algorithms: the tile shape changes the order of
    the sums, so the last bits of the gradients, and a shape picked by timing can differ from
    run to run."""
    base = _config(n_a, d, dtype, atomics)
    tune = (
        os.environ.get("CRL_FAST_AUTOTUNE") == "1"
        and not atomics
        and not torch.are_deterministic_algorithms_enabled()
    )
    if not tune or interpreted:
        return base
    key = (*key, base["TMA"])  # CRL_FAST_TMA, read at each call, picks the candidates
    if key not in _TUNED:
        from triton.testing import do_bench

        candidates = [
            base | {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
            for bm, bn, w in _TILE_CANDIDATES
            for st in (2, 3)
            if bm <= max(64, next_power_of_2(n_a))
        ]
        if base["SINGLE_K"]:  # the default tile through the copy engine (see tma_descriptors)
            candidates += [base | {"TMA": True, "num_stages": st} for st in (2, 3)]
        times = [_time_or_inf(do_bench, launch, c) for c in candidates]
        best = min(range(len(candidates)), key=times.__getitem__)
        _TUNED[key] = candidates[best] if times[best] < float("inf") else base  # none fit
    return _TUNED[key]


def _time_or_inf(do_bench, launch, cfg: dict[str, int]) -> float:
    """A candidate that does not fit the chip (shared memory, registers) never wins."""
    try:
        return do_bench(lambda: launch(cfg))
    except triton.runtime.errors.OutOfResources:
        return float("inf")


def bucket(n: int) -> int:
    """The power of two that stands for a size ``n`` in the autotuner's keys: the sizes of one
    bucket share a tuned config."""
    return next_power_of_2(max(n, 1))
