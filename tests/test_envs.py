"""Tests of crl_fast.envs: dynamics, autoreset, rewards, state_dict and the Gymnasium adapter."""

from __future__ import annotations

import pytest
import torch

from crl_fast.envs import ENV_NAMES, PointMazeEnv, make_env
from crl_fast.envs.point_maze import MAZES


def random_actions(env, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(env.num_envs, env.action_dim, generator=gen) * 2.4 - 1.2


def rollout(env, steps: int, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [env.step(random_actions(env, gen)) for _ in range(steps)]


@pytest.mark.parametrize("name", ENV_NAMES)
def test_api_shapes_and_dtypes(name):
    env = make_env(name, num_envs=8, seed=0)
    obs, info = env.reset(seed=0)
    assert set(obs) == {"observation", "achieved_goal", "desired_goal"}
    assert obs["observation"].shape == (8, env.obs_dim)
    assert obs["achieved_goal"].shape == obs["desired_goal"].shape == (8, env.goal_dim)
    assert all(v.dtype == torch.float32 and v.device == env.device for v in obs.values())
    assert env.single_observation_space["observation"].shape == (env.obs_dim,)
    assert env.action_space.shape == (8, env.action_dim)
    obs, reward, terminated, truncated, info = env.step(torch.zeros(8, env.action_dim))
    assert reward.shape == terminated.shape == truncated.shape == (8,)
    assert reward.dtype == torch.float32 and truncated.dtype == torch.bool
    assert info["_final_obs"].shape == info["success"].shape == (8,)
    assert env.metadata["autoreset_mode"].value == "SameStep"


def test_make_env_errors():
    with pytest.raises(ValueError, match="point_umaze"):
        make_env("nope", num_envs=4)
    with pytest.raises(ValueError, match="num_envs"):
        make_env("point_umaze", num_envs=0)
    env = make_env("point_umaze", num_envs=4)
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.zeros(3, 2))


def touches_wall(layout: tuple[str, ...], xy: torch.Tensor, radius: float) -> torch.Tensor:
    """Whether the square of half-size ``radius`` around each point overlaps a wall cell."""
    height, width = len(layout), len(layout[0])
    walls = torch.tensor([[c == "1" for c in row] for row in layout])
    hit = torch.zeros(len(xy), dtype=torch.bool)
    for dx in (-radius, radius):
        for dy in (-radius, radius):
            col = (xy[:, 0] + dx + width / 2).floor().long()
            row = (height / 2 - xy[:, 1] - dy).floor().long()
            hit |= walls[row, col]
    return hit


@pytest.mark.parametrize("maze", list(MAZES))
def test_point_never_enters_walls_and_respects_speed(maze):
    env = PointMazeEnv(512, maze, seed=1, max_episode_steps=40)
    for obs, _, _, _, info in rollout(env, 200):
        for o in (obs, info["final_obs"]):
            assert not touches_wall(env.layout, o["achieved_goal"], env.radius).any()
            assert o["observation"][:, 2:].abs().max() <= env.max_speed
