"""Goal-conditioned vector environments.

Torch-native batched envs (``make_env``) and an adapter for any Gymnasium goal env
(``GymnasiumGoalVectorEnv``), all with the same torch API: dict observations, SAME_STEP autoreset
with ``info["final_obs"]``, a vectorised ``compute_reward`` and ``info["success"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from crl_fast.envs.base import TorchGoalVectorEnv
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


GoalVectorEnv = TorchGoalVectorEnv | GymnasiumGoalVectorEnv
"""What :func:`make_env` returns: either kind has the same torch API."""

GYMNASIUM_PREFIX = "gymnasium:"
"""``make_env("gymnasium:<id>")`` wraps a registered Gymnasium goal env with the adapter."""


def make_env(
    name: str,
    num_envs: int,
    device: torch.device | str = "cpu",
    seed: int | None = 0,
    max_episode_steps: int | None = None,
    **kwargs: Any,
) -> GoalVectorEnv:
    """Create the torch env ``name`` (one of :data:`ENV_NAMES`) with ``num_envs`` copies on
    ``device``; ``max_episode_steps=None`` takes the env's default, ``kwargs`` go to its class.

    ``"gymnasium:<id>"`` (e.g. ``gymnasium:gymnasium_robotics:PointMaze_UMaze-v3``) builds a
    :class:`GymnasiumGoalVectorEnv` of that id instead; ``kwargs`` then go to it (for example
    ``success_distance``) and to ``gymnasium.make``; it is seeded by ``reset(seed=...)``.
    """
    if name.startswith(GYMNASIUM_PREFIX):
        if max_episode_steps is not None:
            kwargs["max_episode_steps"] = max_episode_steps
        env = GymnasiumGoalVectorEnv(
            name.removeprefix(GYMNASIUM_PREFIX), num_envs, device=device, **kwargs
        )
        if env.max_episode_steps is None:
            raise ValueError(f"{name} has no episode limit: pass max_episode_steps")
        return env
    if name not in _FACTORIES:
        raise ValueError(
            f"unknown env {name!r}; valid names: {', '.join(ENV_NAMES)}, "
            f"or {GYMNASIUM_PREFIX}<gymnasium id>"
        )
    return _FACTORIES[name](
        num_envs, device=device, seed=seed, max_episode_steps=max_episode_steps, **kwargs
    )


__all__ = [
    "ENV_NAMES",
    "GYMNASIUM_PREFIX",
    "GoalVectorEnv",
    "GymnasiumGoalVectorEnv",
    "PointMazeEnv",
    "ReacherEnv",
    "TorchGoalVectorEnv",
    "make_env",
]
