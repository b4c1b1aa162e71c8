"""Helpers for crl-fast's ``torch.library`` custom ops (the fused loss's and the fused MLP's)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def eager_fast_path(op, impl, backward=None, setup_context=None, alternative: str = "") -> Callable:
    """A caller of the custom op ``op`` (``impl`` registered under a name, with ``backward`` and
    ``setup_context`` as its autograd) that runs ``impl`` directly in eager mode, through a plain
    autograd.Function with the same setup and backward when it has them, and ``op`` while
    anything traces it. The op's dispatch costs ~40 us a call in eager PyTorch (torch 2.13,
    this CPU: 43 us against 3 us for ``impl``'s own Python), as much as the rest of a small loss
    call's host work. Under a torch.func transform, which the ops do not support, it raises a
    RuntimeError that names ``alternative``."""
    eager = impl
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)

        def forward(ctx, *args):  # not a separate setup_context: apply would bind a signature
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        methods = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
        eager = type(impl.__name__, (torch.autograd.Function,), methods).apply

    def call(*args):
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(
                "crl-fast's fused kernels do not support torch.func transforms (grad, vmap, "
                f"jacrev, ...): use torch.autograd, or {alternative}"
            )
        # Traced (torch.compile, make_fx, FakeTensorMode, opcheck): the op, whose fake kernel
        # the tracer needs; eager, including CUDA graph capture: the implementation.
        traced = torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
        return op(*args) if traced else eager(*args)

    return call


def refuse_double_backward(what: str, alternative: str) -> None:
    """In a backward rule: create_graph=True would silently treat the kernels' gradients as
    constants, so raise a RuntimeError naming ``what`` and the ``alternative`` to use."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{what} have no second derivative (create_graph=True); use {alternative} for "
            "double backward"
        )
