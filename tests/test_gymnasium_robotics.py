"""The point mazes and the adapter against gymnasium-robotics' own PointMaze (MuJoCo).

Skipped where gymnasium-robotics is not installed (``pip install -e ".[robotics]"``; ``.ci/run``
installs it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crl_fast.envs import GymnasiumGoalVectorEnv, PointMazeEnv
from crl_fast.envs.point_maze import MAZES

gymnasium_robotics = pytest.importorskip("gymnasium_robotics")
gym = pytest.importorskip("gymnasium")

IDS = {"open": "Open", "umaze": "UMaze", "medium": "Medium", "large": "Large"}


def robotics_maze(name: str) -> gym.Env:
    gym.register_envs(gymnasium_robotics)
    return gym.make(f"PointMaze_{IDS[name]}-v3").unwrapped


@pytest.mark.parametrize("name", sorted(MAZES))
def test_layouts_and_cell_centres_are_pointmaze_ones(name):
    theirs = robotics_maze(name)
    layout, _ = MAZES[name]
    assert [[int(c) for c in row] for row in layout] == theirs.maze.maze_map
    # Free cells in the same (row-major) order, centred at the same points.
    centres = np.array(theirs.maze.unique_goal_locations)
    np.testing.assert_allclose(PointMazeEnv(1, name).free_cells.numpy(), centres, atol=1e-6)


def test_success_is_pointmaze_sparse_reward():
    theirs = robotics_maze("umaze")
    env = PointMazeEnv(1, "umaze")
    gen = torch.Generator().manual_seed(0)
    achieved = torch.rand(4096, 2, generator=gen) * 2 - 1
    desired = achieved + (torch.rand(4096, 2, generator=gen) - 0.5) * 1.3  # about half within 0.45
    reward = theirs.compute_reward(achieved.double().numpy(), desired.double().numpy(), {})
    success = env.compute_reward(achieved.double(), desired.double()) == 0
    assert 0.2 < success.double().mean() < 0.8
    np.testing.assert_array_equal(success.numpy(), reward == 1.0)


def test_adapter_runs_pointmaze_with_same_step_autoreset():
    env = GymnasiumGoalVectorEnv("gymnasium_robotics:PointMaze_UMaze-v3", 3, max_episode_steps=5)
    assert (env.obs_dim, env.goal_dim, env.action_dim, env.max_episode_steps) == (4, 2, 2, 5)
    obs, _ = env.reset(seed=0)
    gen = torch.Generator().manual_seed(0)
    for t in range(12):
        new_obs, reward, terminated, truncated, info = env.step(torch.rand(3, 2, generator=gen))
        final = info["final_obs"]
        assert not terminated.any()  # PointMaze-v3 continues past the goal
        assert torch.equal(truncated, torch.full((3,), (t + 1) % 5 == 0))
        assert torch.equal(info["_final_obs"], truncated)
        assert torch.equal(final["desired_goal"], obs["desired_goal"])
        dist = torch.linalg.vector_norm(final["achieved_goal"] - final["desired_goal"], dim=-1)
        torch.testing.assert_close(reward, (dist <= 0.45).float())
        assert torch.equal(info["success"], reward == 1.0)
        if truncated.any():  # a new episode: new start and goal
            assert (new_obs["desired_goal"] != final["desired_goal"]).all()
            assert (new_obs["achieved_goal"] != final["achieved_goal"]).all()
        else:
            assert torch.equal(new_obs["observation"], final["observation"])
        obs = new_obs
    env.close()
