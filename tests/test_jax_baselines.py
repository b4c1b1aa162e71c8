"""bench/jax_baselines.py computes what crl-fast computes: losses, goal law, update (needs jax)."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from bench import jax_baselines as jb  # noqa: E402
from crl_fast import reference_contrastive_loss  # noqa: E402
from crl_fast.agent import CRL  # noqa: E402
from crl_fast.buffer import GoalBatch  # noqa: E402
from crl_fast.config import AgentConfig  # noqa: E402
from tests.test_buffer import chi2_critical, chi_square  # noqa: E402

TINY = AgentConfig(
    width=32, depth=2, repr_dim=8, loss="infonce", energy="norm", logsumexp_penalty=0.1
)
OBS_DIM, ACTION_DIM, GOAL_DIM = 5, 2, 3


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def loss_grads_metrics(phi, psi, loss: str, energy: str, penalty: float):
    """The timed loss step and the critic metrics, compiled once per combo and dtype."""
    metrics = jb.critic_metrics(jb.pairwise_logits(phi, psi, energy))
    return jb.loss_and_grads(phi, psi, loss, energy, penalty), metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("combo", jb.LOSS_COMBOS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_loss_value_grads_and_metrics_match_reference(combo, dtype: str, seed: int) -> None:
    loss, energy, penalty = combo
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(24, 8, generator=g, dtype=getattr(torch, dtype), requires_grad=True)
    psi = torch.randn(24, 8, generator=g, dtype=getattr(torch, dtype), requires_grad=True)
    ref, ref_metrics = reference_contrastive_loss(
        phi, psi, loss=loss, energy=energy, logsumexp_penalty=penalty, return_metrics=True
    )
    ref_grads = torch.autograd.grad(ref, (phi, psi))
    with jax.enable_x64(dtype == "float64"):
        x, y = (jnp.asarray(t.detach().numpy()) for t in (phi, psi))
        (value, grads), metrics = loss_grads_metrics(x, y, loss, energy, penalty)
        assert value.dtype == jnp.dtype(dtype)
    tol = {"float32": 2e-5, "float64": 1e-12}[dtype]
    np.testing.assert_allclose(float(value), ref.item(), rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=tol, atol=tol)
    assert set(metrics) == set(ref_metrics)
    for name, want in ref_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), want.item(), rtol=tol, atol=tol)


def test_sampler_offsets_follow_our_truncated_geometric() -> None:
    gamma, steps, envs = 0.8, 60, 3000
    traj_id = np.arange(steps) // 25  # episodes 0..24, 25..49, 50..59 (cut by the window)
    obs = jnp.broadcast_to(jnp.arange(steps, dtype=jnp.float32)[:, None], (envs, steps, 1))
    sample = jax.jit(jb.sample_future_goals, static_argnums=(4, 5))
    _, _, goal = sample(
        jax.random.PRNGKey(0),
        obs,
        jnp.zeros((envs, steps, 1)),
        jnp.broadcast_to(jnp.asarray(traj_id), (envs, steps)),
        gamma,
        (0,),
    )
    anchor = np.arange(steps - 1)
    k = np.asarray(goal[..., 0]).astype(np.int64) - anchor  # offset of the goal, per draw
    last = np.array([np.flatnonzero(traj_id == e).max() for e in traj_id])
    length = np.broadcast_to(last[:-1] - anchor, k.shape)  # later steps of the same episode
    assert k.shape == (envs, steps - 1)
    assert ((k >= 0) & (k <= length)).all(), "goal outside the anchor's episode future"
    assert (k[length == 0] == 0).all(), "an anchor without a future draws itself"
    # JaxGCRL adds 1e-5 on the diagonal: a row with a future draws itself about 1e-5 of the time.
    assert (k[length > 0] == 0).mean() < 1e-3
    ok = k > 0
    stat, dof = chi_square(k[ok], length[ok], "geometric", gamma)
    crit = chi2_critical(dof)
    assert dof > 50
    assert stat < crit, f"chi2 {stat:.1f} > {crit:.1f} ({dof} dof)"
    for wrong in (np.minimum(k + 1, length), np.maximum(k - 1, 1)):  # one off: rejected
        assert chi_square(wrong[ok], length[ok], "geometric", gamma)[0] > 3 * crit


def linear_params(module: torch.nn.Module) -> jb.Params:
    """A torch MLP's Linear layers as the baseline's [(weight [in, out], bias)]."""
    return [
        (jnp.asarray(m.weight.detach().numpy().T), jnp.asarray(m.bias.detach().numpy()))
        for m in module.modules()
        if isinstance(m, torch.nn.Linear)
    ]


def actor_noise(key: jax.Array, steps: int, shape: tuple[int, int]) -> list[torch.Tensor]:
    """The Gaussian noise of each scanned update's actor step (crl_update's use of its key)."""
    out = []
    for _ in range(steps):
        key, noise_key = jax.random.split(key)
        out.append(torch.from_numpy(np.array(jax.random.normal(noise_key, shape))))
    return out


def test_scanned_updates_follow_our_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """From the same weights, batches and actor noise, every metric of every scanned update
    equals CRL.update's: the actor, alpha and critic steps and their Adam updates match."""
    torch.manual_seed(0)
    agent = CRL(OBS_DIM, ACTION_DIM, GOAL_DIM, TINY)
    state = jb.init_state(jax.random.PRNGKey(0), OBS_DIM, ACTION_DIM, GOAL_DIM, TINY)
    state["critic"] = {
        "sa": linear_params(agent.sa_encoder),
        "goal": linear_params(agent.goal_encoder),
    }
    state["actor"] = linear_params(agent.actor.net)
    steps, size = 3, 32
    batches = GoalBatch(
        torch.randn(steps, size, OBS_DIM),
        torch.rand(steps, size, ACTION_DIM) * 2 - 1,
        torch.randn(steps, size, GOAL_DIM),
    )
    noise = iter(actor_noise(state["key"], steps, (size, ACTION_DIM)))
    monkeypatch.setattr(torch, "randn_like", lambda x: next(noise))
    ours = [agent.update(GoalBatch(*(x[i] for x in batches))) for i in range(steps)]
    run = jax.jit(functools.partial(jb.train_updates, cfg=TINY))
    new_state, theirs = run(state, tuple(jnp.asarray(x.numpy()) for x in batches))

    assert set(theirs) == set(ours[0])
    for name, values in theirs.items():
        assert np.isfinite(np.asarray(values)).all(), name
        want = [m[name].item() for m in ours]
        np.testing.assert_allclose(np.asarray(values), want, rtol=1e-4, atol=1e-5, err_msg=name)
    assert float(new_state["critic_opt"]["t"]) == steps
    np.testing.assert_allclose(float(new_state["log_alpha"]), agent.log_alpha.item(), atol=1e-7)


def test_script_runs_and_writes_a_partial_run_of_its_own(tmp_path, monkeypatch, capsys) -> None:
    """The command line at tiny sizes: a partial run named with --name leaves jax-<device>.json
    (the full table) alone, and its JSON carries the run's facts and each row's calls and timer,
    as the other bench scripts' do."""
    import json
    import sys

    from bench import harness

    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    argv = ["jax_baselines", "--device", "cpu", "--loss-sizes", "32", "--update-sizes"]
    argv += ["--sampler-sizes", "--name", "jax-partial"]
    monkeypatch.setattr(sys, "argv", argv)
    jb.main()
    (path,) = tmp_path.glob("*.json")
    assert path.name.startswith("jax-partial-cpu-")
    result = json.loads(path.read_text())
    assert {"device", "jax", "git_sha", "date", "env_vars"} <= result["env"].keys()
    assert [row["status"] for row in result["rows"]] == ["ok", "ok"]
    # The repeat count and timer under the other bench scripts' names (it was "rep", no timer).
    assert all(row["calls"] >= 1 and row["timer"] for row in result["rows"])
    assert not any("rep" in row for row in result["rows"])
    out = capsys.readouterr().out
    assert "CPU figures" in out and "timed calls" in out


def test_timing_starts_after_the_gpu_was_kept_busy(monkeypatch) -> None:
    """The device idles while XLA compiles (over a minute for the norm energy at B = 16384):
    ``timed`` keeps it busy with the call itself for ``harness.WAKE_S`` before the timed calls,
    as ``harness.measure`` does for torch, so that a JAX baseline is not timed at idle clocks
    (two warm-up calls of a quarter millisecond do not wake a GPU)."""
    from bench import harness

    started = []
    measure = jb.measure

    def spy(fn, **kw):
        started.append(time.perf_counter())
        return measure(fn, **kw)

    monkeypatch.setattr(jb, "measure", spy)
    x = jnp.ones((8, 4))
    t0 = time.perf_counter()
    row = jb.timed(lambda a: a @ a.T, (x,), jax.devices("cpu")[0], budget_s=0.01)
    assert started[0] - t0 >= row["compile_s"] + harness.WAKE_S
