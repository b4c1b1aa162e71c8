"""A user's type checker sees the public API's types: ``contrastive_loss`` (and
``ContrastiveLoss.forward``) return a tensor, or a (tensor, metrics) pair with
``return_metrics=True``. Runs mypy (the ``dev`` extra) on user code beside the source tree."""

from __future__ import annotations

import inspect
import textwrap
import typing
from pathlib import Path

import pytest

from crl_fast import ContrastiveLoss, contrastive_loss

ROOT = Path(__file__).resolve().parents[1]

USER_CODE = """
import torch
from typing import assert_type
from crl_fast import ContrastiveLoss, TrajectoryBuffer, contrastive_loss

phi = torch.randn(8, 4, requires_grad=True)
psi = torch.randn(8, 4)
assert_type(contrastive_loss(phi, psi), torch.Tensor)
contrastive_loss(phi, psi, loss="infonce", energy="norm").backward()
loss, metrics = contrastive_loss(phi, psi, return_metrics=True)
assert_type(loss, torch.Tensor)
assert_type(metrics, dict[str, torch.Tensor])
flag: bool = bool(len(psi))
assert_type(
    contrastive_loss(phi, psi, return_metrics=flag),
    torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]],
)
module = ContrastiveLoss("binary", "cosine", learn_scale=True)
assert_type(module.forward(phi, psi), torch.Tensor)
assert_type(module.forward(phi, psi, True), tuple[torch.Tensor, dict[str, torch.Tensor]])
buffer = TrajectoryBuffer(capacity=4, num_envs=2, obs_dim=3, action_dim=2, goal_dim=1)
assert_type(buffer.sample(4).goal, torch.Tensor)
assert_type(len(buffer), int)
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
@pytest.mark.parametrize("function", [contrastive_loss, ContrastiveLoss.forward])
def test_overloads_take_the_implementations_parameters(function):
    """A parameter added to the implementation but not to its overloads would be refused by
    users' checkers."""
    overloads = typing.get_overloads(function)
    assert len(overloads) == 3

    def parameters(f):
        return [(p.name, p.kind) for p in inspect.signature(f).parameters.values()]

    for overload in overloads:
        assert parameters(overload) == parameters(function)
