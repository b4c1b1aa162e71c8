"""``torch.compile`` into caches of each call's own, for the agent and the torch envs.

torch keeps dynamo's compiled entries per code object: every agent's ``_act`` (every env's
``_transition_eager``, ``Optimizer.step``) shares one cache, so agents or envs of other sizes and
kinds in one process use up ``torch._dynamo.config.recompile_limit`` for the next one.
:func:`compile_isolated` gives each compile call caches of its own.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")

ISOLATE: dict[str, Any] = (
    {"isolate_recompiles": True}
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters
    else {}
)
"""``torch.compile``'s option for caches of one compile call's own, where torch has it (2.13;
2.11 has not)."""


def code_copy(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` (a function, or a method bound to its instance) over a new code object of the same
    code, globals, defaults, closure and attributes: dynamo, which caches per code object, then
    keeps a cache for this copy alone."""
    func = getattr(fn, "__func__", fn)
    if not isinstance(func, types.FunctionType):
        raise TypeError(f"can only copy a Python function or method, got {type(fn).__name__}")
    copy = types.FunctionType(
        func.__code__.replace(),
        func.__globals__,
        func.__name__,
        func.__defaults__,
        func.__closure__,
    )
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__qualname__ = func.__qualname__
    copy.__module__ = func.__module__
    copy.__doc__ = func.__doc__
    copy.__dict__.update(func.__dict__)  # attributes, as functools.wraps copies them
    return types.MethodType(copy, fn.__self__) if inspect.ismethod(fn) else copy


def compile_isolated(fn: Callable[P, R], **kwargs: Any) -> Callable[P, R]:
    """``torch.compile(fn, **kwargs)`` with caches of its own: nested frames' included where torch
    has ``isolate_recompiles`` (``kwargs`` override it); without it, of a :func:`code_copy` of
    ``fn``, which isolates ``fn``'s frame only. Frames that ``fn`` reaches through a graph break
    (an agent's ``Optimizer.step``, which the agent keeps uncompiled) then still share one cache
    per function, which past ``recompile_limit`` torch runs uncompiled with a warning (with
    ``fullgraph=True``, which inlines every callee into ``fn``'s frame, there are none).

    Shapes are static (``dynamic=False``, unless ``kwargs`` say otherwise): dynamo's automatic
    dynamic shapes remember the sizes each function saw by its file, line and name, across
    caches, so an object compiled after another of other sizes would otherwise be compiled
    with dynamic shapes from its first call. A call with new sizes compiles an entry of its own.
    """
    kwargs = {"dynamic": False} | kwargs
    if ISOLATE:
        return torch.compile(fn, **(ISOLATE | kwargs))
    return torch.compile(code_copy(fn), **kwargs)
