"""Test helpers shared by the test files."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.backends.debugging import aot_eager

from crl_fast import compiling
from crl_fast.compiling import ISOLATE

RTOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
"""The loss's tolerance by dtype in ``assert_no_worse_than_eager``, relative to the truth's
largest value."""


def interpreted() -> bool:
    """Whether Triton builds interpreted kernels now (TRITON_INTERPRET as Triton reads it: 1,
    true, on, ...), as the kernels decide; False without Triton."""
    try:
        from crl_fast.kernels import interpreting
    except ImportError:
        return False
    return interpreting()


def max_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest absolute difference, measured in float64."""
    return (actual.double() - truth.double()).abs().max().item()


def relative_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """``max_error`` relative to the truth's largest magnitude, absolute where that is below 1."""
    return max_error(actual, truth) / max(1.0, truth.double().abs().max().item())


def assert_no_worse_than_eager(
    name: str, kernel: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor, rtol: float
) -> None:
    """The kernel's error against float64 truth must not exceed eager PyTorch's error in the same
    dtype by more than ``rtol * max|truth|`` (cut-cross-entropy's rule); where eager is not
    finite, the kernel must be within ``rtol * max|truth|`` on its own. On failure, name the
    worst index."""
    scale = max(truth.double().abs().max().item(), 1e-6)
    k_err, e_err = max_error(kernel, truth), max_error(eager, truth)
    if not torch.isfinite(eager.double()).all():
        e_err = 0.0  # no bar to compare with: an infinite one would pass anything
    if k_err <= e_err + rtol * scale:
        return
    worst = (kernel.double() - truth.double()).abs().argmax().item()
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), truth.shape))
    raise AssertionError(
        f"{name}: kernel error {k_err:.3e} > eager error {e_err:.3e} + {rtol:g} * {scale:.3e}; "
        f"worst at {idx}: kernel {kernel.reshape(-1)[worst].item():.6g}, "
        f"truth {truth.reshape(-1)[worst].item():.6g}"
    )


KERNELS = "crl_fast.kernels.pair_stats, crl_fast.kernels.goal_sampling"


def stderr_with_late_interpret(code: str, imported: str = KERNELS) -> str:
    """The stderr of ``code`` (which must fail) run in a fresh Python after ``imported`` (by
    default crl-fast's kernels) was imported without TRITON_INTERPRET and the variable was set
    only then."""
    setup = f"import os, torch; import {imported}\n"
    setup += "os.environ['TRITON_INTERPRET'] = '1'\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", setup + code], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode != 0, run.stdout
    return run.stderr


@contextlib.contextmanager
def gloo_group(init_file: object, rank: int = 0, world_size: int = 1) -> Iterator[None]:
    """This process as ``rank`` of a CPU (gloo) process group over a file store, torn down on
    exit, an exception included."""
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _garbage(dtype: torch.dtype) -> float | int | bool:
    """A value no correct result contains by chance: NaN, True, or the integer type's largest."""
    if dtype.is_floating_point:
        return float("nan")
    return True if dtype == torch.bool else torch.iinfo(dtype).max


def poison_undefined_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make Triton's interpreter as harsh as a GPU where the GPU leaves values undefined, so that
    reading them shows up on CPU: the masked lanes of a ``tl.load`` without ``other=`` (zeros
    under the interpreter, whatever the registers held on a GPU) read NaN (integers: their
    largest value, booleans: True), and ``torch.empty`` / ``empty_like`` / ``Tensor.new_empty``
    (fresh zero pages on a CPU, stale blocks of the caching allocator on a GPU) come back filled
    the same way, until ``monkeypatch`` undoes both."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    load = interpreter.InterpreterBuilder.create_masked_load

    def masked_load(self, ptrs, mask, other, *args, **kwargs):  # the interpreter's arguments
        if other is None:
            ty = ptrs.get_element_ty()
            np_dtype = interpreter._get_np_dtype(ty)
            if ty == tl.bfloat16:  # stored as uint16
                fill: object = 0x7FC0
            elif ty.is_floating():
                fill = np.nan
            else:
                fill = True if ty == tl.int1 else np.iinfo(np_dtype).max
            other = interpreter.TensorHandle(np.full(ptrs.data.shape, fill, np_dtype), ty)
        return load(self, ptrs, mask, other, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", masked_load)
    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
        real = getattr(owner, name)

        def filled(*args, _real=real, **kwargs):
            t = _real(*args, **kwargs)
            with torch.no_grad():
                return t.fill_(_garbage(t.dtype)) if t.numel() else t

        monkeypatch.setattr(owner, name, filled)


ISOLATION_PATHS = (
    pytest.param(
        "isolate_recompiles",
        marks=pytest.mark.skipif(not ISOLATE, reason="torch.compile has no isolate_recompiles"),
    ),
    "code_copy",
)
"""``compile_isolated``'s two ways to caches of a compile call's own, for
:func:`use_isolation_path`."""


def use_isolation_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Make ``compile_isolated`` take ``path`` until ``monkeypatch`` undoes it: ``code_copy``, the
    only one torch without ``isolate_recompiles`` has, is then tested on every torch."""
    if path == "code_copy":
        monkeypatch.setattr(compiling, "ISOLATE", {})


class ShapeRecorder:
    """A ``torch.compile`` backend that records, in ``dynamic``, one bool a graph: whether it was
    traced with symbolic sizes (dynamic shapes). It runs each graph through AOTAutograd without
    a compiler, which traces the backward of custom ops into the graph as inductor does (a
    graph run eagerly would call the loss's backward as a Python frame of its own)."""

    def __init__(self) -> None:
        self.dynamic: list[bool] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        values = (n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder")
        self.dynamic.append(any(isinstance(v, torch.SymInt) for v in values))
        return aot_eager(gm, example_inputs)
