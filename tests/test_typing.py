"""A user's type checker sees the public API's types: ``contrastive_loss`` returns a tensor, or a
(tensor, metrics) pair with ``return_metrics=True``. Runs mypy (the ``dev`` extra) on user code."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

ROOT = Path(__file__).resolve().parents[1]

USER_CODE = """
import torch
from typing import assert_type
from crl_fast import TrajectoryBuffer, contrastive_loss

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
buffer = TrajectoryBuffer(capacity=4, num_envs=2, obs_dim=3, action_dim=2, goal_dim=1)
assert_type(buffer.sample(4).goal, torch.Tensor)
assert_type(len(buffer), int)
"""


def _mypy(tmp_path: Path, code: str) -> tuple[str, int]:
    source = tmp_path / "user.py"
    source.write_text(textwrap.dedent(code))
    # The project's own settings (no --config-file): what a user's checker sees from outside.
    stdout, stderr, status = mypy_api.run(
        [str(source), "--python-version", "3.11", "--cache-dir", str(ROOT / ".mypy_cache")]
    )
    return stdout + stderr, status


def test_public_api_types(tmp_path):
    out, status = _mypy(tmp_path, USER_CODE)
    assert status == 0, out


def test_a_wrong_use_is_reported(tmp_path):
    """The check can fail: the metrics pair is not a tensor."""
    out, status = _mypy(
        tmp_path, USER_CODE + "contrastive_loss(phi, psi, return_metrics=True).backward()\n"
    )
    assert status == 1 and '"backward"' in out, out
