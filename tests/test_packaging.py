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
