"""The sdist builds the wheel; the wheel ships ``crl_fast`` alone, its kernels as
``crl_fast.kernels`` (never a top-level ``kernels``, a name that belongs to another PyPI package),
and imports from outside the source tree. What a user without Triton or gymnasium gets."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def build_backend_missing() -> str | None:
    """Why this environment cannot build crl-fast in-process (no build isolation: CI's and
    the GPU machine's have no network), or None: pyproject's build-system requirement unmet."""
    text = (ROOT / "pyproject.toml").read_text()
    (needed,) = re.findall(r'^requires = \["(setuptools[^"]*)"\]', text, flags=re.M)
    requirement = Requirement(needed)
    try:
        have = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return f"building needs {requirement}, which is not installed"
    if not requirement.specifier.contains(have):
        return f"building needs {requirement} (pyproject's build-system), this one has {have}"
    return None


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist built from the source tree, and the wheel built from that sdist."""
    if reason := build_backend_missing():
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("dist")
    build_sdist = f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"
    subprocess.run([sys.executable, "-c", build_sdist], cwd=ROOT, check=True, capture_output=True)
    (sdist,) = out.glob("crl_fast-*.tar.gz")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(sdist)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("crl_fast-*.whl")
    return sdist, wheel


def test_sdist_carries_the_test_suite(dists):
    """The whole test suite and the benchmarks it imports (setuptools alone took tests/test*.py
    without their helpers)."""
    sdist = dists[0]
    with tarfile.open(sdist) as tar:
        top = sdist.name.removesuffix(".tar.gz")
        carried = {name.removeprefix(f"{top}/") for name in tar.getnames()}
    suite = [p for folder in ("tests", "bench") for p in (ROOT / folder).glob("*.py")]
    suite.append(ROOT / "bench" / "gpu_check.sh")
    assert {p.relative_to(ROOT).as_posix() for p in suite} <= carried


def test_wheel_requires_triton_only_where_it_ships(dists):
    """Triton has wheels for Linux x86_64 and aarch64 only: elsewhere (macOS, Windows, Linux on
    other machines) crl-fast installs without it and the loss runs its PyTorch path."""
    wheel = zipfile.ZipFile(dists[1])
    (path,) = [name for name in wheel.namelist() if name.endswith(".dist-info/METADATA")]
    metadata = wheel.read(path).decode()
    requires = [Requirement(line.split(": ", 1)[1]) for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]  # fmt: skip
    (triton,) = [r for r in requires if r.name == "triton"]
    assert triton.marker is not None
    for system, machine, wanted in [
        ("Linux", "x86_64", True), ("Linux", "aarch64", True), ("Linux", "s390x", False),
        ("Linux", "ppc64le", False), ("Darwin", "arm64", False), ("Windows", "AMD64", False),
    ]:  # fmt: skip
        got = triton.marker.evaluate({"platform_system": system, "platform_machine": machine})
        assert got == wanted, (system, machine)


def test_wheel_layout_and_import(dists, tmp_path):
    wheel = dists[1]
    names = zipfile.ZipFile(wheel).namelist()
    kernels = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert {f"crl_fast/kernels/{name}" for name in kernels} <= set(names), kernels
    assert all(name.startswith(("crl_fast/", "crl_fast-")) for name in names), names
    assert "crl_fast/py.typed" in names  # users' type checkers read the hints (PEP 561)
    # MIT asks that copies carry the licence text: the wheel as the sdist (built from it)
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
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


def test_loss_buffer_and_agent_need_no_triton_rl_or_plot_packages():
    """A drop-in loss user installs the loss, not an RL stack, and maybe no Triton (macOS,
    Windows, ``pip install --no-deps``): with triton, gymnasium, matplotlib and tensorboard
    unimportable, the loss, the buffer and one agent update still run; ``backend="triton"``,
    the envs and ``crl-fast train`` name what to install."""
    probe = """
import sys
for name in ("triton", "gymnasium", "matplotlib", "tensorboard", "jax"):
    sys.modules[name] = None  # any import of these fails
import torch
from crl_fast import CRL, AgentConfig, TrajectoryBuffer, contrastive_loss
from crl_fast.cli import main
phi, psi = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
contrastive_loss(phi, psi, loss="infonce", energy="norm").backward()
buffer = TrajectoryBuffer(capacity=16, num_envs=2, obs_dim=3, action_dim=2, goal_dim=2,
                          device="cpu")  # the default, "auto", is CUDA on a GPU machine
buffer.extend({
    "observation": torch.randn(4, 2, 3), "action": torch.rand(4, 2, 2) * 2 - 1,
    "next_achieved_goal": torch.randn(4, 2, 2),
    "terminated": torch.zeros(4, 2, dtype=torch.bool),
    "truncated": torch.zeros(4, 2, dtype=torch.bool),
})
agent = CRL(obs_dim=3, action_dim=2, goal_dim=2, config=AgentConfig(width=8, depth=1))
agent.update(buffer.sample(8))
for what, call in [
    ("loss", lambda: contrastive_loss(phi, psi, backend="triton")),
    ("buffer", lambda: TrajectoryBuffer(
        capacity=4, num_envs=2, obs_dim=3, action_dim=2, goal_dim=2, backend="triton"
    )),
]:
    try:
        call()
    except ValueError as error:
        print(f"{what}:", error)
try:
    import crl_fast.envs
except ImportError as error:
    print("envs:", error)
try:
    main(["train", "--total-env-steps", "1"])
except SystemExit as stop:
    print("train exit:", stop.code)
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    for what in ("loss", "buffer"):
        assert "pip install 'triton" in lines.get(what, ""), out.stdout
    assert "pip install 'gymnasium" in lines.get("envs", ""), out.stdout
    assert lines.get("train exit") == "2", out.stdout
    assert "crl-fast train: error: " in out.stderr and "gymnasium" in out.stderr, out.stderr
