"""End to end: TrajectoryBuffer's goals and contrastive_loss's gradients train a free critic table
to the optimum Eysenbach et al. 2022 derive, log(p(g | s, a) / rho(g)) plus a constant, on a
tabular MDP solved exactly with linear algebra."""

import math

import numpy as np
import pytest
import torch

from crl_fast import contrastive_loss
from crl_fast.buffer import TrajectoryBuffer

S, A, GAMMA = 3, 2, 0.6
ENVS, STEPS = 64, 4000  # 256,000 transitions, one episode per env
BATCH, UPDATES = 256, 1000  # the table is the mean of the last UPDATES // 2 Adam iterates
TOL = 0.08
"""Largest error allowed in any cell of the table. The rarest (s, a, g) has p(s, a) p(g | s, a)
= 0.0116, so the 128,000 rows the averaged iterates see hold about 1,490 of its positives: a
logit fitted to n positives is off by about 1 / sqrt(n) = 0.026 (seed 0 gives worst cells of
0.019 and 0.015, seeds 0-4 of the data and the buffer gave 0.014 to 0.048). The finite data
adds about 0.01, and the goal law's truncation at each episode's newest step moves < 1e-3 of
it. A wrong gamma (0.5 or 0.7) moves the optimum by 0.13, goals from k = 0 (the anchor's own
state) by 1.0: both fail, as does a loss whose gradient has the wrong sign."""


def ring(moves: list[float]) -> np.ndarray:
    """A ring of S states: row s gives the probabilities of landing 0, 1, 2 states ahead."""
    return np.stack([np.roll(moves, s) for s in range(S)])


# P[s, a, s']: action 0 mostly stays, action 1 mostly advances; a policy that differs by state,
# so that the stationary distribution, hence rho, is far from uniform.
P = np.stack([ring([0.8, 0.1, 0.1]), ring([0.1, 0.6, 0.3])], axis=1)
PI = np.array([[0.6, 0.4], [0.5, 0.5], [0.2, 0.8]])  # pi[s, a]


def exact_goal_law() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(p, rho, d)``: ``p[s, a, g] = sum_{k >= 1} (1 - gamma) gamma^(k - 1) P(s_{t+k} = g |
    s, a) = (1 - gamma) (P[s, a] (I - gamma P_pi)^-1)[g]``; the stationary distribution ``d``
    of the policy's chain, from which anchors come (envs start there), so anchors are (s, a)
    with probability ``d(s) pi(a | s)``; and ``rho(g)``, the law of the other rows' goals: the
    goal marginal under those anchors (which is ``d`` again)."""
    p_pi = np.einsum("sa,sat->st", PI, P)
    p = (1 - GAMMA) * np.einsum("sat,tg->sag", P, np.linalg.inv(np.eye(S) - GAMMA * p_pi))
    eigenvalues, vectors = np.linalg.eig(p_pi.T)
    d = np.real(vectors[:, np.argmax(np.real(eigenvalues))])
    d /= d.sum()
    rho = np.einsum("sa,sag->g", d[:, None] * PI, p)
    return p, rho, d


def filled_buffer(d: np.ndarray, device: str) -> TrajectoryBuffer:
    """ENVS envs run the policy for STEPS steps from ``d``, states and actions one-hot, the
    achieved goal the state; no episode ends."""
    gen = torch.Generator().manual_seed(0)
    trans, policy = torch.tensor(P), torch.tensor(PI)
    state = torch.multinomial(torch.tensor(d), ENVS, replacement=True, generator=gen)
    states, actions = [state], []
    for _ in range(STEPS):
        action = torch.multinomial(policy[state], 1, generator=gen).squeeze(1)
        state = torch.multinomial(trans[state, action], 1, generator=gen).squeeze(1)
        actions.append(action)
        states.append(state)
    s, a = torch.stack(states).to(device), torch.stack(actions).to(device)
    buf = TrajectoryBuffer(
        capacity=STEPS, num_envs=ENVS, obs_dim=S, action_dim=A, goal_dim=S, gamma=GAMMA,
        device=device, seed=0,
    )  # fmt: skip
    one_hot_s, done = torch.eye(S, device=device), torch.zeros(STEPS, ENVS, dtype=torch.bool)
    buf.extend(
        {
            "observation": one_hot_s[s[:-1]],
            "action": torch.eye(A, device=device)[a],
            "next_achieved_goal": one_hot_s[s[1:]],
            "terminated": done.to(device),
            "truncated": done.to(device),
        }
    )
    return buf


def trained_table(buf: TrajectoryBuffer, loss: str, init: float) -> np.ndarray:
    """A free table W[s, a, g] trained with ``loss`` on the buffer's batches: phi is row (s, a)
    of W, psi the one-hot goal, so the dot energy's logit L_ij is W[s_i, a_i, g_j]."""
    torch.manual_seed(0)
    table = torch.full((S * A, S), init, device=buf.device, requires_grad=True)
    opt = torch.optim.Adam([table], lr=0.03)
    mean = torch.zeros_like(table)
    for update in range(UPDATES):
        batch = buf.sample(BATCH)
        row = batch.observation.argmax(1) * A + batch.action.argmax(1)
        opt.zero_grad()
        contrastive_loss(table[row], batch.goal, loss=loss).backward()
        opt.step()
        if update >= UPDATES // 2:
            mean += table.detach() / (UPDATES - UPDATES // 2)
    return mean.double().cpu().numpy().reshape(S, A, S)


@pytest.mark.parametrize("loss", ["binary", "infonce"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_critic_learns_log_future_over_marginal(device: str, loss: str) -> None:
    """Each row of the sigmoid loss (mean BCE over B x B, labels = identity) holds one positive,
    (s, a, g) with probability p(s, a) p(g | s, a), and B - 1 negatives, each (s, a, g) with
    probability p(s, a) rho(g): its minimiser has sigmoid(W) = p / (p + (B - 1) rho), that is
    W = log(p / rho) - log(B - 1), exactly. InfoNCE's softmax over the row's B goals is the
    posterior of which goal is the positive when W = log(p / rho) + c(s, a), any c. Either way
    argmax_a W = argmax_a Q, Eysenbach et al.'s Q(s, a, g) being p(g | s, a)."""
    p, rho, d = exact_goal_law()
    constant = -math.log(BATCH - 1) if loss == "binary" else 0.0  # also the table's start
    optimum = np.log(p / rho[None, None]) + constant
    table = trained_table(filled_buffer(d, device), loss, constant)
    if loss == "infonce":  # the per-(s, a) constant is free: compare rows centred over goals
        optimum -= optimum.mean(2, keepdims=True)
        table -= table.mean(2, keepdims=True)
    error = np.abs(table - optimum)
    worst = tuple(int(i) for i in np.unravel_index(error.argmax(), error.shape))
    assert error.max() < TOL, f"(s, a, g) {worst}: {table[worst]:.3f}, optimum {optimum[worst]:.3f}"
    log_p = np.sort(np.log(p), axis=1)
    assert (log_p[:, -1] - log_p[:, -2]).min() > 2 * TOL  # each best action stands out
    np.testing.assert_array_equal(table.argmax(1), p.argmax(1))
