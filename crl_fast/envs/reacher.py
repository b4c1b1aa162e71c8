"""A planar 2-link reacher, simulated in torch: bring the fingertip to a goal point.

Links of length 0.5 and 0.5 (reach 1.0) rotate about a base at the origin; the fingertip is the
achieved goal and success is reaching within 0.05 of the goal (5% of the reach). Goals are uniform
over the reachable annulus ``|l1 - l2| <= r <= l1 + l2`` (the unit disk by default); episodes start
at uniformly random joint angles at rest.

Dynamics (per step of ``dt`` = 0.1 s, kinematic, joints decoupled, no gravity): the action in
[-1, 1]^2 is an angular acceleration of each joint, ``w <- clip(0.9 w + 10 dt a, -3, 3)`` rad/s,
then ``q <- wrap(q + w dt)`` to [-pi, pi). Observation:
``[cos q1, sin q1, cos q2, sin q2, w1, w2, tip_x, tip_y]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from crl_fast.checks import positive_real
from crl_fast.envs.base import GoalObs, TorchGoalVectorEnv, check_dynamics, damped_velocity
from crl_fast.envs.render import Canvas

DEFAULT_MAX_EPISODE_STEPS = 50  # about 3x the steps a swing of pi at full speed takes

PIXELS, LINK_HALF_WIDTH = 200, 0.03  # frame side; links drawn 0.06 wide
BACKGROUND, REACH, GOAL, LINK = (255, 255, 255), (235, 235, 228), (230, 90, 90), (40, 80, 170)


class ReacherEnv(TorchGoalVectorEnv):
    """Batched 2-link reacher; see the module docstring for dynamics and defaults."""

    obs_dim = 8
    goal_dim = 2
    action_dim = 2
    _sim_keys = ("angle", "ang_vel", "goal")
    angle: torch.Tensor
    ang_vel: torch.Tensor
    goal: torch.Tensor

    def __init__(
        self,
        num_envs: int,
        *,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        max_episode_steps: int | None = None,
        terminate_on_success: bool = False,
        success_distance: float = 0.05,
        link_lengths: tuple[float, float] = (0.5, 0.5),
        dt: float = 0.1,
        accel: float = 10.0,
        damping: float = 0.9,
        max_speed: float = 3.0,
        render_mode: str | None = None,
    ) -> None:
        check_dynamics(dt, accel, damping, max_speed)
        pair = () if isinstance(link_lengths, str) else tuple(np.atleast_1d(link_lengths))
        if len(pair) != 2:
            raise ValueError(f"link_lengths must be two positive numbers, got {link_lengths!r}")
        self.link_lengths = tuple(positive_real("link_lengths", x) for x in pair)
        self.dt, self.accel, self.damping, self.max_speed = dt, accel, damping, max_speed
        super().__init__(
            num_envs,
            device=device,
            seed=seed,
            max_episode_steps=(
                DEFAULT_MAX_EPISODE_STEPS if max_episode_steps is None else max_episode_steps
            ),
            success_distance=success_distance,
            terminate_on_success=terminate_on_success,
            render_mode=render_mode,
            render_fps=1 / dt,
        )
        reach = sum(self.link_lengths) * 1.1
        self._canvas = Canvas((-reach, -reach), (reach, reach), PIXELS / (2 * reach), self.device)

    def fingertip(self, angle: torch.Tensor) -> torch.Tensor:
        """Forward kinematics: fingertip ``(x, y)`` of joint angles ``(..., 2)``."""
        l1, l2 = self.link_lengths
        q1, q12 = angle[..., 0], angle[..., 0] + angle[..., 1]
        return torch.stack([l1 * q1.cos() + l2 * q12.cos(), l1 * q1.sin() + l2 * q12.sin()], -1)

    def _draw(self) -> dict[str, torch.Tensor]:
        n, gen, dev = self.num_envs, self.generator, self.device
        return {
            "u": torch.rand((2, n), generator=gen, device=dev),
            "angle": torch.rand((n, 2), generator=gen, device=dev),
        }

    def _initial_state(self, draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n, dev, u = self.num_envs, self.device, draws["u"]
        angle = (draws["angle"] * 2 - 1) * math.pi
        l1, l2 = self.link_lengths
        r_min, r_max = abs(l1 - l2), l1 + l2
        radius = (r_min**2 + u[0] * (r_max**2 - r_min**2)).sqrt()  # uniform over the annulus
        theta = u[1] * (2 * math.pi)
        return {
            "angle": angle,
            "ang_vel": torch.zeros(n, 2, device=dev),
            "goal": torch.stack([radius * theta.cos(), radius * theta.sin()], -1),
        }

    def _advance(self, action: torch.Tensor) -> None:
        self.ang_vel = damped_velocity(
            self.ang_vel, action, self.accel, self.damping, self.max_speed, self.dt
        )
        self.angle = torch.remainder(self.angle + self.ang_vel * self.dt + math.pi, 2 * math.pi)
        self.angle = self.angle - math.pi

    def _observe(self) -> GoalObs:
        tip = self.fingertip(self.angle)
        trig = torch.stack([self.angle.cos(), self.angle.sin()], -1).flatten(1)  # c1 s1 c2 s2
        return {
            "observation": torch.cat([trig, self.ang_vel, tip], -1),
            "achieved_goal": tip,
            "desired_goal": self.goal.clone(),
        }

    def frames(self, obs: GoalObs) -> torch.Tensor:
        """Top view: the reachable disc, the goal's success disc red, the links blue."""
        canvas, goal, tip = self._canvas, obs["desired_goal"], obs["achieved_goal"]
        cos_q1, sin_q1 = obs["observation"][:, 0], obs["observation"][:, 1]
        elbow = self.link_lengths[0] * torch.stack([cos_q1, sin_q1], -1)
        base = torch.zeros_like(elbow)
        frames = canvas.fill(goal.shape[0], BACKGROUND)
        frames = canvas.paint(frames, canvas.disc(base, sum(self.link_lengths)), REACH)
        frames = canvas.paint(frames, canvas.disc(goal, self.success_distance), GOAL)
        for start, end in ((base, elbow), (elbow, tip)):
            frames = canvas.paint(frames, canvas.segment(start, end, LINK_HALF_WIDTH), LINK)
        return frames
