"""The Triton kernels read no memory a GPU leaves undefined. Under the interpreter a masked
``tl.load`` without ``other=`` gives zeros and a fresh CPU tensor is often zeros too, so such a
read passes every other CPU test; here (``poison_undefined_memory``) both give NaN, and the
inputs sit between NaN rows of their allocation, so a read past their rows shows too. Every
result must then equal, bit for bit, the one of an ordinary run."""

from __future__ import annotations

import pytest
import torch

from crl_fast import TrajectoryBuffer, contrastive_loss
from crl_fast.fused_mlp import fused_mlp
from tests.helpers import poison_undefined_memory

pytestmark = pytest.mark.interpreter


def _between_nan_rows(t: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """A copy of ``t`` (2-D) stored between ``pad`` rows of NaN before and after it."""
    buf = torch.full((t.shape[0] + 2 * pad, t.shape[1]), float("nan"), dtype=t.dtype)
    buf[pad : pad + t.shape[0]] = t
    return buf[pad : pad + t.shape[0]]


def _poisoned_equals_clean(run, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run()`` (a tuple of tensors) gives the same bits with undefined memory poisoned."""
    want = run()
    with monkeypatch.context() as m:
        poison_undefined_memory(m)
        got = run()
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"output {i} changed: undefined memory was read"


def _loss_and_grads(phi, psi, **kw) -> tuple[torch.Tensor, ...]:
    """Loss, metrics and gradients of phi, psi, a learnable scale and bias."""
    leaves = [t.detach().clone().requires_grad_() for t in (torch.tensor(0.3), torch.tensor(-1.0))]
    phi, psi = (_between_nan_rows(t.detach()).requires_grad_() for t in (phi, psi))
    value, metrics = contrastive_loss(
        phi, psi, log_scale=leaves[0], bias=leaves[1], return_metrics=True, backend="triton", **kw
    )
    grads = torch.autograd.grad(value.sum(), [phi, psi, *leaves])
    return (value.detach(), *metrics.values(), *grads)


# Together: every kernel of pair_stats.py and each flag of theirs (the single pass, TMA, K in
# chunks, several gradient column tiles, the online sums, the metrics, both passes' diagonals).
LOSS_CASES = {
    "binary-dot": ({"loss": "binary", "energy": "dot"}, torch.bfloat16, 20, {}),
    "binary-none-l2": (
        {"loss": "binary", "energy": "l2", "reduction": "none"}, torch.float32, 33, {},
    ),
    "infonce-norm": (
        {"loss": "infonce", "energy": "norm", "logsumexp_penalty": 0.1}, torch.bfloat16, 20, {},
    ),
    "symmetric-l2-excluded": (
        {"loss": "symmetric_infonce", "energy": "l2", "exclude_positive_from_lse": True},
        torch.float32, 200, {},
    ),
    "dpo-cosine": ({"loss": "dpo", "energy": "cosine"}, torch.float16, 20, {}),
    "sppo-norm": ({"loss": "sppo", "energy": "norm"}, torch.bfloat16, 20, {}),
    "binary-norm-single-pass": (
        {"loss": "binary", "energy": "norm"}, torch.bfloat16, 20, {"CRL_FAST_SINGLE_PASS": "1"},
    ),
    "infonce-l2-tma": (
        {"loss": "infonce", "energy": "l2"}, torch.bfloat16, 24, {"CRL_FAST_TMA": "1"},
    ),
}  # fmt: skip


@pytest.mark.parametrize(("kw", "dtype", "d", "env"), LOSS_CASES.values(), ids=LOSS_CASES.keys())
def test_loss_kernels_read_no_undefined_memory(kw, dtype, d, env, monkeypatch):
    g = torch.Generator().manual_seed(0)
    phi = (torch.randn(70, d, generator=g) / d**0.5).to(dtype)
    psi = (torch.randn(90, d, generator=g) / d**0.5).to(dtype)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _poisoned_equals_clean(lambda: _loss_and_grads(phi, psi, **kw), monkeypatch)


@pytest.mark.parametrize("activation", ["swish", "relu"])
def test_mlp_kernels_read_no_undefined_memory(activation, monkeypatch):
    """37 rows (ragged against 16-row programs), inputs 5 + 6 wide, 48 hidden units (padded to
    64), 3 outputs: every mask of the three kernels."""
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 11), (48,), (48, 48), (48,), (3, 48), (3,)]
    params = [torch.randn(s, generator=g) / 4 for s in shapes]
    x1, x2 = torch.randn(37, 5, generator=g), torch.randn(37, 6, generator=g)

    def run() -> tuple[torch.Tensor, ...]:
        leaves = [_between_nan_rows(x) for x in (x1, x2)]
        leaves += [t.clone() for t in params]
        for t in leaves:
            t.requires_grad_()
        y = fused_mlp(leaves[:2], leaves[2:], activation)
        return (y.detach(), *torch.autograd.grad(y.square().sum(), leaves))

    _poisoned_equals_clean(run, monkeypatch)


@pytest.mark.parametrize("goal_mode", ["geometric", "uniform_future"])
def test_buffer_kernels_read_no_undefined_memory(goal_mode, monkeypatch):
    """Rows 19 wide (a 16-column chunk and a ragged one), 37 envs (ragged against 32-env
    programs), more steps than the capacity, episodes ending at random, goals of every kind
    (future, current, random)."""
    g = torch.Generator().manual_seed(0)
    steps, envs = 13, 37
    batch = {
        "observation": torch.randn(steps, envs, 11, generator=g),
        "action": torch.randn(steps, envs, 3, generator=g),
        "next_achieved_goal": torch.randn(steps, envs, 5, generator=g),
        "terminated": torch.rand(steps, envs, generator=g) < 0.2,
        "truncated": torch.rand(steps, envs, generator=g) < 0.1,
    }

    def run() -> tuple[torch.Tensor, ...]:
        buf = TrajectoryBuffer(
            capacity=10, num_envs=envs, obs_dim=11, action_dim=3, goal_dim=5, seed=1,
            goal_mode=goal_mode, random_goal_fraction=0.2, current_goal_fraction=0.2,
            backend="triton",
        )  # fmt: skip
        buf.extend(batch)
        return tuple(buf.sample(300))

    _poisoned_equals_clean(run, monkeypatch)
