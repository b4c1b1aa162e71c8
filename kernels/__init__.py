"""Triton kernels, packaged as ``crl_fast.kernels``. They know nothing of RL."""


def runs_on_cpu(kernel: object) -> bool:
    """Whether ``kernel`` takes CPU tensors: Triton's interpreter built it, which it does when
    TRITON_INTERPRET=1 is set as the kernel's module is imported (set later, it changes nothing)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)
