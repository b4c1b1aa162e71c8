"""TrajectoryBuffer: goal law (chi-square), episode/ring invariants, Triton == torch, state_dict."""

from __future__ import annotations

import bisect
import decimal
import io
import math
from typing import Any

import numpy as np
import pytest
import torch

from crl_fast.buffer import GoalBatch, TrajectoryBuffer
from tests.helpers import stderr_with_late_interpret

OBS, ACT, GOAL = 3, 2, 3
FUTURE_MODES = ("geometric", "clamp", "uniform_future", "final")
# The triton case runs the kernels on CPU tensors.
BACKENDS = ("torch", pytest.param("triton", marks=pytest.mark.interpreter))


class Recorder:
    """Feeds a buffer with rows that encode (step, env, episode) and keeps the ground truth.

    Row ``t`` of env ``e``: obs = (t, e, episode), action = (t, e), next_achieved_goal =
    (t + 1, e, episode), so a sampled goal names the row it was read from.
    """

    def __init__(self, buf: TrajectoryBuffer, done_prob: list[float], seed: int) -> None:
        self.buf, self.n = buf, buf.num_envs
        self.done_prob = np.asarray(done_prob)
        self.rng = np.random.default_rng(seed)
        self.episode = np.zeros(self.n, dtype=np.int64)
        self.done: list[np.ndarray] = []  # per step, [N] bool
        self.ep: list[np.ndarray] = []  # per step, [N] episode id

    @property
    def step(self) -> int:
        return len(self.done)

    def extend(self, steps: int) -> None:
        n, dev, dt = self.n, self.buf.device, self.buf.dtype
        done = self.rng.random((steps, n)) < self.done_prob
        term = done & (self.rng.random((steps, n)) < 0.5)
        ep = self.episode + np.cumsum(done, 0) - done
        self.episode += done.sum(0)
        self.done += list(done)
        self.ep += list(ep)
        t = np.arange(self.step - steps, self.step)[:, None].repeat(n, 1)
        e = np.arange(n)[None].repeat(steps, 0)

        def f(*cols: np.ndarray) -> torch.Tensor:
            return torch.tensor(np.stack(cols, -1), dtype=dt, device=dev)

        self.buf.extend(
            {
                "observation": f(t, e, ep),
                "action": f(t, e),
                "next_achieved_goal": f(t + 1, e, ep),
                "terminated": torch.tensor(term, device=dev),
                "truncated": torch.tensor(done & ~term, device=dev),
            }
        )

    def episode_end(self) -> np.ndarray:
        """[step, N]: the last row of each row's episode (newest row while it runs)."""
        done = np.asarray(self.done)
        end = np.empty_like(done, dtype=np.int64)
        nxt = np.full(self.n, self.step - 1)
        for t in range(self.step - 1, -1, -1):
            nxt = np.where(done[t], t, nxt)
            end[t] = nxt
        return end

    def decode(self, batch: GoalBatch) -> dict[str, np.ndarray]:
        obs, act, goal = (x.double().cpu().numpy().round().astype(np.int64) for x in batch)
        return {
            "t": obs[:, 0],
            "env": obs[:, 1],
            "ep": obs[:, 2],
            "act": act,
            "g": goal[:, 0] - 1,  # the row the goal was read from
            "g_env": goal[:, 1],
            "g_ep": goal[:, 2],
        }

    def check(self, batch: GoalBatch, mode: str, mix: str = "none") -> dict[str, np.ndarray]:
        """Assert the invariants of one sampled batch; return the decoded fields."""
        d = self.decode(batch)
        t, env, g = d["t"], d["env"], d["g"]
        oldest = max(0, self.step - self.buf.capacity)
        ep_hist = np.asarray(self.ep)
        assert ((oldest <= t) & (t < self.step)).all(), "anchor outside the stored window"
        assert (d["ep"] == ep_hist[t, env]).all() and (d["act"] == np.stack([t, env], 1)).all()
        assert ((oldest <= g) & (g < self.step)).all(), "goal row not stored"
        assert (d["g_ep"] == ep_hist[g, d["g_env"]]).all(), "goal row content is stale"
        if mix == "random":
            return d
        assert (d["g_env"] == env).all() and (d["g_ep"] == d["ep"]).all(), (
            "goal from another episode"
        )
        if mix == "current":
            prev_ok = (t - 1 >= oldest) & (ep_hist[np.maximum(t - 1, 0), env] == d["ep"])
            assert (g == np.where(prev_ok, t - 1, t)).all()
            return d
        end = self.episode_end()[t, env]
        assert ((t <= g) & (g <= end)).all(), "goal outside the anchor's future"
        if mode == "final":
            assert (g == end).all()
        d["k"], d["L"] = g - t + 1, end - t + 1
        return d


def assert_same_contents(a: TrajectoryBuffer, b: TrajectoryBuffer) -> None:
    """The two buffers hold the same rows, flags and episode bookkeeping."""
    sa, sb = a.state_dict(), b.state_dict()
    for key in ("rows", "terminated", "truncated", "segment", "segment_end", "open_segment"):
        assert torch.equal(sa[key], sb[key]), key


def make(capacity: int = 17, num_envs: int = 6, **kw: object) -> TrajectoryBuffer:
    kw.setdefault("device", "cpu")
    kw.setdefault("seed", 0)
    return TrajectoryBuffer(
        capacity=capacity, num_envs=num_envs, obs_dim=OBS, action_dim=ACT, goal_dim=GOAL, **kw
    )


# ---------------------------------------------------------------- law of the offset k


def offset_pmf(mode: str, gamma: float, length: int) -> np.ndarray:
    k = np.arange(1, length + 1)
    if mode == "geometric":
        return (1 - gamma) * gamma ** (k - 1) / (1 - gamma**length)
    if mode == "clamp":
        p = (1 - gamma) * gamma ** (k - 1)
        p[-1] = gamma ** (length - 1)
        return p
    return np.full(length, 1.0 / length)


def pearson(observed: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom, consecutive cells pooled to expected counts >= 5
    (a remainder joins the last pool)."""
    bins_o, bins_e, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(observed, expected, strict=True):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            bins_o.append(acc_o)
            bins_e.append(acc_e)
            acc_o = acc_e = 0.0
    if not bins_e:
        return 0.0, 0
    bins_o[-1] += acc_o
    bins_e[-1] += acc_e
    o, e = np.asarray(bins_o), np.asarray(bins_e)
    return float(((o - e) ** 2 / e).sum()), len(bins_e) - 1


def chi_square(k: np.ndarray, lengths: np.ndarray, mode: str, gamma: float) -> tuple[float, int]:
    """Pearson statistic of k against its pmf given L, cells pooled to expected counts >= 5."""
    stat, dof = 0.0, 0
    for length in np.unique(lengths):
        ks = k[lengths == length]
        obs = np.bincount(ks - 1, minlength=length)[:length].astype(float)
        s, d = pearson(obs, offset_pmf(mode, gamma, length) * len(ks))
        stat, dof = stat + s, dof + d
    return stat, dof


def chi2_critical(dof: int, z: float = 3.0902) -> float:
    """Upper 0.999 quantile of chi-square(dof), Wilson-Hilferty (no scipy needed)."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def check_offset_law(mode: str, device: str) -> None:
    gamma = 0.8
    buf = make(capacity=64, num_envs=4, gamma=gamma, device=device)
    rec = Recorder(buf, [0.02, 0.08, 0.2, 0.0], seed=1)
    rec.extend(150)  # wrapped twice; env 3 is one long running episode
    d = rec.check(buf.sample(200_000, goal_mode=mode), mode)
    stat, dof = chi_square(d["k"], d["L"], mode, gamma)
    crit = chi2_critical(dof)
    assert dof > 50
    assert stat < crit, f"{mode}: chi2 {stat:.1f} > {crit:.1f} ({dof} dof)"
    # The same statistic rejects an offset that is one off (too far, or too near).
    for wrong in (np.minimum(d["k"] + 1, d["L"]), np.maximum(d["k"] - 1, 1)):
        assert chi_square(wrong, d["L"], mode, gamma)[0] > 3 * crit


@pytest.mark.parametrize("mode", ["geometric", "clamp", "uniform_future"])
def test_offset_law_chi_square(mode: str) -> None:
    check_offset_law(mode, "cpu")


# ---------------------------------------------------------------- invariants over the ring

DONE_PATTERNS = [0.0, 0.01, 0.1, 0.3, 0.9, 1.0]  # never ends, long, ..., every step ends


def run_invariants(device: str, backend: str, rounds: int, batch: int) -> None:
    rng = np.random.default_rng(7)
    buf = make(capacity=17, num_envs=len(DONE_PATTERNS), gamma=0.9, device=device, backend=backend)
    rec = Recorder(buf, DONE_PATTERNS, seed=3)
    for r in range(rounds):
        rec.extend(int(rng.integers(1, 41)))  # sometimes more than the capacity
        assert len(buf) == min(rec.step, 17) * buf.num_envs
        mode = FUTURE_MODES[r % 4]
        rec.check(buf.sample(batch, goal_mode=mode), mode)
        rec.check(buf.sample(batch, random_goal_fraction=1.0), mode, mix="random")
        rec.check(buf.sample(batch, current_goal_fraction=1.0), mode, mix="current")


def test_invariants_over_wraparound() -> None:
    run_invariants("cpu", "torch", rounds=120, batch=512)


@pytest.mark.interpreter
def test_invariants_over_wraparound_triton_interpreter() -> None:
    """The goal-sampling kernel under the interpreter (the CUDA run is a GPU test)."""
    pytest.importorskip("triton")
    run_invariants("cpu", "triton", rounds=12, batch=256)


@pytest.mark.parametrize("steps", [7, 33])  # partly filled, and wrapped
def test_anchors_uniform_over_stored_transitions(steps: int) -> None:
    buf = make(capacity=10, num_envs=4)
    rec = Recorder(buf, [0.0, 0.1, 0.5, 1.0], seed=0)
    rec.extend(steps)
    d = rec.decode(buf.sample(40_000))
    oldest = max(0, steps - 10)
    counts = np.bincount((d["t"] - oldest) * 4 + d["env"], minlength=len(buf))
    assert counts.size == len(buf)
    expected = 40_000 / len(buf)
    dof = len(buf) - 1
    assert ((counts - expected) ** 2 / expected).sum() < chi2_critical(dof)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_stored_in_other_dtypes(backend: str, dtype: torch.dtype) -> None:
    """Step numbers up to 60 are exact in each dtype: the goals still decode to their rows."""
    buf = make(capacity=9, num_envs=3, dtype=dtype, backend=backend)
    rec = Recorder(buf, [0.0, 0.2, 1.0], seed=0)
    for _ in range(3):
        rec.extend(20)
        for mode in FUTURE_MODES:
            batch = buf.sample(64, goal_mode=mode)
            assert {x.dtype for x in batch} == {dtype}
            rec.check(batch, mode)


def test_single_step_extends_and_short_buffer() -> None:
    buf = make(capacity=5, num_envs=3, gamma=0.5)
    rec = Recorder(buf, [0.0, 0.4, 1.0], seed=0)
    for _ in range(23):
        rec.extend(1)
        for mode in FUTURE_MODES:
            rec.check(buf.sample(64, goal_mode=mode), mode)


def test_mixing_fractions() -> None:
    buf = make(capacity=40, num_envs=8, goal_mode="final")
    rec = Recorder(buf, [0.05] * 8, seed=2)
    rec.extend(100)
    n = 40_000
    d = rec.decode(buf.sample(n, random_goal_fraction=0.5))
    assert abs((d["g_env"] != d["env"]).mean() - 0.5 * 7 / 8) < 0.02
    d = rec.decode(buf.sample(n, current_goal_fraction=0.3))
    ep = np.asarray(rec.ep)[-40:]
    prev_ok = (ep[1:] == ep[:-1]).sum() / ep.size  # rows whose step t-1 is stored and the same ep
    assert abs((d["g"] == d["t"] - 1).mean() - 0.3 * prev_ok) < 0.02
    d = rec.decode(buf.sample(n, random_goal_fraction=0.4, current_goal_fraction=0.3))
    assert abs((d["g_env"] != d["env"]).mean() - 0.4 * 7 / 8) < 0.02
    mine = d["g_env"] == d["env"]  # a random goal from the anchor's own env can be anywhere
    assert abs(((d["g"] == d["t"] - 1) & mine).mean() - 0.3 * prev_ok) < 0.02
    with pytest.raises(ValueError, match="at most 1"):
        buf.sample(8, random_goal_fraction=0.6, current_goal_fraction=0.6)


def test_mixing_is_drawn_per_goal() -> None:
    """Each goal is mixed in with its fraction's probability, independently of the others: a
    batch holds Binomial(batch, fraction) of them, not a fixed share. One running 2-step
    episode, 'final' goals: a goal from row 0 is exactly a current-state goal."""
    buf = make(capacity=2, num_envs=1, goal_mode="final")
    batch = good_batch(steps=2, n=1)
    batch["next_achieved_goal"][:, 0] = torch.tensor([[0.0], [1.0]])
    buf.extend(batch)
    size, calls, frac = 10, 3000, 0.3
    counts = [
        int((buf.sample(size, current_goal_fraction=frac).goal[:, 0] == 0).sum())
        for _ in range(calls)
    ]
    observed = np.bincount(counts, minlength=size + 1).astype(float)
    binomial = [math.comb(size, i) * frac**i * (1 - frac) ** (size - i) for i in range(size + 1)]
    stat, dof = pearson(observed, np.array(binomial) * calls)
    assert stat < chi2_critical(dof), (stat, dof)


def test_mixing_fractions_from_float32_may_sum_to_one() -> None:
    """0.2 and 0.8 held in float32 (numpy, ``tensor.item()``) sum to 1 + 1.5e-8 in float64, the
    samplers' float32 thresholds to 1: the mix is accepted, and a sum over 1 names both parts."""
    r, c = np.float32(0.2), np.float32(0.8)
    buf = make(random_goal_fraction=r, current_goal_fraction=c)
    buf.extend(good_batch())
    batch = buf.sample(8, random_goal_fraction=r.item(), current_goal_fraction=c.item())
    assert batch.goal.shape == (8, GOAL)
    with pytest.raises(ValueError, match=r"at most 1, got 0\.5 \+ 0\.6 = 1\.1"):
        buf.sample(8, random_goal_fraction=0.5, current_goal_fraction=0.6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixing_uniform_against_the_fractions(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 24-bit mixing uniform u picks a random goal where u < random_goal_fraction, the
    current state's where u < the fractions' sum, else the future one: strictly, so a fraction
    of 0 gives no goal of its kind (u = 0 included)."""
    if backend == "triton":
        pytest.importorskip("triton")
    buf = make(capacity=4, num_envs=2, backend=backend)
    batch = good_batch(steps=4, n=2)
    steps = torch.arange(4, dtype=torch.float32)[:, None] * 10 + torch.arange(2)  # t * 10 + env
    batch["next_achieved_goal"] = steps[..., None].expand(4, 2, GOAL).clone()
    buf.extend(batch)
    u_mix = torch.tensor([0, 2**23 - 1, 2**23, 3 * 2**22 - 1, 3 * 2**22, 2**24 - 1])
    bits = torch.zeros(u_mix.numel(), 3, dtype=torch.int64)
    bits[:, 0] = 4  # anchor: step 2 of env 0
    bits[:, 1] = 7  # random goal: step 3 of env 1
    bits[:, 2] = u_mix << 38  # offset uniform 0: k = 1, the anchor's own row
    monkeypatch.setattr(torch, "randint", lambda *args, **kw: bits.clone())
    goal = buf.sample(6, random_goal_fraction=0.5, current_goal_fraction=0.25).goal[:, 0]
    assert goal.tolist() == [31, 31, 10, 10, 20, 20]  # random, current (row 1), future
    assert buf.sample(6).goal[:, 0].tolist() == [20] * 6


def goal_law(
    rec: Recorder, mode: str, gamma: float, f_rand: float, f_cur: float
) -> dict[tuple[int, int, int, int], float]:
    """The exact probability of each (anchor step, env, goal row, goal env), enumerated from what
    ``rec`` wrote: anchors uniform over the stored rows; with probability ``f_rand`` the goal of
    a uniformly drawn stored row (rho(g)), with ``f_cur`` the anchor's own state (row t - 1 when
    stored and of its episode, else row t), else row t + k - 1 with k from ``mode``'s law on
    1..L (L reaching the episode's last row, the newest while it runs)."""
    oldest = max(0, rec.step - rec.buf.capacity)
    stored = [(t, e) for t in range(oldest, rec.step) for e in range(rec.n)]
    end, ep = rec.episode_end(), np.asarray(rec.ep)
    law: dict[tuple[int, int, int, int], float] = {}

    def add(key: tuple[int, int, int, int], p: float) -> None:
        law[key] = law.get(key, 0.0) + p

    p = 1.0 / len(stored)
    for t, e in stored:
        length = int(end[t, e]) - t + 1
        pmf = np.eye(length)[-1] if mode == "final" else offset_pmf(mode, gamma, length)
        for k in range(1, length + 1):
            add((t, e, t + k - 1, e), p * (1 - f_rand - f_cur) * pmf[k - 1])
        prev_ok = t > oldest and ep[t - 1, e] == ep[t, e]
        add((t, e, t - int(prev_ok), e), p * f_cur)
        for g, g_env in stored:
            add((t, e, g, g_env), p * f_rand / len(stored))
    return law


def joint_chi_square(
    d: dict[str, np.ndarray], law: dict[tuple[int, int, int, int], float]
) -> tuple[float, int]:
    """Pearson statistic of the decoded draws ``d`` against ``law``, one cell per (anchor, goal)
    pair; a draw the law gives probability 0 makes it infinite."""
    cells = {key: i for i, key in enumerate(key for key, p in law.items() if p > 0)}
    drawn = np.stack([d["t"], d["env"], d["g"], d["g_env"]], 1).tolist()
    idx = np.array([cells.get(tuple(key), -1) for key in drawn])
    observed = np.bincount(idx[idx >= 0], minlength=len(cells)).astype(float)
    stat, dof = pearson(observed, np.array([law[key] for key in cells]) * len(idx))
    return (stat if (idx >= 0).all() else math.inf), dof


@pytest.mark.parametrize(
    ("backend", "mix"),
    [
        ("torch", (0.0, 0.0)),
        ("torch", (0.3, 0.2)),
        # The interpreter is slow: the mixed law covers the future goals too.
        pytest.param("triton", (0.3, 0.2), marks=pytest.mark.interpreter),
    ],
)
@pytest.mark.parametrize("mode", FUTURE_MODES)
def test_joint_law_of_anchor_and_goal(backend: str, mode: str, mix: tuple[float, float]) -> None:
    """Every (anchor, goal row) pair drawn as often as the exact law says, the law enumerated
    from the rows written: across the ring seam, with episodes of 1, 2 and more steps, one that
    began before the oldest row and runs past the newest, and random (rho(g): uniform over
    stored rows) and current-state goals mixed in. The same draws with each goal of the anchor's
    env one row nearer the anchor (not before it) are rejected: an off-by-one would be."""
    if backend == "triton":
        pytest.importorskip("triton")
    f_rand, f_cur = mix
    gamma = 0.7
    buf = make(capacity=6, num_envs=4, gamma=gamma, backend=backend)
    rec = Recorder(buf, [0.0, 1.0, 0.5, 0.25], seed=11)
    rec.extend(4)
    rec.extend(7)  # wrapped: steps 5..10 stored
    n = 100_000 if backend == "torch" else 16_000
    batch = buf.sample(
        n, goal_mode=mode, random_goal_fraction=f_rand, current_goal_fraction=f_cur,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    d = rec.decode(batch)
    law = goal_law(rec, mode, gamma, f_rand, f_cur)
    stat, dof = joint_chi_square(d, law)
    crit = chi2_critical(dof)
    assert stat < crit, f"chi2 {stat:.1f} > {crit:.1f} ({dof} dof)"
    own_env = d["g_env"] == d["env"]
    nearer = d | {"g": np.where(own_env, np.maximum(d["g"] - 1, d["t"]), d["g"])}
    assert joint_chi_square(nearer, law)[0] > 3 * crit


# ---------------------------------------------------------------- Triton kernels == torch


def assert_same_sample(a: GoalBatch, b: GoalBatch, max_moved: int) -> None:
    """Identical anchors; goals identical except at most ``max_moved`` offsets one step apart
    within the same episode (a log1p/expm1 that rounds differently, at a boundary)."""
    assert torch.equal(a.observation, b.observation) and torch.equal(a.action, b.action)
    same = (a.goal == b.goal).all(1)
    moved = ~same
    diff = (a.goal[moved] - b.goal[moved]).abs()
    assert (diff[:, 0] == 1).all() and (diff[:, 1:] == 0).all(), "not one step, same episode"
    assert int(moved.sum()) <= max_moved


@pytest.mark.interpreter
def test_triton_matches_torch_cpu() -> None:
    """Both kernels under TRITON_INTERPRET=1 reproduce the torch path: the bookkeeping bit for
    bit, the offsets too."""
    pytest.importorskip("triton")
    bufs = [make(capacity=7, num_envs=5, backend=b, gamma=0.7) for b in ("torch", "triton")]
    recs = [Recorder(b, [0.0, 0.2, 0.5, 1.0, 0.1], seed=4) for b in bufs]
    for r, steps in enumerate([1, 3, 9, 2, 1]):
        for rec in recs:
            rec.extend(steps)
        assert_same_contents(*bufs)
        mode = FUTURE_MODES[r % 4]
        kw = {"goal_mode": mode, "random_goal_fraction": 0.2, "current_goal_fraction": 0.2}
        a, b = (buf.sample(48, generator=torch.Generator().manual_seed(r), **kw) for buf in bufs)
        recs[0].check(a, mode, mix="random")
        recs[1].check(b, mode, mix="random")
        assert_same_sample(a, b, max_moved=0)


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.interpreter),
        pytest.param("cuda", marks=pytest.mark.gpu),
    ],
)
def test_triton_matches_torch_with_every_size_one(device: str) -> None:
    """One env, one row, one column per field, one draw, and extends that drop 0, 1 and 2 steps:
    compiled, Triton makes constants of ints equal to 1 (a path only a GPU runs). Bookkeeping
    and batches as torch's, bit for bit (a one-row episode leaves one offset: none can move)."""
    pytest.importorskip("triton")
    dims = {"obs_dim": 1, "action_dim": 1, "goal_dim": 1}
    bufs = [
        TrajectoryBuffer(capacity=1, num_envs=1, device=device, seed=0, backend=b, **dims)
        for b in ("torch", "triton")
    ]
    g = torch.Generator().manual_seed(0)
    for r, steps in enumerate([1, 2, 3, 1]):
        batch = {k: torch.randn(steps, 1, 1, generator=g) for k in ("observation", "action")}
        batch["next_achieved_goal"] = torch.randn(steps, 1, 1, generator=g)
        batch |= {k: torch.rand(steps, 1, generator=g) < 0.5 for k in ("terminated", "truncated")}
        for buf in bufs:
            buf.extend({k: v.to(device) for k, v in batch.items()})
        assert_same_contents(*bufs)
        for mode in FUTURE_MODES:
            kw = {"goal_mode": mode, "random_goal_fraction": 0.3, "current_goal_fraction": 0.3}
            a, b = (
                buf.sample(1, generator=torch.Generator(device).manual_seed(r), **kw)
                for buf in bufs
            )
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), mode


@pytest.mark.parametrize("backend", BACKENDS)
def test_episode_ending_at_step_zero(backend: str) -> None:
    """An episode that ends at the buffer's very first step is closed: its final goal is its own
    (step 0's next state), not that of a later step of the env."""
    if backend == "triton":
        pytest.importorskip("triton")
    buf = make(capacity=10, num_envs=2, backend=backend)
    steps = torch.arange(5, dtype=torch.float32)[:, None] * 10 + torch.arange(2)  # t * 10 + env
    terminated = torch.zeros(5, 2, dtype=torch.bool)
    terminated[0, 0] = True
    buf.extend(
        {
            "observation": steps[..., None].expand(5, 2, OBS).clone(),
            "action": torch.zeros(5, 2, ACT),
            "next_achieved_goal": (1000 + steps)[..., None].expand(5, 2, GOAL).clone(),
            "terminated": terminated,
            "truncated": torch.zeros(5, 2, dtype=torch.bool),
        }
    )
    batch = buf.sample(2000, goal_mode="final", generator=torch.Generator().manual_seed(0))
    first = batch.observation[:, 0] == 0  # anchors at step 0 of env 0
    assert first.any()
    assert (batch.goal[first, 0] == 1000).all()
    later = batch.observation[:, 0] == 10  # step 1 of env 0: its episode runs on to step 4
    assert later.any()
    assert (batch.goal[later, 0] == 1040).all()


@pytest.mark.interpreter
def test_triton_matches_torch_cpu_gamma_near_one() -> None:
    """gamma = 0.9999 over long episodes: the same offsets (in float32, numpy's exp/log against
    torch's moved 4 of these 100k draws one step; in float64, none of 300k with 3 seeds)."""
    pytest.importorskip("triton")
    bufs = [make(capacity=3000, num_envs=2, backend=b, gamma=0.9999) for b in ("torch", "triton")]
    Recorder(bufs[0], [1 / 7, 0.0], seed=1).extend(3000)
    bufs[1].load_state_dict(bufs[0].state_dict())  # the interpreter's extend is slow
    gen = [torch.Generator().manual_seed(1) for _ in bufs]
    a, b = (buf.sample(100_000, generator=g) for buf, g in zip(bufs, gen, strict=True))
    assert_same_sample(a, b, max_moved=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_geometric_offset_exact_for_gamma_near_one(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gamma = 0.99999, 2-step episodes: P(k = 1) = 1 / (1 + gamma). The float32 inverse CDF
    ``log(1 - u (1 - gamma^L))`` cancels (0.4986); ``log1p(u expm1(L log gamma))`` does not.
    Every 2**22-th of the 2**38 offset uniforms, so the fraction is exact to 1.5e-5."""
    if backend == "triton":
        pytest.importorskip("triton")
    gamma = 0.99999
    buf = make(capacity=4, num_envs=1, gamma=gamma, backend=backend)
    t = torch.arange(4, dtype=torch.float32)[:, None, None]
    buf.extend(
        {
            "observation": t.expand(4, 1, OBS).contiguous(),
            "action": t.expand(4, 1, ACT).contiguous(),
            "next_achieved_goal": t.expand(4, 1, GOAL).contiguous(),
            "terminated": torch.tensor([[False], [True], [False], [True]]),
            "truncated": torch.zeros(4, 1, dtype=torch.bool),
        }
    )
    u = torch.arange(0, 2**38, 2**22, dtype=torch.int64)
    bits = torch.zeros(u.numel(), 3, dtype=torch.int64)  # anchor row 0 (L = 2), no mixing
    bits[:, 2] = u | (0xFFFFFF << 38)
    monkeypatch.setattr(torch, "randint", lambda *args, **kw: bits.clone())
    batch = buf.sample(u.numel())
    assert (batch.observation[:, 0] == 0).all()
    p1 = (batch.goal[:, 0] == 0).double().mean().item()  # k = 1: the goal from row 0
    assert (batch.goal[:, 0] <= 1).all()
    assert abs(p1 - 1 / (1 + gamma)) < 1e-4, p1


def _first_uniforms(mode: str, gamma: float, length: int, ks: list[int]) -> list[int]:
    """For each offset k of ``mode``'s law on 1..length, the least 38-bit uniform (times 2**38)
    that draws it: ceil(F(k - 1) 2**38), with F the law's CDF in 50-digit decimals."""
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        gamma = decimal.Decimal(gamma)
        cdf = {
            "geometric": lambda k: (1 - gamma**k) / (1 - gamma**length),
            "clamp": lambda k: 1 - gamma**k,
            "uniform_future": lambda k: decimal.Decimal(k) / length,
        }[mode]
        return [math.ceil(cdf(k - 1) * 2**38) for k in ks]


@pytest.mark.parametrize(
    ("device", "backend"),
    [
        ("cpu", "torch"),
        pytest.param("cpu", "triton", marks=pytest.mark.interpreter),
        pytest.param("cuda", "auto", marks=pytest.mark.gpu),
    ],
)
@pytest.mark.parametrize(
    ("mode", "gamma", "length"),
    [
        ("geometric", 0.9999, 100_000),
        ("clamp", 0.9999, 100_000),
        ("uniform_future", 0.9, 10**6),
        ("geometric", 0.999999, 10**6),
        ("clamp", 0.999999, 10**6),
    ],
)
def test_offsets_switch_where_the_exact_law_says(
    device: str,
    backend: str,
    mode: str,
    gamma: float,
    length: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Offset k takes the 38-bit uniforms u in [F(k - 1), F(k)) (F the law's CDF, computed to 50
    digits): two steps of 2**-38 inside each side of boundaries near the episode's start, middle
    and end give k - 1 and k, on a long episode (float32 and 24 bits never drew this geometric
    law's far offsets, and gave uniform ones over 1e6 steps up to 5% too much or too little)."""
    if backend == "triton":
        pytest.importorskip("triton")
    ref = make(capacity=length, num_envs=1, gamma=gamma, device=device)
    t = torch.arange(length, dtype=torch.float32, device=device)[:, None, None]
    flags = torch.zeros(length, 1, dtype=torch.bool, device=device)
    ref.extend(
        {
            "observation": t.expand(length, 1, OBS),
            "action": t.expand(length, 1, ACT),
            "next_achieved_goal": t.expand(length, 1, GOAL),  # goal = row = offset - 1
            "terminated": flags,
            "truncated": flags,  # one episode, still running: it ends at the newest step
        }
    )
    buf = make(capacity=length, num_envs=1, gamma=gamma, device=device, backend=backend)
    buf.load_state_dict(ref.state_dict())
    ks = [2, 3, 50, length // 2, length - 1, length]
    edges = _first_uniforms(mode, gamma, length, ks)  # gamma as given, not as stored
    u = torch.tensor([q + d for q in edges for d in (-2, 1)], dtype=torch.int64)
    bits = torch.zeros(u.numel(), 3, dtype=torch.int64, device=device)  # anchor 0, no mixing
    bits[:, 2] = u.to(device) | (0xFFFFFF << 38)
    monkeypatch.setattr(torch, "randint", lambda *args, **kw: bits.clone())
    got = buf.sample(u.numel(), goal_mode=mode).goal[:, 0].long() + 1
    assert got.tolist() == [k + d for k in ks for d in (-1, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [1e-300, 1e-6, 0.3, 0.999999])
def test_offsets_exact_on_episodes_of_one_to_three_steps(
    backend: str, gamma: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Episodes of 1, 2 and 3 steps (terminated, truncated, running), each mode: the 38-bit
    uniforms next to every boundary F(k - 1) of the exact law (50 digits), and the least and
    largest, draw the offset the law gives them. Near gamma = 0 an offset whose probability is
    under 2**-38 is never drawn (the largest uniform stays below it); near 1 the law is almost
    uniform and clamp almost always the last step."""
    if backend == "triton":
        pytest.importorskip("triton")
    buf = make(capacity=6, num_envs=1, gamma=gamma, backend=backend)
    t = torch.arange(6, dtype=torch.float32)[:, None, None]
    buf.extend(
        {
            "observation": t.expand(6, 1, OBS).contiguous(),
            "action": t.expand(6, 1, ACT).contiguous(),
            "next_achieved_goal": t.expand(6, 1, GOAL).contiguous(),  # goal = row
            "terminated": torch.tensor([[True], [False], [False], [False], [False], [False]]),
            "truncated": torch.tensor([[False], [False], [True], [False], [False], [False]]),
        }
    )  # episodes: step 0; steps 1-2; steps 3-5, running
    anchors, u, want = [], [], []
    for first, length in ((0, 1), (1, 2), (3, 3)):
        for mode in ("geometric", "clamp", "uniform_future"):
            edges = _first_uniforms(mode, gamma, length, list(range(1, length + 1)))
            grid = {0, 2**38 - 1} | {min(max(q + d, 0), 2**38 - 1) for q in edges for d in (-1, 0)}
            for v in sorted(grid):
                anchors.append((first, mode))
                u.append(v)
                want.append(first + bisect.bisect_right(edges, v) - 1)  # the goal's row
    for mode in ("geometric", "clamp", "uniform_future"):
        rows = [i for i, (_, m) in enumerate(anchors) if m == mode]
        bits = torch.zeros(len(rows), 3, dtype=torch.int64)  # no mixing
        bits[:, 0] = torch.tensor([anchors[i][0] for i in rows])
        bits[:, 2] = torch.tensor([u[i] for i in rows]) | (0xFFFFFF << 38)
        monkeypatch.setattr(torch, "randint", lambda *args, b=bits, **kw: b.clone())
        got = buf.sample(len(rows), goal_mode=mode).goal[:, 0].long().tolist()
        assert got == [want[i] for i in rows], mode


@pytest.mark.parametrize("backend", BACKENDS)
def test_extend_stores_values_without_autograd_history(backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    buf = make(backend=backend)
    batch = good_batch()
    w = torch.ones((), requires_grad=True)
    batch["observation"] = batch["observation"] * w
    buf.extend(batch)
    buf.extend(good_batch())
    assert not buf.sample(8).observation.requires_grad


@pytest.mark.interpreter
def test_wide_rows_triton_matches_torch() -> None:
    """Rows wider than a column chunk (16) and not a multiple of it: the chunked copies of both
    kernels write and gather every column."""
    pytest.importorskip("triton")
    dims = {"obs_dim": 150, "action_dim": 70, "goal_dim": 65}
    bufs = [
        TrajectoryBuffer(capacity=5, num_envs=3, device="cpu", seed=0, backend=b, **dims)
        for b in ("torch", "triton")
    ]
    g = torch.Generator().manual_seed(0)
    batch = {
        "observation": torch.randn(7, 3, 150, generator=g),
        "action": torch.randn(7, 3, 70, generator=g),
        "next_achieved_goal": torch.randn(7, 3, 65, generator=g),
        "terminated": torch.rand(7, 3, generator=g) < 0.3,
        "truncated": torch.zeros(7, 3, dtype=torch.bool),
    }
    for buf in bufs:
        buf.extend(batch)
    assert torch.equal(bufs[0]._rows, bufs[1]._rows)
    a, b = (
        buf.sample(300, goal_mode="final", generator=torch.Generator().manual_seed(1))
        for buf in bufs
    )
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# ---------------------------------------------------------------- state, size, errors


def random_batch(steps: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "observation": torch.randn(steps, n, OBS, generator=g),
        "action": torch.randn(steps, n, ACT, generator=g),
        "next_achieved_goal": torch.randn(steps, n, GOAL, generator=g),
        "terminated": torch.rand(steps, n, generator=g) < 0.1,
        "truncated": torch.rand(steps, n, generator=g) < 0.1,
    }


def test_state_dict_round_trip() -> None:
    buf = make(seed=5)
    buf.extend(random_batch(30, 6, seed=0))
    blob = io.BytesIO()
    torch.save(buf.state_dict(), blob)
    snapshot = buf.state_dict()
    buf.extend(random_batch(3, 6, seed=1))  # a snapshot: later writes do not leak into it
    other = make(seed=123)
    for b in (buf, other):
        b.load_state_dict(torch.load(io.BytesIO(blob.getvalue())))
        sd = b.state_dict()
        assert sd["step"] == snapshot["step"] == 30 and len(b) == 17 * 6
        for key, value in snapshot.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(sd[key], value), key
    for x, y in zip(buf.sample(256), other.sample(256), strict=True):  # same RNG state
        assert torch.equal(x, y)
    nxt = random_batch(9, 6, seed=2)  # both continue identically, across the ring seam
    buf.extend(nxt)
    other.extend(nxt)
    for m in FUTURE_MODES:
        for x, y in zip(buf.sample(64, goal_mode=m), other.sample(64, goal_mode=m), strict=True):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="config"):
        make(capacity=18).load_state_dict(buf.state_dict())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gamma", 0.9),
        ("goal_mode", "final"),
        ("random_goal_fraction", 0.1),
        ("current_goal_fraction", 0.2),
        ("capacity", 18),
        ("rows", torch.zeros(17, 6, OBS + ACT + GOAL, dtype=torch.float64)),
        ("segment", torch.zeros(16, 6, dtype=torch.int64)),
        ("step", -1),
        ("step", 2**64),
        ("step", 21),  # one past the 20 stored steps: the bookkeeping does not fit
        ("step", 10**6),
        ("generator", torch.zeros(16, dtype=torch.uint8)),  # a CUDA generator's state
    ],
)
def test_load_state_dict_rejects_mismatch_unchanged(field: str, value: object) -> None:
    """A state that does not fit (saved with another sampling law or size, or edited) raises
    ValueError naming the field, before writing anything."""
    if field in ("rows", "segment", "step", "generator"):
        src = make(seed=1)
    else:
        src = make(seed=1, **{field: value})
    src.extend(random_batch(20, 6, seed=0))
    state = src.state_dict()
    if field in state:
        state[field] = value
    buf = make(seed=2)
    buf.extend(random_batch(5, 6, seed=3))
    before = buf.state_dict()
    with pytest.raises(ValueError, match=rf"\b{field}\b") as err:
        buf.load_state_dict(state)
    assert str(err.value).count(field) <= 2, "names the field, not the whole config"
    after = buf.state_dict()
    assert after["step"] == before["step"] == 5
    for key, v in before.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(after[key], v), key


@pytest.mark.parametrize(
    "edit",
    [
        "end_in_next_episode",
        "end_a_lap_late",
        "flag_cleared",
        "flag_added",
        "running_episode_skips_one",
        "episodes_below_zero",
    ],
)
def test_load_state_dict_rejects_bookkeeping_that_disagrees_with_the_flags(edit: str) -> None:
    """An ended episode's end must be a done row of that episode before ``step``, and the done
    flags must delimit the episodes, numbered from 0: an end moved to the next episode's done row
    or a lap later to its own (both fit the step count) would send its goals across the episode
    boundary, and a negative episode makes the Triton sampler read before ``segment_end`` (C's %
    keeps the sign)."""
    src = make(capacity=8, num_envs=1)
    batch = random_batch(9, 1, seed=0)
    batch["terminated"] = torch.zeros(9, 1, dtype=torch.bool)
    batch["terminated"][[1, 4], 0] = True  # episodes: 0 = steps 0-1, 1 = 2-4, 2 = 5-8 running
    batch["truncated"] = torch.zeros(9, 1, dtype=torch.bool)
    src.extend(batch)  # step 8 overwrote step 0 (row 0): step 1 (row 1) is the oldest stored
    state = src.state_dict()
    make(capacity=8, num_envs=1).load_state_dict(state)  # the unedited state loads
    ends = state["segment_end"]
    if edit == "end_in_next_episode":
        ends[0, 0] = 4
    elif edit == "end_a_lap_late":
        ends[0, 0] = 9  # row 1 again, at the step count
    elif edit == "flag_cleared":
        state["terminated"][1, 0] = False
    elif edit == "flag_added":
        state["truncated"][3, 0] = True
    elif edit == "running_episode_skips_one":
        state["truncated"][0, 0] = True  # step 8 ends episode 2, and the next is 3, not 4
        ends[2, 0] = 8
        state["open_segment"][0] = 4
    else:  # every index one less, so that episode 0 becomes -1
        state["segment"] -= 1
        state["open_segment"] -= 1
        state["segment_end"] = ends.roll(-1, 0)
    buf = make(capacity=8, num_envs=1)
    with pytest.raises(ValueError, match="segment"):
        buf.load_state_dict(state)
    assert len(buf) == 0


@pytest.mark.parametrize("open_segment", [[-3, 0], [0, 1]])
def test_load_state_dict_rejects_a_running_episode_outside_0_to_step(
    open_segment: list[int],
) -> None:
    """With nothing stored no row checks the running episode's index, yet the next extend files
    that episode's end under it: a negative one made the Triton extend write before
    ``segment_end`` (C's % keeps the sign), and the buffer's own state stopped loading."""
    state = make(capacity=4, num_envs=2).state_dict()
    state["open_segment"] = torch.tensor(open_segment)
    buf = make(capacity=4, num_envs=2)
    with pytest.raises(ValueError, match=r"open_segment.*\[0, state_dict\['step'\] = 0\]"):
        buf.load_state_dict(state)
    assert len(buf) == 0 and buf._open_segment.tolist() == [0, 0]


def test_state_saved_before_the_sampling_law_was_recorded_loads() -> None:
    """Checkpoints written before the config named gamma and the goal modes must still resume."""
    src = make(seed=1)
    src.extend(random_batch(20, 6, seed=0))
    state = src.state_dict()
    for key in ("gamma", "goal_mode", "random_goal_fraction", "current_goal_fraction"):
        del state["config"][key]
    buf = make(seed=2)
    buf.load_state_dict(state)
    assert buf.state_dict()["step"] == 20


def test_load_state_dict_rejects_unknown_config_fields_and_a_bool_step() -> None:
    """A config field this buffer does not know is a state of another version or class; a step
    of True would load as step 1."""
    src = make()
    src.extend(good_batch(steps=1))
    state = src.state_dict()
    state["config"]["horizon"] = 10
    with pytest.raises(ValueError, match=r"unknown fields \['horizon'\]"):
        make().load_state_dict(state)
    state = src.state_dict()
    state["step"] = True
    with pytest.raises(ValueError, match=r"state_dict\['step'\] must be an int"):
        make().load_state_dict(state)
    make().load_state_dict(src.state_dict())


def test_load_state_dict_names_a_state_of_another_kind() -> None:
    """Not a buffer's state, a field that is not a tensor, a step that is not an integer: each
    named, as a ValueError."""
    src = make()
    src.extend(good_batch(steps=1))
    with pytest.raises(ValueError, match="state_dict has no 'config': not a TrajectoryBuffer"):
        make().load_state_dict({})
    for key, value, match in [
        ("rows", [0.0], r"state_dict\['rows'\] must be a tensor, got list"),
        ("step", 1.0, r"state_dict\['step'\] must be an int in \[0, 2\*\*62\), got 1.0"),
        ("generator", [0], r"state_dict\['generator'\] must be a generator state tensor, got list"),
    ]:
        state = src.state_dict()
        state[key] = value
        with pytest.raises(ValueError, match=match):
            make().load_state_dict(state)


def test_sample_draws_from_the_generator_given() -> None:
    """A ``generator`` passed to sample supplies the draws, and the buffer's own is untouched."""
    buf = make()
    buf.extend(random_batch(5, 6, seed=0))
    own = buf.generator.get_state()
    a, b = (buf.sample(64, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(buf.generator.get_state(), own)


def test_len_capacity_clear() -> None:
    buf = make(capacity=4, num_envs=3)
    rec = Recorder(buf, [0.5] * 3, seed=0)
    assert len(buf) == 0 and buf.capacity == 4 and make(gamma=0.9).gamma == 0.9
    rec.extend(3)
    assert len(buf) == 9
    rec.extend(10)
    assert len(buf) == 12
    buf.clear()
    assert len(buf) == 0
    assert_same_contents(buf, make(capacity=4, num_envs=3))
    cleared = buf.state_dict()
    assert cleared["step"] == 0 and int(buf._step_t) == 0  # the cursor a captured sample reads
    make(capacity=4, num_envs=3).load_state_dict(cleared)  # an empty buffer's state loads
    with pytest.raises(ValueError, match="empty"):
        buf.sample(4)
    rec2 = Recorder(buf, [0.5] * 3, seed=1)  # refilled after clear: fresh episode bookkeeping
    rec2.extend(6)
    rec2.check(buf.sample(128, goal_mode="final"), "final")


def good_batch(steps: int = 2, n: int = 6) -> dict[str, torch.Tensor]:
    return {
        "observation": torch.zeros(steps, n, OBS),
        "action": torch.zeros(steps, n, ACT),
        "next_achieved_goal": torch.zeros(steps, n, GOAL),
        "terminated": torch.zeros(steps, n, dtype=torch.bool),
        "truncated": torch.zeros(steps, n, dtype=torch.bool),
    }


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        ("observation", torch.zeros(2, 5, OBS), ValueError, "shaped"),
        ("observation", torch.zeros(6, OBS), ValueError, r"one step: x\.unsqueeze\(0\)"),
        ("action", torch.zeros(2, 6, ACT + 1), ValueError, "shaped"),
        ("next_achieved_goal", torch.zeros(3, 6, GOAL), ValueError, "shaped"),
        ("terminated", torch.zeros(2, 6), TypeError, "dtype"),
        ("observation", torch.zeros(2, 6, OBS, dtype=torch.float64), TypeError, "dtype"),
        ("truncated", torch.zeros(2, 6, 1, dtype=torch.bool), ValueError, "shaped"),
        ("observation", torch.zeros(2, 6, OBS, device="meta"), ValueError, "is on"),
        ("action", np.zeros((2, 6, ACT)), TypeError, "torch.Tensor"),
    ],
)
def test_extend_rejects_bad_input(field: str, value: object, error: type, match: str) -> None:
    buf = make()
    batch = good_batch()
    batch[field] = value
    with pytest.raises(error, match=match):
        buf.extend(batch)
    del batch[field]
    with pytest.raises(ValueError, match="missing"):
        buf.extend(batch)
    assert len(buf) == 0


@pytest.mark.parametrize(
    ("field", "shape", "hint"),
    [
        ("observation", (6, OBS), r"\(one step: x\.unsqueeze\(0\)\)"),
        ("observation", (2, 6, 1, OBS), r"\(flatten the trailing dims: x\.flatten\(2\)\)"),
        ("terminated", (2, 6, 1), r"\(flatten the trailing dims: x\.flatten\(1\)\)"),
        ("observation", (OBS,), r"got \[3\]$"),
    ],
)
def test_extend_hints_only_the_reshape_that_fits(field: str, shape: tuple, hint: str) -> None:
    """A field with one dim too few is one step (unsqueeze); one with extra dims (pixels
    [T, N, C, H, W], flags [T, N, 1]) needs flattening, where unsqueeze(0) would add another."""
    batch = good_batch()
    batch[field] = torch.zeros(shape, dtype=batch[field].dtype)
    with pytest.raises(ValueError, match=hint):
        make().extend(batch)


@pytest.mark.parametrize("field", ["observation", "truncated"])
def test_extend_hints_no_unsqueeze_0_for_a_flat_sequence(field: str) -> None:
    """A flat [T, dim] field (a dataset) whose T is not num_envs is not one step: unsqueeze(0)
    would make it T envs. With one env it is T steps of it (unsqueeze(1)); else no hint."""
    batch = {k: v[:, :1] for k, v in good_batch(steps=5).items()}
    batch[field] = batch[field][:, 0]
    with pytest.raises(ValueError, match=r"T steps of one env: x\.unsqueeze\(1\)"):
        make(num_envs=1).extend(batch)
    batch = good_batch(steps=5)
    batch[field] = batch[field][:, 0]
    with pytest.raises(ValueError, match=r"num_envs(, dim)?\], got \[5(, 3)?\]$"):  # no hint
        make().extend(batch)


def flat_dataset(lengths: list[int], last_ends: bool = True) -> dict[str, np.ndarray]:
    """Episodes of ``lengths`` one after the other, as OGBench stores them (float64 arrays, float
    ``terminals``-style flags): observation = (episode, t), next_achieved_goal = (episode, t + 1),
    so a goal names its episode and step. The last episode ends only if ``last_ends``."""
    episode = np.repeat(np.arange(len(lengths)), lengths)
    t = np.concatenate([np.arange(n) for n in lengths])
    ends = np.cumsum(lengths) - 1
    terminated = np.zeros(len(t))
    terminated[ends if last_ends else ends[:-1]] = 1.0
    return {
        "observation": np.stack([episode, t, np.zeros_like(t)], 1).astype(np.float64),
        "action": np.zeros((len(t), ACT)),
        "next_achieved_goal": np.stack([episode, t + 1, np.zeros_like(t)], 1).astype(np.float64),
        "terminated": terminated,
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_envs", [1, 3])
def test_from_dataset_keeps_goals_within_episodes(backend: str, num_envs: int) -> None:
    """Episodes of different lengths, flat: every goal is a later step of its anchor's episode
    (clamp), the 'final' goal is the episode's last step, or, where a column boundary cuts an
    episode, the last step of its piece; the last episode is closed though its flag is unset."""
    lengths = [5, 1, 12, 7, 3, 9, 2, 15]  # 54 rows, 18 per column with 3
    data = flat_dataset(lengths, last_ends=False)
    buf = TrajectoryBuffer.from_dataset(
        data, num_envs=num_envs, goal_mode="clamp", gamma=0.9, device="cpu", seed=0,
        backend=backend,
    )  # fmt: skip
    n = sum(lengths)
    assert (buf.capacity, buf.num_envs, len(buf), buf.dtype) == (
        n // num_envs,
        num_envs,
        n,
        torch.float32,
    )
    assert (buf.obs_dim, buf.action_dim, buf.goal_dim) == (OBS, ACT, GOAL)
    batch = buf.sample(4096)
    obs, goal = batch.observation.numpy(), batch.goal.numpy()
    assert (obs[:, 0] == goal[:, 0]).all()
    length = np.asarray(lengths)[obs[:, 0].astype(int)]
    assert ((goal[:, 1] > obs[:, 1]) & (goal[:, 1] <= length)).all()
    assert len(np.unique(obs[:, :2], axis=0)) == n  # every row is an anchor
    # 'final': the last step of the anchor's piece of episode in its column.
    final = buf.sample(4096, goal_mode="final")
    episode, t = final.observation[:, :2].long().unbind(1)
    row = torch.tensor(np.cumsum([0, *lengths[:-1]]))[episode] + t  # the anchor's dataset row
    column_end = (row // (n // num_envs) + 1) * (n // num_envs) - 1
    piece_end = torch.minimum(column_end, row - t + torch.tensor(lengths)[episode] - 1)
    assert torch.equal(final.goal[:, 1].long(), piece_end - (row - t) + 1)
    # The dataset's last episode is closed: a step added later starts an episode of its own.
    more = {k: torch.full_like(v[:1], 99) for k, v in good_batch(steps=1, n=num_envs).items()}
    more |= {k: torch.zeros(1, num_envs, dtype=torch.bool) for k in ("terminated", "truncated")}
    buf.extend(more)
    final = buf.sample(4096, goal_mode="final")
    assert ((final.observation[:, 0] == 99) == (final.goal[:, 0] == 99)).all()


@pytest.mark.interpreter
def test_from_dataset_loads_without_the_extend_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Triton buffer's load takes the torch ops, parallel over a column's rows, where a program
    of the extend kernel walks them in order (a million rows: a million steps of one GPU thread),
    and holds what the kernel would have written; a later extend takes the kernel again."""
    from crl_fast.kernels import goal_sampling

    data = flat_dataset([5, 1, 12, 7, 3, 9, 2, 15])  # 54 rows: 3 columns of 18
    ref = make(capacity=18, num_envs=3, backend="triton")
    ref.extend(
        {
            k: torch.from_numpy(v)
            .to(torch.bool if v.ndim == 1 else torch.float32)
            .reshape(3, 18, *v.shape[1:])
            .transpose(0, 1)
            for k, v in (data | {"truncated": np.zeros(54)}).items()
        }
    )
    ref.end_episodes()
    launches = []
    monkeypatch.setattr(goal_sampling, "extend", lambda *a, **k: launches.append(a))
    buf = TrajectoryBuffer.from_dataset(data, num_envs=3, device="cpu", seed=0, backend="triton")
    assert not launches, "from_dataset launched the extend kernel"
    assert_same_contents(buf, ref)
    buf.extend(good_batch(steps=1, n=3))
    assert len(launches) == 1


def test_from_dataset_takes_tensors_flags_of_either_name_and_the_buffer_options() -> None:
    """Tensors like arrays; ``truncated`` alone marks the ends; dtype, gamma and mixing reach the
    buffer; the rows are copies (the dataset may change later)."""
    data = {k: torch.from_numpy(v) for k, v in flat_dataset([4, 6]).items()}
    data["truncated"] = data.pop("terminated").bool()
    buf = TrajectoryBuffer.from_dataset(
        data, dtype=torch.float64, gamma=0.5, random_goal_fraction=0.25, device="cpu", seed=0
    )
    assert (buf.dtype, buf.gamma, buf.random_goal_fraction) == (torch.float64, 0.5, 0.25)
    data["observation"].fill_(-1.0)
    batch = buf.sample(256, random_goal_fraction=0.0)
    assert batch.observation.dtype == torch.float64 and (batch.observation >= 0).all()
    assert (batch.observation[:, 0] == batch.goal[:, 0]).all()


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda d: d.pop("action"), ValueError, r"missing fields \['action'\]"),
        (lambda d: d.pop("terminated"), ValueError, "terminated or truncated"),
        (lambda d: d.update(action=[[0.0, 0.0]] * 10), TypeError, "action must be a"),
        (
            lambda d: d.update(action=np.zeros((9, ACT))),
            ValueError,
            "action has 9 rows, observation 10",
        ),
        (
            lambda d: d.update(observation=np.zeros(10)),
            ValueError,
            r"observation must be shaped \[N, dim\]",
        ),
        (
            lambda d: d.update(observation=np.zeros((10, 2, 2))),
            ValueError,
            r"x\.reshape\(len\(x\), -1\)",
        ),
        (
            lambda d: d.update(terminated=np.zeros((10, 1))),
            ValueError,
            r"terminated must be shaped \[N\]",
        ),
        (
            lambda d: d.update(terminated=np.full(10, 0.5)),
            ValueError,
            "terminated must hold only 0 and 1",
        ),
        (
            lambda d: d.update(terminated=np.full(10, 2.0)),
            ValueError,
            "terminated must hold only 0 and 1",
        ),
        (
            lambda d: d.update(observation=np.zeros((10, OBS), bool)),
            TypeError,
            "observation must hold",
        ),
        (
            lambda d: d.update(terminated=np.zeros(10, np.complex64)),
            TypeError,
            "terminated must hold",
        ),
        (lambda d: [d.update({k: v[:0]}) for k, v in list(d.items())], ValueError, "no rows"),
    ],
)
def test_from_dataset_rejects_bad_input(edit: Any, error: type, match: str) -> None:
    data: dict[str, Any] = flat_dataset([4, 6])
    edit(data)
    with pytest.raises(error, match=match):
        TrajectoryBuffer.from_dataset(data, device="cpu")


def test_from_dataset_rejects_rows_that_do_not_fill_the_columns_or_the_capacity(
    monkeypatch,
) -> None:
    with pytest.raises(ValueError, match=r"10 rows do not split into 3 columns"):
        TrajectoryBuffer.from_dataset(flat_dataset([4, 6]), num_envs=3, device="cpu")
    n = 2**24 + 2  # broadcast views: no memory
    big = {
        "observation": np.broadcast_to(np.zeros(OBS), (n, OBS)),
        "action": np.broadcast_to(np.zeros(ACT), (n, ACT)),
        "next_achieved_goal": np.broadcast_to(np.zeros(GOAL), (n, GOAL)),
        "terminated": np.broadcast_to(np.zeros(1, bool), (n,)),
    }
    with pytest.raises(ValueError, match=r"at most 2\*\*24 rows per column: num_envs=2 or more"):
        TrajectoryBuffer.from_dataset(big, device="cpu")
    from crl_fast import buffer as buffer_module

    monkeypatch.setattr(buffer_module, "_MAX_CAPACITY", 10)  # a column of the limit itself fits
    assert TrajectoryBuffer.from_dataset(flat_dataset([4, 6]), device="cpu").capacity == 10


def test_extend_takes_a_mapping_and_zero_steps_write_nothing(monkeypatch) -> None:
    buf = make()
    with pytest.raises(TypeError, match=r"extend\(\) takes a mapping of tensors, got list"):
        buf.extend(list(good_batch().values()))
    monkeypatch.setattr(buf, "_extend_torch", lambda *args: pytest.fail("wrote 0 steps"))
    buf.extend(good_batch(steps=0))
    assert len(buf) == 0


def test_triton_backend_on_cpu_needs_kernels_built_by_the_interpreter() -> None:
    err = stderr_with_late_interpret(
        "from crl_fast import TrajectoryBuffer\n"
        "TrajectoryBuffer(capacity=4, num_envs=2, obs_dim=3, action_dim=1, goal_dim=2, "
        "device='cpu', backend='triton')"
    )
    assert "ValueError: backend='triton' needs a CUDA device" in err, err


def test_constructor_and_sample_reject_bad_arguments() -> None:
    for gamma in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="gamma"):
            make(gamma=gamma)
    with pytest.raises(TypeError, match="gamma"):
        make(gamma="0.9")
    for dtype in ("float32", torch.int32, torch.float8_e4m3fn):
        with pytest.raises(TypeError, match="dtype must be one of float32, bfloat16, float16"):
            make(dtype=dtype)
    with pytest.raises(ValueError, match="goal_mode"):
        make(goal_mode="future")
    with pytest.raises(ValueError, match="capacity"):
        make(capacity=0)
    with pytest.raises(ValueError, match=r"capacity must be at most 2\*\*24"):
        make(capacity=2**24 + 1, num_envs=1)
    with pytest.raises(ValueError, match="backend must be"):
        make(backend="cuda")
    with pytest.raises(ValueError, match="random_goal_fraction"):
        make(random_goal_fraction=1.5)
    for fraction in (True, "0.1", None):  # True would make every goal random
        with pytest.raises(TypeError, match="current_goal_fraction must be a number"):
            make(current_goal_fraction=fraction)
    for seed in (1.5, "a", True):
        with pytest.raises(TypeError, match="seed"):
            make(seed=seed)
    for seed in (-1, 2**32):  # the CPU generator would take 2**32 + s as s
        with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\*\*32\)"):
            make(seed=seed)
    with pytest.raises(ValueError, match="CPU and CUDA"):
        make(device="meta")
    assert make(device="cpu:1").device == torch.device("cpu")  # as its tensors say
    buf = make()
    with pytest.raises(ValueError, match="empty"):
        buf.sample(8)
    buf.extend(good_batch())
    for bad in (0, -3, 2.5, True, np.int64(0), np.float64(8)):
        with pytest.raises(ValueError, match="batch_size"):
            buf.sample(bad)
    assert buf.sample(np.int64(8)).observation.shape == (8, OBS)  # e.g. from a numpy config
    with pytest.raises(ValueError, match="goal_mode"):
        buf.sample(8, goal_mode="her")
    with pytest.raises(TypeError, match="generator"):
        buf.sample(8, generator=5)
    for state in (None, [1]):
        with pytest.raises(TypeError, match="mapping"):
            buf.load_state_dict(state)
    assert buf.sample(8).observation.shape == (8, OBS)


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_auto_takes_pytorch_on_cuda_without_triton(monkeypatch) -> None:
    """Triton is Linux-only: a CUDA buffer elsewhere samples through PyTorch, as the loss does."""
    from crl_fast import buffer as buffer_module

    monkeypatch.setattr(buffer_module, "triton_available", lambda: False)
    buf = make(device="cuda")
    buf.extend({k: v.cuda() for k, v in good_batch().items()})
    assert not buf._use_triton and buf.sample(8).observation.is_cuda


@pytest.mark.gpu
def test_sample_rejects_a_generator_of_another_device() -> None:
    """A CPU generator for a CUDA buffer is named as such (torch.randint's own error is not a
    ValueError): the only device mismatch the check can see, so a CPU run cannot test it."""
    buf = make(device="cuda")
    buf.extend({k: v.cuda() for k, v in good_batch().items()})
    with pytest.raises(ValueError, match="generator is on cpu, the buffer on cuda"):
        buf.sample(8, generator=torch.Generator())


@pytest.mark.gpu
def test_invariants_cuda_triton() -> None:
    run_invariants("cuda", "auto", rounds=60, batch=4096)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["geometric", "clamp", "uniform_future"])
def test_offset_law_chi_square_cuda_triton(mode: str) -> None:
    check_offset_law(mode, "cuda")


@pytest.mark.gpu
def test_triton_matches_torch_cuda() -> None:
    """Same draws on CUDA: identical anchors and bookkeeping; offsets may differ by one where
    the GPU's float64 log1p/expm1 round differently from torch's (a boundary within an ulp)."""
    bufs = [make(capacity=300, num_envs=64, device="cuda", backend=b) for b in ("torch", "auto")]
    recs = [Recorder(b, [0.01 * (i % 7) for i in range(64)], seed=4) for b in bufs]
    for rec in recs:
        rec.extend(500)  # more than the capacity
        rec.extend(1)
    assert_same_contents(*bufs)
    for mode in FUTURE_MODES:
        kw = {"goal_mode": mode, "random_goal_fraction": 0.1, "current_goal_fraction": 0.1}
        a, b = (
            buf.sample(65536, generator=torch.Generator("cuda").manual_seed(1), **kw)
            for buf in bufs
        )
        assert torch.equal(a.observation, b.observation) and torch.equal(a.action, b.action)
        diff = (a.goal[:, 0] - b.goal[:, 0]).abs()
        assert diff.max() <= 1 and (diff > 0).sum() <= 1  # float64: was < 1e-3 in float32


@pytest.mark.parametrize(
    ("capacity", "num_envs", "device"),
    [
        pytest.param(40, 24, "cpu", marks=pytest.mark.interpreter, id="small-cpu"),
        pytest.param(2048 + 128, 32768, "cuda", marks=pytest.mark.gpu, id="past-2**31-cuda"),
    ],
)
def test_rows_past_element_2_to_the_31(capacity: int, num_envs: int, device: str) -> None:
    """Capacities go to 2**24 steps, times the envs: 2176 steps x 32768 envs x 32 columns put
    the rows of slots 2048 on past element 2**31 (4.3 GiB in bfloat16, 6 GiB a buffer: the GPU
    tests share the card), where the kernels' row offsets (step x envs x width) wrap unless
    taken in 64 bits (the interpreter wraps int32 as a GPU does, but CPU memory cannot hold the
    case). Triton's extend and sample there must equal the torch backend's. Each row names its
    step and env in base-256 digits (exact in bfloat16); 'final', current and random goals
    involve no float rounding."""
    width, steps = 32, capacity + 5  # the ring wraps: the newest rows overwrite the oldest
    bufs = [
        TrajectoryBuffer(capacity=capacity, num_envs=num_envs, obs_dim=width - 4, action_dim=2,
                         goal_dim=2, device=device, dtype=torch.bfloat16, backend=backend, seed=0)
        for backend in ("torch", "triton")
    ]  # fmt: skip
    env = torch.arange(num_envs, device=device)
    obs = torch.zeros(1, num_envs, width - 4, dtype=torch.bfloat16, device=device)
    obs[0, :, 2], obs[0, :, 3] = env % 256, env // 256
    pair = torch.zeros(1, num_envs, 2, dtype=torch.bfloat16, device=device)
    for t in range(steps):
        obs[0, :, 0], obs[0, :, 1] = t % 256, t // 256
        done = ((t + env) % 97 == 96)[None]  # episodes of 97 steps, staggered across envs
        term, trunc = done & (env % 2 == 0), done & (env % 2 == 1)
        batch = {"observation": obs, "action": pair, "next_achieved_goal": obs[..., :2],
                 "terminated": term, "truncated": trunc}  # fmt: skip
        for buf in bufs:
            buf.extend(batch)
    kw = {"goal_mode": "final", "random_goal_fraction": 0.1, "current_goal_fraction": 0.1}
    a, b = (
        buf.sample(65536, generator=torch.Generator(device).manual_seed(1), **kw) for buf in bufs
    )
    for field_a, field_b in zip(a, b, strict=True):
        assert torch.equal(field_a, field_b)
    o = b.observation.long()
    t, e = o[:, 0] + 256 * o[:, 1], o[:, 2] + 256 * o[:, 3]
    assert (t >= steps - capacity).all() and (t < steps).all()
    g = b.goal.long()
    assert (g[:, 0] + 256 * g[:, 1] >= steps - capacity).all()
    if capacity * num_envs * width > 2**31:  # anchors past element 2**31 were drawn
        assert (((t % capacity) * num_envs + e) * width >= 2**31).sum() > 1000


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_sample_and_extend_do_not_sync(backend: str) -> None:
    buf = make(capacity=50, num_envs=16, device="cuda", backend=backend)
    rec = Recorder(buf, [0.05] * 16, seed=0)
    rec.extend(60)
    buf.sample(256, random_goal_fraction=0.1, current_goal_fraction=0.1)  # compile outside
    batch = random_batch(3, 16, seed=0)
    batch = {k: v.cuda() for k, v in batch.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        buf.extend(batch)
        for mode in FUTURE_MODES:
            buf.sample(256, goal_mode=mode, random_goal_fraction=0.1, current_goal_fraction=0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_sample_in_cuda_graph() -> None:
    """A captured sample reads the cursor from device memory, so replays see new data."""
    buf = make(capacity=50, num_envs=16, device="cuda")
    rec = Recorder(buf, [0.05] * 16, seed=0)
    rec.extend(20)
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        buf.sample(1024, generator=gen)  # warm-up compiles the kernel outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = buf.sample(1024, generator=gen)
    for _ in range(5):
        rec.extend(13)
        graph.replay()
        d = rec.check(out, "geometric")
        assert d["t"].max() >= rec.step - 13


@pytest.mark.parametrize("backend", BACKENDS)
def test_end_episodes_cuts_running_episodes(backend: str) -> None:
    """After end_episodes, 'final' goals of earlier anchors stop at the cut and later anchors'
    goals come from after it, also for an env whose episode had just ended anyway."""
    buf = make(capacity=32, num_envs=2, backend=backend)

    def extend(first: int, steps: int, done_at: int | None = None) -> None:
        t = torch.arange(first, first + steps, dtype=torch.float32)
        field = t[:, None, None].expand(steps, 2, 1)
        term = torch.zeros(steps, 2, dtype=torch.bool)
        if done_at is not None:
            term[done_at - first, 1] = True  # env 1 ends an episode on its own
        buf.extend(
            {
                "observation": field.expand(steps, 2, OBS).contiguous(),
                "action": field.expand(steps, 2, ACT).contiguous(),
                "next_achieved_goal": field.expand(steps, 2, GOAL).contiguous(),
                "terminated": term,
                "truncated": torch.zeros(steps, 2, dtype=torch.bool),
            }
        )

    buf.end_episodes()  # nothing stored: a no-op
    extend(0, 5, done_at=4)
    buf.end_episodes()
    state = buf.state_dict()  # the cut is a truncation, and only env 0 starts a new episode
    assert state["truncated"][4].tolist() == [True, False]
    assert state["open_segment"].tolist() == [1, 1]
    make(capacity=32, num_envs=2).load_state_dict(state)
    extend(5, 5)
    batch = buf.sample(4000, goal_mode="final")
    anchor, goal = batch.observation[:, 0], batch.goal[:, 0]
    assert torch.equal(goal[anchor < 5], torch.full_like(goal[anchor < 5], 4.0))
    assert torch.equal(goal[anchor >= 5], torch.full_like(goal[anchor >= 5], 9.0))
    buf.end_episodes()
    buf.end_episodes()  # idempotent: nothing is running any more
    assert torch.equal(
        buf.sample(4000, goal_mode="final").goal[:, 0].unique(), torch.tensor([4.0, 9.0])
    )


def test_end_episodes_after_more_episodes_than_rows() -> None:
    """The cut files the running episode's end at its slot, its index % capacity, also once an
    env has had more episodes than the buffer has rows."""
    buf = make(capacity=2, num_envs=1)
    batch = good_batch(steps=3, n=1)
    batch["terminated"][:2] = True  # episodes 0 and 1 end; episode 2 runs
    buf.extend(batch)
    buf.end_episodes()
    make(capacity=2, num_envs=1).load_state_dict(buf.state_dict())
