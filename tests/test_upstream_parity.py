"""crl-fast's options against the upstream formulas, transcribed plainly in float64.

JaxGCRL: ``jaxgcrl/agents/crl/losses.py`` (current: ``energy_fn``, ``contrastive_loss_fn``, the
penalty in ``update_critic``) and ``src/losses.py`` (older: flatnce, dpo, ipo, fb, sppo,
``resubs``).
open_clip: ``src/open_clip/loss.py`` (``SigLipLoss``: ``_loss`` and the distributed variants'
``negative_only`` blocks), with the model's ``logit_scale`` (a log, exponentiated) and
``logit_bias``; big_vision: ``big_vision/trainers/proj/image_text/siglip.py`` (``loss_fn``).
contrastive_rl (Eysenbach et al. 2022): ``contrastive_rl/contrastive/learning.py``
(``critic_loss``'s ``loss_fn``) and ``builder.py`` (``flatten_fn``'s goal law). Each test is
one row of the README's table "From JaxGCRL and contrastive_rl" (the SigLIP tests: its section
"From open_clip and big_vision"): where crl-fast differs, the test states the documented
relation.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crl_fast import ContrastiveLoss, contrastive_loss
from crl_fast.agent import CRL
from crl_fast.config import AgentConfig
from crl_fast.energy import pairwise_energy
from tests.helpers import RTOL, assert_no_worse_than_eager
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


LOG_10 = math.log(10)  # open_clip's and big_vision's SigLIP init: scale 10, bias -10


def open_clip_siglip(
    img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """open_clip's ``SigLipLoss._loss`` on a rank's ``img`` rows against texts whose first rows
    are their positives (labels ``2 I - 1``) and whose other rows are the other ranks' texts
    (``negative_only``: labels -1), as its distributed variants add them up: the summed
    ``-log sigmoid(labels * logits)`` divided by this rank's rows. The towers' outputs are
    normalised (``F.normalize``) and ``logit_scale`` is the stored log, exponentiated by the
    model. big_vision's ``loss_fn`` is the same (the mean over rows of row sums; it divides by
    ``norm + 1e-8``, 1e-8 off unit rows)."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = logit_scale.exp() * img @ txt.T + logit_bias
    labels = 2 * torch.eye(*logits.shape, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


def siglip_module(**kw: Any) -> ContrastiveLoss:
    """The README's SigLIP: cosine energy, learned scale and bias from open_clip's init, the
    sum (to be divided by the rows)."""
    return ContrastiveLoss(
        "binary",
        energy="cosine",
        learn_scale=True,
        init_log_scale=LOG_10,
        learn_bias=True,
        init_bias=-10.0,
        reduction="sum",
        **kw,
    )


def open_clip_leaves(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``logit_scale`` and ``logit_bias``: 0-d, from ``log(10)`` and -10."""
    scale = torch.tensor(LOG_10, dtype=dtype, requires_grad=True)
    return scale, torch.tensor(-10.0, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("texts", [9, 14], ids=["square", "other-ranks-texts"])
def test_siglip_is_open_clips_in_float64(texts: int) -> None:
    """The README's SigLIP module, its sum divided by B, is open_clip's loss exactly: value and
    gradients for both towers' outputs and the (log) scale and bias; with extra texts, those of
    open_clip's ``negative_only`` blocks."""
    g = torch.Generator().manual_seed(7)
    img = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(texts, D, generator=g, dtype=torch.float64, requires_grad=True)
    module = siglip_module(backend="torch", dtype=torch.float64)
    scale, bias = open_clip_leaves()
    up = open_clip_siglip(img, txt, scale, bias)
    mine = module(img, txt) / B
    torch.testing.assert_close(mine, up, rtol=1e-12, atol=0)
    want = torch.autograd.grad(up, (img, txt, scale, bias))
    got = torch.autograd.grad(mine, (img, txt, module.log_scale, module.bias))
    for w, k in zip(want, got, strict=True):
        torch.testing.assert_close(k.reshape(w.shape), w, rtol=0, atol=1e-12 * w.abs().max())


@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_siglip_no_worse_than_open_clip_in_its_dtype(dtype: torch.dtype, backend: str) -> None:
    """Towers' outputs in ``dtype``, float32 scale and bias (mixed precision), 14 texts (other
    ranks' as negatives): crl-fast's error against open_clip's formula in float64 is no worse
    than that formula's own in ``dtype``, value and all four gradients."""
    g = torch.Generator().manual_seed(8)
    img, txt = torch.randn(B, D, generator=g), torch.randn(14, D, generator=g)
    module = siglip_module(backend=backend)

    def loss_and_grads(fn, scale, bias, dt):
        x, y = (t.to(dt).requires_grad_() for t in (img, txt))
        value = fn(x, y, scale, bias)
        return value, torch.autograd.grad(value, (x, y, scale, bias))

    truth = loss_and_grads(open_clip_siglip, *open_clip_leaves(), torch.float64)
    eager = loss_and_grads(open_clip_siglip, *open_clip_leaves(torch.float32), dtype)
    mine = loss_and_grads(lambda x, y, *_: module(x, y) / B, module.log_scale, module.bias, dtype)
    assert_no_worse_than_eager("loss", mine[0], eager[0], truth[0], RTOL[dtype])
    names = ("dimg", "dtxt", "dlog_scale", "dbias")
    for name, k, e, t in zip(names, mine[1], eager[1], truth[1], strict=True):
        assert k.dtype == e.dtype
        assert_no_worse_than_eager(name, k.reshape(t.shape), e, t, RTOL[dtype])


class TwoTowers(torch.nn.Module):
    """A CLIP-like model, two linear towers, and its SigLIP loss: crl-fast's module (its sum
    over B) or, with ``open_clip``, open_clip's formula on 0-d ``logit_scale`` and
    ``logit_bias`` parameters, as its models hold them."""

    def __init__(self, open_clip: bool = False) -> None:
        super().__init__()
        self.img, self.txt = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
        if open_clip:
            self.logit_scale = torch.nn.Parameter(torch.ones([]) * LOG_10)
            self.logit_bias = torch.nn.Parameter(torch.ones([]) * -10.0)
        else:
            self.siglip = siglip_module()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.loss(self.img(image), self.txt(text))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The SigLIP loss of the towers' outputs."""
        if hasattr(self, "siglip"):
            return self.siglip(x, y) / x.shape[0]
        return open_clip_siglip(x, y, self.logit_scale, self.logit_bias)

    def accumulate(self, images: torch.Tensor, texts: torch.Tensor, cached: bool) -> None:
        """Gradients of two micro-batches: each one's loss over its own pairs, halved, or with
        ``cached`` open_clip's ``accum_freq``: each micro-batch's features recomputed live among
        the other's cached ones, the loss over the whole batch."""
        chunks = list(zip(images.chunk(2), texts.chunk(2), strict=True))
        if not cached:
            for image, text in chunks:
                (self(image, text) / 2).backward()
            return
        with torch.no_grad():
            features = [(self.img(image), self.txt(text)) for image, text in chunks]
        for j, (image, text) in enumerate(chunks):
            live = [
                (self.img(image), self.txt(text)) if i == j else f for i, f in enumerate(features)
            ]
            self.loss(*(torch.cat(side) for side in zip(*live, strict=True))).backward()

    def ordered_parameters(self) -> list[torch.Tensor]:
        """The towers', then the (log) scale and the bias: the same order in both twins."""
        s = self.siglip if hasattr(self, "siglip") else None
        scale_and_bias = (s.log_scale, s.bias) if s else (self.logit_scale, self.logit_bias)
        return [*self.img.parameters(), *self.txt.parameters(), *scale_and_bias]


def twins() -> tuple[TwoTowers, TwoTowers]:
    """crl-fast's model and open_clip's, with the same towers."""
    torch.manual_seed(0)
    mine, theirs = TwoTowers(), TwoTowers(open_clip=True)
    theirs.load_state_dict(mine.state_dict(), strict=False)  # the towers
    return mine, theirs


def image_text_batch(rows: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    return torch.randn(rows, 6, generator=g), torch.randn(rows, 5, generator=g)


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "accum_freq"])
def test_siglip_model_trains_like_open_clips_with_accumulation_and_a_saved_state(
    cached: bool,
) -> None:
    """Three SGD steps of two micro-batches each (see ``TwoTowers.accumulate``), the crl-fast
    model saved and loaded in between: its towers, scale and bias end where open_clip's
    twin's do."""
    mine, theirs = twins()
    images, texts = image_text_batch()
    for step in range(3):
        if step == 1:  # a checkpoint round trip, into a fresh model
            saved = io.BytesIO()
            torch.save(mine.state_dict(), saved)
            mine = TwoTowers()
            mine.load_state_dict(torch.load(io.BytesIO(saved.getvalue())))
        for model in (mine, theirs):
            model.zero_grad()
            model.accumulate(images, texts, cached)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.5 * p.grad
    state = theirs.state_dict()
    state["siglip.log_scale"] = state.pop("logit_scale").reshape(1)
    state["siglip.bias"] = state.pop("logit_bias").reshape(1)
    assert mine.siglip.bias.item() != -10.0  # the bias trained
    for name, value in mine.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.usefixtures("fresh_dynamo")
def test_siglip_model_under_autocast_and_compiled() -> None:
    """A step under bfloat16 autocast: the gradients are no worse against open_clip's twin in
    float64 than the twin's own under autocast, and the model compiled whole (fullgraph) gives
    what it gives eagerly."""
    mine, theirs = twins()
    images, texts = image_text_batch(8)

    def step(model: TwoTowers, autocast: bool = True) -> list[torch.Tensor]:
        model.zero_grad()
        dtype = model.img.weight.dtype
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(images.to(dtype), texts.to(dtype))
        loss.backward()
        return [loss.detach(), *(p.grad.clone() for p in model.ordered_parameters())]

    got, eager = step(mine), step(theirs)
    truth = step(copy.deepcopy(theirs).double(), autocast=False)
    for k, e, t in zip(got, eager, truth, strict=True):
        assert_no_worse_than_eager("loss or a gradient", k.reshape(t.shape), e, t, 1e-2)
    compiled = step(torch.compile(mine, backend="aot_eager", fullgraph=True))
    for k, e in zip(compiled, got, strict=True):
        torch.testing.assert_close(k, e)
