"""Point-mass navigation in the mazes of gymnasium-robotics' PointMaze, simulated in torch.

Layouts are gymnasium-robotics' ``OPEN``, ``U_MAZE``, ``MEDIUM_MAZE`` and ``LARGE_MAZE`` (1 = wall,
0 = free) with cells of size 1 centred at ``((col - (w-1)/2), ((h-1)/2 - row))``; success is
reaching within 0.45 of the goal, as there. Resets follow PointMaze with ``continuing_task=False``:
the goal is a random free cell, the start a random *other* free cell, each plus uniform noise of
+-0.25 per axis.

Dynamics (per step of ``dt`` = 0.1 s): the action in [-1, 1]^2 is an acceleration,
``v <- clip(0.9 v + 10 dt a, -3, 3)`` per component, then the point moves by ``v dt`` (at most 0.3
per axis, so a cell is crossed in about 3.3 steps). The point is a square of half-size 0.1 that
ends every step outside the walls: it moves along x, then along y, and a move whose leading edge
would enter a wall stops at the wall (minus 1e-4) and zeroes that velocity component. No wall is
skipped as long as a step is shorter than a cell, which the constructor checks. As the axes move
in turn, the path within a step is L-shaped, not a straight segment: a diagonal step past a convex
wall corner can cut through the corner, or be stopped by it, where continuous collision would not.
"""

from __future__ import annotations

import torch

from crl_fast.checks import resolve_device
from crl_fast.envs.base import GoalObs, TorchGoalVectorEnv, check_dynamics, damped_velocity
from crl_fast.envs.render import Canvas

OPEN = (
    "1111111",
    "1000001",
    "1000001",
    "1000001",
    "1111111",
)
U_MAZE = (
    "11111",
    "10001",
    "11101",
    "10001",
    "11111",
)
MEDIUM_MAZE = (
    "11111111",
    "10011001",
    "10010001",
    "11000111",
    "10010001",
    "10100101",
    "10001001",
    "11111111",
)
LARGE_MAZE = (
    "111111111111",
    "100001000001",
    "101101010101",
    "100000010001",
    "101111011101",
    "100101000001",
    "110101010111",
    "100100010001",
    "111111111111",
)

# Layout and default episode length. At full speed a cell takes ~3.3 steps; the longest shortest
# path between free cells is 6 cells in the U-maze (~20 steps), 11 in medium (~37), 19 in large
# (~63) and a 4.5-cell diagonal in the open room (~15): the defaults leave 3-5x that.
MAZES: dict[str, tuple[tuple[str, ...], int]] = {
    "open": (OPEN, 50),
    "umaze": (U_MAZE, 100),
    "medium": (MEDIUM_MAZE, 200),
    "large": (LARGE_MAZE, 300),
}

_EDGE_EPS = 1e-4  # gap kept between the point and a wall it stopped at

PIXELS_PER_CELL = 32
FLOOR, WALL, GOAL, POINT = (245, 245, 240), (90, 90, 100), (240, 150, 150), (20, 140, 60)


class PointMazeEnv(TorchGoalVectorEnv):
    """Batched point mass in a maze; observation ``[x, y, vx, vy]``, goals ``(x, y)``.

    Args:
        maze: a key of :data:`MAZES` or a layout (rows of '0'/'1' strings, walls all around).
        max_episode_steps: episode length; None takes the maze's default from :data:`MAZES`
            (a custom layout then needs one).
        Other arguments: see the module docstring for the dynamics and :class:`TorchGoalVectorEnv`.
    """

    obs_dim = 4
    goal_dim = 2
    action_dim = 2
    _sim_keys = ("pos", "vel", "goal")
    pos: torch.Tensor
    vel: torch.Tensor
    goal: torch.Tensor

    def __init__(
        self,
        num_envs: int,
        maze: str | tuple[str, ...] = "umaze",
        *,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        max_episode_steps: int | None = None,
        terminate_on_success: bool = False,
        success_distance: float = 0.45,
        dt: float = 0.1,
        accel: float = 10.0,
        damping: float = 0.9,
        max_speed: float = 3.0,
        radius: float = 0.1,
        position_noise: float = 0.25,
        render_mode: str | None = None,
    ) -> None:
        layout, episode_steps = self._resolve_maze(maze, max_episode_steps)
        device = resolve_device(device)  # the layout tensors are made before the base's init
        check_dynamics(dt, accel, damping, max_speed)
        if not (0 < radius < 0.5 and max_speed * dt < 1.0 - 2 * radius):
            raise ValueError(
                f"need 0 < radius < 0.5 and max_speed * dt < 1 - 2 * radius so a step never skips a"
                f" wall, got radius={radius}, max_speed={max_speed}, dt={dt}"
            )
        if not 0 <= position_noise + radius < 0.5:
            raise ValueError(
                f"position_noise + radius must be in [0, 0.5), got {position_noise} + {radius}"
            )
        self.layout = layout
        self.dt, self.accel, self.damping, self.max_speed = dt, accel, damping, max_speed
        self.radius, self.position_noise = radius, position_noise
        height, width = len(layout), len(layout[0])
        walls = torch.tensor([[c == "1" for c in row] for row in layout], device=device)
        self._walls = walls.flatten()
        self._height, self._width = height, width
        self._world_to_grid = torch.tensor([1.0, -1.0], device=device)
        free = (~walls).nonzero().float()  # (K, 2) rows of (row, col)
        self._grid_offset = torch.tensor([width / 2, height / 2], device=device)
        self.free_cells = self._from_grid(free.flip(1) + 0.5)  # (K, 2) cell centres (x, y)
        super().__init__(
            num_envs,
            device=device,
            seed=seed,
            max_episode_steps=episode_steps,
            success_distance=success_distance,
            terminate_on_success=terminate_on_success,
            render_mode=render_mode,
            render_fps=1 / dt,
        )
        self._canvas: Canvas | None = None  # built at the first render
        self._background: torch.Tensor | None = None

    @staticmethod
    def _resolve_maze(
        maze: str | tuple[str, ...], max_episode_steps: int | None
    ) -> tuple[tuple[str, ...], int]:
        """The layout of ``maze`` and the episode length (``max_episode_steps``, else the maze's
        default), validated."""
        if isinstance(maze, str):
            if maze not in MAZES:
                raise ValueError(f"unknown maze {maze!r}; valid: {sorted(MAZES)}")
            layout, default_steps = MAZES[maze]
            return layout, default_steps if max_episode_steps is None else max_episode_steps
        layout = tuple(maze)
        if not layout or any(not isinstance(row, str) or not row for row in layout):
            raise ValueError("a maze layout must be a non-empty sequence of non-empty strings")
        if any(len(row) != len(layout[0]) or set(row) - {"0", "1"} for row in layout):
            raise ValueError("a maze layout must be equal-length rows of '0' and '1'")
        border = layout[0] + layout[-1] + "".join(row[0] + row[-1] for row in layout)
        if set(border) != {"1"} or sum(row.count("0") for row in layout) < 2:
            raise ValueError("a maze layout needs walls all around and at least 2 free cells")
        if max_episode_steps is None:
            raise ValueError("a custom maze layout needs max_episode_steps")
        return layout, max_episode_steps

    def _to_grid(self, xy: torch.Tensor) -> torch.Tensor:
        """World ``(x, y)`` to grid ``(u, v)``: cell ``(row, col) = (floor(v), floor(u))``."""
        return torch.stack([xy[..., 0], -xy[..., 1]], -1) + self._grid_offset

    def _from_grid(self, uv: torch.Tensor) -> torch.Tensor:
        """Grid ``(u, v)`` back to world ``(x, y)``."""
        uv = uv - self._grid_offset
        return torch.stack([uv[..., 0], -uv[..., 1]], -1)

    def _is_wall(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Whether grid points ``(u, v)`` lie in a wall cell (indices clamped to the grid)."""
        col = u.floor().long().clamp(0, self._width - 1)
        row = v.floor().long().clamp(0, self._height - 1)
        return self._walls[row * self._width + col]

    def _slide(
        self, uv: torch.Tensor, delta: torch.Tensor, axis: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Move grid positions ``uv`` by ``delta`` along ``axis``, stopping at walls.

        Returns the new positions and a mask of the envs that hit a wall.
        """
        step = delta[:, axis]
        new = uv[:, axis] + step
        lead_cell = (new + torch.sign(step) * self.radius).floor()
        other = uv[:, 1 - axis]
        # Both cells the point's side spans across the motion, as a (2, N) batch.
        span = torch.stack([other - self.radius, other + self.radius])
        cells = (lead_cell, span) if axis == 0 else (span, lead_cell)
        hit = self._is_wall(*cells).any(0)
        stop = torch.where(
            step > 0, lead_cell - self.radius - _EDGE_EPS, lead_cell + 1 + self.radius + _EDGE_EPS
        )
        moved = uv.clone()
        moved[:, axis] = torch.where(hit, stop, new)
        return moved, hit

    def _draw(self) -> dict[str, torch.Tensor]:
        n, k, gen = self.num_envs, self.free_cells.shape[0], self.generator
        return {
            "goal_cell": torch.randint(k, (n,), generator=gen, device=self.device),
            "start_cell": torch.randint(k - 1, (n,), generator=gen, device=self.device),
            "noise": torch.rand((2, n, 2), generator=gen, device=self.device),
        }

    def _initial_state(self, draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n, goal_cell = self.num_envs, draws["goal_cell"]
        start_cell = draws["start_cell"]
        start_cell = start_cell + (start_cell >= goal_cell).long()  # any cell but the goal's
        noise = (2 * draws["noise"] - 1) * self.position_noise
        return {
            "pos": self.free_cells[start_cell] + noise[0],
            "vel": torch.zeros(n, 2, device=self.device),
            "goal": self.free_cells[goal_cell] + noise[1],
        }

    def _advance(self, action: torch.Tensor) -> None:
        """Update the velocity, then slide along x and then y (an L-shaped path, see the module
        docstring); the velocity component of each blocked axis is zeroed."""
        vel = damped_velocity(self.vel, action, self.accel, self.damping, self.max_speed, self.dt)
        delta = vel * self.dt * self._world_to_grid
        uv = self._to_grid(self.pos)
        uv, hit_x = self._slide(uv, delta, 0)
        uv, hit_y = self._slide(uv, delta, 1)
        self.pos = self._from_grid(uv)
        self.vel = vel.masked_fill(torch.stack([hit_x, hit_y], -1), 0.0)

    def _observe(self) -> GoalObs:
        return {
            "observation": torch.cat([self.pos, self.vel], -1),
            "achieved_goal": self.pos.clone(),
            "desired_goal": self.goal.clone(),
        }

    def frames(self, obs: GoalObs) -> torch.Tensor:
        """Top view: walls grey, the success disc around the goal red, the point green."""
        if self._canvas is None:
            half = (self._width / 2, self._height / 2)
            self._canvas = Canvas((-half[0], -half[1]), half, PIXELS_PER_CELL, self.device)
            x, y = torch.broadcast_tensors(self._canvas.x[0], self._canvas.y[0])
            u, v = self._to_grid(torch.stack([x, y], -1)).unbind(-1)
            self._background = self._canvas.paint(
                self._canvas.fill(1, FLOOR), self._is_wall(u, v)[None], WALL
            )[0]
        canvas, goal, pos = self._canvas, obs["desired_goal"], obs["achieved_goal"]
        assert self._background is not None  # painted with the canvas
        frames = canvas.fill(goal.shape[0], self._background)
        frames = canvas.paint(frames, canvas.disc(goal, self.success_distance), GOAL)
        return canvas.paint(frames, canvas.square(pos, self.radius), POINT)
