"""The README's env of your own (tests/test_envs.py checks that the two agree)."""

import torch

from crl_fast.envs import TorchGoalVectorEnv, register_env


class FreePoint(TorchGoalVectorEnv):
    """A point in the unit square moved by its action; observation (x, y), goal (x, y)."""

    obs_dim, goal_dim, action_dim = 2, 2, 2
    _sim_keys = ("pos", "goal")  # the state: tensor attributes, saved in checkpoints

    def __init__(self, num_envs, *, device="cpu", seed=None, max_episode_steps=None, **kwargs):
        kwargs.setdefault("success_distance", 0.05)
        kwargs.setdefault("terminate_on_success", False)
        super().__init__(
            num_envs, device=device, seed=seed, max_episode_steps=max_episode_steps or 50, **kwargs
        )

    def _draw(self):  # every random number a reset needs, from the env's own generator
        return {
            "xy": torch.rand((2, self.num_envs, 2), generator=self.generator, device=self.device)
        }

    def _initial_state(self, draws):  # reset states for all envs (step uses the ended envs')
        return {"pos": draws["xy"][0], "goal": draws["xy"][1]}

    def _advance(self, action):  # the action is checked and clipped to [-1, 1] already
        self.pos = (self.pos + 0.1 * action).clamp(0.0, 1.0)

    def _observe(self):  # new tensors, not views of the state
        return {
            "observation": self.pos.clone(),
            "achieved_goal": self.pos.clone(),
            "desired_goal": self.goal.clone(),
        }


register_env("free_point", FreePoint)  # crl-fast train --env <this module>:free_point
