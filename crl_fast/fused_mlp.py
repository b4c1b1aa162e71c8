"""An MLP with two hidden layers in three Triton kernels: forward in one, backward in two.

At the batch sizes of RL updates (hundreds to a few thousand rows) each matmul of a 256-wide MLP
is a handful of tiles, so PyTorch's kernels for it (five in forward, about eleven in backward)
spend their time starting and draining rather than multiplying: the compiled, CUDA-graphed update
of JaxGCRL's networks took ~5 us per kernel on an H200 (``bench/bench_update.py``). The
kernels (``kernels/mlp.py``) keep the hidden activations on chip and take both inputs of an
encoder (no concatenation kernel). Whether that is faster on a GPU is not measured yet, so
:class:`crl_fast.networks.MLP` takes this path only when built with ``fused=True``.

:func:`mlp_reference` is the maths in plain PyTorch; the tests compare the kernels with it.
The ops are ``torch.library`` custom ops: they run under autograd, ``torch.compile`` and CUDA
graph capture, and under ``torch.autocast`` their products take the autocast dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from crl_fast.checks import triton_available, triton_runs_on
from crl_fast.custom_ops import eager_fast_path, refuse_double_backward, refuse_transforms

ACT_CODES = {"swish": 0, "relu": 1}
"""The activations the kernels take, with their codes (the kernels' ACT)."""
MAX_WIDTH = 256
"""Widest hidden layer (and output) the kernels take: a program holds a block of rows of a whole
hidden layer, and a column block of each weight, on chip; at 512 they need more shared memory
than an H100 has (``tests/compile_kernels.py``)."""
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LAYERS = "the PyTorch layers (fused=False)"
Tensor = torch.Tensor
Tensors3 = tuple[Tensor, Tensor, Tensor]


def mlp_reference(inputs: Sequence[Tensor], params: Sequence[Tensor], activation: str) -> Tensor:
    """y = W3 act(W2 act(W1 x + b1) + b2) + b3 with x = cat(inputs) and ``params`` = (W1, b1,
    W2, b2, W3, b3) as ``nn.Linear`` stores them: the maths of :func:`fused_mlp`."""
    act = {"swish": F.silu, "relu": F.relu}[activation]
    w1, b1, w2, b2, w3, b3 = params
    x = torch.cat(list(inputs), dim=-1)
    return F.linear(act(F.linear(act(F.linear(x, w1, b1)), w2, b2)), w3, b3)


def check_supported(depth: int, layer_norm: bool, residual: bool, width: int, out_dim: int) -> None:
    """A ValueError unless the kernels cover this MLP: two hidden layers, no layer norm or
    residual blocks, width and output up to :data:`MAX_WIDTH`."""
    if depth != 2 or layer_norm or residual or max(width, out_dim) > MAX_WIDTH:
        raise ValueError(
            "the fused MLP kernels (fused=True, --fused-mlp) take MLPs of depth 2 without layer "
            f"norm or residual blocks, width and output <= {MAX_WIDTH}; got depth={depth}, "
            f"layer_norm={layer_norm}, residual={residual}, width={width}, out_dim={out_dim}"
        )


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the products: autocast's on ``x``'s device where it is on, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def runs_on(device: torch.device) -> bool:
    """Whether the kernels take tensors on ``device``: CUDA, or the CPU where Triton's
    interpreter built them."""
    if not triton_available():
        return False
    from crl_fast.kernels import mlp as kernels

    return triton_runs_on(device, kernels)


def can_run(inputs: Sequence[Tensor], params: Sequence[Tensor]) -> bool:
    """Whether :func:`fused_mlp` takes these tensors: on one device, CUDA (or the CPU where
    Triton's interpreter built the kernels); inputs (at least 1-D) of one float dtype and one
    batch shape, not empty, whose widths add up to W1's; contiguous parameters of one dtype, the
    inputs' unless autocast sets the products' dtype; all dtypes float16/bfloat16/float32.
    Elsewhere the layers run, and raise their own errors for what they cannot take."""
    if not inputs or min(t.dim() for t in inputs) == 0:
        return False
    x, w1, w2, w3 = inputs[0], params[0], params[2], params[4]
    if x.numel() == 0 or not runs_on(x.device):
        return False
    autocast = torch.is_autocast_enabled(x.device.type)
    return (
        all(t.device == x.device and t.dtype == x.dtype for t in inputs)
        and all(t.shape[:-1] == x.shape[:-1] for t in inputs)
        and sum(t.shape[-1] for t in inputs) == w1.shape[1]
        and w2.shape == (w1.shape[0], w1.shape[0])
        and w3.shape[1] == w1.shape[0]
        and all(p.device == x.device and p.dtype == w1.dtype and p.is_contiguous() for p in params)
        and (autocast or w1.dtype == x.dtype)
        and {x.dtype, w1.dtype, compute_dtype(x)} <= set(_TRITON_DTYPES)
    )


def fused_mlp(inputs: Sequence[Tensor], params: Sequence[Tensor], activation: str) -> Tensor:
    """:func:`mlp_reference` in three kernels, for inputs that :func:`can_run` accepts.

    The output has the inputs' dtype and leading dimensions; z1 and z2 are saved for backward
    (in the compute dtype) only where a gradient will be asked for."""
    lead = inputs[0].shape[:-1]
    parts = [t.reshape(lead.numel(), t.shape[-1]) for t in inputs]  # not -1: a part may be 0 wide
    if len(parts) > 2:
        parts = [parts[0], torch.cat(parts[1:], dim=-1)]
    elif len(parts) == 1:
        parts.append(parts[0].new_empty(parts[0].shape[0], 0))
    x1, x2 = (p if p.stride(-1) == 1 else p.contiguous() for p in parts)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x1, x2, *params))
    act, cd = ACT_CODES[activation], compute_dtype(x1)
    w1, b1, w2, b2, w3, b3 = params
    y, _, _ = _forward(x1, x2, w1, b1, w2, b2, w3, b3, act, cd, save)
    return y.reshape(*lead, y.shape[-1])


def _forward_impl(
    x1: Tensor,
    x2: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    w3: Tensor,
    b3: Tensor,
    act: int,
    dtype: torch.dtype,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from crl_fast.kernels import mlp as kernels

    return kernels.forward(x1, x2, (w1, b1, w2, b2, w3, b3), act, dtype, save)


_forward_op = torch.library.custom_op("crl_fast::mlp_forward", _forward_impl, mutates_args=())


@_forward_op.register_fake
def _(x1: Tensor, x2: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor,
      b3: Tensor, act: int, dtype: torch.dtype, save: bool) -> Tensors3:  # fmt: skip
    rows, width = (x1.shape[0] if save else 0), w2.shape[0]
    z1, z2 = (x1.new_empty(rows, width, dtype=dtype) for _ in range(2))
    return x1.new_empty(x1.shape[0], w3.shape[0]), z1, z2


def _backward_impl(
    dy: Tensor,
    x1: Tensor,
    x2: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor,
    z1: Tensor,
    z2: Tensor,
    act: int,
    need_dx: bool,
    need_weights: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from crl_fast.kernels import mlp as kernels

    return kernels.backward(dy, x1, x2, (w1, w2, w3), z1, z2, act, need_dx, need_weights)


_backward_op = torch.library.custom_op("crl_fast::mlp_backward", _backward_impl, mutates_args=())


@_backward_op.register_fake
def _(dy: Tensor, x1: Tensor, x2: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, z1: Tensor,
      z2: Tensor, act: int, need_dx: bool, need_weights: bool) -> tuple[Tensor, ...]:  # fmt: skip
    dx = [torch.empty_like(x) if need_dx else x.new_empty(0, x.shape[1]) for x in (x1, x2)]
    grads = [
        t if need_weights else w.new_empty(0)
        for w in (w1, w2, w3)
        for t in (torch.empty_like(w), w.new_empty(w.shape[0]))
    ]
    return (*dx, *grads)


_backward = eager_fast_path(_backward_op, _backward_impl, alternative=_LAYERS)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensors3) -> None:
    x1, x2, w1, _, w2, _, w3, _, act, _, _ = inputs
    _, z1, z2 = output
    ctx.mark_non_differentiable(z1, z2)
    ctx.save_for_backward(x1, x2, w1, w2, w3, z1, z2)
    ctx.act = act


def _backward_rule(
    ctx: Any, dy: Tensor, _dz1: Tensor | None, _dz2: Tensor | None
) -> tuple[Tensor | None, ...]:
    refuse_double_backward("the fused MLP kernels", _LAYERS)
    refuse_transforms(_LAYERS, dy)
    need = ctx.needs_input_grad[:8]  # x1, x2, W1, b1, W2, b2, W3, b3
    x1, x2, w1, w2, w3, z1, z2 = ctx.saved_tensors
    grads = _backward(
        dy.contiguous(), x1, x2, w1, w2, w3, z1, z2, ctx.act, any(need[:2]), any(need[2:])
    )
    wanted = [g if wanted else None for g, wanted in zip(grads, need, strict=True)]
    return (*wanted, None, None, None)


_forward = eager_fast_path(
    _forward_op, _forward_impl, _backward_rule, _setup_context, alternative=_LAYERS
)
