"""``torch.compile`` into caches of each call's own, for the agent and the torch envs.

torch keeps dynamo's compiled entries per code object: every agent's ``_act`` (every env's
``_transition_eager``, ``Optimizer.step``) shares one cache, so agents or envs of other sizes and
kinds in one process use up ``torch._dynamo.config.recompile_limit`` for the next one.
"""

from __future__ import annotations

import inspect
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


def compile_isolated(fn: Callable[P, R], **kwargs: Any) -> Callable[P, R]:
    """``torch.compile(fn, **kwargs)`` with caches of its own (nested frames' included) where
    torch has ``isolate_recompiles``; ``kwargs`` override it. Without it, past ``recompile_limit``
    torch runs ``fn`` uncompiled with a warning, or with ``fullgraph=True`` raises."""
    return torch.compile(fn, **(ISOLATE | kwargs))
