"""Networks: MLP structure and init, residual depth, tanh-Gaussian actor log-probabilities."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, TanhTransform, TransformedDistribution

from crl_fast.networks import MLP, Encoder, ResidualBlock, TanhGaussianActor


def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_plain_mlp_has_depth_hidden_layers_and_lecun_init(depth):
    torch.manual_seed(0)
    net = MLP(7, 3, width=32, depth=depth)
    layers = linears(net)
    assert len(layers) == depth + 1
    assert net(torch.randn(5, 7)).shape == (5, 3)
    for layer in layers:  # U(-b, b), b = sqrt(3 / fan_in): variance 1 / fan_in (not JaxGCRL's 1/3)
        bound = math.sqrt(3.0 / layer.in_features)
        assert 0.9 * bound < layer.weight.abs().max() <= bound  # >= 96 weights a layer
        std = layer.weight.detach().std().item()
        assert std == pytest.approx(math.sqrt(1.0 / layer.in_features), rel=0.2)
        assert torch.all(layer.bias == 0)


def test_layer_norm_and_relu_options():
    net = MLP(4, 2, width=16, depth=3, activation="relu", layer_norm=True)
    assert sum(isinstance(m, nn.LayerNorm) for m in net.modules()) == 3
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 3


def test_residual_mlp_goes_deep():
    net = MLP(4, 8, width=32, depth=64, residual=True)
    blocks = [m for m in net.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 16
    assert sum(isinstance(m, nn.LayerNorm) for m in net.modules()) == 64
    assert len(linears(net)) == 64 + 2  # input layer, 16 blocks x 4, output layer
    x = torch.randn(16, 4)
    out = net(x)
    out.square().sum().backward()
    first = linears(net)[0]
    assert torch.isfinite(out).all()
    assert torch.isfinite(first.weight.grad).all() and first.weight.grad.abs().sum() > 0


def test_residual_mlp_is_the_1000_layer_papers_network():
    """The paper's encoder written out (scaling-crl's train.py): Dense, LayerNorm, swish; then
    depth / 4 blocks of 4 x [Dense, LayerNorm, swish] plus the block's input; then Dense."""
    torch.manual_seed(0)
    net = MLP(5, 3, width=16, depth=8, residual=True, layer_norm=True, init="jaxgcrl")
    dense = iter(linears(net))

    def layer(h: torch.Tensor) -> torch.Tensor:
        return F.silu(F.layer_norm(next(dense)(h), (16,)))

    x = torch.randn(32, 5)
    h = layer(x)
    for _ in range(8 // 4):
        h = h + layer(layer(layer(layer(h))))
    torch.testing.assert_close(net(x), next(dense)(h))


def test_residual_block_adds_its_input():
    """The skip connection: a block's output is its input plus its body's (without the skip,
    a deep stack of normalised layers still trains, so depth alone cannot tell)."""
    block = ResidualBlock(8, "swish")
    x = torch.randn(4, 8)
    assert torch.equal(block(x), x + block.body(x))


def test_mlp_slices_share_its_layers():
    net = Encoder(3, 2, width=8, depth=2)
    features = net[:-1]
    x = torch.randn(4, 3)
    assert isinstance(net[-1], nn.Linear)
    assert torch.equal(net[-1](features(x)), net(x))
    assert features[0] is net[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "tanh"}, "activation"),
        ({"depth": 0}, "depth"),
        ({"depth": 6, "residual": True}, "multiple of 4"),
        ({"init": "xavier"}, r"init must be one of \['jaxgcrl', 'lecun'\], got 'xavier'"),
    ],
)
def test_bad_network_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLP(4, 2, **kwargs)


@pytest.mark.parametrize("flag", ["layer_norm", "residual", "fused"])
def test_network_flags_must_be_bools(flag):
    """A string flag is truthy whatever it says: residual="no" would build residual blocks."""
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'no'"):
        MLP(4, 2, depth=4, **{flag: "no"})


def test_encoder_concatenates_inputs():
    enc = Encoder(5, 3, width=8)
    s, a = torch.randn(2, 3), torch.randn(2, 2)
    assert torch.equal(enc(s, a), MLP.forward(enc, torch.cat([s, a], -1)))


def test_actor_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    actor = TanhGaussianActor(4, 2, 3, width=32).double()
    obs, goal = torch.randn(256, 4, dtype=torch.float64), torch.randn(256, 2, dtype=torch.float64)
    torch.manual_seed(1)
    action, log_prob = actor.sample(obs, goal)
    mean, log_std = actor.distribution_params(obs, goal)
    dist = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform()])
    expected = dist.log_prob(action.clamp(-1 + 1e-12, 1 - 1e-12)).sum(-1)
    assert action.abs().max() <= 1.0
    torch.testing.assert_close(log_prob, expected, rtol=1e-6, atol=1e-6)


def test_actor_is_reparameterised_and_deterministic_mode_is_tanh_mean():
    actor = TanhGaussianActor(4, 2, 2, width=16)
    obs, goal = torch.randn(8, 4), torch.randn(8, 2)
    action, log_prob = actor.sample(obs, goal)
    (action.sum() + log_prob.sum()).backward()
    assert all(p.grad is not None for p in actor.parameters())
    mean, log_std = actor.distribution_params(obs, goal)
    assert torch.equal(actor(obs, goal, deterministic=True), torch.tanh(mean))
    assert log_std.min() >= -5.0 and log_std.max() <= 2.0


def test_jaxgcrl_init_and_separate_actor_size():
    from crl_fast import AgentConfig
    from crl_fast.agent import CRL

    net = MLP(5, 3, width=64, depth=8, residual=True, layer_norm=True, init="jaxgcrl")
    for layer in (m for m in net.modules() if isinstance(m, torch.nn.Linear)):
        bound = math.sqrt(1.0 / layer.in_features)  # variance_scaling(1/3, "fan_in", "uniform")
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    config = AgentConfig(
        residual=True, layer_norm=True, depth=8, width=32, actor_depth=4, actor_width=16
    )
    agent = CRL(3, 2, 2, config)
    linears = [m for m in agent.actor.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6 and linears[0].out_features == 16
    assert len([m for m in agent.sa_encoder.modules() if isinstance(m, torch.nn.Linear)]) == 10
    with pytest.raises(ValueError, match="actor-depth"):
        AgentConfig(residual=True, depth=8, actor_depth=6)
    with pytest.raises(ValueError, match="width must be a positive int"):
        MLP(3, 4, width=0)
