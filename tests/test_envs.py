"""Tests of crl_fast.envs: dynamics, autoreset, rewards, state_dict and the Gymnasium adapter."""

from __future__ import annotations

import gc
import subprocess
import sys
import warnings
from typing import ClassVar

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.wrappers import TimeLimit
from torch._dynamo.utils import counters

from crl_fast.checks import resolve_device
from crl_fast.envs import (
    ENV_NAMES,
    GymnasiumGoalVectorEnv,
    PointMazeEnv,
    ReacherEnv,
    TorchGoalVectorEnv,
    make_env,
)
from crl_fast.envs.base import GOAL_KEYS
from crl_fast.envs.point_maze import MAZES
from tests.free_point_env import FreePoint
from tests.helpers import ISOLATION_PATHS, ShapeRecorder, use_isolation_path
from tests.tiny_goal_env import TINY_ID, TINY_UNLIMITED_ID, TinyGoalEnv


def random_actions(env, gen: torch.Generator) -> torch.Tensor:
    """Uniform actions slightly outside [-1, 1], to exercise clipping."""
    return torch.rand(env.num_envs, env.action_dim, generator=gen) * 2.4 - 1.2


def rollout(env, steps: int, seed: int = 0) -> list:
    """Step outputs under random actions, each held for 8 steps so the point builds up speed."""
    gen = torch.Generator().manual_seed(seed)
    out, action = [], None
    for t in range(steps):
        if t % 8 == 0:
            action = random_actions(env, gen)
        out.append(env.step(action))
    return out


def assert_same(a, b) -> None:
    """Recursive exact equality of nested tuples/dicts of tensors."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert torch.equal(a, b)


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


# --------------------------------------------------------------------------- API


@pytest.mark.parametrize("name", ENV_NAMES)
def test_api_shapes_and_dtypes(name):
    env = make_env(name, num_envs=8, seed=0)
    obs, info = env.reset(seed=0)
    assert set(obs) == {"observation", "achieved_goal", "desired_goal"}
    assert obs["observation"].shape == (8, env.obs_dim)
    assert obs["achieved_goal"].shape == obs["desired_goal"].shape == (8, env.goal_dim)
    assert all(v.dtype == torch.float32 and v.device == env.device for v in obs.values())
    assert env.single_observation_space["observation"].shape == (env.obs_dim,)
    assert env.observation_space["desired_goal"].shape == (8, env.goal_dim)
    assert env.action_space.shape == (8, env.action_dim)
    actions = env.single_action_space
    assert (actions.low == -1.0).all() and (actions.high == 1.0).all()
    assert env.single_observation_space["achieved_goal"].dtype == np.float32
    assert env.observation_space["observation"].contains(obs["observation"].numpy())
    obs, reward, terminated, truncated, info = env.step(torch.zeros(8, env.action_dim))
    assert reward.shape == terminated.shape == truncated.shape == (8,)
    assert reward.dtype == torch.float32 and truncated.dtype == terminated.dtype == torch.bool
    assert info["_final_obs"].shape == info["success"].shape == (8,)
    assert info["final_obs"]["observation"].shape == (8, env.obs_dim)
    assert env.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP


def test_make_env_defaults_and_errors():
    assert ENV_NAMES == ("point_open", "point_umaze", "point_medium", "point_large", "reacher")
    env = make_env("point_umaze", num_envs=4)
    assert (env.max_episode_steps, env.success_distance) == (100, 0.45)
    assert make_env("point_umaze", 4, max_episode_steps=7).max_episode_steps == 7
    reacher = make_env("reacher", 4)
    assert (reacher.max_episode_steps, reacher.success_distance) == (50, 0.05)
    assert repr(reacher) == "ReacherEnv(num_envs=4, device=cpu)"
    with pytest.raises(ValueError, match="point_umaze"):
        make_env("nope", num_envs=4)
    with pytest.raises(TypeError, match="an env name is a str"):
        make_env(3, num_envs=4)
    with pytest.raises(ValueError, match="point_umaze fixes the maze"):
        make_env("point_umaze", num_envs=4, maze="large")
    with pytest.raises(ValueError, match="num_envs"):
        make_env("point_umaze", num_envs=0)
    for action in (torch.zeros(3, 2), torch.zeros(2, 4)):  # (2, 4): as many numbers, transposed
        with pytest.raises(ValueError, match="shape"):
            env.step(action)
    for layout, match in [
        (("000", "010", "000"), "walls all around"),
        (("1111", "0001", "1111"), "walls all around"),  # open on the left only
        (("111", "101", "111"), "at least 2 free cells"),
        (("1111", "101", "1111"), "equal-length rows"),
    ]:
        with pytest.raises(ValueError, match=match):
            PointMazeEnv(4, layout, max_episode_steps=10)
    with pytest.raises(ValueError, match="unknown maze 'nope'"):
        PointMazeEnv(4, "nope")
    with pytest.raises(ValueError, match="a custom maze layout needs max_episode_steps"):
        PointMazeEnv(4, ("1111", "1001", "1111"))
    for noise in (0.45, -0.2):  # noise + radius must stay in [0, 0.5): off the walls
        with pytest.raises(ValueError, match="position_noise"):
            PointMazeEnv(4, position_noise=noise)
    with pytest.raises(ValueError, match="skips a wall"):
        PointMazeEnv(4, max_speed=20.0)
    for layout in ((), ("",)):
        with pytest.raises(ValueError, match="non-empty"):
            PointMazeEnv(4, layout, max_episode_steps=10)
    for steps in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_episode_steps"):
            make_env("reacher", 4, max_episode_steps=steps)


def test_import_crl_fast_does_not_import_gymnasium():
    code = "import sys, crl_fast; assert 'gymnasium' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- dynamics


@pytest.mark.parametrize("maze", list(MAZES))
def test_point_never_enters_walls_and_respects_speed(maze):
    env = PointMazeEnv(512, maze, seed=1, max_episode_steps=60)
    hits = 0
    prev_vel = env.vel
    for obs, _, _, _, info in rollout(env, 240):
        for o in (obs, info["final_obs"]):
            assert not touches_wall(env.layout, o["achieved_goal"], env.radius).any()
            assert o["observation"][:, 2:].abs().max() <= env.max_speed
        vel = info["final_obs"]["observation"][:, 2:]
        hits += int(((vel == 0) & (prev_vel.abs() > 0.5)).sum())
        prev_vel = obs["observation"][:, 2:]
    assert hits > 1000  # the walls were actually hit, many times


def test_point_free_motion_and_wall_stop():
    env = PointMazeEnv(1, "open", seed=0)
    env.pos, env.vel = torch.zeros(1, 2), torch.zeros(1, 2)
    obs, *_ = env.step(torch.tensor([[1.0, -0.5]]))
    # v = 0.9 * 0 + accel * dt * a; x += v * dt
    torch.testing.assert_close(obs["observation"], torch.tensor([[0.1, -0.05, 1.0, -0.5]]))
    obs, *_ = env.step(torch.tensor([[1.0, -0.5]]))  # v = 0.9 * v + accel * dt * a
    torch.testing.assert_close(obs["observation"], torch.tensor([[0.29, -0.145, 1.9, -0.95]]))
    for _ in range(30):
        obs, *_ = env.step(torch.tensor([[1.0, 0.0]]))
    # Right wall of the open room is at x = 2.5: the point stops at 2.5 - radius, at rest in x.
    torch.testing.assert_close(obs["observation"][0, 0], torch.tensor(2.5 - env.radius - 1e-4))
    assert obs["observation"][0, 2] == 0.0


def test_point_speed_crosses_umaze_in_a_few_dozen_steps():
    """A waypoint controller gets from the U's top-left cell to its bottom-left cell in < 40
    steps, within the default 100-step episode."""
    env = PointMazeEnv(1, "umaze", seed=0)
    env.pos, env.vel, env.goal = (
        torch.tensor([[-1.0, 1.0]]),
        torch.zeros(1, 2),
        torch.tensor([[-1.0, -1.0]]),
    )
    waypoints = [(1.0, 1.0), (1.0, -1.0), (-1.0, -1.0)]
    success_at = None
    for step in range(1, 41):
        while len(waypoints) > 1 and torch.dist(env.pos[0], torch.tensor(waypoints[0])) < 0.3:
            waypoints.pop(0)
        target = torch.tensor([waypoints[0]])
        if env.step(2.0 * (target - env.pos) - 0.5 * env.vel)[4]["success"].all():
            success_at = step
            break
    assert success_at is not None and success_at > 10


def test_reacher_kinematics_and_goals():
    env = ReacherEnv(4096, seed=0)
    obs, _ = env.reset(seed=0)
    o = obs["observation"]
    angle = torch.stack([torch.atan2(o[:, 1], o[:, 0]), torch.atan2(o[:, 3], o[:, 2])], -1)
    torch.testing.assert_close(obs["achieved_goal"], env.fingertip(angle))
    torch.testing.assert_close(o[:, 6:], obs["achieved_goal"])
    assert (angle.amin(0) < -3.0).all() and (angle.amax(0) > 3.0).all()  # over [-pi, pi)
    goal = obs["desired_goal"]
    assert goal.norm(dim=-1).max() <= 1.0
    # Uniform over the unit disk: each quadrant's inner (r < 1/sqrt 2) and outer half of the
    # area holds an eighth of the goals.
    outer = goal.norm(dim=-1) > 0.5**0.5
    cell = (goal[:, 0] > 0).long() + 2 * (goal[:, 1] > 0).long() + 4 * outer.long()
    assert (torch.bincount(cell, minlength=8) / len(goal) - 1 / 8).abs().max() < 0.03
    for obs, *_ in rollout(env, 30):
        assert obs["observation"][:, 4:6].abs().max() <= env.max_speed
        assert obs["achieved_goal"].norm(dim=-1).max() <= 1.0 + 1e-5


def test_reacher_links_of_unequal_length():
    """The fingertip of each link's length, goals over the annulus the tip reaches."""
    env = ReacherEnv(4096, seed=0, link_lengths=(0.6, 0.3))
    angle = torch.tensor([[0.0, torch.pi / 2], [torch.pi / 2, 0.0], [torch.pi, torch.pi]])
    tip = torch.tensor([[0.6, 0.3], [0.0, 0.9], [-0.3, 0.0]])
    torch.testing.assert_close(env.fingertip(angle), tip)
    radius = env.goal.norm(dim=-1)
    assert 0.3 - 1e-6 <= radius.min() < 0.32 and 0.88 < radius.max() <= 0.9 + 1e-6


def test_reacher_one_step_dynamics():
    """w <- clip(0.9 w + 10 dt a, -3, 3), then q <- wrap(q + w dt) to [-pi, pi)."""
    env = ReacherEnv(2, seed=0)
    env.angle = torch.tensor([[0.5, -1.0], [3.1, 0.0]])
    env.ang_vel = torch.tensor([[1.0, 0.0], [2.9, -2.0]])
    obs, *_ = env.step(torch.tensor([[1.0, -0.5], [1.0, 0.2]]))
    ang_vel = torch.tensor([[1.9, -0.5], [3.0, -1.6]])  # 2.61 + 1 clipped to 3
    angle = torch.tensor([[0.69, -1.05], [3.4 - 2 * torch.pi, -0.16]])
    torch.testing.assert_close(env.ang_vel, ang_vel)
    torch.testing.assert_close(env.angle, angle)
    torch.testing.assert_close(obs["achieved_goal"], env.fingertip(angle))


def test_reacher_goal_reachable_by_a_controller():
    env = ReacherEnv(256, seed=3)
    env.reset(seed=3)
    success = torch.zeros(256, dtype=torch.bool)
    for _ in range(env.max_episode_steps - 1):
        # Jacobian-transpose controller with velocity damping.
        q1, q12 = env.angle[:, 0], env.angle.sum(-1)
        l1, l2 = env.link_lengths
        jac = torch.stack(
            [
                torch.stack([-l1 * q1.sin() - l2 * q12.sin(), -l2 * q12.sin()], -1),
                torch.stack([l1 * q1.cos() + l2 * q12.cos(), l2 * q12.cos()], -1),
            ],
            -2,
        )
        err = env.goal - env.fingertip(env.angle)
        torque = 8.0 * (jac.transpose(1, 2) @ err.unsqueeze(-1)).squeeze(-1) - 0.6 * env.ang_vel
        success |= env.step(torque)[4]["success"]
    assert success.float().mean() > 0.9


# --------------------------------------------------------------------------- reset & autoreset


@pytest.mark.parametrize("name", ENV_NAMES)
def test_reset_seed_reproducible(name):
    """Through autoresets too: 7-step episodes, so the 30 steps draw new goals four times."""
    env = make_env(name, num_envs=64, seed=0, max_episode_steps=7)
    first = (env.reset(seed=5), rollout(env, 30))
    other = make_env(name, num_envs=64, seed=123, max_episode_steps=7)
    assert_same(first, (other.reset(seed=5), rollout(other, 30)))
    obs6, _ = other.reset(seed=6)
    assert not torch.equal(obs6["desired_goal"], first[0][0]["desired_goal"])
    assert_same(env.reset(seed=5), first[0])  # reseeding the same env starts it over
    assert env.np_random_seed == 5  # Gymnasium's record of the last seed
    made = make_env(name, num_envs=64, seed=5, max_episode_steps=7)  # seeded when made
    assert_same(rollout(made, 30), first[1])
    unseeded = [make_env(name, num_envs=64, seed=None).reset()[0] for _ in range(2)]
    assert not torch.equal(unseeded[0]["desired_goal"], unseeded[1]["desired_goal"])


@pytest.mark.parametrize("name", ["point_umaze", "reacher"])
def test_reset_mask_resets_only_those_envs(name):
    env = make_env(name, num_envs=6, seed=0)
    env.reset(seed=np.int64(1))  # numpy ints are seeds too
    rollout(env, 5)
    before, steps = env.state_dict(), env.elapsed_steps.clone()
    mask = np.array([True, False, True, False, False, False])
    obs, _ = env.reset(options={"reset_mask": mask})
    kept = ~torch.from_numpy(mask)
    assert torch.equal(env.elapsed_steps, torch.where(kept, steps, 0)) and steps.min() == 5
    for key in env._sim_keys:
        assert torch.equal(getattr(env, key)[kept], before[key][kept])
        assert not torch.equal(getattr(env, key)[~kept], before[key][~kept])
    assert torch.equal(obs["observation"], env._observe()["observation"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": [1, 2]}, "one int seed"),
        ({"seed": 1.5}, "one int seed"),
        ({"seed": 2**32}, r"seed must lie in \[0, 2\*\*32\)"),
        ({"options": {"reset_mask": [True, False]}}, "shape"),
        ({"options": {"reset_mask": [1, 0, 1]}}, "bool"),
        ({"options": {"goal": 3}}, "only the reset_mask"),
    ],
)
def test_reset_rejects_bad_seeds_and_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_env("point_umaze", num_envs=3, seed=0).reset(**kwargs)


def test_point_reset_distribution():
    env = PointMazeEnv(4096, "medium", seed=0)
    obs, _ = env.reset(seed=0)
    cells = env.free_cells
    start_cell = torch.cdist(obs["achieved_goal"], cells).argmin(-1)
    goal_cell = torch.cdist(obs["desired_goal"], cells).argmin(-1)
    assert (start_cell != goal_cell).all()
    start_noise = obs["achieved_goal"] - cells[start_cell]
    goal_noise = obs["desired_goal"] - cells[goal_cell]
    for noise in (start_noise, goal_noise):  # uniform over +-position_noise per axis
        assert noise.abs().max() <= env.position_noise
        assert (noise.amin(0) < -0.9 * env.position_noise).all()
        assert (noise.amax(0) > 0.9 * env.position_noise).all()
    assert (start_noise - goal_noise).abs().mean() > 0.1  # drawn apart
    assert len(goal_cell.unique()) == len(start_cell.unique()) == len(cells)
    assert (obs["observation"][:, 2:] == 0).all()


@pytest.mark.parametrize("name", ["point_umaze", "reacher"])
def test_truncation_autoreset_and_final_obs(name):
    env = make_env(name, num_envs=32, seed=0, max_episode_steps=5)
    for _ in range(3):  # a reset mid-episode restarts the episode clock
        env.step(torch.zeros(32, env.action_dim))
    obs, _ = env.reset(seed=0)
    velocity = slice(2, 4) if name == "point_umaze" else slice(4, 6)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 11):
        prev = obs
        obs, reward, terminated, truncated, info = env.step(random_actions(env, gen))
        ended = t % 5 == 0
        assert not terminated.any()
        assert (truncated == ended).all() and (info["_final_obs"] == ended).all()
        final = info["final_obs"]
        # The final obs continues the episode that ran: same goal, reward and success from it.
        assert torch.equal(final["desired_goal"], prev["desired_goal"])
        assert torch.equal(
            reward, env.compute_reward(final["achieved_goal"], final["desired_goal"])
        )
        assert torch.equal(info["success"], reward == 0)
        if ended:  # the returned obs starts a new episode: at rest, new goal
            assert (obs["observation"][:, velocity] == 0).all()
            assert not torch.equal(obs["desired_goal"], final["desired_goal"])
            assert (env.elapsed_steps == 0).all()
        else:
            assert_same(obs, final)


def test_terminate_on_success_resets_only_successful_envs():
    env = PointMazeEnv(2, "open", seed=0, terminate_on_success=True)
    env.pos, env.vel = torch.zeros(2, 2), torch.zeros(2, 2)
    env.goal = goals = torch.tensor([[0.1, 0.0], [2.0, 0.0]])
    obs, reward, terminated, truncated, info = env.step(torch.zeros(2, 2))
    assert terminated.tolist() == [True, False] and not truncated.any()
    assert info["success"].tolist() == [True, False] and reward.tolist() == [0.0, -1.0]
    assert info["_final_obs"].tolist() == [True, False]
    assert torch.equal(info["final_obs"]["desired_goal"], goals)
    assert torch.equal(obs["desired_goal"][1], goals[1])
    # By default reaching the goal does not end the episode.
    env = PointMazeEnv(1, "open", seed=0)
    env.goal = env.pos.clone()
    _, reward, terminated, _, info = env.step(torch.zeros(1, 2))
    assert info["success"].all() and reward.item() == 0.0 and not terminated.any()


def test_compute_reward_batched():
    env = make_env("point_umaze", num_envs=4)
    goal = torch.zeros(3, 5, 2)
    achieved = torch.zeros(3, 5, 2)
    achieved[..., 0] = torch.linspace(0, 1, 5)  # 0, .25, .5, .75, 1
    reward = env.compute_reward(achieved, goal, {})
    assert reward.shape == (3, 5) and reward.dtype == torch.float32
    assert reward[0].tolist() == [0.0, 0.0, -1.0, -1.0, -1.0]
    at_the_boundary = torch.tensor([[env.success_distance, 0.0]])
    assert env.compute_reward(at_the_boundary, torch.zeros(1, 2)).item() == 0.0  # <=, not <
    for other in (torch.zeros(3, 5, 1), torch.zeros(5, 2)):  # no silent broadcasting
        with pytest.raises(ValueError, match="share a shape"):
            env.compute_reward(achieved, other)


@pytest.mark.parametrize(
    "make", [lambda: make_env("point_umaze", 3), lambda: GymnasiumGoalVectorEnv(TINY_ID, 3)]
)
def test_compute_reward_names_goals_it_cannot_take(make):
    """HER code written for gymnasium-robotics passes numpy goals: named, not a torch.linalg or
    ``.cpu()`` error; the adapter broadcast goals of different shapes without a word."""
    env = make()
    with pytest.raises(TypeError, match="achieved_goal and desired_goal must be torch tensors"):
        env.compute_reward(np.zeros((3, 2)), np.zeros((3, 2)), {})
    with pytest.raises(ValueError, match="share a shape"):
        env.compute_reward(torch.zeros(3, 2), torch.zeros(2), {})


# --------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("name", ["point_large", "reacher"])
def test_state_dict_resumes_exactly(name):
    env = make_env(name, num_envs=64, seed=0, max_episode_steps=7)
    rollout(env, 11)
    state = env.state_dict()
    expected = rollout(env, 20, seed=1)
    resumed = make_env(name, num_envs=64, seed=99, max_episode_steps=7)
    resumed.load_state_dict(state)
    assert_same(expected, rollout(resumed, 20, seed=1))
    env.load_state_dict(state)  # the saved state is not aliased by the env that produced it
    assert_same(expected, rollout(env, 20, seed=1))
    with pytest.raises(ValueError, match="shape"):
        make_env(name, num_envs=8).load_state_dict(state)
    with pytest.raises(ValueError, match="state_dict keys must be"):  # state of another env
        env.load_state_dict(state | {"mass": torch.ones(64)})
    key = env._sim_keys[0]
    with pytest.raises(TypeError, match=rf"state_dict\['{key}'\] must be a tensor, got list"):
        env.load_state_dict(state | {key: state[key].tolist()})


@pytest.mark.parametrize("name", ["point_umaze", "reacher"])
def test_a_bad_generator_state_leaves_the_env_as_it_was(name):
    env = make_env(name, num_envs=4, seed=0)
    state, before = env.state_dict(), env.state_dict()
    state["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state size
    key = env._sim_keys[0]
    state[key] = torch.zeros_like(state[key]) + 0.1
    with pytest.raises(ValueError, match=r"generator.*saved on another device type"):
        env.load_state_dict(state)
    after = env.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("name", ["point_umaze", "reacher"])
@pytest.mark.parametrize(
    "bad",
    [{"dt": -0.1}, {"accel": 0.0}, {"damping": 1.5}, {"max_speed": float("nan")},
     {"success_distance": 0.0}],
)  # fmt: skip
def test_bad_dynamics_are_refused(name, bad):
    """A negative dt, say, would move the point backwards through the walls."""
    with pytest.raises(ValueError, match=next(iter(bad))):
        make_env(name, num_envs=2, **bad)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"terminate_on_success": "false"}, TypeError),  # bool("false") is True
        ({"success_distance": True}, TypeError),
        ({"dt": "0.1"}, TypeError),
        ({"damping": None}, TypeError),
        ({"link_lengths": (0.5, float("nan"))}, ValueError),
        ({"link_lengths": (0.5, 0.5, 0.5)}, ValueError),
        ({"link_lengths": 0.5}, ValueError),
    ],
)
def test_env_arguments_of_the_wrong_type_are_refused(bad, error):
    with pytest.raises(error, match=next(iter(bad))):
        make_env("reacher", num_envs=2, **bad)


def test_device_auto_means_what_the_buffer_takes_it_for():
    envs = [make_env(name, num_envs=2, device="auto") for name in ENV_NAMES]
    envs.append(GymnasiumGoalVectorEnv(TINY_ID, 2, device="auto"))
    assert all(env.device == resolve_device("auto") for env in envs)


@pytest.mark.parametrize(
    "make", [lambda: make_env("point_umaze", 2), lambda: GymnasiumGoalVectorEnv(TINY_ID, 2)]
)
@pytest.mark.parametrize(
    ("action", "match"),
    [
        (None, "got NoneType"),  # torch: "must be real number, not NoneType"
        ("left", "got str"),
        ({"move": [0.0, 0.0]}, "got dict"),
        (torch.ones(2, 2, dtype=torch.complex64), "got torch.complex64"),  # torch warned only
    ],
)
def test_actions_that_are_not_real_numbers_are_named(make, action, match):
    with pytest.raises(TypeError, match=rf"action must be an array of real numbers, {match}"):
        make().step(action)


@pytest.mark.parametrize("name", ["point_umaze", "reacher"])
def test_nan_actions_act_as_zero(name):
    """A NaN action moves like a zero action instead of staying in the state all episode."""
    nan_env, zero_env = (make_env(name, num_envs=3, seed=0) for _ in range(2))
    action = torch.rand(3, nan_env.action_dim) * 2 - 1
    nan_action, zero_action = action.clone(), action.clone()
    nan_action[1] = float("nan")
    zero_action[1] = 0.0
    for _ in range(3):
        got, want = nan_env.step(nan_action)[0], zero_env.step(zero_action)[0]
        assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name", ["point_umaze", "reacher"])
def test_actions_that_require_grad_leave_no_autograd_history(name):
    """A policy's output stepped outside torch.no_grad: the state holds values, not a graph."""
    env = make_env(name, num_envs=3, seed=0, max_episode_steps=4)
    policy = torch.nn.Linear(env.obs_dim, env.action_dim)
    obs, _ = env.reset(seed=0)
    for _ in range(6):  # past an autoreset
        obs, reward, *_ = env.step(torch.tanh(policy(obs["observation"])))
    assert not any(v.requires_grad for v in obs.values()) and not reward.requires_grad
    assert not any(v.requires_grad for v in env.state_dict().values())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ENV_NAMES)
def test_cuda_matches_semantics(name):
    env = make_env(name, num_envs=4096, device="cuda", seed=0, max_episode_steps=20)
    env.reset(seed=0)
    for obs, reward, _, _, info in rollout(env, 45):
        assert obs["observation"].is_cuda and reward.is_cuda and info["_final_obs"].is_cuda
        if name.startswith("point"):
            assert not touches_wall(env.layout, obs["achieved_goal"].cpu(), env.radius).any()
    state = env.state_dict()
    expected = rollout(env, 5)
    env.load_state_dict(state)
    assert_same(expected, rollout(env, 5))
    action = torch.zeros(env.num_envs, env.action_dim, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # step must never wait for the GPU
    try:
        for _ in range(25):
            env.step(action)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", ["point_umaze", "reacher"])
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_step_matches_eager(name, device):
    """``env.compile()``: the same episodes (truncations, resets, rewards) and observations up
    to the compiler's rounding, in one graph (fullgraph: no break)."""
    eager = make_env(name, num_envs=64, device=device, seed=3, max_episode_steps=20)
    compiled = make_env(name, num_envs=64, device=device, seed=3, max_episode_steps=20)
    compiled.compile()
    graphs = counters["stats"]["unique_graphs"]
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(45):  # two autoresets
        action = torch.rand(64, eager.action_dim, generator=gen, device=device) * 2 - 1
        want, have = eager.step(action), compiled.step(action)
        for key in ("observation", "achieved_goal", "desired_goal"):
            torch.testing.assert_close(have[0][key], want[0][key], rtol=1e-5, atol=1e-5)
        for k in (1, 2, 3):  # reward, terminated, truncated
            assert torch.equal(have[k], want[k])
        assert torch.equal(have[4]["_final_obs"], want[4]["_final_obs"])
    assert counters["stats"]["unique_graphs"] > graphs  # the steps went through the compiler


@pytest.mark.parametrize("path", ISOLATION_PATHS)
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_envs_do_not_share_recompile_limits(monkeypatch, path):
    """Each env compiles its step into caches of its own, by either path (torch 2.11 has only the
    code copy): envs of other kinds or sizes in one process (a run's, a sweep's, a test suite's)
    do not use up ``recompile_limit`` for the next one. One function steps every env, so a
    shared cache took an entry per env class, maze size, ``terminate_on_success`` and first new
    ``num_envs``, and with ``fullgraph=True`` torch raised FailOnRecompileLimitHit at the step
    of the env past the limit (the ninth kind with the default 8): here, with a limit of 1, the
    second env's. Each step compiles with static shapes, as it would alone: dynamo's automatic
    dynamic shapes, kept per function whatever the caches, made the second point U-maze's
    (another ``num_envs``) dynamic."""
    use_isolation_path(monkeypatch, path)
    with torch._dynamo.config.patch(recompile_limit=1):
        for name, num_envs in (("point_umaze", 4), ("reacher", 4), ("point_umaze", 8)):
            env = make_env(name, num_envs=num_envs, seed=0)
            backend = ShapeRecorder()
            env.compile(backend=backend)
            for _ in range(2):
                env.step(torch.zeros(num_envs, env.action_dim))
            assert backend.dynamic == [False]  # compiled, once, with static shapes


# --------------------------------------------------------------------------- your own env


def test_readme_shows_the_example_env():
    """The README's env of your own is tests/free_point_env.py, line for line."""
    from pathlib import Path

    root = Path(__file__).parent.parent
    code = (root / "tests" / "free_point_env.py").read_text().split("\n\n", 1)[1]
    assert f"```python\n{code.strip()}\n```" in (root / "README.md").read_text()


def test_a_registered_env_steps_like_the_built_in_ones():
    env = make_env("tests.free_point_env:free_point", num_envs=4, seed=0, max_episode_steps=3)
    from tests.free_point_env import FreePoint  # imported by make_env: "<module>:<name>"

    assert isinstance(env, FreePoint) and env.max_episode_steps == 3
    assert make_env("free_point", num_envs=2).max_episode_steps == 50  # registered on import
    start, _ = env.reset(seed=1)
    state = env.state_dict()
    obs = env.step(torch.ones(4, 2))[0]
    torch.testing.assert_close(obs["observation"], (start["observation"] + 0.1).clamp(0, 1))
    for _ in range(2):
        _, reward, _, truncated, info = env.step(torch.ones(4, 2))
    assert truncated.all() and info["_final_obs"].all()  # autoreset at the limit
    assert set(reward.tolist()) <= {-1.0, 0.0}
    env.load_state_dict(state)
    again = env.step(torch.ones(4, 2))[0]
    torch.testing.assert_close(again["observation"], (start["observation"] + 0.1).clamp(0, 1))


def test_register_env_refuses_clashes_and_bad_names():
    from crl_fast.envs import register_env
    from tests import free_point_env
    from tests.free_point_env import FreePoint

    register_env("free_point", FreePoint)  # the same factory again: nothing changes
    # The same file loaded under another name (a script also imported as a module): accepted.
    import importlib.util

    spec = importlib.util.spec_from_file_location("free_point_copy", free_point_env.__file__)
    copy = sys.modules["free_point_copy"] = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(copy)  # registers its own FreePoint class as "free_point"
    finally:
        del sys.modules["free_point_copy"]
        register_env("free_point", FreePoint, replace=True)  # the copy's class replaced it
    for name, error in [("reacher", "built-in"), ("a:b", "without ':'"), ("", "without ':'")]:
        with pytest.raises(ValueError, match=error):
            register_env(name, FreePoint)
    with pytest.raises(ValueError, match="registered already"):
        register_env("free_point", lambda *a, **k: None)
    register_env("two_lambdas", lambda *a, **k: None)
    with pytest.raises(ValueError, match="registered already"):  # the same file, another line
        register_env("two_lambdas", lambda *a, **k: None)
    with pytest.raises(TypeError, match="callable"):
        register_env("other", 3)
    with pytest.raises(TypeError, match="replace must be True or False"):  # "no" is truthy
        register_env("free_point", FreePoint, replace="no")
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        make_env("no_such_module:free_point", num_envs=2)
    with pytest.raises(ValueError, match="unknown env 'nope'"):
        make_env("tests.free_point_env:nope", num_envs=2)


def test_make_env_refuses_a_factory_that_drops_its_arguments():
    """A factory that ignored max_episode_steps ran a run with another episode length than its
    config says, silently; one that ignored num_envs failed later on an action's shape."""
    from crl_fast.envs import register_env

    def drops(num_envs, *, device="cpu", seed=None, max_episode_steps=None):
        return FreePoint(num_envs + 1, device=device, seed=seed)  # 50 steps whatever is asked

    register_env("drops_arguments", drops, replace=True)
    register_env("not_an_env", lambda num_envs, **kwargs: object(), replace=True)
    with pytest.raises(ValueError, match=r"num_envs=4 \(got 5\)"):
        make_env("drops_arguments", num_envs=4)
    with pytest.raises(ValueError, match=r"max_episode_steps=20 \(got 50\)"):
        make_env("drops_arguments", num_envs=4, max_episode_steps=20)
    with pytest.raises(TypeError, match=r"GymnasiumGoalVectorEnv\), got object"):
        make_env("not_an_env", num_envs=4)
    env = make_env("tests.free_point_env:free_point", 4, max_episode_steps=20)
    assert env.max_episode_steps == 20


def test_an_env_drawing_outside_its_generator_is_warned_about():
    """Draws from torch's global generator make reset(seed=...) and resuming irreproducible."""

    class GlobalDraws(FreePoint):
        def _draw(self):
            return {"xy": torch.rand((2, self.num_envs, 2), device=self.device)}

    with pytest.warns(UserWarning, match="drew none from self.generator"):
        GlobalDraws(4, seed=0)

    class FixedStart(FreePoint):  # draws nothing, and says so
        def _draw(self):
            return {}

        def _initial_state(self, draws):
            return {"pos": torch.zeros(self.num_envs, 2), "goal": torch.ones(self.num_envs, 2)}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FreePoint(4, seed=0).reset(seed=1)
        FixedStart(4, seed=0).reset(seed=1)


# --------------------------------------------------------------------------- rendering


def pixel(xy: torch.Tensor, lo: tuple[float, float], pixels_per_unit: float) -> tuple[int, int]:
    """(row, col) of the pixel holding world point ``xy`` in a frame whose top left is at
    ``(lo[0], -lo[1])``."""
    return int((-lo[1] - float(xy[1])) * pixels_per_unit), int(
        (float(xy[0]) - lo[0]) * pixels_per_unit
    )


@pytest.mark.parametrize("name", ["point_umaze", "point_open", "point_large"])
def test_point_maze_frames_show_walls_goal_and_point(name):
    from crl_fast.envs.point_maze import FLOOR, GOAL, PIXELS_PER_CELL, POINT, WALL

    env = make_env(name, num_envs=6, seed=1, render_mode="rgb_array")
    env.step(torch.rand(6, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    frames = env.render()
    height, width = len(env.layout), len(env.layout[0])
    lo, ppu = (-width / 2, -height / 2), PIXELS_PER_CELL
    assert len(frames) == 6
    for i, frame in enumerate(frames):
        assert frame.shape == (height * ppu, width * ppu, 3) and frame.dtype == np.uint8
        assert tuple(frame[pixel(env.pos[i], lo, ppu)]) == POINT
        assert tuple(frame[pixel(env.pos[i] + 0.08, lo, ppu)]) == POINT  # a square, corners too
        for offset in (0.0, 0.4):  # the success disc (0.45) around the goal
            on_disc = env.goal[i] + torch.tensor([offset, 0.0])
            near_point = torch.dist(env.pos[i], on_disc) < 0.2
            assert near_point or tuple(frame[pixel(on_disc, lo, ppu)]) == GOAL
        for row, cells in enumerate(env.layout):
            for col, cell in enumerate(cells):
                centre = frame[row * ppu + ppu // 2, col * ppu + ppu // 2]
                centre_xy = torch.tensor([col + 0.5 - width / 2, height / 2 - row - 0.5])
                allowed = {WALL} if cell == "1" else {FLOOR}
                if torch.dist(centre_xy, env.goal[i]) < 0.5:
                    allowed.add(GOAL)
                if torch.dist(centre_xy, env.pos[i]) < 0.15:
                    allowed.add(POINT)
                assert tuple(centre) in allowed, (row, col)


def test_reacher_frames_show_links_and_goal():
    from crl_fast.envs.reacher import BACKGROUND, GOAL, LINK, REACH

    env = make_env("reacher", num_envs=8, seed=2, render_mode="rgb_array")
    frames = env.render()
    reach = 1.1 * sum(env.link_lengths)
    lo, ppu = (-reach, -reach), frames[0].shape[0] / (2 * reach)
    tip = env.fingertip(env.angle)
    for i, frame in enumerate(frames):
        q1 = env.angle[i, 0]
        elbow = env.link_lengths[0] * torch.stack([q1.cos(), q1.sin()])
        for point in (elbow / 2, (elbow + tip[i]) / 2):  # the middle of each link
            assert tuple(frame[pixel(point, lo, ppu)]) == LINK
        links_near_goal = (
            torch.dist(tip[i], env.goal[i]) < 0.2 or torch.dist(elbow, env.goal[i]) < 0.2
        )
        assert links_near_goal or tuple(frame[pixel(env.goal[i], lo, ppu)]) in (GOAL, LINK)
        assert tuple(frame[0, 0]) == BACKGROUND  # the corner lies outside the reachable disc
        assert tuple(frame[pixel(torch.tensor([-0.95, 0.05]), lo, ppu)]) in (REACH, LINK, GOAL)


def test_canvas_segment_stops_at_its_ends():
    from crl_fast.envs.render import Canvas

    canvas = Canvas((-1.0, -1.0), (1.0, 1.0), 10, torch.device("cpu"))
    mask = canvas.segment(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.5, 0.0]]), 0.06)[0]
    inside = [(0.25, 0.05), (0.05, -0.05), (0.45, 0.05)]
    outside = [(0.25, 0.15), (0.65, 0.05), (-0.15, 0.05), (0.95, 0.05)]
    for points, want in ((inside, True), (outside, False)):
        for x, y in points:  # pixel centres lie at odd multiples of 0.05
            assert mask[int((1 - y) * 10), int((x + 1) * 10)].item() is want, (x, y)


def test_first_episodes_film_each_env_until_its_episode_ends():
    """Env 0 reaches its goal in the first step (and resets), env 1 runs to its time limit:
    env 0 stays as it ended, each env's last picture is its final observation, and the film
    stops once both have ended; env 2 is not filmed."""
    from crl_fast.envs.render import FirstEpisodes

    env = make_env("point_open", num_envs=3, seed=0, max_episode_steps=5, terminate_on_success=True)
    obs, _ = env.reset(seed=0)
    env.goal[0] = env.pos[0]
    obs = env._observe()
    film = FirstEpisodes(env, 2)
    film(obs, None)
    still = torch.zeros(3, 2)
    finals = {}  # env -> (the step its episode ended at, the picture of its final observation)
    for step in range(1, 8):
        obs, _, _, _, info = env.step(still)
        for i in range(2):
            if info["_final_obs"][i] and i not in finals:
                final = {k: v[i : i + 1] for k, v in info["final_obs"].items()}
                finals[i] = step, env.frames(final)[0].numpy()
        film(obs, info)
    assert finals[0][0] == 1 and finals[1][0] == 5
    width = 7 * 32
    assert len(film.frames) == 6  # the reset and steps 1..5: nothing after both ended
    for frame in film.frames[1:]:
        assert np.array_equal(frame[:, :width], finals[0][1])
    assert np.array_equal(film.frames[-1][:, width + 2 :], finals[1][1])
    assert film.frames[0].shape == (5 * 32, 2 * width + 2, 3)


def test_render_needs_the_rgb_array_mode():
    with pytest.raises(ValueError, match="render_mode="):
        make_env("reacher", num_envs=2).render()
    with pytest.raises(ValueError, match="render_mode must be"):
        make_env("point_umaze", num_envs=2, render_mode="human")
    with pytest.raises(NotImplementedError, match="FreePoint does not render"):
        FreePoint(2, render_mode="rgb_array").render()


class _FloatFrames(FreePoint):
    """Draws grey frames of float32 values in [0, 1], as matplotlib takes them."""

    def frames(self, obs):
        return torch.full((len(obs["observation"]), 8, 8, 3), 0.5)


class _OneFrame(FreePoint):
    """Draws one frame for all the rows it is given."""

    def frames(self, obs):
        return torch.zeros((8, 8, 3), dtype=torch.uint8)


@pytest.mark.parametrize(
    ("env", "error", "match"),
    [
        (
            _FloatFrames,
            TypeError,
            r"_FloatFrames.frames\(\) must return a uint8 tensor, got .*float32",
        ),
        (
            _OneFrame,
            ValueError,
            r"_OneFrame.frames\(\) must return .* \(2, height, width, 3\), got \(8, 8, 3\)",
        ),
    ],
)
def test_frames_of_an_env_of_your_own_are_checked(env, error, match):
    """Float frames were rendered as they came and failed only in Pillow, after a whole
    evaluation, in ``crl-fast eval --video`` ("Cannot handle this data type: (1, 1, 3), <f4")."""
    from crl_fast.envs.render import FirstEpisodes

    env = env(2, seed=0, render_mode="rgb_array")
    with pytest.raises(error, match=match):
        env.render()
    with pytest.raises(error, match=match):
        FirstEpisodes(env, 2)(env.reset()[0], None)


def test_a_gif_needs_frames(tmp_path):
    from crl_fast.envs.render import save_gif

    with pytest.raises(ValueError, match="no frames to write"):
        save_gif([], tmp_path / "empty.gif", 10)
    assert not (tmp_path / "empty.gif").exists()


# --------------------------------------------------------------------------- Gymnasium's tools


GYMNASIUM = tuple(int(part) for part in gym.__version__.split(".")[:2])
"""(major, minor): pyproject admits Gymnasium 1.1, older than some of the tools the README lists."""


def as_numpy(obs: dict) -> dict:
    """A dict of tensors as the numpy arrays Gymnasium's spaces and wrappers take."""
    return {key: value.cpu().numpy() for key, value in obs.items()}


@pytest.mark.parametrize("name", ["point_umaze", "reacher"])
def test_gymnasium_spaces_and_action_wrappers_apply_directly(name):
    """The README's list of what works on the torch envs as they are."""
    from gymnasium.vector.utils import batch_space
    from gymnasium.wrappers.vector import ClipAction, ClipReward, RescaleAction

    env = make_env(name, num_envs=4, seed=0, max_episode_steps=3)
    assert env.observation_space == batch_space(env.single_observation_space, 4)
    assert env.action_space == batch_space(env.single_action_space, 4)
    obs, _ = env.reset(seed=0)
    samples = [(env.action_space.seed(1), env.action_space.sample())[1] for _ in range(2)]
    sample = samples[0]
    assert np.array_equal(*samples)  # seeding the space repeats its samples
    for _ in range(3):  # to the autoreset
        next_obs, _, _, _, info = env.step(sample)
        for batch in (obs, next_obs, info["final_obs"]):
            assert env.observation_space.contains(as_numpy(batch))
    assert info["_final_obs"].all()
    rescaled = RescaleAction(make_env(name, num_envs=4, seed=0), -2.0, 2.0)
    clipped = ClipAction(make_env(name, num_envs=4, seed=0))
    rewards = ClipReward(make_env(name, num_envs=4, seed=0), -0.5, 0.5)
    want = make_env(name, num_envs=4, seed=0).step(sample)  # [-2, 2] maps onto [-1, 1]
    assert_same(rescaled.step(2 * sample)[:4], want[:4])
    assert_same(clipped.step(4 * sample)[:4], make_env(name, 4, seed=0).step(4 * sample)[:4])
    assert torch.equal(rewards.step(sample)[1], want[1].clamp(-0.5, 0.5))


@pytest.mark.skipif(GYMNASIUM < (1, 4), reason="benchmark_vector_step is new in Gymnasium 1.4")
@pytest.mark.parametrize("name", ["point_umaze", "reacher"])
def test_gymnasium_benchmark_vector_step_takes_the_torch_envs(name):
    """The README's list: Gymnasium's step benchmark runs the torch envs as they are."""
    from gymnasium.utils.performance import benchmark_vector_step

    env = make_env(name, num_envs=4, seed=0, max_episode_steps=3)
    assert benchmark_vector_step(env, target_duration=0, seed=0) > 0


def test_gymnasium_record_video_films_the_torch_envs(tmp_path):
    """Vector RecordVideo reads the frames ``render`` returns and sees the SAME_STEP resets."""
    pytest.importorskip("moviepy")  # gymnasium[other]; not in the test extra
    from gymnasium.wrappers.vector import RecordVideo

    env = RecordVideo(
        make_env("reacher", 2, render_mode="rgb_array", max_episode_steps=3), tmp_path
    )
    env.reset(seed=0)
    for _ in range(4):
        env.step(torch.zeros(2, 2))
    env.close()
    videos = sorted(p.name for p in tmp_path.iterdir())  # the autoreset at step 3 began one
    assert videos == ["rl-video-episode-0.mp4", "rl-video-episode-1.mp4"]


@pytest.mark.skipif(GYMNASIUM < (1, 2), reason="ArrayConversion is new in Gymnasium 1.2")
def test_gymnasium_numpy_wrappers_work_through_array_conversion():
    """RecordEpisodeStatistics, DictInfoToList and NormalizeReward take numpy arrays (on torch
    tensors they fail in numpy or on an assert): the README's ArrayConversion makes them work."""
    pytest.importorskip("array_api_compat")  # gymnasium[array-api], in the test extra
    from gymnasium.wrappers.vector import (
        ArrayConversion,
        DictInfoToList,
        NormalizeReward,
        RecordEpisodeStatistics,
    )

    env = make_env("point_umaze", num_envs=4, seed=0, max_episode_steps=3)
    wrapped = NormalizeReward(RecordEpisodeStatistics(ArrayConversion(env, torch, np)))
    listed = DictInfoToList(wrapped)
    obs, _ = listed.reset(seed=0, options={"reset_mask": np.array([True, True, False, True])})
    assert isinstance(obs["observation"], np.ndarray)
    listed.reset(seed=0)
    for _ in range(3):
        obs, reward, _, truncated, infos = listed.step(listed.action_space.sample())
    assert isinstance(reward, np.ndarray) and truncated.all() and len(infos) == 4
    assert all(info["episode"]["l"] == 3 for info in infos)
    assert all(info["final_obs"]["desired_goal"].shape == (2,) for info in infos)
    _, _, _, _, infos = listed.step(listed.action_space.sample())  # mid-episode: no final_obs
    assert all(set(info) == {"success"} for info in infos)


@pytest.mark.parametrize("wrapper", ["NormalizeObservation", "FlattenObservation"])
def test_gymnasium_observation_wrappers_refuse_same_step_autoreset(wrapper):
    """Gymnasium's own limit, as the README says: they would leave ``final_obs`` as it was.
    Gymnasium < 1.4 refuses with a bare assert."""
    import gymnasium.wrappers.vector

    error, match = (
        (ValueError, "NEXT_STEP or DISABLED") if GYMNASIUM >= (1, 4) else (AssertionError, None)
    )
    with pytest.raises(error, match=match):
        getattr(gymnasium.wrappers.vector, wrapper)(make_env("reacher", num_envs=2))


# --------------------------------------------------------------------------- adapter


def tiny_vector_env(
    mode: AutoresetMode, num_envs: int = 8, copy: bool = True, **kwargs
) -> SyncVectorEnv:
    fns = [lambda: gym.make(TINY_ID, **kwargs) for _ in range(num_envs)]
    return SyncVectorEnv(fns, autoreset_mode=mode, copy=copy)


def adapter_rollout(env: GymnasiumGoalVectorEnv, steps: int = 20) -> list:
    gen = torch.Generator().manual_seed(0)
    return [env.reset(seed=0), *(env.step(random_actions(env, gen)) for _ in range(steps))]


@pytest.mark.parametrize("terminate_on_success", [False, True])
def test_adapter_same_step_semantics(terminate_on_success):
    env = GymnasiumGoalVectorEnv(TINY_ID, 8, terminate_on_success=terminate_on_success)
    assert (env.obs_dim, env.goal_dim, env.action_dim, env.max_episode_steps) == (2, 2, 2, 6)
    assert env.autoreset_mode == AutoresetMode.SAME_STEP
    (obs, _), *steps = adapter_rollout(env, 20)
    n_success = 0
    for t, (new_obs, reward, terminated, truncated, info) in enumerate(steps):
        done = terminated | truncated
        assert torch.equal(info["_final_obs"], done)
        final = info["final_obs"]
        assert torch.equal(final["desired_goal"], obs["desired_goal"])
        torch.testing.assert_close(
            reward, env.compute_reward(final["achieved_goal"], final["desired_goal"])
        )
        assert torch.equal(info["success"], reward == 0)  # also for envs reset in this step
        if not terminate_on_success:
            assert torch.equal(truncated, torch.full((8,), (t + 1) % 6 == 0))
        assert_same(
            {k: v[~done] for k, v in new_obs.items()}, {k: v[~done] for k, v in final.items()}
        )
        # Ended envs already started a new episode (new goals are drawn at random).
        assert (new_obs["desired_goal"][done] != final["desired_goal"][done]).all()
        n_success += int(info["success"][done].sum())
        obs = new_obs
    assert n_success > 0 or not terminate_on_success


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED])
@pytest.mark.parametrize("terminate_on_success", [False, True])
def test_adapter_converts_autoreset_modes_to_same_step(mode, terminate_on_success):
    reference = adapter_rollout(
        GymnasiumGoalVectorEnv(
            tiny_vector_env(AutoresetMode.SAME_STEP, terminate_on_success=terminate_on_success)
        )
    )
    # copy=False: the reset of ended envs writes into the arrays their step returned.
    converted = GymnasiumGoalVectorEnv(
        tiny_vector_env(mode, copy=False, terminate_on_success=terminate_on_success)
    )
    assert converted.autoreset_mode == mode
    assert_same(reference, adapter_rollout(converted))


def test_adapter_reads_a_vector_env_that_names_no_autoreset_mode_as_next_step():
    """Gymnasium's default: a vector env written before autoreset modes existed."""
    legacy = tiny_vector_env(AutoresetMode.NEXT_STEP)
    legacy.metadata = {k: v for k, v in legacy.metadata.items() if k != "autoreset_mode"}
    assert GymnasiumGoalVectorEnv(legacy).autoreset_mode == AutoresetMode.NEXT_STEP


def test_adapter_reset_mask_takes_a_tensor_or_list_as_the_torch_envs_do():
    """Gymnasium takes only a numpy array, and pops it from the caller's options: the same
    options passed again reset every env."""
    results = []
    flags = [True, False, True, False]
    for mask in (np.array(flags), torch.tensor(flags), flags):
        env = GymnasiumGoalVectorEnv(TINY_ID, 4, device="cpu")
        env.reset(seed=0)
        for _ in range(3):
            before, *_ = env.step(torch.full((4, env.action_dim), 0.5))
        options = {"reset_mask": mask}
        after, _ = env.reset(options=options)
        assert options == {"reset_mask": mask}
        kept = ~torch.as_tensor(mask)
        assert torch.equal(after["observation"][kept], before["observation"][kept])
        assert not torch.equal(after["observation"][~kept], before["observation"][~kept])
        results.append(after)
    assert all(torch.equal(results[0][k], result[k]) for result in results for k in result)


def test_adapter_reset_takes_a_numpy_int_seed_as_the_torch_envs_do():
    """Gymnasium's vector envs take a Python int or a list (a numpy int failed on len())."""
    env = GymnasiumGoalVectorEnv(TINY_ID, 2)
    assert_same(env.reset(seed=np.int64(3)), env.reset(seed=3))


def test_adapter_records_the_reset_seed_as_the_torch_envs_do():
    """``np_random_seed`` is Gymnasium's record of the last ``reset(seed=...)``: the adapter kept
    an unrelated random one."""
    env = GymnasiumGoalVectorEnv(TINY_ID, 2)
    env.reset(seed=np.int64(5))
    assert env.np_random_seed == make_env("point_umaze", 2, seed=5).np_random_seed == 5


def test_adapter_actions_rescaled_and_errors():
    env = GymnasiumGoalVectorEnv(TINY_ID, 2, device="cpu")
    obs, _ = env.reset(seed=0)
    new_obs, *_ = env.step(torch.tensor([[1.0, -1.0], [5.0, 0.0]]))  # [-1, 1] -> [-2, 2], clipped
    torch.testing.assert_close(
        new_obs["achieved_goal"] - obs["achieved_goal"], torch.tensor([[0.5, -0.5], [0.5, 0.0]])
    )
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.zeros(3, 2))
    with pytest.raises(NotImplementedError):
        env.state_dict()
    with pytest.raises(ValueError, match="Dict"):
        GymnasiumGoalVectorEnv(gym.make_vec("CartPole-v1", 2, vectorization_mode="sync"))
    with pytest.raises(ValueError, match="num_envs"):
        GymnasiumGoalVectorEnv(TINY_ID, 0)
    with pytest.raises(ValueError, match="need an env id"):  # they would be ignored
        GymnasiumGoalVectorEnv(tiny_vector_env(AutoresetMode.SAME_STEP), max_episode_steps=3)
    with pytest.raises(ValueError, match=r"num_envs=4 .* has 8"):  # was ignored: 8 envs ran
        GymnasiumGoalVectorEnv(tiny_vector_env(AutoresetMode.SAME_STEP), num_envs=4)
    assert GymnasiumGoalVectorEnv(tiny_vector_env(AutoresetMode.SAME_STEP), 8).num_envs == 8
    with pytest.raises(ValueError, match="success_distance"):
        GymnasiumGoalVectorEnv(TINY_ID, 2, success_distance=-1.0)
    for name in ("gymnasium:Nope-v0", "gymnasium:", "gymnasium:no_such_module:Foo-v0"):
        with pytest.raises(ValueError, match="cannot make the Gymnasium env"):
            make_env(name, 2)
    env.close()


def test_adapter_episode_limit_override():
    """``make_env("gymnasium:<id>", max_episode_steps=N)``: episodes end at N, and the adapter says
    N (evaluation runs that many steps), also for an env registered without a limit."""
    for env_id, steps in ((TINY_ID, 3), (TINY_ID, 10), (TINY_UNLIMITED_ID, 5)):
        env = make_env(f"gymnasium:{env_id}", 2, max_episode_steps=steps)
        assert env.max_episode_steps == steps
        env.reset(seed=0)
        truncated = [env.step(torch.zeros(2, 2))[3].all().item() for _ in range(steps)]
        assert truncated == [False] * (steps - 1) + [True]
        env.close()
    with pytest.raises(ValueError, match="no episode limit"):
        make_env(f"gymnasium:{TINY_UNLIMITED_ID}", 2)


@pytest.mark.parametrize("vectorization_mode", ["sync", "async"])
def test_adapter_reads_the_limit_of_a_ready_vector_env(vectorization_mode):
    ready = gym.make_vec(TINY_ID, 2, vectorization_mode, max_episode_steps=3)
    env = GymnasiumGoalVectorEnv(ready)
    assert env.max_episode_steps == 3
    env.close()


def test_adapter_takes_the_longest_limit_of_envs_that_differ():
    fns = [lambda steps=steps: gym.make(TINY_ID, max_episode_steps=steps) for steps in (3, 5)]
    assert GymnasiumGoalVectorEnv(SyncVectorEnv(fns)).max_episode_steps == 5


def test_adapter_takes_actions_that_require_grad():
    env = GymnasiumGoalVectorEnv(TINY_ID, 2)
    obs, _ = env.reset(seed=0)
    policy = torch.nn.Linear(env.obs_dim, env.action_dim)
    want = env.step(torch.tanh(policy(obs["observation"])).detach())
    env.reset(seed=0)
    assert_same(env.step(torch.tanh(policy(obs["observation"]))), want)
    env.close()


def test_adapter_outputs_are_copies():
    """A vector env made with copy=False reuses its observation arrays from step to step."""

    def make():
        return gym.wrappers.TransformObservation(
            gym.make(TINY_ID),
            lambda obs: {k: v.astype(np.float32) for k, v in obs.items()},
            gym.spaces.Dict(
                {
                    k: gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
                    for k in ("observation", "achieved_goal", "desired_goal")
                }
            ),
        )

    env = GymnasiumGoalVectorEnv(SyncVectorEnv([make, make], copy=False))
    obs, _ = env.reset(seed=0)
    first = {k: v.clone() for k, v in obs.items()}
    stepped = env.step(torch.ones(2, 2))[0]
    assert_same(obs, first)
    assert not torch.equal(stepped["achieved_goal"], first["achieved_goal"])
    env.close()


def test_adapter_renders_through_the_wrapped_env():
    class Rendering(TinyGoalEnv):
        metadata: ClassVar[dict] = {"render_modes": ["rgb_array"]}

        def __init__(self, render_mode=None):
            super().__init__()
            self.render_mode = render_mode

        def render(self):
            return np.zeros((4, 4, 3), np.uint8)

    fns = [lambda: Rendering(render_mode="rgb_array")] * 2
    env = GymnasiumGoalVectorEnv(SyncVectorEnv(fns))
    env.reset(seed=0)
    assert env.render_mode == "rgb_array" and len(env.render()) == 2


def test_adapter_metadata_keeps_the_wrapped_envs_render_settings():
    """Gymnasium's RecordVideo reads ``render_fps`` (30 without it), HumanRendering also
    ``render_modes``, from the outermost env's metadata."""

    class Rendering(TinyGoalEnv):
        metadata: ClassVar[dict] = {"render_modes": ["rgb_array"], "render_fps": 4}

    vector = SyncVectorEnv([Rendering] * 2, autoreset_mode=AutoresetMode.NEXT_STEP)
    env = GymnasiumGoalVectorEnv(vector)
    assert env.metadata["render_fps"] == 4 and env.metadata["render_modes"] == ["rgb_array"]
    assert env.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP  # what the adapter returns
    assert vector.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP  # left as it was


class _NumpyBoolSuccess(TinyGoalEnv):
    """Reports success as ``np.bool_``, as most hand-written envs do: Gymnasium's vector env
    collects such values into an object array."""

    def step(self, action):
        *out, info = super().step(action)
        return *out, {"is_success": np.bool_(info["is_success"])}


class _SilentReset(TinyGoalEnv):
    """Reports success at steps only (Fetch's reset info is empty): where every env ends in
    one step, the info holds the resets' infos, and success is in ``final_info`` alone."""

    def reset(self, *, seed=None, options=None):
        return super().reset(seed=seed, options=options)[0], {}


class _NoSuccess(_SilentReset):
    def step(self, action):
        return *super().step(action)[:4], {}


def test_adapter_reads_success_from_final_info_and_needs_some_success():
    fns = [lambda: TimeLimit(_SilentReset(), 6)] * 8
    env = GymnasiumGoalVectorEnv(SyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP))
    steps = adapter_rollout(env, 12)[1:]
    assert steps[5][3].all()  # every env ends at step 6
    for _, reward, _, _, info in steps:
        assert torch.equal(info["success"], reward == 0)
    silent = GymnasiumGoalVectorEnv(SyncVectorEnv([_NoSuccess] * 2))
    silent.reset(seed=0)
    with pytest.raises(ValueError, match=r"reports none of .* pass success_distance"):
        silent.step(torch.zeros(2, 2))


class _WideDesiredGoal(TinyGoalEnv):
    def __init__(self) -> None:
        super().__init__()
        box = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
        self.observation_space = gym.spaces.Dict(
            dict(self.observation_space) | {"desired_goal": box}
        )


def test_adapter_reads_numpy_bool_success_and_refuses_unequal_goal_widths():
    def rollout(env_class):
        env = GymnasiumGoalVectorEnv(SyncVectorEnv([env_class] * 16))
        return [info["success"] for *_, info in adapter_rollout(env, 60)[1:]]

    plain, numpy_bool = rollout(TinyGoalEnv), rollout(_NumpyBoolSuccess)
    assert sum(int(s.sum()) for s in plain) > 0
    for a, b in zip(plain, numpy_bool, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"desired_goal must be as wide as achieved_goal \(2\)"):
        GymnasiumGoalVectorEnv(SyncVectorEnv([_WideDesiredGoal] * 2))


class _SuccessLeftOut(TinyGoalEnv):
    def step(self, action):
        return *super().step(action)[:4], {"is_success": None}


class _SuccessOfTwoGoals(TinyGoalEnv):
    def step(self, action):
        return *super().step(action)[:4], {"is_success": np.array([True, False])}


class _SuccessAsText(TinyGoalEnv):
    def step(self, action):
        return *super().step(action)[:4], {"is_success": "False"}


@pytest.mark.parametrize(
    "envs",
    [
        [_SuccessLeftOut, _SuccessOfTwoGoals],  # an object array of None and an array
        [_SuccessOfTwoGoals] * 2,  # a (2, 2) bool array, which np.where broadcast
        [_SuccessAsText] * 2,  # strings, each non-empty: true
    ],
)
def test_adapter_names_a_success_that_is_not_one_flag(envs):
    """Success must be one boolean or number per env: an object array of arrays has no truth
    value (numpy's "ambiguous"), an array per env came out as a (num_envs, 2) success, and the
    text "False" as True."""
    env = GymnasiumGoalVectorEnv(SyncVectorEnv(envs))
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"info\['is_success'\] must hold booleans or numbers"):
        env.step(torch.zeros(2, 2))


class _UnboundedActions(TinyGoalEnv):
    def __init__(self) -> None:
        super().__init__()
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)


class _GridObservation(TinyGoalEnv):
    def __init__(self) -> None:
        super().__init__()
        grid = gym.spaces.Box(-np.inf, np.inf, (2, 2), np.float64)
        self.observation_space = gym.spaces.Dict(
            dict(self.observation_space) | {"observation": grid}
        )


@pytest.mark.parametrize(
    ("env", "match"),
    [
        (_UnboundedActions, "the action space must be bounded"),
        (_GridObservation, "observation must be a 1-D Box"),
    ],
)
def test_adapter_refuses_spaces_it_cannot_map(env, match):
    """[-1, 1] cannot be rescaled to an unbounded box; a 2-D observation has no width."""
    with pytest.raises(ValueError, match=match):
        GymnasiumGoalVectorEnv(SyncVectorEnv([env] * 2))


class _ViewPoint(FreePoint):
    """Moves its state in place and observes it without copies: an observation returned before
    a step would change with it."""

    def _advance(self, action):
        self.pos += 0.1 * action

    def _observe(self):
        return {"observation": self.pos, "achieved_goal": self.pos, "desired_goal": self.goal}


class _WideGoal(FreePoint):
    def _observe(self):
        return super()._observe() | {"achieved_goal": torch.zeros(self.num_envs, 3)}


class _OneRow(FreePoint):
    def _observe(self):
        return super()._observe() | {"desired_goal": self.goal[:1].clone()}


class _NoDesiredGoal(FreePoint):
    def _observe(self):
        return {k: v for k, v in super()._observe().items() if k != "desired_goal"}


class _DoubleObservation(FreePoint):
    def _observe(self):
        return super()._observe() | {"observation": self.pos.double()}


class _UnsavedState(FreePoint):
    """Its velocity is state a checkpoint would not save: resuming would change the run."""

    def _initial_state(self, draws):
        return super()._initial_state(draws) | {"vel": torch.zeros(self.num_envs, 2)}


class _GoalsAcross(FreePoint):
    """Keeps its goals as a (2, num_envs) tensor: a step's reset of the envs that end, a
    ``torch.where`` over the first dim, would mix coordinates (or fail inside torch)."""

    def _initial_state(self, draws):
        return super()._initial_state(draws) | {"goal": draws["xy"][1].T.clone()}

    def _observe(self):
        return super()._observe() | {"desired_goal": self.goal.T.clone()}


class _DrawsATensor(FreePoint):
    def _draw(self):
        return super()._draw()["xy"]

    def _initial_state(self, draws):
        return {"pos": draws[0], "goal": draws[1]}


@pytest.mark.parametrize(
    ("env", "error", "match"),
    [
        (_ViewPoint, ValueError, r"\['observation'\] shares memory with the state 'pos'"),
        (_WideGoal, ValueError, r"_WideGoal._observe\(\)\['achieved_goal'\] must be \(4, 2\)"),
        (_OneRow, ValueError, r"\['desired_goal'\] must be \(4, 2\) .* got \(1, 2\)"),
        (_DoubleObservation, TypeError, r"\['observation'\] must be a float32 tensor"),
        (_NoDesiredGoal, TypeError, r"keys .*, got \['achieved_goal', 'observation'\]"),
        (_UnsavedState, ValueError, r"_initial_state must return a dict whose keys are among"),
        (_GoalsAcross, ValueError, r"_initial_state\(\)\['goal'\] must be a tensor of 4 rows"),
        (_DrawsATensor, TypeError, r"_DrawsATensor._draw\(\) must return a dict .* got Tensor"),
    ],
)
def test_an_env_with_wrong_observations_is_refused_when_made(env, error, match):
    """Named at the first reset (the constructor's), not later as a buffer's shape error or,
    for views, never: the buffer would have stored s_{t+1} as s_t."""
    with pytest.raises(error, match=match):
        env(4, seed=0)


class _MisspeltAdvance(TorchGoalVectorEnv):
    """A point at the origin that defines ``advance``, not ``_advance``."""

    obs_dim, goal_dim, action_dim = 2, 2, 2
    _sim_keys = ("pos",)

    def __init__(self, num_envs, **kwargs):
        kwargs |= {"max_episode_steps": 5, "success_distance": 0.1, "terminate_on_success": False}
        super().__init__(num_envs, device="cpu", **kwargs)

    def _draw(self):
        return {}

    def _initial_state(self, draws):
        return {"pos": torch.zeros(self.num_envs, 2)}

    def advance(self, action):
        self.pos = self.pos + action

    def _observe(self):
        return {key: self.pos.clone() for key in GOAL_KEYS}


def test_an_env_missing_one_of_its_methods_is_named_when_made():
    """Without it the base class's empty method ran: a misspelt ``_advance`` made an env whose
    point never moved, trained without an error; a misspelt ``_observe`` was reported as
    ``_observe()`` returning None."""
    with pytest.raises(TypeError, match=r"_MisspeltAdvance .*abstract method '?_advance"):
        _MisspeltAdvance(4, seed=0)


class _RandomisedMass(FreePoint):
    """State drawn once after construction (domain randomisation), not at each reset."""

    _sim_keys = ("pos", "goal", "mass")

    def __init__(self, num_envs, **kwargs):
        super().__init__(num_envs, **kwargs)
        self.mass = torch.rand(num_envs, generator=self.generator, device=self.device) + 0.5


class _MisnamedState(FreePoint):
    _sim_keys = ("pos", "goal", "position")  # never set: the first checkpoint would fail


class _DoubleAfterAStep(FreePoint):
    def _advance(self, action):
        self.pos = (self.pos + 0.1 * action).double()


class _ReturnsItsState(FreePoint):
    """Returns its next state, as ``_initial_state`` does, rather than setting it: its point
    stood still, silently."""

    def _advance(self, action):
        return {"pos": (self.pos + 0.1 * action).clamp(0.0, 1.0)}


def test_a_state_saved_before_the_env_changed_names_the_env_and_the_keys():
    """Resuming a run after adding state to its env said only "state_dict keys must be [...],
    got [...]": neither which object refused it nor which key differed."""
    state = FreePoint(4, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"^_RandomisedMass.load_state_dict: .*missing \['mass'\]"):
        _RandomisedMass(4, seed=0).load_state_dict(state)
    state["pos"] = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"^FreePoint.load_state_dict: state_dict\['pos'\] has"):
        FreePoint(4, seed=0).load_state_dict(state)


@pytest.mark.parametrize(
    ("env", "error", "match"),
    [
        (_MisnamedState, ValueError, r"_sim_keys names \['position'\], which are not tensor"),
        (_DoubleAfterAStep, TypeError, r"\['observation'\] must be a float32 tensor"),
        (_ReturnsItsState, TypeError, r"_ReturnsItsState._advance\(\) must set the state"),
    ],
)
def test_an_env_whose_state_or_steps_go_wrong_is_refused_at_its_first_step(env, error, match):
    env = env(4, seed=0)
    with pytest.raises(error, match=match):
        env.step(torch.zeros(4, 2))


def test_state_set_after_the_first_reset_is_not_an_error():
    env = _RandomisedMass(4, seed=0)
    obs, _ = env.reset(seed=1)
    assert obs["observation"].shape == (4, 2) and "mass" in env.state_dict()


def test_adapter_appends_the_achieved_goal_and_overrides_success():
    plain = GymnasiumGoalVectorEnv(TINY_ID, 2)
    env = GymnasiumGoalVectorEnv(TINY_ID, 2, append_achieved_goal=True, success_distance=10.0)
    assert env.obs_dim == plain.obs_dim + env.goal_dim == 4
    assert env.single_observation_space["observation"].shape == (4,)
    obs, _ = env.reset(seed=0)
    assert torch.equal(obs["observation"][:, 2:], obs["achieved_goal"])
    for _ in range(6):  # through an episode end
        obs, _, _, truncated, info = env.step(torch.zeros(2, 2))
        final = info["final_obs"]
        assert torch.equal(obs["observation"][:, 2:], obs["achieved_goal"])
        assert torch.equal(final["observation"][:, 2:], final["achieved_goal"])
        assert info["success"].all()  # 10.0 overrides the env's is_success (0.3)
    assert truncated.all()
    env.close()
    plain.close()


def test_adapter_success_distance_measures_the_final_goal_distance():
    env = GymnasiumGoalVectorEnv(TINY_ID, 8, success_distance=1.0)
    success = []
    for *_, info in adapter_rollout(env, 12)[1:]:  # through episode ends
        final = info["final_obs"]
        distance = torch.linalg.vector_norm(final["achieved_goal"] - final["desired_goal"], dim=-1)
        assert torch.equal(info["success"], distance <= 1.0)
        success.append(info["success"])
    assert 0 < torch.cat(success).float().mean() < 1
    env.close()


@pytest.mark.parametrize("value", ["false", "yes", 1, None])
def test_adapter_refuses_an_append_achieved_goal_that_is_not_a_bool(value):
    # --env-kwargs '{"append_achieved_goal": "false"}' turned it on (any truthy value did)
    with pytest.raises(TypeError, match="append_achieved_goal must be True or False"):
        GymnasiumGoalVectorEnv(TINY_ID, 2, append_achieved_goal=value)


def test_adapter_hints_at_the_module_of_an_unknown_id():
    with pytest.raises(ValueError, match="'gymnasium_robotics:NoSuchGoalEnv-v0'"):
        GymnasiumGoalVectorEnv("NoSuchGoalEnv-v0", 2)
    with pytest.raises(ValueError, match="cannot make") as error:  # its module is named already
        GymnasiumGoalVectorEnv("gymnasium:NoSuchGoalEnv-v0", 2)
    assert "gymnasium_robotics" not in str(error.value)
    with pytest.raises(ValueError, match="not a goal env"):
        GymnasiumGoalVectorEnv("CartPole-v1", 2)


def test_adapter_without_an_env_is_collected_quietly(monkeypatch):
    """Gymnasium < 1.3's VectorEnv.__del__ closes an adapter whose env could not be made: no
    AttributeError ignored in ``__del__``."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(ValueError, match="cannot make"):
        GymnasiumGoalVectorEnv("gymnasium:NoSuchGoalEnv-v0", 2)
    gc.collect()  # the adapter sits in a cycle: its __init__'s frame and the error
    assert unraisable == []
