"""A tiny goal-conditioned Gymnasium env (gymnasium-robotics' interface), registered as
``TINY_ID`` (episodes of 6 steps) and ``TINY_UNLIMITED_ID`` (no limit): what the adapter and the
training loop are tested against."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class TinyGoalEnv(gym.Env):
    """A 2-D point goal env with the gymnasium-robotics interface, for the adapter tests."""

    def __init__(self, terminate_on_success: bool = False) -> None:
        box = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
        self.observation_space = gym.spaces.Dict(
            {"observation": box, "achieved_goal": box, "desired_goal": box}
        )
        self.action_space = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)  # rescaled from [-1, 1]
        self.terminate_on_success = terminate_on_success

    def _obs(self) -> dict[str, np.ndarray]:
        return {
            "observation": self.pos.copy(),
            "achieved_goal": self.pos.copy(),
            "desired_goal": self.goal.copy(),
        }

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = self.np_random.uniform(-1, 1, 2)
        self.goal = self.np_random.uniform(-1, 1, 2)
        return self._obs(), {"is_success": False}

    def step(self, action):
        self.pos = self.pos + 0.25 * np.asarray(action, np.float64)
        success = bool(np.linalg.norm(self.pos - self.goal) < 0.3)
        reward = float(self.compute_reward(self.pos, self.goal, {}))
        return (
            self._obs(),
            reward,
            success and self.terminate_on_success,
            False,
            {"is_success": success},
        )

    def compute_reward(self, achieved_goal, desired_goal, info):
        return -(np.linalg.norm(achieved_goal - desired_goal, axis=-1) >= 0.3).astype(np.float64)


TINY_ID = "CrlFastTinyGoal-v0"
if TINY_ID not in gym.registry:
    gym.register(TINY_ID, entry_point=TinyGoalEnv, max_episode_steps=6)
TINY_UNLIMITED_ID = "CrlFastTinyGoalUnlimited-v0"  # registered without an episode limit
if TINY_UNLIMITED_ID not in gym.registry:
    gym.register(TINY_UNLIMITED_ID, entry_point=TinyGoalEnv)
