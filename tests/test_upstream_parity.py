"""crl-fast's options against the upstream formulas, transcribed plainly in float64.

JaxGCRL: ``jaxgcrl/agents/crl/losses.py`` (current: ``energy_fn``, ``contrastive_loss_fn``, the
penalty in ``update_critic``) and ``src/losses.py`` (older: flatnce, dpo, ipo, fb, sppo,
``resubs``).
contrastive_rl (Eysenbach et al. 2022): ``contrastive_rl/contrastive/learning.py``
(``critic_loss``'s ``loss_fn``) and ``builder.py`` (``flatten_fn``'s goal law). Each test is
one row of the README's table "From JaxGCRL and contrastive_rl": where crl-fast differs, the
test states the documented relation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crl_fast import contrastive_loss
from crl_fast.agent import CRL
from crl_fast.config import AgentConfig
from crl_fast.energy import pairwise_energy
from tests.test_buffer import offset_pmf

B, D = 9, 5


def rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    psi = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    return phi, psi


def jaxgcrl_energy(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """JaxGCRL's ``energy_fn`` (norm, l2, dot) and the older ``cos`` (per-row norms)."""
    if name == "norm":
        return -torch.sqrt(((x - y) ** 2).sum(-1) + 1e-6)
    if name == "l2":
        return -((x - y) ** 2).sum(-1)
    if name == "dot":
        return (x * y).sum(-1)
    assert name == "cos"
    return (x / x.norm(dim=-1, keepdim=True) * (y / y.norm(dim=-1, keepdim=True))).sum(-1)


def jaxgcrl_logits(name: str, phi: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """``energy_fn(name, sa_repr[:, None, :], g_repr[None, :, :])``."""
    return jaxgcrl_energy(name, phi[:, None, :], psi[None, :, :])


def assert_same_grads(
    upstream: torch.Tensor,
    ours: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    scale: float = 1.0,
    rel: float = 1e-10,
) -> None:
    """Gradients equal up to ``scale`` (upstream = scale * ours), to ``rel`` of the largest."""
    want = torch.autograd.grad(upstream, inputs, retain_graph=True)
    got = torch.autograd.grad(ours, inputs, retain_graph=True)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(scale * g, w, rtol=0, atol=rel * w.abs().max().item())


@pytest.mark.parametrize("name", ["norm", "l2", "dot", "cos"])
def test_energies_and_the_actors_critic_value(name: str) -> None:
    phi, psi = rows()
    ours = {"cos": "cosine"}.get(name, name)
    logits = jaxgcrl_logits(name, phi, psi)
    up = (logits.logsumexp(1) - logits.diagonal()).mean()
    mine = contrastive_loss(phi, psi, loss="infonce", energy=ours, backend="torch")
    torch.testing.assert_close(mine, up, rtol=1e-12, atol=1e-12)
    assert_same_grads(up, mine, (phi, psi))
    # The actor's qf_pi = energy_fn(name, sa_repr, g_repr), row by row.
    torch.testing.assert_close(
        pairwise_energy(phi, psi, ours), jaxgcrl_energy(name, phi, psi), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("fwd_infonce", "infonce"),
        ("bwd_infonce", "infonce_backward"),
        ("sym_infonce", "symmetric_infonce"),
    ],
)
def test_jaxgcrl_critic_with_its_penalty(name: str, ours: str) -> None:
    """``contrastive_loss_fn`` plus ``coeff * mean(logsumexp(logits + 1e-6, axis=1) ** 2)``:
    crl-fast leaves out the 1e-6, which moves the value by 2e-6 * coeff * mean(lse)."""
    phi, psi = rows(1)
    logits = jaxgcrl_logits("norm", phi, psi)
    diag, lse1, lse0 = logits.diagonal(), logits.logsumexp(1), logits.logsumexp(0)
    critic = {
        "fwd_infonce": -(diag - lse1).mean(),
        "bwd_infonce": -(diag - lse0).mean(),
        "sym_infonce": -(2 * diag - lse1 - lse0).mean(),
    }[name]
    up = critic + 0.1 * ((logits + 1e-6).logsumexp(1) ** 2).mean()
    mine = contrastive_loss(
        phi, psi, loss=ours, energy="norm", logsumexp_penalty=0.1, backend="torch"
    )
    torch.testing.assert_close(mine, up, rtol=1e-6, atol=0)
    assert_same_grads(up, mine, (phi, psi), rel=1e-6)


@pytest.mark.parametrize("loss", ["infonce", "symmetric_infonce"])
def test_resubs_false_is_exclude_positive_from_lse(loss: str) -> None:
    """Older JaxGCRL, ``resubs=False``: ``logsumexp(logits - 100 * I + 1e-6)`` in the loss and
    the penalty; crl-fast drops the diagonal exactly (equal while logits span << 100)."""
    phi, psi = rows(2)
    logits = jaxgcrl_logits("dot", phi, psi)
    big = logits - 100 * torch.eye(B, dtype=logits.dtype) + 1e-6
    row, col = big.logsumexp(1), big.logsumexp(0)
    diag = logits.diagonal()
    up = -(diag - row).mean() if loss == "infonce" else -((diag - row) + (diag - col)).mean()
    up = up + 0.1 * (row**2).mean()
    mine = contrastive_loss(
        phi, psi, loss=loss, logsumexp_penalty=0.1, exclude_positive_from_lse=True, backend="torch"
    )
    torch.testing.assert_close(mine, up, rtol=1e-6, atol=0)
    assert_same_grads(up, mine, (phi, psi), rel=1e-6)


def test_binary_of_older_jaxgcrl_and_contrastive_rl_and_cpc() -> None:
    """``mean(sigmoid_binary_cross_entropy(logits, eye))`` is ``binary``; contrastive_rl's
    ``use_cpc``, ``softmax_cross_entropy(logits, I) + 0.01 * logsumexp(logits, 1) ** 2``, is
    ``infonce`` with ``logsumexp_penalty=0.01``."""
    phi, psi = rows(3)
    logits = jaxgcrl_logits("dot", phi, psi)
    eye = torch.eye(B, dtype=logits.dtype)
    up = F.binary_cross_entropy_with_logits(logits, eye, reduction="none").mean()
    mine = contrastive_loss(phi, psi, backend="torch")
    torch.testing.assert_close(mine, up, rtol=1e-12, atol=0)
    assert_same_grads(up, mine, (phi, psi))
    cpc = (-(eye * logits.log_softmax(1)).sum(1) + 0.01 * logits.logsumexp(1) ** 2).mean()
    mine = contrastive_loss(phi, psi, loss="infonce", logsumexp_penalty=0.01, backend="torch")
    torch.testing.assert_close(mine, cpc, rtol=1e-12, atol=0)
    assert_same_grads(cpc, mine, (phi, psi))


def test_jaxgcrls_flatnce_has_infonces_gradient() -> None:
    """Older JaxGCRL's ``flatnce`` keeps the diagonal in ``logsumexp(logits - diag[:, None])``
    (a term exp(0) = 1), so its c_i is row i's InfoNCE loss: its gradient is ``infonce``'s,
    not that of crl-fast's ``flatnce`` (the paper's, over j != i)."""
    phi, psi = rows(4)
    logits = jaxgcrl_logits("dot", phi, psi)
    c = (logits - logits.diagonal()[:, None]).logsumexp(1)
    up = torch.exp(c - c.detach()).mean()
    assert_same_grads(up, contrastive_loss(phi, psi, loss="infonce", backend="torch"), (phi, psi))
    flat = torch.autograd.grad(contrastive_loss(phi, psi, loss="flatnce", backend="torch"), phi)
    assert not torch.allclose(flat[0], torch.autograd.grad(up, phi, retain_graph=True)[0])


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_dpo_ipo_average_over_the_diagonal_too(loss: str) -> None:
    """Older JaxGCRL averages over all B x B pairs, the diagonal's constant term (log 2 for dpo,
    1 for ipo) included; crl-fast over the B (B - 1) others: upstream = (B - 1) / B * ours +
    const / B, and its gradients are (B - 1) / B times crl-fast's."""
    phi, psi = rows(5)
    logits = jaxgcrl_logits("dot", phi, psi)
    diffs = logits.diagonal()[:, None] - logits
    if loss == "dpo":
        up, const = -F.logsigmoid(diffs).mean(), np.log(2.0)
    else:
        up, const = ((diffs - 1) ** 2).mean(), 1.0
    mine = contrastive_loss(phi, psi, loss=loss, backend="torch")
    torch.testing.assert_close(up, (B - 1) / B * mine + const / B, rtol=1e-12, atol=0)
    assert_same_grads(up, mine, (phi, psi), scale=(B - 1) / B)


def jaxgcrl_fb(logits: torch.Tensor) -> torch.Tensor:
    """Older JaxGCRL's ``fb`` (forward-backward representation loss)."""
    b = logits.shape[0]
    eye = torch.eye(b, dtype=logits.dtype)
    l_align = -logits.diagonal()
    l_unif = 0.5 * (logits**2 * (1 - eye) / (b - 1)).sum(-1)
    return (l_align + l_unif).mean()


def jaxgcrl_sppo(logits: torch.Tensor) -> torch.Tensor:
    """Older JaxGCRL's ``sppo``: positives to 1, negatives to -1, positives weighted B."""
    b = logits.shape[0]
    eye = torch.eye(b, dtype=logits.dtype)
    target = -1 + 2 * eye
    scale = torch.ones(b, b, dtype=logits.dtype) + (b - 1) * eye
    return ((logits - target) ** 2 * scale).mean()


@pytest.mark.parametrize("loss", ["fb", "sppo"])
def test_fb_sppo_are_jaxgcrls(loss: str) -> None:
    """Older JaxGCRL's ``fb`` and ``sppo`` on a square batch (where crl-fast's M - 1 and M are
    its B - 1 and B), with the default ``norm`` energy and a logit scale and bias: the same value
    and gradients."""
    phi, psi = rows(6)
    log_scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    logits = jaxgcrl_logits("norm", phi, psi) * log_scale.exp() + bias
    up = (jaxgcrl_fb if loss == "fb" else jaxgcrl_sppo)(logits)
    kw = {"log_scale": log_scale, "bias": bias}
    mine = contrastive_loss(phi, psi, loss=loss, energy="norm", backend="torch", **kw)
    torch.testing.assert_close(mine, up, rtol=1e-12, atol=0)
    assert_same_grads(up, mine, (phi, psi, log_scale, bias))


def test_goal_law_is_the_upstream_matrix_row() -> None:
    """JaxGCRL's ``flatten_batch`` (and contrastive_rl's ``flatten_fn``) draw goal index j > i
    of the same episode with weight gamma ** (j - i): row i, normalised, is the truncated
    geometric pmf the buffer's chi-square test holds it to (JaxGCRL's 1e-5 on the diagonal
    left out; README, "Differences from JaxGCRL")."""
    gamma, traj = 0.9, np.repeat([0, 1], [12, 7])  # a window holding two episodes
    t = np.arange(len(traj))
    probs = (t[:, None] < t[None]) * gamma ** (t[None] - t[:, None]).astype(float)
    probs = probs * (traj[:, None] == traj[None])
    for i in t:
        later = probs[i][probs[i] > 0]
        if later.size:
            np.testing.assert_allclose(
                later / later.sum(), offset_pmf("geometric", gamma, later.size), rtol=1e-12
            )


def test_actor_and_alpha_losses_are_jaxgcrls() -> None:
    """``update_actor_and_alpha``: ``mean(exp(log_alpha) * log_prob - energy_fn(sa, g))`` on the
    critic's future goals, ``exp(log_alpha) * mean(-log_prob - target_entropy)`` with target
    -0.5 * |A| and log alpha from 0; the same weights and noise, upstream in float64. Its
    ``log(1 - tanh(x)^2 + 1e-6)`` moves each log-probability by up to 1e-6 / (1 - tanh(x)^2) a
    dimension (crl-fast's is exact): the tolerance allows that and no more."""
    torch.manual_seed(0)
    agent = CRL(5, 2, 3, AgentConfig(width=32, repr_dim=8, loss="infonce", energy="norm"))
    g = torch.Generator().manual_seed(1)
    obs, goal = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
    action = torch.rand(16, 2, generator=g) * 2 - 1
    with torch.no_grad():
        means, log_stds = (t.double() for t in agent.actor.distribution_params(obs, goal))
        torch.manual_seed(2)  # the update's first draw is the actor's noise
        x_ts = means + log_stds.exp() * torch.randn(means.shape).double()
        act = torch.tanh(x_ts)
        log_prob = torch.distributions.Normal(means, log_stds.exp()).log_prob(x_ts)
        log_prob = (log_prob - torch.log(1 - act**2 + 1e-6)).sum(-1)
        sa_repr = agent.sa_encoder(obs, act.float()).double()
        qf_pi = jaxgcrl_energy("norm", sa_repr, agent.goal_encoder(goal).double())
        actor_loss = (np.exp(0.0) * log_prob - qf_pi).mean()
        alpha_loss = np.exp(0.0) * (-log_prob - (-0.5 * 2)).mean()
        eps_effect = (1e-6 / (1 - act**2)).sum(-1).mean().item()
    torch.manual_seed(2)
    metrics = agent.update((obs, action, goal))
    for name, want in (("actor/loss", actor_loss), ("alpha/loss", alpha_loss)):
        torch.testing.assert_close(metrics[name].double(), want, rtol=1e-6, atol=eps_effect + 1e-6)
