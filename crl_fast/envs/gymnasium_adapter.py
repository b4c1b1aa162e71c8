"""Adapter: any Gymnasium goal env, vectorised by Gymnasium, behind the torch env API.

The wrapped env must have a Dict observation space with 1-D ``observation``, ``achieved_goal`` and
``desired_goal`` boxes and a bounded Box action space. gymnasium-robotics' PointMaze, AntMaze and
Fetch tasks qualify; they are an optional install (pass e.g.
``"gymnasium_robotics:PointMaze_UMaze-v3"`` so Gymnasium imports the module that registers them).
Actions in [-1, 1] are clipped and rescaled to the env's bounds. Whatever autoreset mode the vector
env uses, the adapter returns SAME_STEP results: with ``NEXT_STEP`` or ``DISABLED`` it resets the
ended envs right away through ``reset(options={"reset_mask": done})`` (supported by Gymnasium's
sync and async vector envs).

``info["success"]`` comes from the goal distance if ``success_distance`` is given, else from the
env's ``is_success`` or ``success`` info (of the step that ran, also for envs reset in the same
step). ``append_achieved_goal=True`` appends ``achieved_goal`` to ``observation`` (the agent reads
only ``observation``: AntMaze's leaves out the ant's x-y position, which is its achieved goal).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv

from crl_fast.checks import (
    check_bool,
    is_integer,
    is_real,
    positive_int,
    positive_real,
    resolve_device,
)
from crl_fast.envs.base import (
    GOAL_KEYS,
    GoalObs,
    check_action,
    check_goals,
    goal_spaces,
    is_success,
)

SUCCESS_KEYS = ("is_success", "success")


def _vector_box(space: gym.Space, name: str) -> gym.spaces.Box:
    """``space`` if it is a 1-D Box, else a ValueError naming it."""
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise ValueError(f"{name} must be a 1-D Box space, got {space}")
    return space


def _episode_limit(env: VectorEnv) -> int | None:
    """The episode limit the wrapped envs run with: the longest of a sync env's own specs, else
    an override recorded in the vector env's ``make_vec`` kwargs, else the registered limit.
    (Not ``get_attr``: a failed call shuts an async env's workers down.)"""
    specs = [e.spec for e in getattr(env, "envs", ()) if e.spec is not None]
    limits = [s.max_episode_steps for s in specs if s.max_episode_steps]
    if limits:
        return max(limits)
    if env.spec is None:
        return None
    return env.spec.kwargs.get("max_episode_steps", env.spec.max_episode_steps)


def _as_bool(values: Any, key: str, num_envs: int) -> np.ndarray:
    """An info entry as a bool array, one flag per env: Gymnasium collects ``np.bool_`` values
    (and those of envs that left the key out: None) into an object array. Anything else (an
    array per env, a string, whose truth is not its meaning) is a ValueError naming it."""
    array = np.asarray(values)
    if array.dtype == object:
        flags = all(v is None or isinstance(v, bool | np.bool_) or is_real(v) for v in array.flat)
    else:
        flags = array.dtype.kind in "biuf"
    if array.shape != (num_envs,) or not flags:
        raise ValueError(
            f"info[{key!r}] must hold booleans or numbers, one per env ({num_envs}), got {values!r}"
        )
    return array.astype(bool)


class GymnasiumGoalVectorEnv(VectorEnv):
    """Torch view of a Gymnasium goal vector env, with SAME_STEP autoreset.

    Args:
        env: an env id (or spec), made with ``gymnasium.make_vec(env, num_envs, "sync",
            vector_kwargs={"autoreset_mode": SAME_STEP}, **make_kwargs)``, or a ready VectorEnv.
        num_envs: number of copies when ``env`` is an id (None: 1); a ready VectorEnv's own
            number, if given.
        device: where the returned tensors live.
        success_distance: goal distance counted as success; None: the env's success info.
        append_achieved_goal: append ``achieved_goal`` to ``observation`` (for envs whose
            observation leaves out the achieved goal, such as AntMaze).
        make_kwargs: go to ``gymnasium.make`` (e.g. ``max_episode_steps``, ``render_mode``).

    :attr:`max_episode_steps` is the episode limit the wrapped envs run with (their specs'), else
    the registered one, or None. Returned tensors are copies: Gymnasium may reuse its arrays.
    """

    # Gymnasium's VectorEnv declares metadata an instance attribute with a class default.
    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.SAME_STEP}  # noqa: RUF012

    def __init__(
        self,
        env: str | gym.envs.registration.EnvSpec | VectorEnv,
        num_envs: int | None = None,
        *,
        device: torch.device | str = "cpu",
        success_distance: float | None = None,
        append_achieved_goal: bool = False,
        **make_kwargs: Any,
    ) -> None:
        check_bool("append_achieved_goal", append_achieved_goal)  # a JSON "false" is truthy
        if isinstance(env, VectorEnv):
            if make_kwargs:
                raise ValueError(
                    f"make_kwargs {sorted(make_kwargs)} need an env id, not a VectorEnv"
                )
            if num_envs is not None and num_envs != env.num_envs:
                raise ValueError(
                    f"num_envs={num_envs} given with a VectorEnv that has {env.num_envs} envs "
                    "(num_envs sizes an env made from an id)"
                )
            self.env = env
        else:
            num_envs = positive_int("num_envs", 1 if num_envs is None else num_envs)
            try:
                self.env = gym.make_vec(
                    env,
                    num_envs=num_envs,
                    vectorization_mode="sync",
                    vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP},
                    **make_kwargs,
                )
            except (gym.error.Error, ImportError) as error:  # unknown id, module or version
                hint = ""
                if isinstance(error, gym.error.NameNotFound) and ":" not in str(env):
                    hint = (
                        " (an env of another package needs its module first, e.g."
                        f" 'gymnasium_robotics:{env}' for gymnasium-robotics' envs)"
                    )
                raise ValueError(f"cannot make the Gymnasium env {env!r}: {error}{hint}") from error
        self.autoreset_mode = AutoresetMode(
            self.env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        )
        # The wrapped env's render_modes and render_fps, which Gymnasium's rendering wrappers read.
        self.metadata = {**self.env.metadata, "autoreset_mode": AutoresetMode.SAME_STEP}
        obs_space, act_space = self.env.single_observation_space, self.env.single_action_space
        if not isinstance(obs_space, gym.spaces.Dict) or set(obs_space.keys()) != set(GOAL_KEYS):
            raise ValueError(
                "not a goal env: its observation space must be a Dict with exactly the keys "
                f"{GOAL_KEYS} (gymnasium-robotics' interface), got {obs_space}"
            )
        self.append_achieved_goal = append_achieved_goal
        self.obs_dim = _vector_box(obs_space["observation"], "observation").shape[0]
        self.goal_dim = _vector_box(obs_space["achieved_goal"], "achieved_goal").shape[0]
        desired = _vector_box(obs_space["desired_goal"], "desired_goal").shape[0]
        if desired != self.goal_dim:
            raise ValueError(
                f"desired_goal must be as wide as achieved_goal ({self.goal_dim}), got {desired}"
            )
        if self.append_achieved_goal:
            self.obs_dim += self.goal_dim
        act_space = _vector_box(act_space, "the action space")
        self.action_dim = act_space.shape[0]
        if not (np.isfinite(act_space.low).all() and np.isfinite(act_space.high).all()):
            raise ValueError(
                f"the action space must be bounded to rescale [-1, 1], got {act_space}"
            )
        self._action_low, self._action_range = act_space.low, act_space.high - act_space.low
        self.num_envs = self.env.num_envs
        self.device = resolve_device(device)
        if success_distance is not None:
            success_distance = positive_real("success_distance", success_distance)
        self.success_distance = success_distance
        self.max_episode_steps = _episode_limit(self.env)
        self.render_mode = self.env.render_mode
        (
            self.single_observation_space,
            self.single_action_space,
            self.observation_space,
            self.action_space,
        ) = goal_spaces(self.obs_dim, self.goal_dim, self.action_dim, self.num_envs)

    def _tensor(self, array: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A copy (``torch.tensor`` copies): a vector env made with ``copy=False`` writes its
        next observations into the arrays it returned."""
        return torch.tensor(np.asarray(array), dtype=dtype, device=self.device)

    def _obs(self, obs: dict[str, np.ndarray]) -> GoalObs:
        out = {key: self._tensor(obs[key]) for key in GOAL_KEYS}
        if self.append_achieved_goal:
            out["observation"] = torch.cat([out["observation"], out["achieved_goal"]], dim=-1)
        return out

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[GoalObs, dict[str, Any]]:
        """Reset all envs (``seed`` seeds env i with ``seed + i``, as Gymnasium does), or with
        ``options={"reset_mask": mask}`` (a bool array, tensor or list of shape ``(num_envs,)``,
        as the torch envs take it) only where ``mask`` is true."""
        if is_integer(seed):  # Gymnasium reads a numpy int as a list of seeds
            seed = int(seed)
            super().reset(seed=seed)  # np_random_seed reports it, as the torch envs' does
        obs, _ = self.env.reset(seed=seed, options=self._gymnasium_options(options))
        return self._obs(obs), {}

    @staticmethod
    def _gymnasium_options(options: dict[str, Any] | None) -> dict[str, Any] | None:
        """``options`` with its ``reset_mask`` as the numpy array Gymnasium takes, in a new
        dict: Gymnasium pops the mask, so the caller's options would reset every env next
        time."""
        if options is None or "reset_mask" not in options:
            return options
        mask = options["reset_mask"]
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu()
        return {**options, "reset_mask": np.asarray(mask)}

    def step(
        self, action: Any
    ) -> tuple[GoalObs, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Step all envs; ended envs are reset in the same step, ``info["final_obs"]`` keeps their
        last observation (valid rows where ``info["_final_obs"]``)."""
        action = check_action(action, self.num_envs, self.action_dim, torch.device("cpu"))
        action = self._action_low + (action.numpy() + 1) / 2 * self._action_range
        obs, reward, terminated, truncated, info = self.env.step(
            action.astype(self.env.action_space.dtype)
        )
        done = np.logical_or(terminated, truncated)
        if self.autoreset_mode == AutoresetMode.SAME_STEP:
            final_obs = self._final_obs_same_step(obs, info, done)
        else:
            final_obs = {key: obs[key].copy() for key in GOAL_KEYS}
            if done.any():
                obs, _ = self.env.reset(options={"reset_mask": done})
        final = self._obs(final_obs)
        info = {
            "final_obs": final,
            "_final_obs": self._tensor(done, torch.bool),
            "success": self._success(info, final),
        }
        reward, terminated = self._tensor(reward), self._tensor(terminated, torch.bool)
        return self._obs(obs), reward, terminated, self._tensor(truncated, torch.bool), info

    @staticmethod
    def _final_obs_same_step(
        obs: dict[str, np.ndarray], info: dict[str, Any], done: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Batched final observations: ``obs`` with the rows of ended envs from ``final_obs``
        (an array of per-env dicts, as Gymnasium's sync and async vector envs give it)."""
        final_obs = {key: obs[key].copy() for key in GOAL_KEYS}
        for i in np.flatnonzero(done):
            for key in GOAL_KEYS:
                final_obs[key][i] = info["final_obs"][i][key]
        return final_obs

    def _success(self, info: dict[str, Any], final_obs: GoalObs) -> torch.Tensor:
        """Success of the step that ran: the goal distance if ``success_distance`` is given, else
        the env's own report."""
        if self.success_distance is not None:
            return is_success(
                final_obs["achieved_goal"], final_obs["desired_goal"], self.success_distance
            )
        final_info = info.get("final_info", {})
        for key in SUCCESS_KEYS:
            if key in info or key in final_info:
                success = np.zeros(self.num_envs, dtype=bool)
                for source, valid in ((info, True), (final_info, info.get("_final_info", False))):
                    if key in source:
                        reported = _as_bool(source[key], key, self.num_envs)
                        success = np.where(source[f"_{key}"] & valid, reported, success)
                return self._tensor(success, torch.bool)
        raise ValueError(
            f"the env reports none of {SUCCESS_KEYS} in its info: pass success_distance"
        )

    def compute_reward(
        self, achieved_goal: torch.Tensor, desired_goal: torch.Tensor, info: Any = None
    ) -> torch.Tensor:
        """The wrapped env's own (vectorised) ``compute_reward``, as a float32 tensor."""
        check_goals(achieved_goal, desired_goal, self.goal_dim)
        envs = getattr(self.env, "envs", None)
        if not envs:
            raise NotImplementedError("compute_reward needs a vector env with local `envs` (sync)")
        reward = envs[0].unwrapped.compute_reward(
            achieved_goal.cpu().numpy(), desired_goal.cpu().numpy(), {} if info is None else info
        )
        return self._tensor(reward)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Not supported: a general Gymnasium env cannot be snapshotted."""
        raise NotImplementedError("GymnasiumGoalVectorEnv cannot save the wrapped envs' state")

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Not supported, see :meth:`state_dict`."""
        raise NotImplementedError("GymnasiumGoalVectorEnv cannot restore the wrapped envs' state")

    def render(self) -> Any:
        """The wrapped vector env's frames (made with ``render_mode``)."""
        return self.env.render()

    def close_extras(self, **kwargs: Any) -> None:
        # Gymnasium < 1.3's VectorEnv.__del__ also closes an adapter whose env could not be made.
        if hasattr(self, "env"):
            self.env.close(**kwargs)
