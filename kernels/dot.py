"""How the kernels' ``tl.dot`` products treat their operands, chosen the same way everywhere."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def precision(dtype: torch.dtype) -> str:
    """tf32 for float32 only when torch's matmul precision setting allows it: the
    ``fp32_precision`` setting where torch has it (reading the legacy one raises once the new
    one is set), else ``get_float32_matmul_precision``."""
    if dtype != torch.float32:
        return "tf32"
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if setting is None:  # torch < 2.9
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if setting == "none":  # inherits the global setting
        setting = getattr(torch.backends, "fp32_precision", "none")
    return "tf32" if setting == "tf32" else "ieee"


def upcast(dtype: torch.dtype, interpreted: bool) -> bool:
    """Whether ``tl.dot`` must take float32 copies of ``dtype`` operands: Triton's interpreter
    multiplies the raw bits of bfloat16 in ``tl.dot`` (seen with triton 3.8), so under
    TRITON_INTERPRET=1 (``interpreted``) bfloat16 tiles are rounded as on the GPU (with
    :func:`round_to_bfloat16`), then multiplied in float32. Compiled kernels always use the
    tensor cores."""
    return dtype == torch.bfloat16 and interpreted


@triton.jit
def _round_mantissa(x, DROP: tl.constexpr):
    """Float32 ``x`` rounded to nearest (ties to even) with its low DROP mantissa bits cleared,
    still float32; NaN stays NaN (its bits would wrap), past the largest value goes to inf."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) >> DROP) << DROP
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def round_to_bfloat16(x):
    """Float32 ``x`` rounded to the nearest bfloat16 (ties to even), still float32: what a GPU's
    cast does. Triton's interpreter truncates float32 -> bfloat16 casts (Triton 3.8, with or
    without ``fp_downcast_rounding="rtne"``: twice the error, and biased towards zero), so the
    kernels round the bits themselves there."""
    return _round_mantissa(x, 16)


@triton.jit
def round_to_tf32(x):
    """Float32 ``x`` rounded to the nearest tf32 (10 mantissa bits), still float32: a tf32
    product then multiplies exactly these values, whatever the tensor cores' own rounding."""
    return _round_mantissa(x, 13)
