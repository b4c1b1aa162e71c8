"""The kernel variants the library launches compile for sm_90, without a GPU: ``--quick``'s
sample (562 of the 2,393 distinct variants: every kernel and flag set in bfloat16, each tile
shape and flag value in float32 and float16, not every combination of them: 726 until
2026-12-07, which took 8.5 of CI's 21.6 minutes); ``python tests/compile_kernels.py`` without
``--quick`` builds them all.

The interpreter accepts code that the compiler rejects, so this is the only CPU-side check that
the kernels build for the H100 at all (see ``compile_kernels.py``). It runs in a subprocess
because the kernels must be imported with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_kernels.py")


@pytest.mark.slow
def test_the_quick_variants_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(SCRIPT), "--quick"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1500)
    failures = [line for line in run.stdout.splitlines() if not line.startswith("ok")]
    assert run.returncode == 0, "\n".join(failures[:40]) + run.stderr[-4000:]
    # The fused MLP's kernels specialise on the activation (ACT: 0 swish, 1 relu), each built.
    built = {(m[1], m[2]) for m in re.finditer(r"(\w+_kernel)\[\S*\] ACT=(\d)", run.stdout)}
    mlp = ("forward_kernel", "backward_data_kernel", "backward_weight_kernel")
    assert {(kernel, act) for kernel in mlp for act in "01"} <= built, sorted(built)
