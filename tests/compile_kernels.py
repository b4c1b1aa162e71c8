"""Compile every Triton kernel variant the library launches for a GPU, on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, so it accepts code the compiler
rejects (a plain float global, a dtype mismatch in ``tl.where``, ...) and never sees shared memory
or register limits. This script records the launches the loss and the buffer make on CPU tensors
with the Triton backend forced (nothing runs: the recorded kernels return without launching),
then compiles each distinct variant down to a cubin for sm_90 with the ptxas that ships in the
triton wheel, checks its shared memory against the H100's 227 KiB and reports its registers and
spills (``ptxas -v``). Compiling goes through ``JITFunction.warmup``, the path of a real launch, so
the Triton cache it fills is the one a GPU run looks up (``bench/gpu_check.sh`` warms it this way,
on all cores, before the serial GPU tests).

    python tests/compile_kernels.py [--quick] [--autotune] [--only REGEX] [--set num_warps=4]
                                    [--sass]

``--sass`` adds, per variant, the instructions issued per logit in the loop over interior column
tiles (those off the diagonal, which need no masks), from the cubin's SASS, counted over all
threads of a program and divided by the tile's logits, and how many of them are special-function
(MUFU) ops: a static cost model, not a timing. An H100 issues at most 4 warp-instructions per SM
per clock and 16 MUFU ops.

Run by ``tests/test_kernels_compile.py`` in a subprocess (TRITON_INTERPRET must be unset).
Prints one line per variant; exits 1 if any fails to compile or does not fit.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels.py compiles for the GPU: run it with TRITON_INTERPRET unset")

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import native_specialize_impl

from crl_fast import GOAL_MODES, LOSSES, TrajectoryBuffer, contrastive_loss
from crl_fast import buffer as buffer_module
from crl_fast import loss as loss_module
from crl_fast.fused_mlp import ACT_CODES
from crl_fast.kernels import goal_sampling, mlp, pair_stats, pair_stats_tiling

H100_SHARED_BYTES = 232_448
"""Dynamic shared memory one block may use on sm_90 (227 KiB)."""

_OPTIONS = ("num_warps", "num_stages")


@dataclass
class Variant:
    """One launch as recorded: compiling it takes the path a real launch takes."""

    kernel: triton.runtime.JITFunction
    args: tuple
    kwargs: dict[str, object]  # constexprs and options (num_warps, num_stages)
    types: tuple  # (type, specialisation) of each positional argument, as Triton derives them
    callers: set[str] = field(default_factory=set)

    def key(self) -> tuple:
        return (self.kernel.__name__, self.types, tuple(self.kwargs.items()))

    def with_overrides(self, values: dict[str, int]) -> Variant:
        """The same launch with the constexprs and options it has replaced by ``values``."""
        kwargs = {k: values.get(k, v) for k, v in self.kwargs.items()}
        return Variant(self.kernel, self.args, kwargs, self.types, self.callers)

    def label(self) -> str:
        flags = {k: v for k, v in self.kwargs.items() if k not in _OPTIONS}
        options = {k: v for k, v in self.kwargs.items() if k in _OPTIONS}
        types = sorted({t for t, _ in self.types if t.startswith("*") and "f" in t})
        text = ",".join(f"{k}={v}" for k, v in flags.items())
        return f"{self.kernel.__name__}[{'/'.join(types)}] {text} {options}"

    def compile(self):
        """Compile (or fetch from the Triton cache) as ``kernel[grid](...)`` would, without
        launching: the arguments get the same specialisation (alignment, ints equal to 1), so
        the cache keys are the ones a real launch looks up. Needs :class:`_TargetOnly` active."""
        return self.kernel.warmup(*self.args, grid=(1,), **self.kwargs)


class _TargetOnly:
    """A stand-in for Triton's CUDA driver that names the target and launches nothing."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def _specialisation(param, value) -> tuple:
    """(type, alignment) of one argument, as ``JITFunction`` derives them (for the dedup key)."""
    specialise, align = not param.do_not_specialize, not param.do_not_specialize_on_alignment
    return native_specialize_impl(BaseBackend, value, False, specialise, align)


class Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel: triton.runtime.JITFunction, seen: dict[tuple, Variant]):
        self.kernel, self.seen, self.caller = kernel, seen, "?"

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, **kwargs) -> None:
        params = self.kernel.params
        types = tuple(_specialisation(p, v) for p, v in zip(params, args, strict=False))
        variant = Variant(self.kernel, args, kwargs, types)
        self.seen.setdefault(variant.key(), variant).callers.add(self.caller)


def _record_candidate(do_bench, launch, cfg: dict[str, int]) -> float:
    launch(cfg)  # recorded, not run
    return 0.0


_DTYPES = (
    (torch.float32, "highest"),
    (torch.float32, "high"),
    (torch.bfloat16, "highest"),
    (torch.float16, "highest"),
)
"""(dtype, float32 matmul precision): float32 with TF32 ("high", as training on CUDA) and
without."""


def _loss_cases(quick: bool):
    """((dtype, float32 matmul precision), (B, d), loss, energy, options): every combination, or
    with ``quick`` every flag combination in bfloat16 and, in each other dtype and tile shape, a
    few losses, each with one energy (each dtype meets both). Float32 runs with TF32 ("high", as
    training on CUDA does) and without."""
    energies = ("dot", "l2", "norm", "cosine")
    extras = ({}, {"logsumexp_penalty": 0.1, "exclude_positive_from_lse": True})
    dtypes = _DTYPES
    shapes = ((100, 64), (7, 200), (100, 256))
    if not quick:
        return itertools.product(dtypes, shapes, LOSSES, energies, extras)
    every_flag = itertools.product(dtypes[2:3], shapes[:1], LOSSES, energies, extras)
    few = ("binary", "infonce", "symmetric_infonce", "dpo")
    other = [  # each (dtype, shape) with each loss, energies alternating: both for each dtype
        (dtype, shape, loss, ("dot", "norm")[(i + j) % 2], extras[0])
        for j, (dtype, shape) in enumerate(itertools.product(dtypes, shapes))
        for i, loss in enumerate(few)
    ]
    return itertools.chain(every_flag, other)


def _record_loss_launches(recorders: list[Recorder], autotune: bool, quick: bool) -> None:
    """Forward and backward of the losses, energies, dtypes and options the kernels specialise
    on."""
    loss_module.triton_runs_on = lambda device, kernels: True  # CPU tensors: launches only recorded
    if autotune:  # record every candidate config instead of timing it
        os.environ["CRL_FAST_AUTOTUNE"] = "1"
        pair_stats_tiling._time_or_inf = _record_candidate
    for (dtype, precision), (b, d), loss, energy, extra in _loss_cases(quick):
        torch.set_float32_matmul_precision(precision)
        for r in recorders:
            r.caller = f"{loss}/{energy}/{dtype}/{precision}/B={b}/d={d}/{extra}"
        phi = torch.randn(b, d, dtype=dtype, requires_grad=True)
        psi = torch.randn(b + 3, d, dtype=dtype, requires_grad=True)
        scale = torch.zeros((), requires_grad=True)
        out, _ = contrastive_loss(
            phi, psi, loss=loss, energy=energy, log_scale=scale, backend="triton",
            return_metrics=True, **extra,
        )  # fmt: skip
        out.backward()
        square = contrastive_loss(phi, psi[:b], loss=loss, energy=energy, backend="triton", **extra)
        square.backward()
        agent, _ = contrastive_loss(  # metrics without a learnable scale, as the agent asks
            phi, psi, loss=loss, energy=energy, backend="triton", return_metrics=True, **extra
        )
        agent.backward()
    _record_single_pass_launches(recorders, quick)


def _record_single_pass_launches(recorders: list[Recorder], quick: bool) -> None:
    """The experimental single pass (CRL_FAST_SINGLE_PASS=1): the sigmoid loss in every dtype
    and energy (``quick``: each energy once in dtypes but bfloat16), with and without a learnable
    scale, at widths it takes in one tile (float32 without TF32: 16 only); DPO, IPO, FB and SPPO in
    bfloat16; every loss's backward (penalty and metrics on: the general path) in bfloat16."""
    energies = ("dot", "l2", "norm", "cosine")
    shapes = list(itertools.product((16, 64), ("plain", "scale")))  # (d, options)
    binary = []
    for dtype in _DTYPES:
        if not quick or dtype == _DTYPES[2]:
            binary += [
                ("binary", dtype, d, e, options)
                for (d, options), e in itertools.product(shapes, energies)
            ]
        else:  # each energy once, at a width this dtype takes in one tile (else: two passes)
            takes = [s for s in shapes if s[0] == 16] if dtype == _DTYPES[0] else shapes
            for i, energy in enumerate(energies):
                d, options = takes[i % len(takes)]
                binary.append(("binary", dtype, d, energy, options))
    cases = itertools.chain(  # (loss, dtype, d, energy, options)
        binary,
        itertools.product(
            ("dpo", "ipo", "fb", "sppo"), _DTYPES[2:3], (64,), energies, ("plain", "scale")
        ),
        itertools.product(LOSSES, _DTYPES[2:3], (64,), ("dot", "norm"), ("general",)),
    )
    os.environ["CRL_FAST_SINGLE_PASS"] = "1"
    try:
        for loss, (dtype, precision), d, energy, options in cases:
            torch.set_float32_matmul_precision(precision)
            for r in recorders:
                r.caller = f"single pass/{loss}/{energy}/{dtype}/{precision}/d={d}/{options}"
            phi = torch.randn(130, d, dtype=dtype, requires_grad=True)
            psi = torch.randn(133, d, dtype=dtype, requires_grad=True)
            scale = None if options == "plain" else torch.zeros((), requires_grad=True)
            kw = {"loss": loss, "energy": energy, "log_scale": scale, "backend": "triton"}
            if options == "general":  # penalty and metrics: the general backward
                kw |= {"logsumexp_penalty": 0.1, "return_metrics": True}
                contrastive_loss(phi, psi, **kw)[0].backward()
            else:
                contrastive_loss(phi, psi, **kw).backward()
    finally:
        del os.environ["CRL_FAST_SINGLE_PASS"]


def _record_buffer_launches(recorders: list[Recorder]) -> None:
    """Extend and every goal mode of sample, on CPU tensors (CUDA stays uninitialised for the
    forked compile workers, also on a GPU machine)."""
    for r in recorders:
        r.caller = "buffer"
    buffer_module.triton_runs_on = lambda device, kernels: True  # CPU tensors: launches recorded
    for dtype in (torch.float32, torch.bfloat16):
        buf = TrajectoryBuffer(
            capacity=8, num_envs=3, obs_dim=5, action_dim=2, goal_dim=2, dtype=dtype,
            device="cpu", backend="triton",
        )  # fmt: skip
        t = 4
        buf.extend(
            {
                "observation": torch.randn(t, 3, 5, dtype=dtype),
                "action": torch.randn(t, 3, 2, dtype=dtype),
                "next_achieved_goal": torch.randn(t, 3, 2, dtype=dtype),
                "terminated": torch.zeros(t, 3, dtype=torch.bool),
                "truncated": torch.zeros(t, 3, dtype=torch.bool),
            }
        )
        for mode in GOAL_MODES:
            buf.sample(16, goal_mode=mode, random_goal_fraction=0.2, current_goal_fraction=0.1)


def _record_mlp_launches(recorders: list[Recorder], quick: bool) -> None:
    """The fused MLP's forward and backward (with and without input or weight gradients; the
    backward for each activation, which it specialises on) in each dtype (``quick``: TF32 and
    bfloat16, as training on CUDA), at the encoders' and the actor's shapes of bench_update, an
    odd width and the widest."""
    shapes = ((35, 256, 64), (2, 256, 64), (29, 256, 16), (7, 48, 5), (600, 256, 256))
    dtypes = _DTYPES[1:3] if quick else _DTYPES
    for (dtype, precision), (n_in, width, out) in itertools.product(dtypes, shapes):
        torch.set_float32_matmul_precision(precision)
        for r in recorders:
            r.caller = f"mlp/{dtype}/{precision}/in={n_in}/width={width}/out={out}"
        params = [torch.randn(o, i) for i, o in ((n_in, width), (width, width), (width, out))]
        params = [t for w in params for t in (w, w[:, 0].contiguous())]
        x1, x2 = torch.randn(100, n_in - n_in // 2), torch.randn(100, n_in // 2)
        _, z1, z2 = mlp.forward(x1, x2, params, 0, dtype, save=True)
        mlp.forward(x1, x2, params, 1, dtype, save=False)
        dy = torch.randn(100, out)
        flags = ((True, True), (False, True), (True, False))  # (need_dx, need_weights)
        for act, (need_dx, need_weights) in itertools.product(ACT_CODES.values(), flags):
            mlp.backward(dy, x1, x2, params[::2], z1, z2, act, need_dx, need_weights)


def _loop_cost(cubin: bytes, v: Variant) -> str:
    """Issued instructions and MUFU ops per logit in the kernel's first outer loop: the loop over
    interior column tiles (a K loop inside it is counted once, as for d <= BLOCK_K)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    code = [(int(m[1], 16), m[2]) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    back_edges = [
        (int(m[1], 16), at) for at, op in code if (m := re.search(r"BRA .*0x([0-9a-f]+)", op))
    ]
    loops = [(lo, hi) for lo, hi in back_edges if lo < hi]
    if not loops or not {"BLOCK_M", "BLOCK_N"} <= v.kwargs.keys():  # the pair-stats kernels
        return ""
    outer = [(lo, hi) for lo, hi in loops if not any(a < lo and hi < b for a, b in loops)]
    lo, hi = min(outer)  # the first column loop: interior tiles (checked tiles follow)
    body = [op for at, op in code if lo <= at <= hi]
    warps = v.kwargs.get("num_warps", 4)  # Triton's default where a launch leaves it out
    per = 32 * warps / (v.kwargs["BLOCK_M"] * v.kwargs["BLOCK_N"])
    mufu = sum("MUFU" in op for op in body)
    return f"  {len(body) * per:5.1f} instr/logit {mufu * per:3.1f} MUFU/logit"


def _compile(v: Variant, arch: int, sass: bool = False) -> tuple[bool, int, str]:
    """Compile one variant to a cubin: (fits, spilled bytes, report line)."""
    try:
        compiled = v.compile()
    except Exception as exc:  # report every variant, not just the first error
        where = f"first caller: {min(v.callers)}"
        return False, 0, f"FAIL {v.label()}\n     {where}\n     {exc!r:.2000}"
    shared = compiled.metadata.shared
    fits = arch != 90 or shared <= H100_SHARED_BYTES
    regs, spills = _registers_and_spills(compiled.asm["ptx"], arch)
    status = "ok  " if fits else "FAIL"
    line = f"{status} {shared:6d} B shared {regs:3d} regs {spills:4d} B spilled  {v.label()}"
    if sass:
        line += _loop_cost(compiled.asm["cubin"], v)
    if not fits:
        line += f"\n     exceeds {H100_SHARED_BYTES} B; first caller: {min(v.callers)}"
    return fits, spills, line


def _registers_and_spills(ptx: str, arch: int) -> tuple[int, int]:
    """Registers per thread and bytes of register spill stores, from ``ptxas -v`` on the PTX
    (the stack frame alone is no spill: it also holds local arrays)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        command = [tool, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull]
        log = subprocess.run(command, capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs[1]) if regs else -1), (int(spills[1]) if spills else -1)


_VARIANTS: list[Variant] = []  # read by forked workers


def _compile_nth(job: tuple[int, int, bool]) -> tuple[bool, int, str]:
    return _compile(_VARIANTS[job[0]], job[1], job[2])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    parser.add_argument("--autotune", action="store_true", help="also the autotune candidates")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--quick", action="store_true", help="every flag combination, fewer dtypes")
    parser.add_argument("--only", default="", help="compile the variants whose label matches")
    parser.add_argument("--sass", action="store_true", help="instructions per logit (SASS)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=INT",
        help="what-if: override a tile size or option (e.g. num_warps=8) where a variant has it",
    )  # fmt: skip
    args = parser.parse_args()

    seen: dict[tuple, Variant] = {}
    recorders = []
    for module, name in (
        (pair_stats, "rows_kernel"),
        (pair_stats, "stats_kernel"),
        (pair_stats, "grad_kernel"),
        (goal_sampling, "_sample_kernel"),
        (goal_sampling, "_extend_kernel"),
        (mlp, "forward_kernel"),
        (mlp, "backward_data_kernel"),
        (mlp, "backward_weight_kernel"),
    ):
        recorders.append(Recorder(getattr(module, name), seen))
        setattr(module, name, recorders[-1])
    _record_loss_launches(recorders, args.autotune, args.quick)
    _record_buffer_launches(recorders)
    _record_mlp_launches(recorders, args.quick)
    unseen = [
        r.kernel.__name__ for r in recorders if not any(v.kernel is r.kernel for v in seen.values())
    ]
    if unseen:  # a launcher that bypasses the recorders would drop its kernel from the check
        print(f"FAIL no launch recorded for {', '.join(unseen)}")
        return 1
    overrides = dict(item.split("=", 1) for item in args.set)
    for v in seen.values():
        if re.search(args.only, v.label()):
            _VARIANTS.append(v.with_overrides({k: int(x) for k, x in overrides.items()}))

    driver.set_active(_TargetOnly(args.arch))  # before forking: the workers inherit it
    start = time.perf_counter()
    head = f"triton {triton.__version__}: {len(_VARIANTS)} of {len(seen)} variants"
    print(f"{head} for sm_{args.arch}", flush=True)
    jobs = [(i, args.arch, args.sass) for i in range(len(_VARIANTS))]
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        results = pool.map(_compile_nth, jobs, chunksize=4)
    for _, _, line in results:
        print(line)
    failures = sum(not ok for ok, _, _ in results)
    spills = sum(spilled > 0 for _, spilled, _ in results)
    print(f"{spills} variants spill registers (slow, not wrong)")
    elapsed = time.perf_counter() - start
    print(f"{len(_VARIANTS) - failures}/{len(_VARIANTS)} compiled in {elapsed:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
