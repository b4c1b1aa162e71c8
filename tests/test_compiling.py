"""``crl_fast.compiling``: the code copy that gives a compile call a cache of its own."""

import functools

import pytest
import torch

from crl_fast.compiling import code_copy


class Scaled:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def apply(self, x: torch.Tensor, *, shift: float = 1.0) -> torch.Tensor:
        return x * self.factor + shift


def test_code_copy_is_the_same_method_over_new_code():
    """Dynamo caches per code object: the copy must have a code object of its own, and otherwise
    be the method it copies (instance, keyword defaults, result)."""
    obj = Scaled(2.0)
    copy = code_copy(obj.apply)
    assert copy.__code__ is not obj.apply.__code__
    assert copy.__self__ is obj and copy.__qualname__ == "Scaled.apply"
    assert torch.equal(copy(torch.ones(3)), obj.apply(torch.ones(3)))


def test_code_copy_keeps_the_function_attributes():
    """A decorated function's attributes (``__wrapped__``, a framework's marks) come along."""

    @functools.wraps(Scaled.apply)
    def wrapper(*args: object) -> object:
        return Scaled.apply(*args)  # type: ignore[arg-type]

    wrapper.mark = 1  # type: ignore[attr-defined]
    copy = code_copy(wrapper)
    assert copy.__wrapped__ is Scaled.apply and copy.mark == 1  # type: ignore[attr-defined]


def test_code_copy_refuses_what_is_no_python_function():
    with pytest.raises(TypeError, match="Python function or method, got Linear"):
        code_copy(torch.nn.Linear(2, 2))
