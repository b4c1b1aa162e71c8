"""Helpers for crl-fast's ``torch.library`` custom ops (the fused loss's and the fused MLP's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn, ParamSpec, TypeVar, cast

import torch
from torch.library import CustomOpDef

P_ = ParamSpec("P_")
R_ = TypeVar("R_")


def eager_fast_path(
    op: CustomOpDef,
    impl: Callable[P_, R_],
    backward: Callable[..., tuple[torch.Tensor | None, ...]] | None = None,
    setup_context: Callable[[Any, tuple[Any, ...], Any], None] | None = None,
    *,
    alternative: str,
) -> Callable[P_, R_]:
    """A caller of the custom op ``op`` (``impl`` registered under a name, with ``backward`` and
    ``setup_context`` as its autograd) that runs ``impl`` directly in eager mode, through a plain
    autograd.Function with the same setup and backward when it has them, and ``op`` while
    anything traces it. The op's dispatch costs ~40 us a call in eager PyTorch (torch 2.13,
    this CPU: 43 us against 3 us for ``impl``'s own Python), as much as the rest of a small loss
    call's host work. Under a torch.func transform or forward-mode AD, which the ops do not
    support, it raises a RuntimeError that names ``alternative``."""
    run: Callable[..., Any] = impl  # called with *args below, not P_'s
    eager = run
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)

        # not a separate setup_context: apply would bind a signature
        def forward(ctx: Any, *args: Any) -> Any:
            output = run(*args)
            if setup_context is not None:
                setup_context(ctx, args, output)
            return output

        # else PyTorch's "implement the jvp function", naming no op
        def jvp(ctx: Any, *tangents: Any) -> NoReturn:
            raise RuntimeError(
                "crl-fast's fused kernels have no forward-mode derivative "
                f"(torch.autograd.forward_ad): use backward (reverse mode), or {alternative}"
            )

        methods = {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
        }
        function: type[torch.autograd.Function] = type(
            impl.__name__, (torch.autograd.Function,), methods
        )
        eager = function.apply

    def call(*args: Any) -> Any:
        refuse_transforms(alternative)
        # Traced (torch.compile, make_fx, FakeTensorMode, opcheck): the op, whose fake kernel
        # the tracer needs; eager, including CUDA graph capture: the implementation.
        traced = torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
        return op(*args) if traced else eager(*args)

    return cast(Callable[P_, R_], call)  # positional arguments only, as op(*args) takes them


def refuse_transforms(alternative: str, *grads: torch.Tensor | None) -> None:
    """Raise a RuntimeError naming ``alternative`` under a torch.func transform, which the ops
    do not support; in a backward rule this also catches a vmapped backward
    (``torch.autograd.grad(..., is_grads_batched=True)``,
    ``torch.autograd.functional.jacobian(..., vectorize=True)``), whose in-place float32
    accumulations would otherwise fail inside PyTorch with an unrelated vmap message."""
    legacy_vmap = any(  # is_grads_batched=True batches the incoming gradients (legacy vmap)
        isinstance(g, torch.Tensor) and torch._C._functorch.is_legacy_batchedtensor(g)
        for g in grads
    )
    if legacy_vmap or torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "crl-fast's fused kernels do not support torch.func transforms (grad, vmap, "
            "jacrev, ...) nor a vmapped backward (is_grads_batched=True, "
            f"jacobian(vectorize=True)): use torch.autograd, or {alternative}"
        )


def refuse_double_backward(what: str, alternative: str) -> None:
    """In a backward rule: create_graph=True would silently treat the kernels' gradients as
    constants, so raise a RuntimeError naming ``what`` and the ``alternative`` to use."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{what} have no second derivative (create_graph=True); use {alternative} for "
            "double backward"
        )
