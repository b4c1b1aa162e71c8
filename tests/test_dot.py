"""The kernels' roundings of float32 to bfloat16 and tf32 against independent references, on
every kind of float32: random bit patterns, subnormals, ties, the largest values, inf and NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from crl_fast.kernels.dot import round_to_bfloat16, round_to_tf32  # noqa: E402

BLOCK = 1024
# The kernel runs on CUDA where there is one, else on CPU tensors (the interpreter).
pytestmark = [] if torch.cuda.is_available() else [pytest.mark.interpreter]


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, TF32: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = round_to_tf32(x) if TF32 else round_to_bfloat16(x)
    tl.store(out_ptr + offs, y, mask=mask)


def _floats(device: str) -> torch.Tensor:
    """Random bit patterns (every exponent, sign and mantissa), ties of both roundings, the
    largest finite values, subnormals, zeros, infinities and NaN."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31, (200_000,), generator=g, dtype=torch.int64)
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x3F801000, 0x3F803000, 0x7F7F8000])
    edges = torch.tensor(
        [0x7F7FFFFF, 0x7F7FF000, 0x00000001, 0x007FFFFF, 0x00001000, 0, 0x7F800000]
    )
    patterns = torch.cat([bits, ties, edges, edges | 0x80000000, torch.tensor([0x7FC00000])])
    return patterns.to(torch.int32).view(torch.float32).to(device)


def _tf32_reference(x: np.ndarray) -> np.ndarray:
    """Nearest (ties to even) float with 10 mantissa bits, float32's exponent range: from
    float64 arithmetic, not bit tricks; subnormals on their fixed 2**-136 grid."""
    with np.errstate(over="ignore", invalid="ignore"):  # NaN and inf are passed through below
        x64 = x.astype(np.float64)
        mantissa, exponent = np.frexp(x64)  # x = mantissa 2**exponent, |mantissa| in [0.5, 1)
        normal = np.rint(mantissa * 2.0**11) * np.exp2(exponent - 11.0)
        subnormal = np.rint(x64 * 2.0**136) * 2.0**-136
        out = np.where(np.abs(x64) < 2.0**-126, subnormal, normal).astype(np.float32)
    return np.where(np.isfinite(x), out, x)


@pytest.mark.parametrize("target", ["bfloat16", "tf32"])
def test_roundings_match_independent_references(target):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = _floats(device)
    out = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), BLOCK),)](
        x, out, x.numel(), TF32=target == "tf32", BLOCK=BLOCK
    )
    if target == "bfloat16":
        want = x.bfloat16().float()  # torch's cast rounds to nearest, ties to even
    else:
        want = torch.from_numpy(_tf32_reference(x.cpu().numpy())).to(device)
    same = (out.view(torch.int32) == want.view(torch.int32)) | (out.isnan() & want.isnan())
    bad = (~same).nonzero().flatten()[:5].tolist()
    assert same.all(), [(x[i].item(), out[i].item(), want[i].item()) for i in bad]
