"""Shared base of the torch-native goal-conditioned vector envs.

Subclasses only define their simulation state, its initial distribution and one integration step;
this module owns everything else once: Gymnasium spaces, action checking, rewards and success,
truncation, SAME_STEP autoreset with ``final_obs`` in the info, seeding and ``state_dict``.

``step`` never synchronises with the host (no ``.item()``, no branching on tensor values): resets
are applied with ``torch.where`` against a freshly sampled initial state for every env, so thousands
of envs step with a fixed sequence of kernels on a GPU. Its random draws (from the env's own
generator, which dynamo cannot trace) come first; the rest, about a hundred small ops, is one
function that :meth:`TorchGoalVectorEnv.compile` hands to ``torch.compile``.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from crl_fast.checks import (
    check_bool,
    fraction,
    generator_state,
    is_integer,
    positive_int,
    positive_real,
    resolve_device,
    seed_int,
)
from crl_fast.compiling import compile_isolated

GoalObs = dict[str, torch.Tensor]
"""A batch of goal observations: ``observation``, ``achieved_goal`` and ``desired_goal``."""

GOAL_KEYS = ("observation", "achieved_goal", "desired_goal")

RGB_ARRAY = "rgb_array"
"""The one render mode of the torch envs."""


def goal_spaces(
    obs_dim: int, goal_dim: int, action_dim: int, num_envs: int
) -> tuple[gym.spaces.Dict, gym.spaces.Box, gym.spaces.Space, gym.spaces.Space]:
    """Single and batched observation and action spaces of a goal env: unbounded float32 boxes
    for the Dict observation, [-1, 1] for actions."""

    def box(dim: int) -> gym.spaces.Box:
        return gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)

    single_obs = gym.spaces.Dict(
        {"observation": box(obs_dim), "achieved_goal": box(goal_dim), "desired_goal": box(goal_dim)}
    )
    single_act = gym.spaces.Box(-1.0, 1.0, (action_dim,), np.float32)
    return (
        single_obs,
        single_act,
        batch_space(single_obs, num_envs),
        batch_space(single_act, num_envs),
    )


def check_action(action: Any, num_envs: int, action_dim: int, device: torch.device) -> torch.Tensor:
    """Return ``action`` as a float32 ``(num_envs, action_dim)`` tensor on ``device``, clipped to
    [-1, 1], NaN read as 0 (it would stay in the simulation state until the episode ends;
    checking for it would cost a host sync), detached (a policy's output stepped outside
    ``torch.no_grad`` would otherwise chain every step's autograd graph into the state); raise a
    TypeError on what is not an array of real numbers (torch's own messages name no action, and
    it casts complex numbers to their real part with a warning only), a ValueError on a wrong
    shape."""
    refused = "action must be an array of real numbers, got"
    try:
        converted = torch.as_tensor(action, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{refused} {type(action).__name__} ({error})") from error
    if converted.is_complex():
        raise TypeError(f"{refused} {converted.dtype}")
    action = converted.to(torch.float32).detach()
    if action.shape != (num_envs, action_dim):
        raise ValueError(
            f"action must have shape (num_envs, action_dim) = {(num_envs, action_dim)}, "
            f"got {tuple(action.shape)}"
        )
    return action.clamp(-1.0, 1.0).nan_to_num(0.0)


def _shares_memory(a: torch.Tensor, b: object) -> bool:
    """Whether ``b`` is a tensor viewing ``a``'s storage (metadata only: no device sync)."""
    return isinstance(b, torch.Tensor) and a.untyped_storage().data_ptr() == (
        b.untyped_storage().data_ptr()
    )


def check_dynamics(dt: float, accel: float, damping: float, max_speed: float) -> None:
    """A ValueError unless ``dt``, ``accel`` and ``max_speed`` are positive and ``damping`` lies
    in [0, 1] (a negative ``dt`` would walk the point backwards through the walls)."""
    for name, value in (("dt", dt), ("accel", accel), ("max_speed", max_speed)):
        positive_real(name, value)
    fraction("damping", damping)


def damped_velocity(
    velocity: torch.Tensor,
    action: torch.Tensor,
    accel: float,
    damping: float,
    max_speed: float,
    dt: float,
) -> torch.Tensor:
    """One step of a damped, speed-limited double integrator: ``v <- clip(damping * v + accel * dt
    * a, -max_speed, max_speed)`` per component."""
    return (damping * velocity + (accel * dt) * action).clamp(-max_speed, max_speed)


def check_goals(achieved_goal: Any, desired_goal: Any, goal_dim: int) -> None:
    """A TypeError unless both goals are tensors (gymnasium-robotics' ``compute_reward`` takes
    numpy arrays, these envs' takes torch's), a ValueError unless they share a shape
    ``(..., goal_dim)`` (broadcasting would pair each achieved goal with every desired one)."""
    if not (isinstance(achieved_goal, torch.Tensor) and isinstance(desired_goal, torch.Tensor)):
        raise TypeError(
            "achieved_goal and desired_goal must be torch tensors (torch.as_tensor converts "
            f"arrays), got {type(achieved_goal).__name__} and {type(desired_goal).__name__}"
        )
    shapes = tuple(achieved_goal.shape), tuple(desired_goal.shape)
    if shapes[0] != shapes[1] or shapes[0][-1:] != (goal_dim,):
        raise ValueError(
            f"achieved_goal and desired_goal must share a shape (..., {goal_dim}), got "
            f"{shapes[0]} and {shapes[1]}"
        )


def is_success(
    achieved_goal: torch.Tensor, desired_goal: torch.Tensor, success_distance: float
) -> torch.Tensor:
    """``||achieved - desired|| <= success_distance`` (gymnasium-robotics' test), batched over
    leading dims."""
    return torch.linalg.vector_norm(achieved_goal - desired_goal, dim=-1) <= success_distance


class TorchGoalVectorEnv(VectorEnv, ABC):
    """A batch of ``num_envs`` goal-conditioned envs simulated with torch tensors on ``device``.

    Observations are dicts of float32 tensors (see :data:`GoalObs`). Episodes never terminate unless
    ``terminate_on_success`` (reaching the goal does not end a CRL episode) and are truncated after
    ``max_episode_steps``. Ended envs are reset in the same step (``AutoresetMode.SAME_STEP``): the
    returned observation is the new episode's first one, ``info["final_obs"]`` holds the last one
    (valid rows where ``info["_final_obs"]``), and ``info["success"]`` says whether the step that
    just ran reached the goal.

    :meth:`frames` pictures envs from their observations (the final ones of ended episodes
    too); with ``render_mode="rgb_array"``, :meth:`render` returns a frame of every env.

    Subclasses set ``obs_dim``, ``goal_dim``, ``action_dim``, ``_sim_keys`` (names of the tensor
    attributes holding the simulation state) and implement :meth:`_draw`, :meth:`_initial_state`,
    :meth:`_advance` and :meth:`_observe`, and :meth:`frames` to render. A subclass missing one
    of the four cannot be made (``ABC``: a misspelt ``_advance`` would otherwise leave the
    base class's empty one, an env that never moves).
    """

    # Gymnasium's VectorEnv declares metadata an instance attribute with a class default.
    metadata: dict[str, Any] = {  # noqa: RUF012
        "autoreset_mode": AutoresetMode.SAME_STEP,
        "render_modes": [RGB_ARRAY],
    }
    obs_dim: int
    goal_dim: int
    action_dim: int
    _sim_keys: tuple[str, ...]

    def __init__(
        self,
        num_envs: int,
        *,
        device: torch.device | str,
        seed: int | None,
        max_episode_steps: int,
        success_distance: float,
        terminate_on_success: bool,
        render_mode: str | None = None,
        render_fps: float = 10.0,
    ) -> None:
        if render_mode not in (None, RGB_ARRAY):
            raise ValueError(f"render_mode must be None or {RGB_ARRAY!r}, got {render_mode!r}")
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "render_fps": render_fps}
        self.num_envs = positive_int("num_envs", num_envs)
        self.device = resolve_device(device)
        self.max_episode_steps = positive_int("max_episode_steps", max_episode_steps)
        self.success_distance = positive_real("success_distance", success_distance)
        check_bool("terminate_on_success", terminate_on_success)
        self.terminate_on_success = terminate_on_success
        (
            self.single_observation_space,
            self.single_action_space,
            self.observation_space,
            self.action_space,
        ) = goal_spaces(self.obs_dim, self.goal_dim, self.action_dim, self.num_envs)
        self.generator = torch.Generator(device=self.device)
        self.elapsed_steps = torch.zeros(self.num_envs, dtype=torch.int64, device=self.device)
        if seed is None:
            self.generator.seed()
        self._transition = self._transition_eager
        self.reset(seed=seed)

    def compile(self, **kwargs: Any) -> None:
        """Run :meth:`step`'s work after its random draws through ``torch.compile(**kwargs)``
        (one graph: on a GPU a few fused kernels instead of about a hundred small ones), into
        caches of this env's own (:func:`crl_fast.compiling.compile_isolated`, on any torch):
        one function steps every env, whose shared cache other envs would fill."""
        self._transition = compile_isolated(self._transition_eager, fullgraph=True, **kwargs)

    @abstractmethod
    def _draw(self) -> dict[str, torch.Tensor]:
        """The random numbers one fresh initial state of every env needs (``self.generator``);
        ``{}`` for an env without any (values that draw nothing from it are warned about)."""

    @abstractmethod
    def _initial_state(self, draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The initial state of every env made from :meth:`_draw`'s numbers, keyed by
        ``_sim_keys``; no random calls of its own. Called at every step too (for the envs that
        end there), so it must not change the env: return the state, do not set it."""

    @abstractmethod
    def _advance(self, action: torch.Tensor) -> None:
        """Integrate one step of all envs under ``action`` (already checked and clipped), setting
        the state's attributes; returns None (unlike :meth:`_initial_state`)."""

    @abstractmethod
    def _observe(self) -> GoalObs:
        """The current observation dict (new tensors, not views of the state)."""

    def frames(self, obs: GoalObs) -> torch.Tensor:
        """Pictures of envs in the observations ``obs`` (any number of rows, e.g. the first few
        envs' or ``info["final_obs"]``): uint8 ``(rows, height, width, 3)`` on the env's device."""
        raise NotImplementedError(f"{type(self).__name__} does not render")

    def render(self) -> tuple[np.ndarray, ...]:
        """One RGB frame (a ``(height, width, 3)`` uint8 array) per env, as Gymnasium's vector
        envs render; needs ``render_mode="rgb_array"``. Copies the frames to the host."""
        if self.render_mode != RGB_ARRAY:
            raise ValueError(
                f"{type(self).__name__} was made with render_mode={self.render_mode!r}; make it "
                f"with render_mode={RGB_ARRAY!r} to render"
            )
        return tuple(checked_frames(self, self._observe()).cpu().numpy())

    @property
    def _state_keys(self) -> tuple[str, ...]:
        return ("elapsed_steps", *self._sim_keys)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[GoalObs, dict[str, Any]]:
        """Start new episodes in all envs, or with ``options={"reset_mask": mask}`` (a bool array
        of shape ``(num_envs,)``, as Gymnasium's vector envs take) only where ``mask`` is true.
        ``seed`` (one int: all envs share one generator) reseeds the env's torch generator."""
        mask = self._reset_mask(options)
        if seed is not None:
            if not is_integer(seed):
                raise ValueError(
                    f"{type(self).__name__} takes one int seed (its envs share one generator), "
                    f"got {seed!r}"
                )
            self.generator.manual_seed(seed_int(seed))
            super().reset(seed=seed_int(seed))  # np_random_seed reports it, as Gymnasium's do
        before = self.generator.get_state()  # seed and offset on CUDA: no device sync
        draws = self._draw()
        if not isinstance(draws, dict):
            raise TypeError(
                f"{type(self).__name__}._draw() must return a dict of tensors ({{}} for an env "
                f"that draws nothing), got {type(draws).__name__}"
            )
        if draws and torch.equal(before, self.generator.get_state()):
            warnings.warn(
                f"{type(self).__name__}._draw() returned values but drew none from "
                "self.generator: if they are random, reset(seed=...) and checkpoints cannot "
                "reproduce its episodes (pass generator=self.generator to its torch.rand calls)",
                stacklevel=2,
            )
        initial = self._checked_initial(self._initial_state(draws))
        if mask is None:
            for key, value in initial.items():
                setattr(self, key, value)
            self.elapsed_steps.zero_()
        else:
            self._reset_where(mask, initial)
        return self._checked(self._observe()), {}

    def _checked_initial(self, initial: Any) -> dict[str, torch.Tensor]:
        """``initial`` if it is a dict of tensors keyed among ``_sim_keys`` (the state a checkpoint
        saves), each with one row per env on the env's device (a step resets the envs that end
        with a ``torch.where`` along the first dim); else a TypeError or ValueError naming the
        env."""
        name = f"{type(self).__name__}._initial_state()"
        if not isinstance(initial, dict) or not set(initial) <= set(self._sim_keys):
            got = sorted(initial) if isinstance(initial, dict) else type(initial).__name__
            raise ValueError(
                f"{type(self).__name__}._initial_state must return a dict whose keys are among "
                f"_sim_keys {sorted(self._sim_keys)} (the state a checkpoint saves), got {got}"
            )
        for key, value in initial.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}[{key!r}] must be a tensor, got {type(value).__name__}")
            if value.shape[:1] != (self.num_envs,) or value.device != self.device:
                raise ValueError(
                    f"{name}[{key!r}] must be a tensor of {self.num_envs} rows (one per env: a "
                    f"step resets the envs that end row by row) on {self.device}, got shape "
                    f"{tuple(value.shape)} on {value.device}"
                )
        return initial

    def _checked(self, obs: GoalObs, with_state: bool = True) -> GoalObs:
        """``obs`` if it holds float32 ``(num_envs, width)`` tensors of the declared widths on
        the env's device, none sharing memory with the state (a view would change
        under the caller at the next step: the buffer would store s_{t+1} as s_t); else a
        TypeError or ValueError naming the env. Checked at each reset, and after each step
        ``with_state=False``: a step's observations come from the same ``_observe`` that the
        reset checked for views (a compiled step's are new tensors anyway)."""
        name = f"{type(self).__name__}._observe()"
        widths = dict(zip(GOAL_KEYS, (self.obs_dim, self.goal_dim, self.goal_dim), strict=True))
        if not isinstance(obs, dict) or set(obs) != set(GOAL_KEYS):
            got = sorted(obs) if isinstance(obs, dict) else type(obs).__name__
            raise TypeError(f"{name} must return a dict with keys {GOAL_KEYS}, got {got}")
        keys = self._state_keys if with_state else ()
        state = {key: getattr(self, key, None) for key in keys}  # some set later
        for key, width in widths.items():
            t = obs[key]
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"{name}[{key!r}] must be a float32 tensor, got {kind}")
            if tuple(t.shape) != (self.num_envs, width) or t.device != self.device:
                raise ValueError(
                    f"{name}[{key!r}] must be ({self.num_envs}, {width}) on {self.device} (the "
                    f"env's num_envs and declared width), got {tuple(t.shape)} on {t.device}"
                )
            shared = [k for k, s in state.items() if _shares_memory(t, s)]
            if shared:
                raise ValueError(
                    f"{name}[{key!r}] shares memory with the state {shared[0]!r}: _observe must "
                    "return new tensors (e.g. .clone()), since a step that updates the state in "
                    "place would change an observation already returned"
                )
        return obs

    def _reset_mask(self, options: dict[str, Any] | None) -> torch.Tensor | None:
        """The ``reset_mask`` option as a bool tensor on the env's device (None: every env)."""
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        if options:
            raise ValueError(
                f"{type(self).__name__}.reset takes only the reset_mask option, got {options!r}"
            )
        if mask is None:
            return None
        mask = torch.as_tensor(mask, device=self.device)
        if mask.dtype != torch.bool or tuple(mask.shape) != (self.num_envs,):
            raise ValueError(
                f"reset_mask must be a bool array of shape ({self.num_envs},), got "
                f"{mask.dtype} of shape {tuple(mask.shape)}"
            )
        return mask

    def step(
        self, action: Any
    ) -> tuple[GoalObs, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Advance all envs one step, autoresetting ended ones in the same step (see class doc)."""
        action = check_action(action, self.num_envs, self.action_dim, self.device)
        unset = [k for k in self._sim_keys if not isinstance(getattr(self, k, None), torch.Tensor)]
        if unset:
            raise ValueError(
                f"{type(self).__name__}._sim_keys names {unset}, which are not tensor attributes "
                "of the env (set them in _initial_state or __init__): a checkpoint saves them"
            )
        obs, reward, terminated, truncated, info = self._transition(action, self._draw())
        self._checked(obs, with_state=False)
        self._checked(info["final_obs"], with_state=False)
        return obs, reward, terminated, truncated, info

    def _transition_eager(
        self, action: torch.Tensor, draws: dict[str, torch.Tensor]
    ) -> tuple[GoalObs, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """:meth:`step` after its random draws: integrate, reward, reset ended envs to the state
        made from ``draws``."""
        returned = self._advance(action)
        if returned is not None:  # as _initial_state does: the state would never change
            raise TypeError(
                f"{type(self).__name__}._advance() must set the state's attributes (self.<key> "
                f"= ...) and return None, got {type(returned).__name__}"
            )
        self.elapsed_steps += 1
        final_obs = self._observe()
        achieved, desired = final_obs["achieved_goal"], final_obs["desired_goal"]
        reward = self.compute_reward(achieved, desired, {})
        success = is_success(achieved, desired, self.success_distance)
        terminated = success if self.terminate_on_success else torch.zeros_like(success)
        truncated = self.elapsed_steps >= self.max_episode_steps
        done = terminated | truncated
        self._reset_where(done, self._initial_state(draws))
        info = {"final_obs": final_obs, "_final_obs": done, "success": success}
        return self._observe(), reward, terminated, truncated, info

    def _reset_where(self, done: torch.Tensor, initial: dict[str, torch.Tensor]) -> None:
        """Replace the state of envs where ``done`` by ``initial``, without syncing."""
        for key, fresh in initial.items():
            mask = done.view(-1, *([1] * (fresh.dim() - 1)))
            setattr(self, key, torch.where(mask, fresh, getattr(self, key)))
        self.elapsed_steps = self.elapsed_steps.masked_fill(done, 0)

    def compute_reward(
        self, achieved_goal: torch.Tensor, desired_goal: torch.Tensor, info: Any = None
    ) -> torch.Tensor:
        """Sparse float32 reward, batched over leading dims: 0 within ``success_distance`` else -1
        (the sparse convention of gymnasium-robotics' Fetch tasks; its PointMaze uses 1/0)."""
        check_goals(achieved_goal, desired_goal, self.goal_dim)
        return is_success(achieved_goal, desired_goal, self.success_distance).float() - 1.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume exactly: simulation state, step counters and RNG state."""
        state = {key: getattr(self, key).clone() for key in self._state_keys}
        state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict` of an env of the same kind, ``num_envs`` and device type
        (CPU and CUDA generator states differ)."""
        refused = f"{type(self).__name__}.load_state_dict: state_dict"  # a run's env, say
        expected = {*self._state_keys, "generator"}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"{refused} keys must be {sorted(expected)}: missing {missing}, unexpected "
                f"{extra} (a state of another env, or saved before its _sim_keys changed)"
            )
        for key in self._state_keys:
            current = getattr(self, key)
            if not isinstance(state[key], torch.Tensor):
                raise TypeError(
                    f"{refused}[{key!r}] must be a tensor, got {type(state[key]).__name__}"
                )
            if tuple(state[key].shape) != tuple(current.shape):
                raise ValueError(
                    f"{refused}[{key!r}] has shape {tuple(state[key].shape)}, "
                    f"expected {tuple(current.shape)}"
                )
        generator = generator_state(state["generator"], self.device, f"{refused}['generator']")
        for key in self._state_keys:
            current = getattr(self, key)
            setattr(self, key, state[key].to(device=self.device, dtype=current.dtype).clone())
        self.generator.set_state(generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_envs={self.num_envs}, device={self.device})"


def checked_frames(env: TorchGoalVectorEnv, obs: GoalObs) -> torch.Tensor:
    """``env.frames(obs)`` if it is a uint8 ``(rows, height, width, 3)`` tensor, one picture per
    row of ``obs``; else a TypeError or ValueError naming the env (Pillow's error, after a whole
    evaluation, names neither the env nor its frames)."""
    frames = env.frames(obs)
    name = f"{type(env).__name__}.frames()"
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
        kind = frames.dtype if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise TypeError(f"{name} must return a uint8 tensor, got {kind}")
    rows = len(obs["observation"])
    if frames.dim() != 4 or frames.shape[0] != rows or frames.shape[-1] != 3:
        raise ValueError(
            f"{name} must return RGB pictures of the observations' rows, shaped ({rows}, height, "
            f"width, 3), got {tuple(frames.shape)}"
        )
    return frames
