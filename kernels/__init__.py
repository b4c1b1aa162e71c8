"""Triton kernels, packaged as ``crl_fast.kernels``. They know nothing of RL."""


def check_unit_column_stride(**tensors: object) -> None:
    """A ValueError naming the first tensor whose last dimension is strided: the launchers pass
    the kernels a row stride only (the library's callers make their inputs contiguous first)."""
    for name, t in tensors.items():
        if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} needs unit column stride, got strides {tuple(t.stride())}")


def interpreting() -> bool:
    """Whether ``triton.jit`` builds interpreted kernels now: TRITON_INTERPRET as Triton reads it
    (1, true, on, yes, ...). A module that picks between libdevice and its own versions of a
    function (the interpreter has no libdevice) must decide as ``triton.jit`` does, by this."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


def runs_on_cpu(kernel: object) -> bool:
    """Whether ``kernel`` takes CPU tensors: Triton's interpreter built it and Triton's own
    jit'd library (``tl.zeros``, ``tl.sum``), which it does when TRITON_INTERPRET=1 is set as
    triton is first imported. Set later, the library stays compiled, and an interpreted kernel
    fails at its first call into it ("Cannot call @triton.jit'd outside of the scope of a
    kernel")."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction) and isinstance(
        standard.zeros, InterpretedFunction
    )
