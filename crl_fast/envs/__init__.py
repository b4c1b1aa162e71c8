"""Goal-conditioned vector environments.

Torch-native batched envs (``make_env``) and an adapter for any Gymnasium goal env
(``GymnasiumGoalVectorEnv``), all with the same torch API: dict observations, SAME_STEP autoreset
with ``info["final_obs"]``, a vectorised ``compute_reward`` and ``info["success"]``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, Literal, overload

import torch

from crl_fast.checks import check_bool, resolve_device

try:
    import gymnasium  # noqa: F401
except ImportError as error:  # a crl-fast dependency that `pip install --no-deps` leaves out
    raise ImportError(
        "crl_fast.envs (and crl-fast train / eval) need gymnasium, which is not installed: "
        "pip install 'gymnasium>=1.1' (the loss, the buffer and the agent run without it)"
    ) from error

from crl_fast.envs.base import GoalObs, TorchGoalVectorEnv
from crl_fast.envs.gymnasium_adapter import GymnasiumGoalVectorEnv
from crl_fast.envs.point_maze import MAZES, PointMazeEnv
from crl_fast.envs.reacher import ReacherEnv


def _point_maze(maze: str) -> Callable[..., PointMazeEnv]:
    def make(num_envs: int, **kwargs: Any) -> PointMazeEnv:
        if "maze" in kwargs:  # the name says which maze: another one would be mislabelled
            raise ValueError(f"point_{maze} fixes the maze; build PointMazeEnv for another layout")
        return PointMazeEnv(num_envs, maze, **kwargs)

    return make


_FACTORIES: dict[str, Callable[..., TorchGoalVectorEnv]] = {
    **{f"point_{maze}": _point_maze(maze) for maze in MAZES},
    "reacher": ReacherEnv,
}
ENV_NAMES: tuple[str, ...] = tuple(_FACTORIES)
"""The built-in envs (:func:`register_env` adds others)."""


def _definition(factory: Callable[..., Any]) -> tuple[Any, ...]:
    """Where a factory is defined: its qualified name, its module's file (None for a notebook's
    or the interpreter's), whatever name the module was loaded under, and a function's first
    line (two lambdas of one file differ there)."""
    file = getattr(sys.modules.get(getattr(factory, "__module__", "")), "__file__", None)
    line = getattr(getattr(factory, "__code__", None), "co_firstlineno", None)
    return getattr(factory, "__qualname__", None), file and os.path.realpath(file), line


def _same_definition(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """Whether two factories are one definition loaded twice (a script run as ``__main__``
    and imported by ``--env <module>:<name>``, a notebook cell run again)."""
    return a is b or (_definition(a)[0] is not None and _definition(a) == _definition(b))


def register_env(
    name: str, factory: Callable[..., TorchGoalVectorEnv], *, replace: bool = False
) -> None:
    """Let :func:`make_env` (and so ``crl-fast train --env``) build a torch env of your own:
    ``factory(num_envs, device=..., seed=..., max_episode_steps=..., **env_kwargs)`` returns a
    :class:`TorchGoalVectorEnv` (``max_episode_steps=None``: its default). ``--env
    <module>:<name>`` imports ``<module>`` first, so a module that registers its envs when
    imported needs no other hook. A name is registered once unless ``replace`` (or the factory is
    the same definition loaded again: a script that is also imported as a module, a notebook
    cell run twice). A run whose ``--env`` is ``<module>:<name>`` can be resumed and evaluated
    from the command line; a bare name registered by a script cannot (nothing registers it)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"an env name is a non-empty string without ':', got {name!r}")
    if name in ENV_NAMES:
        raise ValueError(f"{name!r} is a built-in env")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    check_bool("replace", replace)  # "no" would replace
    if name in _FACTORIES and not (replace or _same_definition(_FACTORIES[name], factory)):
        raise ValueError(f"an env named {name!r} is registered already (replace=True replaces it)")
    _FACTORIES[name] = factory


def registered_at_run_time(name: str) -> bool:
    """Whether ``name`` is an env only a script's :func:`register_env` call makes known: a new
    process (``crl-fast eval``, ``--resume``) cannot build it."""
    return ":" not in name and name not in ENV_NAMES


GoalVectorEnv = TorchGoalVectorEnv | GymnasiumGoalVectorEnv
"""What :func:`make_env` returns: either kind has the same torch API."""

PointMazeName = Literal["point_open", "point_umaze", "point_medium", "point_large"]
"""The built-in point mazes' names: :func:`make_env` returns a :class:`PointMazeEnv` for them."""

GYMNASIUM_PREFIX = "gymnasium:"
"""``make_env("gymnasium:<id>")`` wraps a registered Gymnasium goal env with the adapter."""


@overload
def make_env(
    name: PointMazeName,
    num_envs: int,
    device: torch.device | str = ...,
    seed: int | None = ...,
    max_episode_steps: int | None = ...,
    **kwargs: Any,
) -> PointMazeEnv: ...
@overload
def make_env(
    name: Literal["reacher"],
    num_envs: int,
    device: torch.device | str = ...,
    seed: int | None = ...,
    max_episode_steps: int | None = ...,
    **kwargs: Any,
) -> ReacherEnv: ...
@overload
def make_env(
    name: str,
    num_envs: int,
    device: torch.device | str = ...,
    seed: int | None = ...,
    max_episode_steps: int | None = ...,
    **kwargs: Any,
) -> GoalVectorEnv: ...
def make_env(
    name: str,
    num_envs: int,
    device: torch.device | str = "cpu",
    seed: int | None = 0,
    max_episode_steps: int | None = None,
    **kwargs: Any,
) -> GoalVectorEnv:
    """Create the torch env ``name`` (one of :data:`ENV_NAMES` or a :func:`register_env` name,
    ``<module>:<name>`` importing ``<module>`` first) with ``num_envs`` copies on ``device``;
    ``max_episode_steps=None`` takes the env's default, ``kwargs`` go to its class. A built-in
    name written out (``make_env("reacher", ...)``) is typed as its class for type checkers.

    ``"gymnasium:<id>"`` (e.g. ``gymnasium:gymnasium_robotics:PointMaze_UMaze-v3``) builds a
    :class:`GymnasiumGoalVectorEnv` of that id instead; ``kwargs`` then go to it (for example
    ``success_distance``) and to ``gymnasium.make``; it is seeded by ``reset(seed=...)``.
    """
    if not isinstance(name, str):
        raise TypeError(f"an env name is a str, got {type(name).__name__}")
    if name.startswith(GYMNASIUM_PREFIX):
        if max_episode_steps is not None:
            kwargs["max_episode_steps"] = max_episode_steps
        env = GymnasiumGoalVectorEnv(
            name.removeprefix(GYMNASIUM_PREFIX), num_envs, device=device, **kwargs
        )
        if env.max_episode_steps is None:
            raise ValueError(f"{name} has no episode limit: pass max_episode_steps")
        return env
    module, _, short = name.rpartition(":")
    if module:
        try:
            importlib.import_module(module)  # registers its envs
        except ImportError as error:
            raise ValueError(
                f"env {name!r}: cannot import {module!r}: {error} (from the folder that holds it,"
                " `python -m crl_fast` finds it; else add its folder to PYTHONPATH)"
            ) from error
    if short not in _FACTORIES:
        raise ValueError(
            f"unknown env {short!r}; valid names: {', '.join(_FACTORIES)}, "
            f"<module>:<name> of a module that registers it, or {GYMNASIUM_PREFIX}<gymnasium id> "
            "(a name a script registers exists while the script runs: register it again from "
            "Python to resume or evaluate such a run, or train it as <module>:<name>)"
        )
    made = _FACTORIES[short](
        num_envs, device=device, seed=seed, max_episode_steps=max_episode_steps, **kwargs
    )
    return _factory_result(short, made, num_envs, device, max_episode_steps)


def _factory_result(
    name: str,
    env: Any,
    num_envs: int,
    device: torch.device | str,
    max_episode_steps: int | None,
) -> GoalVectorEnv:
    """``env`` if a factory built what it was asked for, else an error naming the factory: one
    that drops ``num_envs``, ``device`` or ``max_episode_steps`` would otherwise fail far away
    (an action of the wrong shape) or run with settings other than the run's config says."""
    what = f"the factory registered as {name!r}"
    if not isinstance(env, (TorchGoalVectorEnv, GymnasiumGoalVectorEnv)):
        raise TypeError(
            f"{what} must return a TorchGoalVectorEnv (or GymnasiumGoalVectorEnv), got "
            f"{type(env).__name__}"
        )
    wrong = []
    if env.num_envs != num_envs:
        wrong.append(f"num_envs={num_envs} (got {env.num_envs})")
    if env.device != (asked := resolve_device(device)):
        wrong.append(f"device={asked} (got {env.device})")
    if max_episode_steps is not None and env.max_episode_steps != max_episode_steps:
        wrong.append(f"max_episode_steps={max_episode_steps} (got {env.max_episode_steps})")
    if wrong:
        raise ValueError(
            f"{what} was asked for {', '.join(wrong)}: pass its num_envs, device and "
            "max_episode_steps arguments on to the env"
        )
    return env


__all__ = [
    "ENV_NAMES",
    "GYMNASIUM_PREFIX",
    "GoalObs",
    "GoalVectorEnv",
    "GymnasiumGoalVectorEnv",
    "PointMazeEnv",
    "PointMazeName",
    "ReacherEnv",
    "TorchGoalVectorEnv",
    "make_env",
    "register_env",
]
