"""A user's type checker sees the public API's types: ``contrastive_loss`` and a
``ContrastiveLoss`` return a tensor, or a (tensor, metrics) pair with ``return_metrics=True``;
``make_env`` of a built-in name its env class. Runs mypy (the ``dev`` extra) on user code
beside the source tree."""

from __future__ import annotations

import inspect
import textwrap
import typing
from pathlib import Path

import pytest

from crl_fast import ContrastiveLoss, contrastive_loss
from crl_fast.envs import ENV_NAMES, PointMazeName, make_env

ROOT = Path(__file__).resolve().parents[1]

USER_CODE = """
from pathlib import Path
from typing import assert_type

import torch

from crl_fast import CRL, ContrastiveLoss, TrajectoryBuffer, contrastive_loss
from crl_fast.checkpoint import load_checkpoint, save_checkpoint
from crl_fast.envs import GoalObs, GoalVectorEnv, PointMazeEnv, ReacherEnv, make_env

Pair = tuple[torch.Tensor, dict[str, torch.Tensor]]
phi = torch.randn(8, 4, requires_grad=True)
psi = torch.randn(8, 4)
assert_type(contrastive_loss(phi, psi), torch.Tensor)
contrastive_loss(phi, psi, loss="infonce", energy="norm").backward()
loss, metrics = contrastive_loss(phi, psi, return_metrics=True)
assert_type(loss, torch.Tensor)
assert_type(metrics, dict[str, torch.Tensor])
flag: bool = bool(len(psi))
assert_type(contrastive_loss(phi, psi, return_metrics=flag), torch.Tensor | Pair)

# A module is called (nn.Module.__call__ alone would return Any), or its forward.
module = ContrastiveLoss("binary", "cosine", learn_scale=True)
assert_type(module(phi, psi), torch.Tensor)
assert_type(module(phi, psi, return_metrics=True), Pair)
assert_type(module(phi, psi, flag), torch.Tensor | Pair)
assert_type(module.forward(phi, psi, True), Pair)

buffer = TrajectoryBuffer(capacity=4, num_envs=2, obs_dim=3, action_dim=2, goal_dim=1)
assert_type(buffer.sample(4).goal, torch.Tensor)
assert_type(len(buffer), int)

assert_type(make_env("point_umaze", 2), PointMazeEnv)
assert_type(make_env("reacher", 2, seed=None), ReacherEnv)
name: str = "point_umaze"
assert_type(make_env(name, 2), GoalVectorEnv)
make_env("point_large", 2).compile()  # a torch env's: no narrowing needed
assert_type(make_env("point_open", 2).max_episode_steps, int)
obs: GoalObs = make_env("reacher", 2).reset()[0]

agent = CRL(3, 2, 1)
assert_type(agent.act(obs["observation"], obs["desired_goal"]), torch.Tensor)
batch = buffer.sample(4)
agent.update(batch)
agent.update((batch.observation, batch.action, batch.goal))  # any (obs, action, goal) triple
assert_type(save_checkpoint({}, Path("checkpoint.pt")), Path)
load_checkpoint(Path("checkpoint.pt"))
"""


def _mypy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str) -> tuple[str, int]:
    mypy_api = pytest.importorskip("mypy.api")
    source = tmp_path / "user.py"
    source.write_text(textwrap.dedent(code))
    # From the repository root: mypy finds crl_fast there (an editable install's import hook
    # is invisible to it), with the project's settings.
    monkeypatch.chdir(ROOT)
    stdout, stderr, status = mypy_api.run(
        [str(source), "--python-version", "3.11", "--cache-dir", str(ROOT / ".mypy_cache")]
    )
    return stdout + stderr, status


def test_public_api_types(tmp_path, monkeypatch):
    out, status = _mypy(tmp_path, monkeypatch, USER_CODE)
    assert status == 0, out


def test_a_wrong_use_is_reported(tmp_path, monkeypatch):
    """The check can fail: the metrics pair is not a tensor."""
    wrong = "contrastive_loss(phi, psi, return_metrics=True).backward()\n"
    out, status = _mypy(tmp_path, monkeypatch, USER_CODE + wrong)
    assert status == 1 and '"backward"' in out, out


@pytest.mark.skipif(not hasattr(typing, "get_overloads"), reason="Python >= 3.11")
@pytest.mark.parametrize(
    "function",
    [contrastive_loss, ContrastiveLoss.forward, make_env],
)
def test_overloads_take_the_implementations_parameters(function):
    """A parameter added to the implementation but not to its overloads would be refused by
    users' checkers."""
    overloads = typing.get_overloads(function)
    assert len(overloads) == 3

    def parameters(f):
        return [(p.name, p.kind) for p in inspect.signature(f).parameters.values()]

    for overload in overloads:
        assert parameters(overload) == parameters(function)


def test_make_env_literal_names_are_the_built_in_envs():
    """make_env's overloads type the built-in names as their classes: the same names."""
    assert {*typing.get_args(PointMazeName), "reacher"} == set(ENV_NAMES)
