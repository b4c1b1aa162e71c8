"""The wheel ships the kernels as ``crl_fast.kernels`` (never a top-level ``kernels``, a name
that belongs to another PyPI package) and imports from outside the source tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout_and_import(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("crl_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    kernels = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert {f"crl_fast/kernels/{name}" for name in kernels} <= set(names), kernels
    assert not any(name.startswith("kernels/") for name in names)
    assert "crl_fast/py.typed" in names  # users' type checkers read the hints (PEP 561)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import crl_fast, crl_fast.kernels.pair_stats, crl_fast.kernels.goal_sampling, "
        "crl_fast.kernels.mlp; "
        "import crl_fast.envs, crl_fast.train, crl_fast.cli; print(crl_fast.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().startswith(str(site))


def test_loss_buffer_and_agent_need_no_rl_or_plot_packages():
    """A drop-in loss user installs the loss, not an RL stack: with gymnasium, matplotlib and
    tensorboard unimportable, the loss, the buffer and one agent update still run, and only the
    envs ask for gymnasium."""
    probe = """
import sys
for name in ("gymnasium", "matplotlib", "tensorboard", "jax"):
    sys.modules[name] = None  # any import of these fails
import torch
from crl_fast import CRL, AgentConfig, TrajectoryBuffer, contrastive_loss
phi, psi = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
contrastive_loss(phi, psi, loss="infonce", energy="norm").backward()
buffer = TrajectoryBuffer(capacity=16, num_envs=2, obs_dim=3, action_dim=2, goal_dim=2)
buffer.extend({
    "observation": torch.randn(4, 2, 3), "action": torch.rand(4, 2, 2) * 2 - 1,
    "next_achieved_goal": torch.randn(4, 2, 2),
    "terminated": torch.zeros(4, 2, dtype=torch.bool),
    "truncated": torch.zeros(4, 2, dtype=torch.bool),
})
agent = CRL(obs_dim=3, action_dim=2, goal_dim=2, config=AgentConfig(width=8, depth=1))
agent.update(buffer.sample(8))
try:
    import crl_fast.envs
except ImportError as error:
    print("envs:", error)
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "envs: " in out.stdout and "gymnasium" in out.stdout
