"""contrastive_loss against the float64 B x M reference: Triton kernels (interpreter on CPU) and
the chunked PyTorch path; every loss and energy; gradients, metrics, errors, memory."""

from __future__ import annotations

import fractions
import functools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from crl_fast import (
    ENERGIES,
    ContrastiveLoss,
    contrastive_loss,
    pairwise_energy,
    reference_contrastive_loss,
)
from crl_fast.loss import LOSSES
from crl_fast.loss_reference import reference_logits
from tests.helpers import (
    KERNELS,
    RTOL,
    assert_no_worse_than_eager,
    max_error,
    relative_error,
    stderr_with_late_interpret,
)

# The triton case runs the kernels on CPU tensors (its cuda cases, where a test has them, are gpu).
BACKENDS = ("torch", pytest.param("triton", marks=pytest.mark.interpreter))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (B, M, d): the issue's odd sizes, one rectangular batch with extra negatives.
SHAPES = [(1, 1, 1), (2, 2, 3), (7, 7, 16), (100, 100, 64), (257, 257, 100), (5, 12, 3)]


def _inputs(b, m, d, dtype=torch.float32, seed=0, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    phi = (torch.randn(b, d, generator=g) * scale / math.sqrt(d) ** 0.5).to(device, dtype)
    psi = (torch.randn(m, d, generator=g) * scale / math.sqrt(d) ** 0.5).to(device, dtype)
    return phi, psi


def _loss_and_grads(fn, phi, psi, extra=(), **kw):
    """Loss value, metrics (if asked) and gradients w.r.t. phi, psi and ``extra`` tensors."""
    leaves = [t.detach().clone().requires_grad_() for t in (phi, psi, *extra)]
    names = ("log_scale", "bias")[: len(extra)]
    out = fn(leaves[0], leaves[1], **kw, **dict(zip(names, leaves[2:], strict=True)))
    value, metrics = out if isinstance(out, tuple) else (out, {})
    grads = torch.autograd.grad(value, leaves)
    return value.detach(), metrics, grads


def _truth(phi, psi, extra=(), **kw):
    return _loss_and_grads(
        reference_contrastive_loss, phi.double(), psi.double(), [t.double() for t in extra], **kw
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_binary_loss_no_worse_than_eager(shape, dtype, backend):
    phi, psi = _inputs(*shape, dtype=dtype)
    value, _, grads = _loss_and_grads(contrastive_loss, phi, psi, backend=backend)
    e_value, _, e_grads = _loss_and_grads(reference_contrastive_loss, phi, psi)
    t_value, _, t_grads = _truth(phi, psi)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    assert_no_worse_than_eager("loss", value, e_value, t_value, RTOL[dtype])
    for name, k, e, t in zip(("dphi", "dpsi"), grads, e_grads, t_grads, strict=True):
        assert_no_worse_than_eager(name, k, e, t, RTOL[dtype])


def _check_every_loss(shape, loss, energy, scaled, device="cpu", **kw):
    """Loss, gradients (scale and bias too) and metrics against the float64 reference."""
    phi, psi = _inputs(*shape, seed=1, device=device)
    extra = (torch.tensor(0.4, device=device), torch.tensor(-1.5, device=device)) if scaled else ()
    kw |= {"loss": loss, "energy": energy, "return_metrics": True}
    kw["logsumexp_penalty"] = 0.1 if scaled else 0.0
    if loss == "flatnce_backward" and shape[0] < 2:  # its one column has no off-diagonal term
        with pytest.raises(ValueError, match="off-diagonal"):
            contrastive_loss(phi, psi, **kw)
        return
    value, metrics, grads = _loss_and_grads(contrastive_loss, phi, psi, extra, **kw)
    kw.pop("backend", None)
    t_value, t_metrics, t_grads = _truth(phi, psi, extra, **kw)
    assert relative_error(value, t_value) < 2e-5
    for k, t in zip(grads, t_grads, strict=True):
        assert relative_error(k, t) < 2e-5
    assert metrics.keys() == t_metrics.keys()
    for key in metrics:
        assert relative_error(metrics[key], t_metrics[key]) < 1e-4, key


SCALED = pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scale-bias-penalty"])


@pytest.mark.parametrize("exclude", [False, True])
@SCALED
@pytest.mark.parametrize("energy", ENERGIES)
@pytest.mark.parametrize("loss", LOSSES)
def test_torch_path_in_many_chunks(loss, energy, scaled, exclude, monkeypatch):
    """The chunked PyTorch path with chunks of a few rows (every other test fits in one): the
    diagonal, online column sums and row-chunked terms must line up across chunk boundaries."""
    from crl_fast import pair_stats, pair_stats_torch

    monkeypatch.setattr(pair_stats_torch, "CHUNK_ELEMENTS", 100)  # 37 columns: 2 rows a chunk
    monkeypatch.setattr(pair_stats, "ROW_CHUNK_ELEMENTS", 20)
    monkeypatch.setattr(pair_stats, "_DIAGONAL_CHUNK", 3)
    kw = {"exclude_positive_from_lse": exclude, "backend": "torch"}
    _check_every_loss((21, 37, 7), loss, energy, scaled, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("energy", ENERGIES)
@pytest.mark.parametrize("loss", LOSSES)
@SCALED
@pytest.mark.parametrize("shape", [(7, 11, 5), (1, 3, 1)], ids=str)
def test_every_loss_and_energy(shape, loss, energy, backend, scaled):
    _check_every_loss(shape, loss, energy, scaled, backend=backend)


# Each (loss, energy) pair once, scaled on alternate pairs: every loss and every energy meets
# both settings (the small shapes above take every loss x energy x setting).
TILED_CASES = [
    pytest.param(
        loss, energy, (i + j) % 2 == 1, id=f"{loss}-{energy}-{('plain', 'scaled')[(i + j) % 2]}"
    )
    for i, loss in enumerate(LOSSES)
    for j, energy in enumerate(ENERGIES)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("loss", "energy", "scaled"), TILED_CASES)
@pytest.mark.parametrize("shape", [(70, 70, 33), (20, 37, 200)], ids=str)
def test_every_loss_and_energy_over_several_tiles(shape, loss, energy, scaled, backend):
    """Several row programs, column tiles and K chunks (70 x 70 x 33: 64-row tiles, 16-wide K
    chunks in float32) and several D tiles of the gradient (d = 200 over 128), ragged ends; the
    interpreter takes ~3x the small shapes' time here, hence pairs, not the whole product."""
    _check_every_loss(shape, loss, energy, scaled, backend=backend)


@pytest.mark.interpreter
@pytest.mark.parametrize("loss", ["binary", "infonce", "symmetric_infonce"])
@pytest.mark.parametrize("shape", [(32, 150, 20), (130, 200, 8)], ids=str)
def test_interior_tiles_skip_exactly_the_diagonal_band(shape, loss):
    """Programs whose rows are all valid and that have unmasked interior column tiles, which the
    shapes above never give: 32 rows under 64-column tiles (a band of one tile), and 64 rows
    over 32-column tiles whose band (tiles 2-3) starts past tile 0."""
    _check_every_loss(shape, loss, "l2", True, backend="triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("energy", ["dot", "l2", "norm"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 12, 3), (40, 70, 200)], ids=str)
def test_rows_kernel_matches_torch(shape, energy, dtype):
    """The prologue kernel (squared norms, paired energy, slope, positives) against its PyTorch
    twin, rows past B included and d in two chunks."""
    from crl_fast.energy import ENERGY_CODES
    from crl_fast.pair_stats import paired_rows

    phi, psi = _inputs(*shape, dtype=dtype, seed=7)
    psi[0] = phi[0]  # a zero distance: the norm energy's slope is 0 there
    scale, bias = torch.tensor(1.7), torch.tensor(-0.4)
    code = ENERGY_CODES[energy]
    got = paired_rows(phi, psi, scale, bias, code, use_triton=True)
    want = paired_rows(phi, psi, scale, bias, code, use_triton=False)
    for name, k, t in zip(got._fields, got, want, strict=True):
        assert k.shape == t.shape and k.dtype == t.dtype, name
        if t.numel():  # the squared norms are empty for dot
            assert relative_error(k, t) <= 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["binary", "infonce", "symmetric_infonce"])
@pytest.mark.parametrize("learn", ["log_scale", "bias", "neither"])
def test_scale_or_bias_learnable_alone(learn, loss, backend):
    """The kernels skip the dscale/dbias sums (and infonce's online W) unless the scale or the
    bias needs a gradient: either alone must still get the right one, phi and psi theirs."""
    phi, psi = _inputs(20, 27, 8, seed=5)

    def grads(fn, dtype, **kw):
        leaves = [phi.to(dtype).requires_grad_(), psi.to(dtype).requires_grad_()]
        given = {
            "log_scale": torch.tensor(0.4, dtype=dtype),
            "bias": torch.tensor(-1.5, dtype=dtype),
        }
        if learn in given:
            leaves.append(given[learn].requires_grad_())
        value = fn(leaves[0], leaves[1], loss=loss, energy="norm", **given, **kw)
        return torch.autograd.grad(value, leaves)

    got = grads(contrastive_loss, torch.float32, backend=backend)
    truth = grads(reference_contrastive_loss, torch.float64)
    for k, t in zip(got, truth, strict=True):
        assert relative_error(k, t) < 2e-5


CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
# For a test without a backend parameter, which runs the Triton kernels on either device.
CPU_KERNELS = pytest.param("cpu", marks=pytest.mark.interpreter)
# For a test with both: the PyTorch path (CPU), then the Triton kernels on either device.
BACKEND_DEVICES = pytest.mark.parametrize(
    ("backend", "device"),
    [
        ("torch", "cpu"),
        pytest.param("triton", "cpu", marks=pytest.mark.interpreter),
        pytest.param("triton", "cuda", marks=pytest.mark.gpu),
    ],
)


@pytest.mark.parametrize("device", [CPU_KERNELS, CUDA])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_low_precision_every_loss_no_worse_than_eager(loss, dtype, device):
    """bf16/fp16 on every loss; on CUDA with the approximate log2 and reciprocal of the sigmoid
    kernels and over several tiles."""
    shape = (33, 40, 24) if device == "cpu" else (300, 333, 64)
    phi, psi = _inputs(*shape, dtype=dtype, seed=11, device=device)
    kw = {"loss": loss, "energy": "norm", "logsumexp_penalty": 0.1}
    value, _, grads = _loss_and_grads(contrastive_loss, phi, psi, backend="triton", **kw)
    e_value, _, e_grads = _loss_and_grads(reference_contrastive_loss, phi, psi, **kw)
    t_value, _, t_grads = _truth(phi, psi, **kw)
    assert_no_worse_than_eager("loss", value, e_value, t_value, RTOL[dtype])
    for name, k, e, t in zip(("dphi", "dpsi"), grads, e_grads, t_grads, strict=True):
        assert_no_worse_than_eager(name, k, e, t, RTOL[dtype])


@pytest.mark.parametrize("device", [CPU_KERNELS, CUDA])
@pytest.mark.parametrize(
    ("loss", "energy"),
    [("binary", "dot"), ("infonce", "norm"), ("symmetric_infonce", "l2"), ("dpo", "cosine")],
)
def test_tma_loads_match_pointer_loads(loss, energy, device, monkeypatch):
    """CRL_FAST_TMA=1 takes the tiles through tensor descriptors (zero-filled past the rows and
    past d): the same numbers as the masked pointer loads, ragged tiles included."""
    phi, psi = _inputs(70, 90, 24, dtype=torch.bfloat16, seed=3, device=device)
    kw = {"loss": loss, "energy": energy, "logsumexp_penalty": 0.1, "backend": "triton"}
    _check_tma_matches_pointer_loads(phi, psi, monkeypatch, **kw)


@pytest.mark.parametrize("device", [CPU_KERNELS, CUDA])
@pytest.mark.parametrize(
    ("dtype", "d", "loss", "energy", "single"),
    [
        (torch.float32, 64, "symmetric_infonce", "l2", False),
        (torch.float16, 64, "infonce", "norm", False),
        (torch.float32, 48, "binary", "norm", True),
    ],
    ids=["float32-d64", "float16-d64", "float32-d48-single-pass"],
)
def test_tma_loads_of_wide_rows_match_pointer_loads(dtype, d, loss, energy, single, device,
                                                    monkeypatch):  # fmt: skip
    """TMA beyond the bfloat16 case above: float32 tiles (TF32) 64 wide, 256 bytes a row, past
    the copy engine's 128-byte swizzle (the compiler must split the copy); float16; and the
    single pass, whose atomics take the program's rows from the descriptor, with d = 48
    zero-filled to the 64-wide tile. The same numbers as the pointer loads."""
    from crl_fast.kernels import dot

    monkeypatch.setattr(dot, "precision", lambda dtype: "tf32")  # float32 in one 64-wide tile
    if single:
        monkeypatch.setenv("CRL_FAST_SINGLE_PASS", "1")
    phi, psi = _inputs(70, 90, d, dtype=dtype, seed=4, device=device)
    kw = {"loss": loss, "energy": energy, "backend": "triton"}
    _check_tma_matches_pointer_loads(phi, psi, monkeypatch, **kw)


def _check_tma_matches_pointer_loads(phi, psi, monkeypatch, **kw) -> None:
    """The loss and gradients with CRL_FAST_TMA=1 (every launch taking descriptors) match the
    pointer loads' to 1e-6 (the single pass's atomics may differ in last bits)."""
    from crl_fast.kernels import pair_stats_tiling as tiling

    want_value, _, want_grads = _loss_and_grads(contrastive_loss, phi, psi, **kw)
    engaged = []
    descriptors = tiling.tma_descriptors

    def recording(a, b, cfg):
        out = descriptors(a, b, cfg)
        engaged.append(out[2]["TMA"])
        return out

    monkeypatch.setattr(tiling, "tma_descriptors", recording)
    monkeypatch.setenv("CRL_FAST_TMA", "1")
    value, _, grads = _loss_and_grads(contrastive_loss, phi, psi, **kw)
    assert engaged and all(engaged)
    assert relative_error(value, want_value) <= 1e-6
    for k, t in zip(grads, want_grads, strict=True):
        assert relative_error(k, t) <= 1e-6


def _record_grad_launches(monkeypatch) -> list[tuple[bool, bool]]:
    """Record (x_is_a, column sums given) for each launch of the kernels' gradient pass."""
    from crl_fast.kernels import pair_stats as kernels

    launches = []
    grad = kernels.grad

    def recording(*args, **kwargs):
        launches.append((kwargs["x_is_a"], kwargs.get("column_sums") is not None))
        return grad(*args, **kwargs)

    monkeypatch.setattr(kernels, "grad", recording)
    return launches


def _check_scaled_loss(phi, psi, dtype, **kw):
    """The Triton path's loss and gradients (phi, psi, a learnable scale and bias) no worse than
    eager PyTorch in ``dtype`` against the float64 truth."""
    extra = (torch.tensor(0.3, device=phi.device), torch.tensor(-1.0, device=phi.device))
    value, _, grads = _loss_and_grads(contrastive_loss, phi, psi, extra, backend="triton", **kw)
    e_value, _, e_grads = _loss_and_grads(reference_contrastive_loss, phi, psi, extra, **kw)
    t_value, _, t_grads = _truth(phi, psi, extra, **kw)
    assert_no_worse_than_eager("loss", value, e_value, t_value, RTOL[dtype])
    names = ("dphi", "dpsi", "dlog_scale", "dbias")
    for name, k, e, t in zip(names, grads, e_grads, t_grads, strict=True):
        assert_no_worse_than_eager(name, k, e, t, RTOL[dtype])


def _every_dtype_on_cuda(losses, energies, dtypes) -> list:
    """(loss, energy, dtype, device): on CUDA the whole product; under the interpreter (~1 s a
    case at the single pass's 130 rows) each (loss, energy) pair once with the dtype cycling,
    so that every loss and every energy still meets every dtype."""
    cases = []
    for i, loss in enumerate(losses):
        for j, energy in enumerate(energies):
            for k, dtype in enumerate(dtypes):
                devices = [CUDA, CPU_KERNELS] if k == (i + j) % len(dtypes) else [CUDA]
                for device in devices:
                    cases.append(
                        pytest.param(loss, energy, dtype, *device.values, marks=device.marks,
                                     id=f"{loss}-{energy}-{dtype}-{device.values[0]}")
                    )  # fmt: skip
    return cases


@pytest.mark.parametrize(
    ("loss", "energy", "dtype", "device"),
    _every_dtype_on_cuda(["binary", "dpo", "ipo"], ENERGIES, DTYPES),
)
def test_single_pass(loss, energy, dtype, device, monkeypatch):
    """CRL_FAST_SINGLE_PASS=1: dpsi from the row pass's tiles through float32 atomics, learnable
    scale and bias, extra negatives, several programs per tile column; held to float64 truth
    like the two passes. Deterministic algorithms switch it off."""
    d = 16 if dtype == torch.float32 else 24  # one tile: float32 without TF32 takes 16
    phi, psi = _inputs(130, 150, d, dtype=dtype, seed=5, device=device)
    launches = _record_grad_launches(monkeypatch)
    monkeypatch.setenv("CRL_FAST_SINGLE_PASS", "1")
    _check_scaled_loss(phi, psi, dtype, loss=loss, energy=energy)
    assert launches == [(True, True)]
    launches.clear()
    torch.use_deterministic_algorithms(True)
    try:
        _check_scaled_loss(phi, psi, dtype, loss=loss, energy=energy)
    finally:
        torch.use_deterministic_algorithms(False)
    assert launches == [(True, False), (False, False)]


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("scaled", [False, True], ids=["fixed", "learnable"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_a_side_without_gradient_costs_no_pass(loss, backend, scaled, device, monkeypatch):
    """phi or psi that needs no gradient (a frozen encoder's, as in LiT) gets none, the other
    side gets the two-sided call's, and the frozen side's work is skipped: on the Triton path
    the pass that gives only its gradient (the row pass also sums binary's, DPO's and IPO's
    loss, so only a frozen psi saves one there, and gives a learnable scale's gradient), on the
    chunked path its B x M x d product."""
    from torch.profiler import profile

    phi, psi = _inputs(40, 56, 8, seed=9, device=device)
    kw = {"loss": loss, "energy": "norm", "backend": backend}
    launches = _record_grad_launches(monkeypatch)

    def run(grad_phi: bool, grad_psi: bool) -> tuple[list, int]:
        """Gradients (phi, psi, the scale), and the Triton path's passes or the chunked path's
        matrix products."""
        leaves = [phi.clone().requires_grad_(grad_phi), psi.clone().requires_grad_(grad_psi)]
        scale = torch.tensor(0.2, device=device, requires_grad=scaled)
        launches.clear()
        with profile() as prof:
            contrastive_loss(*leaves, log_scale=scale, **kw).backward()
        products = sum(e.name == "aten::mm" for e in prof.events())
        grads = [t.grad for t in (*leaves, scale)]
        return grads, len(launches) if backend == "triton" else products

    (dphi, dpsi, dscale), both = run(True, True)
    (phi_only, none, phi_dscale), phi_work = run(True, False)
    assert none is None
    torch.testing.assert_close(phi_only, dphi)
    (none, psi_only, psi_dscale), psi_work = run(False, True)
    assert none is None
    torch.testing.assert_close(psi_only, dpsi)
    # A frozen side still gives the scale its whole gradient (both passes' shares).
    torch.testing.assert_close(phi_dscale, dscale)
    torch.testing.assert_close(psi_dscale, dscale)
    if backend == "triton":
        assert max(phi_work, psi_work) <= both and min(phi_work, psi_work) == both - 1
    else:
        assert phi_work == psi_work == both - 1


@pytest.mark.interpreter
@pytest.mark.parametrize("rows", ["-16", "0", "8", "100", "abc", "1e3"])
def test_single_pass_rows_must_be_a_tile(rows, monkeypatch):
    monkeypatch.setenv("CRL_FAST_SINGLE_PASS", "1")
    monkeypatch.setenv("CRL_FAST_SINGLE_PASS_ROWS", rows)
    phi, psi = _inputs(130, 150, 16)
    with pytest.raises(ValueError, match=f"CRL_FAST_SINGLE_PASS_ROWS .* got '{rows}'"):
        contrastive_loss(phi.requires_grad_(), psi.requires_grad_(), backend="triton")


def test_autotune_leaves_the_single_pass_alone(monkeypatch):
    """CRL_FAST_AUTOTUNE=1 times candidate configs by launching them; a single-pass launch adds
    into the caller's column sums, so it must take the fixed config without a timed launch."""
    from crl_fast.kernels import pair_stats_tiling as tiling

    monkeypatch.setenv("CRL_FAST_AUTOTUNE", "1")
    launched = []
    config = tiling.choose_config(
        ("test",), 1024, 64, torch.bfloat16, launched.append, True, interpreted=False
    )
    assert launched == [] and config == tiling._config(1024, 64, torch.bfloat16, True)


def test_autotune_is_off_under_deterministic_algorithms(monkeypatch):
    """The tile shape changes the sums' order, so the last bits of the gradients; a shape picked
    by timing can differ from run to run. Deterministic algorithms keep the fixed config."""
    import triton.testing

    from crl_fast.kernels import pair_stats_tiling as tiling

    monkeypatch.setattr(tiling, "_TUNED", {})
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: fn() or 1.0)
    monkeypatch.setenv("CRL_FAST_AUTOTUNE", "1")
    launched = []
    torch.use_deterministic_algorithms(True)
    try:
        config = tiling.choose_config(
            ("test",), 1024, 64, torch.bfloat16, launched.append, interpreted=False
        )
    finally:
        torch.use_deterministic_algorithms(False)
    assert launched == [] and config == tiling._config(1024, 64, torch.bfloat16)


def test_autotune_tunes_again_when_tma_is_switched(monkeypatch):
    """CRL_FAST_TMA is read at each call: a shape tuned without it is tuned again with it (its
    candidates load through TMA), not answered from the first tuning."""
    import triton.testing

    from crl_fast.kernels import pair_stats_tiling as tiling

    monkeypatch.setattr(tiling, "_TUNED", {})
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: fn() or 1.0)
    monkeypatch.setenv("CRL_FAST_AUTOTUNE", "1")
    tuned = {}
    for tma in ("0", "1"):
        monkeypatch.setenv("CRL_FAST_TMA", tma)
        timed = []
        config = tiling.choose_config(
            ("test",), 1024, 64, torch.bfloat16, timed.append, interpreted=False
        )
        tuned[tma] = (config["TMA"], len(timed) > 0)
    assert tuned == {"0": (False, True), "1": (True, True)}


def test_autotune_keeps_the_fixed_config_when_no_candidate_fits(monkeypatch):
    """Every candidate out of resources (a smaller chip, say): the fixed config, not the first
    candidate that failed."""
    import triton.testing

    from crl_fast.kernels import pair_stats_tiling as tiling

    def out_of_resources(fn):
        raise triton.runtime.errors.OutOfResources(1, 0, "shared memory")

    monkeypatch.setattr(tiling, "_TUNED", {})
    monkeypatch.setattr(triton.testing, "do_bench", out_of_resources)
    monkeypatch.setenv("CRL_FAST_AUTOTUNE", "1")
    config = tiling.choose_config(("test",), 1024, 64, torch.bfloat16, None, interpreted=False)
    assert config == tiling._config(1024, 64, torch.bfloat16)


@pytest.mark.gpu
def test_autotuned_single_pass_launches_untimed(monkeypatch):
    """The call site of the rule above: with both switches on, the sigmoid loss's single pass
    (its only tiled launch) is never timed, and its gradients stay right."""
    from crl_fast.kernels import pair_stats_tiling as tiling

    timed = []
    time_or_inf = tiling._time_or_inf
    monkeypatch.setattr(tiling, "_time_or_inf", lambda *a: timed.append(a[-1]) or time_or_inf(*a))
    monkeypatch.setenv("CRL_FAST_AUTOTUNE", "1")
    monkeypatch.setenv("CRL_FAST_SINGLE_PASS", "1")
    launches = _record_grad_launches(monkeypatch)
    phi, psi = _inputs(1000, 1000, 64, dtype=torch.bfloat16, seed=9, device="cuda")
    _check_scaled_loss(phi, psi, torch.bfloat16, loss="binary", energy="dot")
    assert launches == [(True, True)] and timed == []


@pytest.mark.parametrize(
    ("loss", "energy", "dtype", "device"),
    _every_dtype_on_cuda(LOSSES, ["dot", "norm"], [torch.float32, torch.bfloat16]),
)
def test_single_pass_backward_of_every_loss(loss, energy, dtype, device, monkeypatch):
    """CRL_FAST_SINGLE_PASS=1 in the backward of every loss (penalty and metrics on: the
    general path): where dphi needs a pass over the logits, that pass also gives dpsi through
    atomics and no column pass follows. Held to float64 truth."""
    launches = _record_grad_launches(monkeypatch)
    monkeypatch.setenv("CRL_FAST_SINGLE_PASS", "1")
    d = 16 if dtype == torch.float32 else 24  # one tile: float32 without TF32 takes 16
    phi, psi = _inputs(130, 150, d, dtype=dtype, seed=8, device=device)
    kw = {"loss": loss, "energy": energy, "logsumexp_penalty": 0.1, "return_metrics": True}
    _check_scaled_loss(phi, psi, dtype, **kw)
    online = loss in ("infonce", "flatnce")  # dphi from the forward's online sums: dpsi's pass
    assert launches == [(False, False)] if online else [(True, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("energy", ["l2", "norm"])
@pytest.mark.parametrize(
    "loss", ["binary", "binary+single-pass", "infonce", "symmetric_infonce", "dpo"]
)
def test_positives_close_to_their_goals(loss, energy, backend, monkeypatch):
    """A trained critic puts phi_i near psi_i: |x|^2 + |y|^2 - 2 x.y would cancel there, so the
    diagonal must come from x_i - y_i (float32, rows of norm ~8, distances ~1e-2)."""
    single = loss == "binary+single-pass"
    if single:  # d = 64 in one tile: TF32 (which the interpreter ignores)
        loss = "binary"
        monkeypatch.setenv("CRL_FAST_SINGLE_PASS", "1")
        from crl_fast.kernels import dot

        monkeypatch.setattr(dot, "precision", lambda dtype: "tf32")
        launches = _record_grad_launches(monkeypatch)
    g = torch.Generator().manual_seed(12)
    phi = torch.randn(24, 64, generator=g)
    psi = torch.cat(
        (phi + 1e-3 * torch.randn(24, 64, generator=g), torch.randn(8, 64, generator=g))
    )
    kw = {"loss": loss, "energy": energy}
    value, _, grads = _loss_and_grads(contrastive_loss, phi, psi, backend=backend, **kw)
    _, _, e_grads = _loss_and_grads(reference_contrastive_loss, phi, psi, **kw)
    t_value, _, t_grads = _truth(phi, psi, **kw)
    # The loss is ~1e-3 here (lse ~ L_ii): float32 logsumexps of O(1) terms carry ~1e-7.
    assert max_error(value, t_value) < 1e-6
    for name, k, e, t in zip(("dphi", "dpsi"), grads, e_grads, t_grads, strict=True):
        assert_no_worse_than_eager(name, k, e, t, RTOL[torch.float32])
    if single:  # the single pass ran, where it can
        assert launches == ([(True, True)] if backend == "triton" else [])


@pytest.mark.parametrize("device", [CPU_KERNELS, CUDA])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("energy", ["l2", "norm"])
@pytest.mark.parametrize(
    "loss", ["binary", "binary+single-pass", "infonce", "symmetric_infonce", "dpo"]
)
def test_low_precision_goals_close_to_each_other(loss, energy, dtype, device, monkeypatch):
    """Two goals close together (and phi near its goal), rows of norm 8: the l2 / norm gradient
    sum_j H_ij (B_j - A_i) is a product minus A_i sum_j H_ij, which cancel only if the sum adds
    the weights the product rounded (bfloat16: off by 2**-9 |B_j| per weight otherwise, 15-130x
    eager's error). float16's weights go to the product in tf32, rounded by the kernel: the
    interpreter's products do not round, so only the CUDA run can miss that rounding."""
    if loss == "binary+single-pass":
        loss = "binary"
        monkeypatch.setenv("CRL_FAST_SINGLE_PASS", "1")
    g = torch.Generator().manual_seed(0)
    psi = torch.randn(16, 64, generator=g)
    psi = 8 * psi / psi.norm(dim=1, keepdim=True)
    psi[1] = psi[0] + 0.1 * torch.randn(64, generator=g) / 8
    phi = psi + 0.1 * torch.randn(16, 64, generator=g) / 8
    phi, psi = phi.to(device, dtype), psi.to(device, dtype)
    kw = {"loss": loss, "energy": energy}
    _, _, grads = _loss_and_grads(contrastive_loss, phi, psi, backend="triton", **kw)
    _, _, e_grads = _loss_and_grads(reference_contrastive_loss, phi, psi, **kw)
    _, _, t_grads = _truth(phi, psi, **kw)
    for name, k, e, t in zip(("dphi", "dpsi"), grads, e_grads, t_grads, strict=True):
        assert_no_worse_than_eager(name, k, e, t, RTOL[dtype])


@pytest.mark.parametrize("energy", ENERGIES)
def test_pairwise_energy_close_pairs(energy):
    """The actor's critic value and its gradient, for phi(s, a) close to psi(g)."""
    g = torch.Generator().manual_seed(13)
    psi = 3 * torch.randn(16, 64, generator=g)
    phi = (psi + 1e-3 * torch.randn(16, 64, generator=g)).requires_grad_()
    (grad,) = torch.autograd.grad(pairwise_energy(phi, psi, energy).sum(), phi)
    grads = []
    for p, q in ((phi, psi), (phi.double(), psi.double())):  # eager float32, float64 truth
        leaf = p.detach().requires_grad_()
        grads += torch.autograd.grad(reference_logits(leaf, q, energy).diagonal().sum(), leaf)
    assert_no_worse_than_eager("dphi", grad, *grads, RTOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_slope_of_a_distance_below_eps_resolution(backend):
    """A goal 2e-7 from phi_0: |x - y|^2 = 4e-14 vanishes in 1e-6 + 4e-14 (half an ulp of
    NORM_EPS is 5.7e-14), but the slope 1 / sqrt(eps) times x - y is still 1e-4 of the
    gradient. The kernels took the slope as 0 there (torch's slope is 0 only where the squared
    distance is), which cost 2e-4 relative (eager: exact)."""
    phi, psi = torch.tensor([[0.0]]), torch.tensor([[1.0], [2e-7]])
    kw = {"loss": "infonce", "energy": "norm"}
    _, _, grads = _loss_and_grads(contrastive_loss, phi, psi, backend=backend, **kw)
    _, _, e_grads = _loss_and_grads(reference_contrastive_loss, phi, psi, **kw)
    _, _, t_grads = _truth(phi, psi, **kw)
    for name, k, e, t in zip(("dphi", "dpsi"), grads, e_grads, t_grads, strict=True):
        assert_no_worse_than_eager(name, k, e, t, RTOL[torch.float32])


@pytest.mark.parametrize("loss", ["binary", "infonce"])
def test_double_backward_is_refused(loss):
    phi, psi = _inputs(6, 6, 4, seed=14)
    phi.requires_grad_()
    with pytest.raises(RuntimeError, match=r"second derivative|autograd"):
        torch.autograd.grad(contrastive_loss(phi, psi, loss=loss), phi, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["infonce", "infonce_backward", "symmetric_infonce"])
def test_exclude_positive_from_lse(loss, backend):
    phi, psi = _inputs(6, 9, 4, seed=2)
    kw = {"loss": loss, "exclude_positive_from_lse": True, "logsumexp_penalty": 0.2}
    value, _, grads = _loss_and_grads(contrastive_loss, phi, psi, backend=backend, **kw)
    t_value, _, t_grads = _truth(phi, psi, **kw)
    assert max_error(value, t_value) < 1e-5
    for k, t in zip(grads, t_grads, strict=True):
        assert max_error(k, t) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["binary", "infonce", "symmetric_infonce", "dpo"])
@pytest.mark.parametrize("penalty", [0.0, 0.1])
def test_reduction_sum(loss, backend, penalty):
    phi, psi = _inputs(5, 8, 3, seed=3)
    kw = {"loss": loss, "reduction": "sum", "logsumexp_penalty": penalty}
    value, _, grads = _loss_and_grads(contrastive_loss, phi, psi, backend=backend, **kw)
    t_value, _, t_grads = _truth(phi, psi, **kw)
    assert max_error(value, t_value) < 1e-4
    for k, t in zip(grads, t_grads, strict=True):
        assert max_error(k, t) < 1e-4


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("energy", ["dot", "norm"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("penalty", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(7, 7, 5), (5, 12, 3)], ids=str)
def test_reduction_none_gives_row_losses(shape, penalty, loss, energy, backend, device):
    """The B row losses against float64 truth, their gradients under unequal row weights (each
    row's pairs weighed by its own weight: the fused losses must not take uniform weights in
    forward), and their sum against ``reduction="sum"``."""
    phi, psi = _inputs(*shape, seed=13, device=device)
    weights = torch.rand(shape[0], generator=torch.Generator().manual_seed(2)).to(device) * 2
    kw = {"loss": loss, "energy": energy, "logsumexp_penalty": penalty}

    def weighted(fn, p, q, **kw):
        rows = fn(p, q, reduction="none", **kw)
        assert rows.shape == (shape[0],)
        return (weights.to(rows.dtype) * rows).sum()

    value, _, grads = _loss_and_grads(
        functools.partial(weighted, contrastive_loss), phi, psi, backend=backend, **kw
    )
    truth = functools.partial(weighted, reference_contrastive_loss)
    t_value, _, t_grads = _loss_and_grads(truth, phi.double(), psi.double(), **kw)
    assert relative_error(value, t_value) < 1e-5
    for k, t in zip(grads, t_grads, strict=True):
        assert relative_error(k, t) < 1e-5
    rows = contrastive_loss(phi, psi, reduction="none", backend=backend, **kw)
    total = contrastive_loss(phi, psi, reduction="sum", backend=backend, **kw)
    assert relative_error(rows.sum(), total) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_reduction_none_rows_can_be_masked_in_place(loss, backend):
    """``rows[pad] = 0`` on the per-row losses (a common way to drop padded rows) backpropagates
    like weights of 0 and 1: no loss returns a tensor that its backward reads (FlatNCE's
    ``exp(c - stopgrad(c))`` saved its output, and the in-place write made backward raise)."""
    phi, psi = _inputs(6, 8, 4, seed=15)
    keep = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    grads = []
    for masked_in_place in (True, False):
        p, q = phi.clone().requires_grad_(), psi.clone().requires_grad_()
        rows = contrastive_loss(p, q, loss=loss, reduction="none", backend=backend)
        if masked_in_place:
            rows[keep == 0] = 0
            rows.sum().backward()
        else:
            (keep * rows).sum().backward()
        grads.append((p.grad, q.grad))
    for k, t in zip(*grads, strict=True):
        assert max_error(k, t) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.usefixtures("fresh_dynamo")
def test_reduction_none_with_metrics_module_and_compile(backend):
    """Per-row losses come with the metrics, from the module, and under torch.compile."""
    phi, psi = _inputs(9, 9, 4, seed=14)
    kw = {"loss": "binary", "energy": "cosine", "backend": backend}
    rows = contrastive_loss(phi, psi, reduction="none", **kw)
    with_metrics, metrics = contrastive_loss(phi, psi, reduction="none", return_metrics=True, **kw)
    _, t_metrics = contrastive_loss(phi, psi, return_metrics=True, **kw)
    assert max_error(with_metrics, rows) < 1e-6
    for key in t_metrics:
        assert max_error(metrics[key], t_metrics[key]) < 1e-6, key
    module = ContrastiveLoss(reduction="none", learn_bias=True, init_bias=-2.0, **kw)
    expected = contrastive_loss(phi, psi, bias=module.bias, reduction="none", **kw)
    assert max_error(module(phi, psi), expected) < 1e-6
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    phi.requires_grad_()
    compiled(phi, psi)[::2].sum().backward()  # the even rows' losses only
    t_phi = phi.detach().double().requires_grad_()
    truth = reference_contrastive_loss(
        t_phi, psi.double(), loss="binary", energy="cosine", bias=module.bias.double(),
        reduction="none",
    )  # fmt: skip
    truth[::2].sum().backward()
    assert max_error(phi.grad, t_phi.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["binary", "infonce", "dpo"])
def test_huge_logits_stay_finite(loss, backend):
    phi, psi = _inputs(9, 9, 8, seed=4, scale=60.0)  # logits of order 1e3..1e4
    value, _, grads = _loss_and_grads(contrastive_loss, phi, psi, loss=loss, backend=backend)
    e_value, _, e_grads = _loss_and_grads(reference_contrastive_loss, phi, psi, loss=loss)
    t_value, _, t_grads = _truth(phi, psi, loss=loss)
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)
    assert_no_worse_than_eager("loss", value, e_value, t_value, RTOL[torch.float32])
    for name, k, e, t in zip(("dphi", "dpsi"), grads, e_grads, t_grads, strict=True):
        assert_no_worse_than_eager(name, k, e, t, RTOL[torch.float32])


@pytest.mark.parametrize("device", [CPU_KERNELS, CUDA])
@pytest.mark.parametrize("metrics", [False, True], ids=["grads-in-forward", "backward"])
def test_float16_ipo_weights_do_not_overflow(metrics, device):
    """IPO's logit gradient 2 (u + 1) has no bound: a far positive plus a negative on phi_0
    (norm energy, slope 1 / |x - y|) makes tile weights past float16's 65504."""
    phi = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3
    psi = phi + 0.1
    psi[0] = phi[0] + torch.tensor([0.0, 100.0, 0.0, 0.0])
    psi[1] = phi[0] + torch.tensor([0.002, 0.0, 0.0, 0.0])
    phi, psi = phi.to(device, torch.float16), psi.to(device, torch.float16)
    kw = {"loss": "ipo", "energy": "norm", "return_metrics": metrics}
    _, _, grads = _loss_and_grads(contrastive_loss, phi, psi, backend="triton", **kw)
    _, _, e_grads = _loss_and_grads(reference_contrastive_loss, phi, psi, **kw)
    _, _, t_grads = _truth(phi, psi, **kw)
    for name, k, e, t in zip(("dphi", "dpsi"), grads, e_grads, t_grads, strict=True):
        assert_no_worse_than_eager(name, k, e, t, RTOL[torch.float16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_log_scale_takes_its_exp_in_float32(backend):
    """A float16 log_scale (a module made .half()): exp(log_scale) rounded to float16 puts 1e-4
    of relative error into the logits, and its gradient dlog_scale / scale ~ 4e5 overflows
    float16, where dlog_scale ~ 5e4 does not (eager float16 gives inf)."""
    phi = torch.tensor([[-640.0]], dtype=torch.float16)
    psi = torch.tensor([[625.0]], dtype=torch.float16)  # L_00 = scale * -4e5: its loss ~ 5e4
    extra = (torch.tensor(math.log(0.125), dtype=torch.float16),)
    kw = {"reduction": "sum"}
    value, _, grads = _loss_and_grads(contrastive_loss, phi, psi, extra, backend=backend, **kw)
    t_value, _, t_grads = _truth(phi, psi, extra, **kw)
    assert max_error(value, t_value) < 2e-5 * t_value.abs().item()
    assert max_error(grads[2], t_grads[2]) < 1e-3 * t_grads[2].abs().item()


@pytest.mark.parametrize("device", [CPU_KERNELS, CUDA])
def test_float16_small_loss_weight_keeps_its_gradient(device):
    """A loss weighted by 0.01 (no GradScaler): tile weights of ~1e-8 would flush to zero in
    float16; the kernels' error stays the torch path's (float32 sums, one rounding)."""
    phi, psi = _inputs(128, 128, 16, torch.float16, seed=12, scale=0.5, device=device)
    kw = {"loss": "symmetric_infonce"}

    def weighted(p, q, **kw):
        return 0.01 * contrastive_loss(p, q, **kw)

    _, _, grads = _loss_and_grads(weighted, phi, psi, backend="triton", **kw)
    _, _, torch_grads = _loss_and_grads(weighted, phi.cpu(), psi.cpu(), backend="torch", **kw)
    _, _, t_grads = _truth(phi, psi, **kw)
    for name, k, e, t in zip(("dphi", "dpsi"), grads, torch_grads, t_grads, strict=True):
        assert_no_worse_than_eager(name, k.cpu(), e, 0.01 * t.cpu(), 1e-4)


@pytest.mark.parametrize(
    ("m", "device"),
    [
        pytest.param(300, "cpu", marks=pytest.mark.interpreter, id="small-cpu"),
        pytest.param(2**23 + 1000, "cuda", marks=pytest.mark.gpu, id="past-2**31-cuda"),
    ],
)
@pytest.mark.parametrize("loss", ["binary", "infonce"])
def test_goal_rows_past_element_2_to_the_31(loss, m, device):
    """Extra negatives (M > B, gathered from many ranks): 2**23 + 1000 goals 256 wide put psi's
    last rows past element 2**31, where a row's offset (row x stride) wraps unless taken in 64
    bits (the interpreter wraps int32 as a GPU does, but CPU memory cannot hold the case). The
    loss and every gradient, psi's last rows on their own too, match the torch path's (bfloat16
    both, 4 GiB a copy of psi: the GPU tests share the card): the row pass reads psi's rows as
    its B tiles, the column pass as its A rows."""
    g = torch.Generator(device).manual_seed(13)
    phi, psi = (torch.randn(n, 256, generator=g, device=device) / 4 for n in (64, m))
    phi, psi = phi.bfloat16(), psi.bfloat16()
    extra = (torch.tensor(0.3, device=device), torch.tensor(-1.0, device=device))
    kw = {"loss": loss}
    value, _, grads = _loss_and_grads(contrastive_loss, phi, psi, extra, backend="triton", **kw)
    want, _, wants = _loss_and_grads(contrastive_loss, phi, psi, extra, backend="torch", **kw)
    assert max_error(value, want) <= 1e-2 * want.abs().item()
    tail = slice(m - m // 4, m)  # past element 2**31 on CUDA
    for k, t in (*zip(grads, wants, strict=True), (grads[1][tail], wants[1][tail])):
        assert max_error(k, t) <= 1e-2 * t.abs().max().item() + 1e-6  # infonce's dbias is 0


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["grad", "no_grad", "metrics"])
def test_binary_loss_of_a_confident_critic(mode, backend, device):
    """Positives at +25, negatives at -25: the loss is ~6e-8 and every path (gradients in
    forward, no gradients, metrics) keeps its digits, summing softplus(-L_ii) rather than
    softplus(L_ii) - L_ii, which cancels to 0 in float32."""
    phi = (torch.eye(64) * 5).to(device).requires_grad_(mode == "grad")
    kw = {"loss": "binary", "energy": "l2", "reduction": "sum"}
    bias = torch.tensor(25.0, device=device)
    truth = reference_contrastive_loss(phi.double(), phi.double(), bias=bias.double(), **kw)
    out = contrastive_loss(
        phi, phi, bias=bias, return_metrics=mode == "metrics", backend=backend, **kw
    )
    value = out[0] if mode == "metrics" else out
    assert truth.item() == pytest.approx(5.69e-8, rel=1e-2)
    assert value.item() == pytest.approx(truth.item(), rel=1e-4)


# FlatNCE's value is exp(c - stopgrad(c)) = 1 by construction: its gradient is not the
# derivative of its value, so gradcheck does not apply (its gradients are checked above).
@pytest.mark.parametrize("loss", [name for name in LOSSES if not name.startswith("flatnce")])
@pytest.mark.parametrize("energy", ENERGIES)
def test_gradcheck_float64(loss, energy):
    phi, psi = _inputs(4, 6, 3, dtype=torch.float64, seed=5)
    log_scale = torch.tensor(0.2, dtype=torch.float64)
    bias = torch.tensor(-0.3, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (phi, psi, log_scale, bias)]

    def fn(p, q, s, b):
        return contrastive_loss(
            p, q, loss=loss, energy=energy, log_scale=s, bias=b, logsumexp_penalty=0.1
        )

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_partial_grad_and_non_contiguous(backend):
    phi_t, psi_t = _inputs(6, 16, 10, seed=6)
    phi = phi_t.T.contiguous().T  # same values, column-major
    psi = psi_t[::2]  # strided rows: 8 rows
    psi_leaf = psi.detach().clone().requires_grad_()
    value = contrastive_loss(phi, psi_leaf, loss="infonce", energy="norm", backend=backend)
    (3.5 * value).backward()
    t_phi, t_psi = phi.double(), psi.double().requires_grad_()
    (3.5 * reference_contrastive_loss(t_phi, t_psi, loss="infonce", energy="norm")).backward()
    assert max_error(psi_leaf.grad, t_psi.grad) < 1e-5


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", ["function", "module", "compiled"])
@pytest.mark.parametrize(("loss", "energy"), [("binary", "cosine"), ("infonce", "norm")])
@pytest.mark.usefixtures("fresh_dynamo")
def test_autocast_casts_inputs_like_a_matmul(loss, energy, call, backend, device):
    """Under autocast, float32 phi and a bfloat16 psi (a LayerNorm keeps float32, a Linear
    does not) give the loss of both in bfloat16, computed as without autocast (cosine: of the
    rows normalised in their own dtype first, as F.normalize before the matmul); gradients
    return in each input's dtype."""
    phi, psi = _inputs(12, 12, 8, seed=11, device=device)
    phi, psi = phi.requires_grad_(), psi.bfloat16().requires_grad_()
    kw = {"loss": loss, "energy": energy, "backend": backend}
    fn = ContrastiveLoss(**kw) if call == "module" else functools.partial(contrastive_loss, **kw)
    if call == "compiled":
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        value = fn(phi, psi)
        value.backward()  # inside the region too: backward must not be recast either
    leaves = phi.detach().requires_grad_(), psi.detach().requires_grad_()
    x, y = leaves
    if energy == "cosine":
        x, y = (F.normalize(t.float(), dim=-1).to(t.dtype) for t in leaves)
    expected = contrastive_loss(
        x.bfloat16(), y, **kw | {"energy": "dot" if energy == "cosine" else energy}
    )
    expected.backward()
    assert torch.equal(value.detach(), expected.detach())
    assert torch.equal(phi.grad, leaves[0].grad) and torch.equal(psi.grad, leaves[1].grad)
    assert phi.grad.dtype == torch.float32 and psi.grad.dtype == torch.bfloat16
    autocast = torch.autocast(device, dtype=torch.bfloat16)
    with autocast, pytest.raises(TypeError, match=r"float64 and torch.bfloat16 \(after autocast"):
        contrastive_loss(phi.detach().double(), psi.detach(), **kw)  # as torch: float64 stays


def test_autocast_cosine_gradient_of_a_zero_row_stays_finite():
    """A zero row (a ReLU encoder's output) under float16 autocast: normalised in float32 first,
    its gradient (F.normalize's g / eps, ~1e11) fits, as eager's does; it overflowed float16."""
    phi, psi = _inputs(4, 6, 8, seed=3)
    phi[1] = 0.0
    grads = []
    for fn in (contrastive_loss, reference_contrastive_loss):
        leaf = phi.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            value = fn(leaf, psi, loss="infonce", energy="cosine")
        value.backward()
        grads.append(leaf.grad)
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-2, atol=1e-3)


FORWARD_GRAD_LOSSES = ("binary", "dpo", "ipo", "fb", "sppo")


@pytest.mark.interpreter
def test_column_loss_value_launches_only_the_column_pass(monkeypatch):
    """Without gradients a column loss needs no row statistic: one stats launch, over columns."""
    from crl_fast.kernels import pair_stats as kernels

    launches = []
    kernel = kernels.stats_kernel

    class Recording:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(kernels, "stats_kernel", Recording())
    phi, psi = _inputs(20, 30, 8, seed=5)
    with torch.no_grad():
        value = contrastive_loss(phi, psi, loss="infonce_backward", backend="triton")
    truth = reference_contrastive_loss(phi.double(), psi.double(), loss="infonce_backward")
    assert max_error(value, truth) < 1e-5
    assert len(launches) == 1


@pytest.mark.parametrize("device", [CPU_KERNELS, CUDA])
@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("energy", ENERGIES)
@pytest.mark.parametrize("loss", ["infonce_backward", "flatnce_backward"])
@pytest.mark.parametrize("m", [70, 90])
def test_column_losses_take_the_row_path(m, loss, energy, exclude, device, monkeypatch):
    """The column losses read only psi's first B rows (extra negatives are columns without a
    term), and run as the row losses of (psi[:B], phi), whose forward keeps the online sums (two
    passes over B x B logits); the same values and gradients as the float64 truth."""
    from crl_fast import loss as loss_module

    calls = []
    stats = loss_module.pair_stats

    def recording(x, y, scale, bias, **kw):
        calls.append((kw["online"], x.shape[0], y.shape[0]))
        return stats(x, y, scale, bias, **kw)

    monkeypatch.setattr(loss_module, "pair_stats", recording)
    phi, psi = _inputs(70, m, 24, seed=4, device=device)
    extra = (torch.tensor(0.3, device=device), torch.tensor(-1.0, device=device))
    kw = {"loss": loss, "energy": energy, "exclude_positive_from_lse": exclude}
    value, _, grads = _loss_and_grads(contrastive_loss, phi, psi, extra, backend="triton", **kw)
    assert calls == [(True, 70, 70)]
    t_value, _, t_grads = _truth(phi, psi, extra, **kw)
    assert relative_error(value, t_value) < 2e-5
    for k, t in zip(grads, t_grads, strict=True):
        assert relative_error(k, t) < 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("energy", ENERGIES)
@pytest.mark.parametrize("loss", FORWARD_GRAD_LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradients_computed_in_forward(loss, energy, backend, reduction):
    """Without metrics or penalty the sigmoid loss (and on the Triton path DPO / IPO) computes
    its gradients in forward and backward only scales them: check that scaling, and the
    scale/bias gradients."""
    phi, psi = _inputs(9, 13, 6, seed=10)
    extra = (torch.tensor(0.7), torch.tensor(-2.0))
    kw = {"loss": loss, "energy": energy, "reduction": reduction}
    leaves = [t.clone().requires_grad_() for t in (phi, psi, *extra)]
    value = contrastive_loss(*leaves[:2], log_scale=leaves[2], bias=leaves[3], backend=backend,
                             **kw)  # fmt: skip
    grads = torch.autograd.grad(2.5 * value, leaves)
    t_leaves = [t.double().requires_grad_() for t in (phi, psi, *extra)]
    truth = reference_contrastive_loss(*t_leaves[:2], log_scale=t_leaves[2], bias=t_leaves[3],
                                       **kw)  # fmt: skip
    t_grads = torch.autograd.grad(2.5 * truth, t_leaves)
    assert relative_error(value.detach(), truth.detach()) < 1e-5
    for k, t in zip(grads, t_grads, strict=True):
        assert relative_error(k, t) < 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_pair_losses_give_the_bias_an_exact_zero_gradient(loss, backend):
    """DPO and IPO take L_ij - L_ii, in which the bias cancels: its gradient is 0 exactly, not
    the rounding noise left where the off-diagonal and diagonal shares meet (~1e-7 here)."""
    phi, psi = _inputs(9, 13, 5, seed=3)
    bias = torch.tensor(-0.5, requires_grad=True)
    contrastive_loss(phi.requires_grad_(), psi, loss=loss, bias=bias, backend=backend).backward()
    assert bias.grad.item() == 0.0


@pytest.mark.parametrize("device", [CPU_KERNELS, CUDA])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", FORWARD_GRAD_LOSSES)
def test_gradients_in_forward_no_worse_than_eager(loss, dtype, device, monkeypatch):
    """The losses with gradients in forward on the Triton path, several tiles each way, extra
    negatives, learnable scale and bias, every dtype: no worse than eager against float64."""
    phi, psi = _inputs(150, 170, 16 if dtype == torch.float32 else 24, dtype, 7, device=device)
    launches = _record_grad_launches(monkeypatch)
    _check_scaled_loss(phi, psi, dtype, loss=loss, energy="norm")
    assert launches == [(True, False), (False, False)]  # two passes, both in forward


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_learns_scale_and_bias(backend):
    module = ContrastiveLoss(
        "binary", learn_scale=True, init_log_scale=math.log(10), learn_bias=True, init_bias=-10
    )
    module.backend = backend
    phi, psi = _inputs(8, 8, 4, seed=7)
    value, metrics = module(phi, psi, return_metrics=True)
    value.backward()
    assert module.log_scale.grad is not None and module.bias.grad is not None
    t_scale = torch.tensor(math.log(10), dtype=torch.float64, requires_grad=True)
    t_bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    truth = reference_contrastive_loss(phi.double(), psi.double(), log_scale=t_scale, bias=t_bias)
    truth.backward()
    assert max_error(value.detach(), truth.detach()) < 1e-5
    assert max_error(module.log_scale.grad, t_scale.grad) < 1e-5
    assert max_error(module.bias.grad, t_bias.grad) < 1e-5
    assert set(metrics) == {
        "categorical_accuracy",
        "binary_accuracy",
        "logits_pos",
        "logits_neg",
        "logsumexp_sq",
    }


def test_module_fixed_scale_and_bias():
    """Without learn_*, init_* are fixed values (buffers), not dropped."""
    module = ContrastiveLoss("infonce", init_log_scale=math.log(10), init_bias=-10)
    assert not list(module.parameters())
    assert set(dict(module.named_buffers())) == {"log_scale", "bias"}
    phi, psi = _inputs(8, 8, 4, seed=7)
    truth = reference_contrastive_loss(
        phi.double(), psi.double(), loss="infonce",
        log_scale=torch.tensor(math.log(10)).double(), bias=torch.tensor(-10.0).double(),
    )  # fmt: skip
    assert max_error(module(phi, psi), truth) < 1e-5
    assert not dict(ContrastiveLoss().named_buffers())  # zero: left out


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_transforms_get_a_clear_error(transform):
    phi, psi = _inputs(8, 8, 4)
    fn = getattr(torch.func, transform)
    args = (phi,) if transform == "grad" else (phi[None],)
    with pytest.raises(RuntimeError, match=r"do not support torch\.func"):
        fn(lambda p: contrastive_loss(p, psi))(*args)


@pytest.mark.parametrize("loss", ["binary", "infonce"])
def test_forward_mode_ad_gets_a_clear_error(loss):
    """A dual input (torch.autograd.forward_ad) got PyTorch's "implement the jvp function for
    custom autograd.Function", which names neither crl-fast nor what to use instead."""
    from torch.autograd import forward_ad

    phi, psi = _inputs(4, 4, 3)
    with forward_ad.dual_level(), pytest.raises(RuntimeError, match="no forward-mode derivative"):
        contrastive_loss(forward_ad.make_dual(phi, torch.ones_like(phi)), psi, loss=loss)


def test_module_repr_shows_its_settings():
    module = ContrastiveLoss(
        "infonce", "norm", logsumexp_penalty=0.1, learn_scale=True, init_log_scale=math.log(10)
    )
    assert repr(module) == (
        "ContrastiveLoss(loss='infonce', energy='norm', reduction='mean', "
        "logsumexp_penalty=0.1, log_scale=2.303 (learned))"
    )
    assert repr(ContrastiveLoss(init_bias=-10.0)).endswith("bias=-10)")
    assert repr(ContrastiveLoss(exclude_positive_from_lse=True)).endswith(
        "reduction='mean', exclude_positive_from_lse=True)"
    )
    with torch.device("meta"):  # deferred initialisation: no values to read
        assert repr(ContrastiveLoss(learn_bias=True)).endswith("bias=meta (learned))")


def test_module_built_on_meta_resets_to_its_init_values():
    """Deferred initialisation (FSDP's): built on the meta device, then to_empty, the scale and
    bias hold uninitialised memory until reset_parameters, which FSDP calls, sets the init
    values; the method was missing (FSDP raised, a loop over modules left the garbage)."""
    kw = {"learn_scale": True, "init_log_scale": math.log(10), "init_bias": -10.0}
    with torch.device("meta"):
        module = ContrastiveLoss("binary", **kw)
    module.to_empty(device="cpu").reset_parameters()
    want = ContrastiveLoss("binary", **kw).state_dict()
    assert module.state_dict().keys() == want.keys()
    assert all(torch.equal(module.state_dict()[k], want[k]) for k in want)
    assert isinstance(module.log_scale, torch.nn.Parameter)


def test_module_loads_a_state_saved_with_0d_scale_and_bias():
    """The scale and bias are (1,) since FSDP refuses 0-d parameters; a state saved while they
    were 0-d still loads, into that shape."""
    module = ContrastiveLoss(learn_scale=True, init_bias=-10.0)
    module.load_state_dict({"log_scale": torch.tensor(2.3), "bias": torch.tensor(-5.0)})
    assert module.log_scale.shape == module.bias.shape == (1,)
    assert (module.log_scale.item(), module.bias.item()) == pytest.approx((2.3, -5.0))


def test_module_built_in_float64_holds_its_init_values_exactly():
    """dtype=torch.float64 makes the scale and bias float64 with log(10) exact: built in
    float32 then moved by .to(torch.float64), the scale was 3e-8 off, which set a float64
    SigLIP model's parameters 5e-9 apart from a plain-PyTorch twin's after 300 Adam steps."""
    module = ContrastiveLoss(
        learn_scale=True, init_log_scale=math.log(10), init_bias=-10.0, dtype=torch.float64
    )
    assert module.log_scale.dtype == module.bias.dtype == torch.float64
    assert module.log_scale.item() == math.log(10)
    with pytest.raises(TypeError, match=r"floating-point torch\.dtype"):
        ContrastiveLoss(init_log_scale=math.log(10), dtype=torch.int64)


def test_module_refuses_a_bad_backend_when_built():
    with pytest.raises(ValueError, match="backend"):
        ContrastiveLoss(backend="gpu")


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_argmax_ties_take_the_first_column(backend):
    """All logits equal: every row's argmax is column 0, as torch.argmax says, though the Triton
    kernels visit the tiles off the diagonal before the diagonal's own (rows 0..63 see column 64
    before column 0). The reference is held to the same counts: the fused paths are checked
    against it, and no random input has a logit of exactly 0."""
    fn = reference_contrastive_loss
    if backend != "reference":
        fn = functools.partial(contrastive_loss, backend=backend)
    kw = {"loss": "infonce", "return_metrics": True}
    _, metrics = fn(torch.zeros(100, 8), torch.zeros(130, 8), **kw)
    assert metrics["categorical_accuracy"].item() == pytest.approx(1 / 100)
    # A logit of exactly 0 is not > 0: every negative is right, no positive is.
    assert metrics["binary_accuracy"].item() == pytest.approx(1 - 100 / (100 * 130))
    # Within one tile: row 0's positive ties column 1 (dot energy), and column 0 is taken. (All
    # equal logits leave one row right whichever column of a tile a tie takes.)
    phi, psi = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    _, metrics = fn(phi, psi, energy="dot", **kw)
    assert metrics["categorical_accuracy"].item() == 1.0


@pytest.mark.interpreter
def test_binary_accuracy_counts_a_nan_negative_as_right():
    """A NaN logit is not > 0: off the diagonal that is the right answer, on every path."""
    phi, psi = _inputs(4, 6, 8)
    psi[5] = float("nan")  # an extra negative
    accuracy = [
        fn(phi, psi, loss="infonce", return_metrics=True, **kw)[1]["binary_accuracy"].item()
        for fn, kw in (
            (contrastive_loss, {"backend": "torch"}),
            (contrastive_loss, {"backend": "triton"}),
            (reference_contrastive_loss, {}),
        )
    ]
    assert accuracy[0] == accuracy[1] == pytest.approx(accuracy[2])


@pytest.mark.parametrize("side", ["phi", "psi"])
@pytest.mark.parametrize("energy", ENERGIES)
@BACKEND_DEVICES
def test_a_nan_input_gives_a_nan_loss(backend, device, energy, side):
    """NaN in one element of phi or psi reaches the loss, the mean positive logit and the
    gradients, as in the reference; it is never clamped into a number (the norm energy's
    max(|x - y|^2, 0) once turned it into -sqrt(eps) on the Triton path)."""
    phi, psi = _inputs(4, 6, 3, device=device)
    (phi if side == "phi" else psi)[1, 0] = float("nan")
    phi.requires_grad_(True)
    psi.requires_grad_(True)
    loss, metrics = contrastive_loss(
        phi, psi, loss="infonce", energy=energy, return_metrics=True, backend=backend
    )
    loss.backward()
    assert loss.isnan() and metrics["logits_pos"].isnan()
    assert phi.grad.isnan().any() and psi.grad.isnan().any()


@pytest.mark.parametrize("loss", ["binary", "infonce"])
@BACKEND_DEVICES
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's tl.max
def test_a_nan_row_with_metrics_gives_a_nan_loss(backend, device, loss):
    """A row of phi that is all NaN makes every logit of its row NaN: the loss is NaN and the
    metrics come back (the interpreter's argmax of a tile of NaN raised "All-NaN slice"). The
    row is not counted as right, on every path, and the other rows are the reference's."""
    phi, psi = _inputs(64, 64, 8, device=device)
    phi[1] = float("nan")
    value, metrics = contrastive_loss(phi, psi, loss=loss, return_metrics=True, backend=backend)
    _, truth = reference_contrastive_loss(
        phi.cpu().double(), psi.cpu().double(), loss=loss, return_metrics=True
    )
    assert value.isnan() and metrics["logits_pos"].isnan()
    right = truth["categorical_accuracy"].item()  # torch's argmax puts row 1's at 0: wrong
    assert metrics["categorical_accuracy"].item() == pytest.approx(right)


@pytest.mark.parametrize("shape", [(32, 32), (24, 40)], ids=str)
@BACKEND_DEVICES
@pytest.mark.parametrize("loss", LOSSES)
def test_metrics_leave_the_loss_and_gradients_unchanged(loss, backend, device, shape):
    """Asking for metrics changes what comes back, not the numbers: the same loss and the
    same gradients, bit for bit (a training loop asks only when it logs)."""
    phi, psi = _inputs(*shape, 16, seed=3, scale=3.0, device=device)
    kw = {"loss": loss, "energy": "norm", "backend": backend}
    plain = _loss_and_grads(contrastive_loss, phi, psi, **kw)
    measured = _loss_and_grads(contrastive_loss, phi, psi, return_metrics=True, **kw)
    assert set(measured[1]) == {
        "categorical_accuracy", "binary_accuracy", "logits_pos", "logits_neg", "logsumexp_sq"
    }  # fmt: skip
    assert torch.equal(plain[0], measured[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[2], measured[2], strict=True))
    truth = _truth(phi.cpu(), psi.cpu(), return_metrics=True, loss=loss, energy="norm")[1]
    for key, value in measured[1].items():
        torch.testing.assert_close(value.cpu().double(), truth[key].double(), rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("loss", ["binary", "infonce", "symmetric_infonce", "dpo"])
@pytest.mark.parametrize("shape", [(16, 70, 24), (32, 100, 24)], ids=str)
def test_few_rows_many_columns(shape, loss):
    """B = 16 or 32 with 64-wide column tiles: a program's rows end inside the diagonal's column
    tile, which must still count as a diagonal tile (masked, L_ii replaced)."""
    _check_every_loss(shape, loss, "norm", True, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_softplus_of_moderately_negative_logits(backend):
    """Logits around -5 (softplus ~ 7e-3): the kernels' log1p(e) switches to a series only for
    tiny e, so the binary loss keeps float32's relative precision there."""
    g = torch.Generator().manual_seed(13)
    phi = 10**0.5 * torch.eye(8) + 0.05 * torch.randn(8, 8, generator=g)  # L_ii ~ 5, L_ij ~ -5
    psi = 10**0.5 * torch.eye(8) + 0.05 * torch.randn(8, 8, generator=g)
    bias = torch.tensor(-5.0)
    with torch.no_grad():
        value = contrastive_loss(phi, psi, bias=bias, backend=backend, return_metrics=True)[0]
    truth = reference_contrastive_loss(phi.double(), psi.double(), bias=bias.double())
    assert abs(value.item() / truth.item() - 1) < 1e-6  # Triton 2e-7, eager float32 6e-8


@pytest.mark.parametrize("device", [CPU_KERNELS, CUDA])
@pytest.mark.parametrize("grad", [False, True], ids=["statistics", "grads-in-forward"])
@pytest.mark.parametrize("logit", [-9.127272605895996, -7.0, -5.0, -2.8])
def test_softplus_of_equal_negative_logits(logit, grad, device):
    """Negatives that all share one logit between -9.2 and -2.8 (SigLIP's bias of -10 puts them
    there), so that the kernels' error in each log1p(exp(L)) adds up instead of averaging out:
    1 + e rounded to float32 is 2**-24 off, 5e-4 of log1p(e) at e = exp(-9.13) ~ 1.1e-4, just
    past the series' old switch at 1e-4; on a GPU lg2.approx adds 2**-22 more. At -2.8 (e ~
    0.061, just under the switch at 1/16) each of the series' terms weighs most: a wrong
    coefficient of e**4 is 1e-5 off. The positive sits at +20, where softplus(-L_ii) is a
    negligible 2e-9."""
    m, d = 64, 64
    phi = torch.zeros(1, d, device=device)
    phi[0, 0] = (20.0 - logit) ** 0.5  # L_00 = 20; the other goals are orthogonal: L_0j = bias
    psi = torch.eye(m, d, device=device)
    psi[0, 0] = phi[0, 0]
    bias = torch.tensor(logit, device=device)
    phi.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        value = contrastive_loss(phi, psi, bias=bias, backend="triton")
    truth = reference_contrastive_loss(phi.detach().double(), psi.double(), bias=bias.double())
    assert abs(value.item() / truth.item() - 1) < 2e-6


@pytest.mark.parametrize("penalty", [0.0, 0.1])
@pytest.mark.parametrize("loss", ["binary", "dpo"])
def test_float64_softplus_past_20_keeps_its_digits(loss, penalty):
    """float64 softplus terms past 20 (binary's softplus(-L_ii) at L_ii < -20, DPO's at
    L_ij - L_ii > 20): F.softplus's default threshold returns its argument there, slope 1, off
    by exp(-20) ~ 2e-9, which is ten million float64 ulps (the penalty takes the gradient
    through it)."""
    phi = torch.tensor([[1.0], [0.5]], dtype=torch.float64)
    psi = torch.tensor([[-1.0], [-0.5], [22.0]], dtype=torch.float64)
    extra = (torch.tensor(0.0, dtype=torch.float64), torch.tensor(-21.0, dtype=torch.float64))
    kw = {"loss": loss, "logsumexp_penalty": penalty, "backend": "torch"}
    value, _, grads = _loss_and_grads(contrastive_loss, phi, psi, extra, **kw)
    kw.pop("backend")
    t_value, _, t_grads = _truth(phi, psi, extra, **kw)
    assert relative_error(value, t_value) < 1e-14
    for k, t in zip(grads, t_grads, strict=True):
        assert relative_error(k, t) < 1e-14


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["infonce", "symmetric_infonce", "flatnce", "flatnce_backward"])
def test_softmax_weights_round_the_logits_as_forward_did(loss, backend):
    """A softmax on one logit weighs it exactly 1 in backward: the weights exp(L - lse) take L
    rounded as the pass that computed lse rounded it. L_01 = 1500 + 2**-13 + 2**-14 is a
    rounding tie; the Triton kernels once folded the bias into the shift, scale f + (bias - lse),
    and rounding bias - lse on its own put the weight 1.2e-4 off (eager float32: exact)."""
    phi = torch.tensor([[1.0], [2.0]])
    psi = torch.tensor([[0.0], [1500.0 + 2**-13]])
    kw = {"loss": loss, "bias": torch.tensor(2.0**-14)}
    _, _, grads = _loss_and_grads(contrastive_loss, phi, psi, backend=backend, **kw)
    _, _, e_grads = _loss_and_grads(reference_contrastive_loss, phi, psi, **kw)
    kw["bias"] = kw["bias"].double()
    _, _, t_grads = _truth(phi, psi, **kw)
    for name, k, e, t in zip(("dphi", "dpsi"), grads, e_grads, t_grads, strict=True):
        assert_no_worse_than_eager(name, k, e, t, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("energy", ["l2", "norm"])
@pytest.mark.parametrize("loss", ["infonce", "symmetric_infonce"])
def test_softmax_weights_of_the_transposed_pass_round_the_logits_as_forward_did(
    loss, energy, backend
):
    """The launches with A = y (column statistics, dpsi) form L_ij from (y_j, x_i): l2's
    2P - ra - rb and norm's (ra + eps) + rb - 2P rounded the squared norms in the other order
    there, so row 1's dominant L_10 weighed exp(L_10 - lse_1) up to 8e-3 off 1 (eager: exactly
    1). The energy must be symmetric in (ra, rb) to the last bit."""
    if energy == "l2":
        phi, psi = torch.tensor([[391.2], [361.2]]), torch.tensor([[362.1], [331.2]])
        extra = ()
    else:  # norms of a few units, a logit scale of 1000
        phi, psi = torch.tensor([[3.0], [0.8217864]]), torch.tensor([[1.0566303], [-2.0]])
        extra = (torch.tensor(math.log(1000.0)), torch.tensor(0.0))
    kw = {"loss": loss, "energy": energy}
    _, _, grads = _loss_and_grads(contrastive_loss, phi, psi, extra, backend=backend, **kw)
    _, _, e_grads = _loss_and_grads(reference_contrastive_loss, phi, psi, extra, **kw)
    _, _, t_grads = _truth(phi, psi, extra, **kw)
    for name, k, e, t in zip(("dphi", "dpsi"), grads, e_grads, t_grads, strict=False):
        assert_no_worse_than_eager(name, k, e, t, 1e-6)


@pytest.mark.parametrize("device", [CPU_KERNELS, CUDA])
@pytest.mark.parametrize("loss", ["infonce", "symmetric_infonce", "flatnce", "flatnce_backward"])
def test_softmax_weights_with_logits_in_the_thousands_and_a_scale(loss, device):
    """Rows a few large logits dominate, with a logit scale and bias: the Triton gradients are
    no worse than eager float32's. On a GPU the compiler contracts scale f + bias into one FMA
    in both passes; the weights must still take the logits as the statistics pass rounded them.
    (The interpreter contracts nothing: on CPU this passed before that fix too, and the
    rounding tie above is the test that catches it there.)"""
    phi, psi = _inputs(48, 56, 16, seed=5, scale=40.0, device=device)
    extra = (torch.tensor(0.3, device=device), torch.tensor(0.7, device=device))
    _, _, grads = _loss_and_grads(contrastive_loss, phi, psi, extra, loss=loss, backend="triton")
    _, _, e_grads = _loss_and_grads(reference_contrastive_loss, phi, psi, extra, loss=loss)
    _, _, t_grads = _truth(phi.cpu(), psi.cpu(), [t.cpu() for t in extra], loss=loss)
    # The bias cancels in a softmax (its true gradient is 0): both sides give rounding noise.
    names = ("dphi", "dpsi", "dlog_scale")
    for name, k, e, t in zip(names, grads, e_grads, t_grads, strict=False):
        assert_no_worse_than_eager(name, k.cpu(), e.cpu(), t, 1e-6)


@BACKEND_DEVICES
@pytest.mark.parametrize(("penalty", "exclude"), [(0.0, False), (0.1, False), (0.0, True)])
@pytest.mark.parametrize("energy", ["dot", "l2"])
@pytest.mark.parametrize(
    "loss", ["infonce", "infonce_backward", "symmetric_infonce", "flatnce", "flatnce_backward"]
)
def test_softmax_weights_of_near_ties_in_the_thousands_sum_to_one(
    loss, energy, penalty, exclude, backend, device
):
    """Logits of 1e4 within a few units of each other (a bias of 1e4 on dyadic energies: every
    logit exact in float32): each row's and column's softmax weights must sum to 1 to float32's
    precision. The passes kept each logsumexp as one float32, 2**-11 off at 1e4, so the weights
    summed to 1 +- 5e-4 and flatnce's dphi was off by that times |psi| (eager subtracts L_ii
    first: exact); eager's infonce has that error itself, so the kernels are also held to
    float64 truth directly, the loss too (InfoNCE's rows take ``max - L_ii`` first; a
    penalty's logsumexp**2 of 1e8 has float32's rounding itself). Rectangular psi: extra
    negatives. On CUDA: whether the compiled passes recompute the same logits (the column pass
    takes the transposed product)."""
    g = torch.Generator().manual_seed(7)
    phi, psi = (torch.randint(-8, 9, (n, 2), generator=g) / 4.0 for n in (3, 5))
    extra = (torch.tensor(0.0), torch.tensor(1e4))
    kw = {"loss": loss, "energy": energy, "logsumexp_penalty": penalty,
          "exclude_positive_from_lse": exclude}  # fmt: skip
    on = [t.to(device) for t in (phi, psi, *extra)]
    value, _, grads = _loss_and_grads(contrastive_loss, *on[:2], on[2:], backend=backend, **kw)
    _, _, e_grads = _loss_and_grads(reference_contrastive_loss, phi, psi, extra, **kw)
    t_value, _, t_grads = _truth(phi, psi, extra, **kw)
    if not penalty:
        assert relative_error(value.cpu(), t_value) <= 1e-6
    # The bias cancels in a softmax (its true gradient is 0): both sides give rounding noise.
    names = ("dphi", "dpsi", "dlog_scale")
    for name, k, e, t in zip(names, grads, e_grads, t_grads, strict=False):
        assert_no_worse_than_eager(name, k.cpu(), e, t, 1e-6)
        assert relative_error(k.cpu(), t) <= 1e-6, name


def test_compiles_without_graph_breaks():
    phi, psi = _inputs(16, 16, 8, seed=8)
    phi.requires_grad_()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(p, q):
        return contrastive_loss(p, q, loss="symmetric_infonce", energy="norm")

    value = step(phi, psi)
    value.backward()
    t_phi = phi.detach().double().requires_grad_()
    truth = reference_contrastive_loss(t_phi, psi.double(), loss="symmetric_infonce", energy="norm")
    truth.backward()
    assert max_error(value.detach(), truth.detach()) < 1e-5
    assert max_error(phi.grad, t_phi.grad) < 1e-5


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiles_whole_with_dynamic_shapes_and_a_changing_penalty():
    """dynamic=True, and a penalty passed as an argument that changes between calls (a
    schedule), both make the float penalty symbolic: the config's checks must trace (they used
    math.isfinite, which dynamo cannot)."""
    phi, psi = _inputs(16, 16, 8, seed=9)
    default = torch.compile(contrastive_loss, backend="aot_eager", fullgraph=True, dynamic=True)
    torch.testing.assert_close(default(phi, psi), contrastive_loss(phi, psi))

    def loss(p: torch.Tensor, q: torch.Tensor, c: float) -> torch.Tensor:
        return contrastive_loss(p, q, loss="infonce", logsumexp_penalty=c)

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for c in (0.1, 0.2, 0.3, 0.0):
        torch.testing.assert_close(compiled(phi, psi, c), loss(phi, psi, c))


@pytest.mark.parametrize(
    ("phi", "psi", "kwargs", "error", "match"),
    [
        (torch.randn(4), torch.randn(4, 3), {}, ValueError, "2-D"),
        (torch.randn(4, 3), torch.randn(3, 3), {}, ValueError, "at least as many rows"),
        (torch.randn(4, 3), torch.randn(4, 2), {}, ValueError, "feature sizes differ"),
        (torch.randn(0, 3), torch.randn(0, 3), {}, ValueError, "empty batch"),
        (torch.randn(4, 0), torch.randn(4, 0), {}, ValueError, "phi and psi have 0 features"),
        (torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3), {}, TypeError, "float"),
        (torch.randn(4, 3), torch.randn(4, 3).double(), {}, TypeError, "share a dtype"),
        (torch.randn(4, 3), torch.randn(4, 3), {"loss": "nce"}, ValueError, "loss must be"),
        (torch.randn(4, 3), torch.randn(4, 3), {"energy": "cos"}, ValueError, "energy must be"),
        (torch.randn(4, 3), torch.randn(4, 3), {"reduction": "max"}, ValueError, "reduction"),
        (torch.randn(4, 3), torch.randn(4, 3), {"logsumexp_penalty": -1}, ValueError, "penalty"),
        (torch.randn(4, 3), torch.randn(4, 3), {"logsumexp_penalty": True}, TypeError, "penalty"),
        (torch.randn(1, 3), torch.randn(1, 3), {"loss": "dpo"}, ValueError, ">= 2 goals"),
        (torch.randn(1, 3), torch.randn(1, 3), {"loss": "fb"}, ValueError, ">= 2 goals"),
        (
            torch.randn(1, 3),
            torch.randn(1, 3),
            {"logsumexp_penalty": 0.1, "exclude_positive_from_lse": True},
            ValueError,
            ">= 2 goals",
        ),
        (torch.randn(1, 3), torch.randn(4, 3), {"loss": "flatnce_backward"}, ValueError, "phi"),
        (torch.randn(4, 3), torch.randn(4, 3), {"log_scale": 1.0}, TypeError, r"float 1.0 \(pass"),
        (torch.randn(4, 3), torch.randn(4, 3), {"bias": torch.ones(0)}, TypeError, r"shape \(0,\)"),
        (
            torch.randn(4, 3),
            torch.randn(4, 3),
            {"bias": torch.tensor(0.5, device="meta")},
            ValueError,
            "bias is on meta but phi is on cpu",
        ),
        (torch.randn(4, 3), torch.randn(4, 3), {"backend": "cuda"}, ValueError, "backend"),
        (
            torch.randn(4, 3).double(),
            torch.randn(4, 3).double(),
            {"backend": "triton"},
            TypeError,
            "the Triton backend takes float16/bfloat16/float32, got torch.float64",
        ),
        (
            torch.randn(4, 3),
            torch.randn(4, 3),
            {"exclude_positive_from_lse": "no"},
            TypeError,
            "exclude_positive_from_lse",
        ),
        ([[1.0]], torch.randn(1, 1), {}, TypeError, "torch.Tensor"),
        (torch.randn(4, 3), torch.randn(4, 3), {"return_metrics": None}, TypeError, "metrics"),
        (torch.randn(4, 3), torch.randn(4, 3), {"return_metrics": "no"}, TypeError, "metrics"),
        (
            torch.randn(4, 3, device="meta"),
            torch.randn(5, 3, device="meta"),
            {},
            ValueError,
            "meta tensor",
        ),
        (torch.randn(4, 3).to_sparse(), torch.randn(4, 3), {}, TypeError, "phi must be dense"),
        (torch.randn(4, 3), torch.randn(4, 3).to_sparse_csr(), {}, TypeError, "psi must be dense"),
    ],
)
def test_bad_input_is_named(phi, psi, kwargs, error, match):
    with pytest.raises(error, match=match):
        contrastive_loss(phi, psi, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(error, match=match):
        contrastive_loss(phi, psi, **kwargs | {"energy": kwargs.get("energy", "cosine")})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_inputs_made_in_inference_mode_still_train_a_learned_scale(loss, backend):
    with torch.inference_mode():
        phi, psi = _inputs(4, 5, 3)
    grads = []
    for x, y in ((phi, psi), (phi.clone(), psi.clone())):  # inference tensors, then plain
        scale = torch.zeros((), requires_grad=True)
        contrastive_loss(x, y, loss=loss, log_scale=scale, backend=backend).backward()
        grads.append(scale.grad)
    assert torch.equal(*grads)


def test_a_numpy_bool_flag_is_named_as_such():
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=r"True or False, got .*True.* \(numpy\.bool"):
        contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), exclude_positive_from_lse=np.True_)


def test_any_real_penalty_weight_is_taken_as_a_float():
    phi, psi = _inputs(5, 7, 3)
    want = contrastive_loss(phi, psi, loss="infonce", logsumexp_penalty=0.1)
    got = contrastive_loss(phi, psi, loss="infonce", logsumexp_penalty=fractions.Fraction(1, 10))
    assert torch.equal(got, want)


def test_exclude_positive_changes_nothing_without_a_row_logsumexp():
    """The sigmoid loss without a penalty has no logsumexp to leave the positive out of: one
    goal is enough, and the value is the same."""
    phi, psi = torch.randn(1, 3), torch.randn(1, 3)
    excluded = contrastive_loss(phi, psi, exclude_positive_from_lse=True)
    assert torch.equal(excluded, contrastive_loss(phi, psi))


def test_the_reference_checks_its_options_as_the_loss_does():
    with pytest.raises(ValueError, match="reduction"):
        reference_contrastive_loss(torch.randn(3, 2), torch.randn(3, 2), reduction="bogus")
    with pytest.raises(ValueError, match="unknown energy 'cos'"):
        reference_logits(torch.randn(3, 2), torch.randn(3, 2), "cos")


def test_the_reference_matches_the_textbook_formulas():
    """Every other test holds the fused paths to the reference, which shares its options and
    NORM_EPS with them: here the reference is held to the usual formulas, written without its
    code (cross-entropy over goals, BCE with identity labels, DPO / IPO over the off-diagonal
    pairs, the energies from torch.cdist and cosine_similarity), on a rectangular batch."""
    g = torch.Generator().manual_seed(4)
    phi = torch.randn(3, 2, generator=g, dtype=torch.float64)
    psi = torch.randn(5, 2, generator=g, dtype=torch.float64)
    dist = torch.cdist(phi, psi)
    energies = {
        "dot": phi @ psi.T,
        "l2": -dist.square(),
        "norm": -(dist.square() + 1e-6).sqrt(),
        "cosine": F.cosine_similarity(phi[:, None], psi[None], dim=-1),
    }
    for energy, logits in energies.items():
        got = reference_logits(phi, psi, energy, torch.tensor(0.5), torch.tensor(-1.0))
        torch.testing.assert_close(got, logits * math.exp(0.5) - 1.0)
    logits = energies["dot"]
    labels = torch.arange(3)
    eye = torch.eye(3, 5, dtype=torch.float64)
    margins = (logits.diagonal()[:, None] - logits)[eye == 0]  # L_ii - L_ij, j != i
    columns = F.cross_entropy(logits[:, :3].T, labels)
    no_positive = logits.masked_fill(eye == 1, -math.inf).logsumexp(1)
    expected = {
        "binary": F.binary_cross_entropy_with_logits(logits, eye),
        "infonce": F.cross_entropy(logits, labels),
        "infonce_backward": columns,
        "symmetric_infonce": F.cross_entropy(logits, labels) + columns,
        "dpo": -F.logsigmoid(margins).mean(),
        "ipo": (margins - 1).square().mean(),
        # M = 5 goals: fb's B - 1 off-diagonal count is M - 1, sppo's positive weight B is M
        "fb": (0.5 * logits.square()[eye == 0].reshape(3, 4).mean(1) - logits.diagonal()).mean(),
        "sppo": ((logits - (2 * eye - 1)).square() * (1 + 4 * eye)).mean(),
    }
    for loss, want in expected.items():
        torch.testing.assert_close(reference_contrastive_loss(phi, psi, loss=loss), want)
    got = reference_contrastive_loss(
        phi, psi, loss="infonce", exclude_positive_from_lse=True, logsumexp_penalty=0.1
    )
    want = (no_positive - logits.diagonal()).mean() + 0.1 * no_positive.square().mean()
    torch.testing.assert_close(got, want)


def test_the_reference_flatnce_has_the_textbook_gradient():
    """FlatNCE's value is 1 by construction (exp(c - stopgrad(c))): what it trains with is its
    gradient, the mean gradient of c_i = logsumexp_{j != i}(L_ij - L_ii) (rows; columns j < B
    of the first B rows for flatnce_backward), held here to that formula on a rectangular batch."""
    g = torch.Generator().manual_seed(5)
    phi = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    psi = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    logits = phi @ psi.T
    off = torch.eye(3, 5, dtype=torch.bool).logical_not()
    rows = (logits - logits.diagonal()[:, None]).masked_fill(~off, -math.inf).logsumexp(1)
    square = logits[:, :3]
    columns = (square - square.diagonal()[None]).masked_fill(~off[:, :3], -math.inf).logsumexp(0)
    for loss, c in (("flatnce", rows), ("flatnce_backward", columns)):
        got = reference_contrastive_loss(phi, psi, loss=loss)
        torch.testing.assert_close(got, torch.ones((), dtype=torch.float64))
        want = torch.autograd.grad(c.mean(), (phi, psi), retain_graph=True)
        for g_got, g_want in zip(torch.autograd.grad(got, (phi, psi)), want, strict=True):
            torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1, 1)])
def test_the_reference_takes_any_one_element_scale_and_bias(shape):
    phi, psi = _inputs(5, 7, 3, seed=3)
    scale, bias = torch.full(shape, 0.3), torch.full(shape, -1.0)
    for loss in ("binary", "infonce"):
        want = contrastive_loss(phi, psi, loss=loss, log_scale=scale, bias=bias)
        got = reference_contrastive_loss(phi, psi, loss=loss, log_scale=scale, bias=bias)
        assert max_error(got, want) < 1e-5


@pytest.mark.parametrize("imported", [KERNELS, "triton"])
def test_triton_backend_on_cpu_needs_kernels_built_by_the_interpreter(imported):
    """TRITON_INTERPRET=1 set after the kernels were built, or after triton was imported
    (torch.compile imports it; Triton's own jit'd library, tl.zeros, stays compiled), changes
    nothing: a clear error, not Triton's 'no active drivers' or, after triton alone, the
    interpreter's "Cannot call @triton.jit'd outside of the scope of a kernel" from deep inside
    a launch."""
    err = stderr_with_late_interpret(
        "from crl_fast import contrastive_loss\n"
        "contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), backend='triton')",
        imported,
    )
    assert "ValueError: backend='triton' needs CUDA tensors" in err, err


@pytest.mark.parametrize("value", ["true", "on"])
def test_kernels_run_under_any_spelling_of_triton_interpret(value):
    """Triton interprets for TRITON_INTERPRET=true or on as for 1: the kernels then take their
    interpreter versions of libdevice's functions too (the sigmoid loss's log2, the buffer's
    log1p), not libdevice's, which the interpreter lacks (an InterpreterError on None)."""
    code = textwrap.dedent("""
        import torch
        from crl_fast import TrajectoryBuffer, contrastive_loss
        phi, psi = torch.randn(6, 3), torch.randn(6, 3)
        got = contrastive_loss(phi, psi, backend="triton")
        want = contrastive_loss(phi, psi, backend="torch")
        assert abs(got.item() - want.item()) < 1e-5, (got, want)
        buf = TrajectoryBuffer(capacity=4, num_envs=2, obs_dim=1, action_dim=1, goal_dim=1,
                               backend="triton")
        buf.extend({"observation": torch.zeros(3, 2, 1), "action": torch.zeros(3, 2, 1),
                    "next_achieved_goal": torch.zeros(3, 2, 1),
                    "terminated": torch.zeros(3, 2, dtype=torch.bool),
                    "truncated": torch.zeros(3, 2, dtype=torch.bool)})
        buf.sample(5)
    """)
    env = os.environ | {"TRITON_INTERPRET": value, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("value", ["0", None])
def test_compiled_kernels_take_libdevice(value):
    """Without the interpreter the kernels take libdevice's functions (the sigmoid loss's fast
    log2 and division, the buffer's log1p and expm1): the interpreter's versions would compile
    on a GPU too, only slower or less exact, which no GPU test shows."""
    code = textwrap.dedent("""
        from crl_fast.kernels import goal_sampling, pair_stats
        picked = (pair_stats._log2_approx, pair_stats._div_approx, goal_sampling._log1p,
                  goal_sampling._expm1)
        assert all("libdevice" in f.src for f in picked)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"CUDA_VISIBLE_DEVICES": ""} | ({} if value is None else {"TRITON_INTERPRET": value})
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize(
    ("phi", "psi", "error"),
    [
        ([[1.0]], torch.randn(1, 1), TypeError),
        (torch.ones(3, 1), torch.randn(3, 5), ValueError),
        (torch.ones(3, 2, dtype=torch.int64), torch.ones(3, 2, dtype=torch.int64), TypeError),
        (torch.ones(3, 2), torch.ones(3, 2).double(), TypeError),
    ],
)
def test_pairwise_energy_refuses_mismatched_rows(phi, psi, error):
    with pytest.raises(error, match="pairwise_energy"):
        pairwise_energy(phi, psi, "l2")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"bias": torch.tensor([1.0, 100.0])}, TypeError),
        ({"bias": torch.zeros(2, 2)}, TypeError),
        ({"log_scale": 0.5}, TypeError),
        ({"log_scale": torch.tensor(1)}, TypeError),
    ],
)
def test_pairwise_energy_checks_scale_and_bias(kwargs, error):
    with pytest.raises(error, match=r"log_scale|bias"):
        pairwise_energy(torch.randn(2, 3), torch.randn(2, 3), **kwargs)


def test_pairwise_energy_scale_and_bias_keep_the_shape():
    phi, psi = torch.randn(5, 3), torch.randn(5, 3)
    plain = pairwise_energy(phi, psi, "l2")
    scaled = pairwise_energy(phi, psi, "l2", log_scale=torch.ones(1, 1), bias=torch.ones(1))
    assert scaled.shape == (5,)
    torch.testing.assert_close(scaled, plain * math.e + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_sigmoid_gradients_survive_loss_scaling(backend):
    """GradScaler multiplies the loss by 2**16: the fused sigmoid loss (gradients made in forward)
    must scale before rounding to float16, not overflow or lose the 1 / (B M) factor."""
    torch.manual_seed(0)
    w, x = torch.randn(64, 64) / 8, torch.randn(256, 64)
    psi = (torch.randn(256, 64) / 8).half()
    w16 = w.clone().requires_grad_()
    (contrastive_loss((x @ w16).half(), psi, backend=backend) * 2**16).backward()
    w64 = w.double().requires_grad_()
    reference_contrastive_loss(x.double() @ w64, psi.double()).backward()
    grad = w16.grad.double() / 2**16
    assert torch.isfinite(grad).all()
    assert (grad - w64.grad).norm() / w64.grad.norm() < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_cosine_takes_zero_and_large_rows(backend):
    """Rows are normalised in float32: float16's eps of 0 gave NaN for a zero row, and norms past
    65504 overflowed to give zero rows."""
    phi, psi = _inputs(6, 6, 64, dtype=torch.float16, seed=3)
    phi[1] = 0.0
    psi[2] = 1e4
    value = contrastive_loss(phi, psi, loss="infonce", energy="cosine", backend=backend)
    truth = reference_contrastive_loss(phi.double(), psi.double(), loss="infonce", energy="cosine")
    assert torch.isfinite(value)
    assert max_error(value, truth) < 1e-2


@pytest.mark.interpreter
def test_triton_reads_the_new_fp32_precision_setting():
    """torch >= 2.9 raises on the legacy getter once ``fp32_precision`` is set."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch has no fp32_precision setting")
    before = matmul.fp32_precision
    phi, psi = _inputs(8, 8, 4)
    try:
        matmul.fp32_precision = "tf32"
        value = contrastive_loss(phi, psi, backend="triton")
    finally:
        matmul.fp32_precision = before
    assert max_error(value, reference_contrastive_loss(phi.double(), psi.double())) < 1e-3


def test_cpu_path_memory_is_bounded():
    """B = 8192: the B x B float32 logits alone would be 256 MiB; the chunked path must stay
    far below that, forward and backward (peak RSS growth, measured in a fresh process)."""
    script = textwrap.dedent(
        """
        import resource, torch
        from crl_fast import contrastive_loss
        torch.set_num_threads(2)
        b, d = 8192, 8
        phi = torch.randn(b, d, requires_grad=True)
        psi = torch.randn(b, d, requires_grad=True)
        contrastive_loss(phi[:64], psi[:64]).backward()  # warm up allocator and autograd
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss = contrastive_loss(phi, psi, loss="infonce", logsumexp_penalty=0.1)
        loss.backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    full_matrix_mib = 8192**2 * 4 / 2**20
    assert growth_mib < full_matrix_mib / 4, f"peak grew {growth_mib:.0f} MiB"


# ------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1000, 1000, 64), (1024, 1500, 256), (333, 333, 100)], ids=str)
@pytest.mark.parametrize("loss", ["binary", "symmetric_infonce", "dpo"])
def test_cuda_kernels_no_worse_than_eager(shape, dtype, loss):
    phi, psi = _inputs(*shape, dtype=dtype, device="cuda")
    kw = {"loss": loss, "energy": "norm" if loss != "binary" else "dot"}
    value, _, grads = _loss_and_grads(contrastive_loss, phi, psi, **kw)
    e_value, _, e_grads = _loss_and_grads(reference_contrastive_loss, phi, psi, **kw)
    t_value, _, t_grads = _truth(phi, psi, **kw)
    assert_no_worse_than_eager("loss", value, e_value, t_value, RTOL[dtype])
    for name, k, e, t in zip(("dphi", "dpsi"), grads, e_grads, t_grads, strict=True):
        assert_no_worse_than_eager(name, k, e, t, RTOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("energy", ENERGIES)
@pytest.mark.parametrize("loss", LOSSES)
@SCALED
def test_cuda_every_loss_and_energy(loss, energy, scaled):
    """Every compiled variant (float32, several tiles, ragged edges) against float64."""
    _check_every_loss((300, 333, 64), loss, energy, scaled, device="cuda")


@pytest.mark.gpu
def test_cuda_memory_is_linear_in_batch():
    b, d = 262144, 64
    phi, psi = _inputs(b, b, d, dtype=torch.bfloat16, device="cuda")
    phi.requires_grad_()
    psi.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    contrastive_loss(phi, psi, loss="infonce", energy="norm", logsumexp_penalty=0.1).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 8 * b * d * 2 + (16 << 20), f"extra memory {extra / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_cuda_graph_capture():
    phi, psi = _inputs(512, 512, 64, device="cuda")
    phi.requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (compiles the kernels) outside the graph
            phi.grad = None
            contrastive_loss(phi, psi, loss="infonce", energy="norm").backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    phi.grad = None
    with torch.cuda.graph(graph):
        value = contrastive_loss(phi, psi, loss="infonce", energy="norm")
        value.backward()
    phi.data.copy_(_inputs(512, 512, 64, device="cuda", seed=9)[0])
    graph.replay()
    torch.cuda.synchronize()
    truth = reference_contrastive_loss(phi.detach().double(), psi.double(), loss="infonce",
                                       energy="norm")  # fmt: skip
    assert max_error(value, truth) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["binary", "infonce"])
def test_cuda_inductor_compile(loss):
    phi, psi = _inputs(1024, 1024, 64, dtype=torch.bfloat16, device="cuda")
    phi.requires_grad_()

    @torch.compile(fullgraph=True)
    def step(p, q):
        return contrastive_loss(p, q, loss=loss, energy="norm", logsumexp_penalty=0.1)

    value = step(phi, psi)
    value.backward()
    t_phi = phi.detach().double().requires_grad_()
    truth = reference_contrastive_loss(
        t_phi, psi.double(), loss=loss, energy="norm", logsumexp_penalty=0.1
    )
    truth.backward()
    assert max_error(value.detach(), truth.detach()) < 1e-3
    assert max_error(phi.grad, t_phi.grad) < 1e-2 * t_phi.grad.abs().max().item()


_STATS_FLAGS = {  # energy, row_lse, col_lse, mask_diag, softplus, pair, metrics, online, online_w
    "infonce": (2, True, False, False, False, 0, True, False, False),
    "columns+dpo": (0, False, True, True, True, 1, False, False, False),
    "both+ipo": (1, True, True, False, False, 2, True, False, False),
    "fb": (1, False, False, False, False, 3, False, False, False),  # no slope sum: empty
    "sppo+metrics": (0, False, False, False, False, 4, True, False, False),
    "online": (2, True, False, False, False, 0, False, True, True),
}


@pytest.mark.parametrize(
    "use_triton",
    [False, pytest.param(True, marks=pytest.mark.interpreter)],
    ids=["torch", "triton"],
)
@pytest.mark.parametrize("flags", list(_STATS_FLAGS))
def test_loss_custom_ops_pass_opcheck(flags, use_triton):
    """torch.library.opcheck on the loss's custom ops: schemas, autograd registration, and fake
    kernels whose shapes and dtypes match the real outputs (what torch.compile traces with)."""
    from crl_fast.loss_with_grads import _loss_with_grads_op
    from crl_fast.pair_stats import PairStats, _pair_stats_backward_op, _pair_stats_op

    energy, *options = _STATS_FLAGS[flags]
    if options[-2] and not use_triton:
        pytest.skip("the online sums are a Triton-path optimisation")
    phi, psi = _inputs(12, 16, 8, seed=21)
    scale, bias = torch.tensor(1.3), torch.tensor(-0.2)
    leaves = [t.clone().requires_grad_() for t in (phi, psi, scale, bias)]
    torch.library.opcheck(_pair_stats_op, (*leaves, energy, *options, use_triton))
    pair = _STATS_FLAGS[flags][5]
    if pair == 0 or use_triton:  # DPO / IPO take their gradients in forward on Triton only
        for x_grad, y_grad in ((True, True), (False, True), (True, False)):  # empty when frozen
            sides = [t.clone().requires_grad_(g) for t, g in ((phi, x_grad), (psi, y_grad))]
            flags = (energy, pair, True, x_grad, y_grad, True, use_triton)
            torch.library.opcheck(_loss_with_grads_op, (*sides, *leaves[2:], *flags))
    stats = PairStats(*_pair_stats_op(phi, psi, scale, bias, energy, True, True, *options[2:-2],
                                      False, False, use_triton))  # fmt: skip
    empty, g_row, g_col = torch.empty(0), torch.rand(12), torch.rand(16)
    args = (phi, psi, stats.x_sq, stats.y_sq, scale, bias, stats.pos, stats.row_lse, stats.col_lse)
    args += (stats.row_max, stats.col_max)
    args += (g_row, g_col, empty, empty, torch.zeros(12), energy, options[2], 0)
    for need_dx, need_dy in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(_pair_stats_backward_op, (*args, need_dx, need_dy, True, use_triton))


@pytest.mark.interpreter
def test_kernel_launchers_refuse_strided_columns():
    """The launchers pass the kernels a row stride only: a column-strided input (here a
    transposed copy, whose values are right) is an error, not a wrong result."""
    from crl_fast.kernels import pair_stats as kernels

    phi, psi = _inputs(8, 8, 16, seed=22)
    strided = phi.t().contiguous().t()
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    with pytest.raises(ValueError, match=r"x needs unit column stride, got strides \(1, 8\)"):
        kernels.paired_rows(strided, psi, one, zero, energy=0)
    x_sq, y_sq, _, _, pos = kernels.paired_rows(phi, psi, one, zero, energy=0)
    with pytest.raises(ValueError, match="a needs unit column stride"):
        kernels.stats(strided, psi, x_sq, y_sq, one, zero, pos, energy=0, lse=True,
                      mask_diag=False, softplus=False, pair=0, metrics=False)  # fmt: skip


def test_kernel_launchers_refuse_options_they_cannot_compute():
    """Online sums need the row logsumexp (and d <= ONLINE_MAX_D); the single pass's column
    sums need d in one tile. The callers never ask otherwise: called directly."""
    from crl_fast.kernels import pair_stats as kernels

    one, zero, empty, pos = torch.tensor(1.0), torch.tensor(0.0), torch.empty(0), torch.zeros(4)
    phi, psi = _inputs(4, 4, 8)  # dot energy: no squared norms; refused before any launch
    with pytest.raises(ValueError, match="online sums need the row logsumexp and d <= 128"):
        kernels.stats(phi, psi, empty, empty, one, zero, pos, energy=0, lse=False,
                      mask_diag=False, softplus=False, pair=0, metrics=False,
                      online=True)  # fmt: skip
    phi, psi = _inputs(4, 4, 80)
    col = (torch.zeros(4, 80), torch.zeros(0))
    with pytest.raises(ValueError, match="column_sums need d in one tile, got d = 80"):
        kernels.grad(phi, psi, empty, empty, one, zero, pos, *[empty] * 6, torch.ones(4), empty,
                     empty, energy=0, x_is_a=True, mask_diag=False, pair=0, scale_grad=False,
                     column_sums=col)  # fmt: skip


def test_triton_path_optimisations_are_refused_on_the_torch_path():
    """The pair losses' gradients in forward and the online row sums exist on the Triton path
    only; the loss never asks the PyTorch path for them: called directly."""
    from crl_fast.loss_with_grads import loss_with_grads
    from crl_fast.pair_stats import PAIR_DPO, PAIR_FB, pair_stats

    phi, psi = _inputs(4, 4, 3)
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    for pair in (PAIR_DPO, PAIR_FB):
        with pytest.raises(ValueError, match="pair losses with gradients in forward are a Triton"):
            loss_with_grads(phi, psi, one, zero, energy=0, pair=pair, mean=True, use_triton=False)
    with pytest.raises(ValueError, match="the online row sums are a Triton-path optimisation"):
        pair_stats(phi, psi, one, zero, energy=0, row_lse=True, online=True, use_triton=False)


@pytest.mark.interpreter
@pytest.mark.parametrize("loss", ["infonce", "flatnce"])
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_online_backward_does_not_specialise_the_batch(loss):
    """The online losses' backward (Triton path) ran a Python loop over row chunks outside the
    ops: traced by torch.compile it specialised the batch size, so dynamic=True recompiled for
    every new batch size."""
    from torch._dynamo.utils import counters

    counters.clear()
    step = torch.compile(
        lambda p, q: contrastive_loss(p, q, loss=loss, backend="triton"),
        backend="aot_eager", fullgraph=True, dynamic=True,
    )  # fmt: skip
    for b, m in ((16, 24), (13, 20), (32, 40)):
        phi, psi = _inputs(b, m, 5, seed=b)
        phi.requires_grad_()
        step(phi, psi).backward()
        truth = phi.grad.clone()
        phi.grad = None
        contrastive_loss(phi, psi, loss=loss, backend="triton").backward()
        torch.testing.assert_close(truth, phi.grad)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("loss", ["infonce", "symmetric_infonce", "dpo", "binary"])
def test_batched_gradients_raise_a_clear_error(loss):
    """is_grads_batched=True (and jacobian(vectorize=True)) vmaps the backward: the ops' error,
    not an unrelated one from inside PyTorch's vmap; the sigmoid loss, whose backward only
    scales the gradients forward computed, gives the batched gradients."""
    phi, psi = _inputs(6, 8, 4, seed=3)
    phi.requires_grad_()
    value = contrastive_loss(phi, psi, loss=loss)
    outputs = torch.tensor([1.0, -2.0])
    if loss != "binary":
        with pytest.raises(RuntimeError, match="vmapped backward"):
            torch.autograd.grad(value, phi, outputs, is_grads_batched=True)
        return
    (batched,) = torch.autograd.grad(value, phi, outputs, is_grads_batched=True, retain_graph=True)
    (one,) = torch.autograd.grad(value, phi)
    torch.testing.assert_close(batched, outputs[:, None, None] * one)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"learn_scale": 1}, TypeError, "learn_scale must be True or False"),
        ({"learn_bias": "no"}, TypeError, "learn_bias must be True or False"),
        ({"init_log_scale": "1"}, TypeError, "init_log_scale must be a real number"),
        ({"init_bias": torch.tensor([1.0, 2.0])}, TypeError, "init_bias must be a real number"),
        ({"init_log_scale": float("nan")}, ValueError, "init_log_scale must be finite"),
        ({"init_bias": -math.inf}, ValueError, "init_bias must be finite"),
    ],
)
def test_module_refuses_bad_scale_and_bias_settings_when_built(kwargs, error, message):
    """As contrastive_loss's flags: a truthy string does not turn learning on, and a scale or
    bias that is not a finite number is named, not turned into NaN logits at the first call."""
    with pytest.raises(error, match=message):
        ContrastiveLoss(**kwargs)
