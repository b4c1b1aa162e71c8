"""Networks for contrastive RL: MLPs (plain or residual), two encoders and a tanh-Gaussian actor.

Residual MLPs follow "1000 Layer Networks for Self-Supervised RL" (Wang et al., 2025): an input
layer, then blocks of 4 x [Linear, LayerNorm, activation (swish there)] with a skip connection
around each block, then an output layer, so the depth can reach hundreds of layers. Weights are
uniform (see :data:`INITS`: LeCun's by default, or JaxGCRL's and the paper's) and biases start at
zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crl_fast import fused_mlp
from crl_fast.checks import check_bool, positive_int

ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU}
INITS = {"lecun": 3.0, "jaxgcrl": 1.0}
"""Weight initialisations: U(-b, b) with b = sqrt(value / fan_in). ``lecun``: variance 1 / fan_in;
``jaxgcrl``: JaxGCRL's and the 1000-layer paper's ``variance_scaling(1/3, "fan_in", "uniform")``,
variance 1 / (3 fan_in)."""
RESIDUAL_BLOCK_LAYERS = 4
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def uniform_init_(linear: nn.Linear, init: str = "lecun") -> nn.Linear:
    """Uniform weights (``init``, one of :data:`INITS`) and zero bias, in place."""
    bound = math.sqrt(INITS[init] / linear.in_features)
    nn.init.uniform_(linear.weight, -bound, bound)
    nn.init.zeros_(linear.bias)
    return linear


def _hidden_layer(
    in_dim: int, width: int, activation: str, layer_norm: bool, init: str = "lecun"
) -> list[nn.Module]:
    layers: list[nn.Module] = [uniform_init_(nn.Linear(in_dim, width), init)]
    if layer_norm:
        layers.append(nn.LayerNorm(width))
    layers.append(ACTIVATIONS[activation]())
    return layers


class ResidualBlock(nn.Module):
    """``x + f(x)`` with ``f`` = 4 x [Linear, LayerNorm, activation] (always normalised)."""

    def __init__(self, width: int, activation: str, init: str = "lecun") -> None:
        super().__init__()
        layers = []
        for _ in range(RESIDUAL_BLOCK_LAYERS):
            layers += _hidden_layer(width, width, activation, layer_norm=True, init=init)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class MLP(nn.Sequential):
    """An MLP with ``depth`` hidden layers of size ``width`` and a linear output layer, applied
    to the concatenation of its inputs.

    With ``residual=True`` the hidden part is an input layer followed by ``depth // 4`` residual
    blocks (``depth`` must then be a positive multiple of 4), so it holds ``depth + 1`` hidden
    layers in all; ``layer_norm`` then applies to the input layer (the blocks always normalise).

    ``fused=True`` (two hidden layers, no layer norm or residual blocks, width and output up to
    :data:`crl_fast.fused_mlp.MAX_WIDTH`) runs forward and backward as :mod:`crl_fast.fused_mlp`'s
    Triton kernels wherever they take the inputs (CUDA), and as these layers elsewhere. The
    parameters, and so the state dict, are the same either way.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        width: int = 256,
        depth: int = 2,
        activation: str = "swish",
        layer_norm: bool = False,
        residual: bool = False,
        fused: bool = False,
        init: str = "lecun",
    ) -> None:
        in_dim, out_dim, width, depth = (
            positive_int(name, value)
            for name, value in (
                ("in_dim", in_dim), ("out_dim", out_dim), ("width", width), ("depth", depth)
            )
        )  # fmt: skip
        for name, flag in (("layer_norm", layer_norm), ("residual", residual), ("fused", fused)):
            check_bool(name, flag)  # residual="no" is truthy: it would build residual blocks
        if init not in INITS:
            raise ValueError(f"init must be one of {sorted(INITS)}, got {init!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if residual and depth % RESIDUAL_BLOCK_LAYERS:
            raise ValueError(f"residual networks need depth a multiple of 4, got {depth}")
        layers = _hidden_layer(in_dim, width, activation, layer_norm, init)
        if residual:
            for _ in range(depth // RESIDUAL_BLOCK_LAYERS):
                layers.append(ResidualBlock(width, activation, init))
        else:
            for _ in range(depth - 1):
                layers += _hidden_layer(width, width, activation, layer_norm, init)
        if fused:
            fused_mlp.check_supported(depth, layer_norm, residual, width, out_dim)
        layers.append(uniform_init_(nn.Linear(width, out_dim), init))
        super().__init__(*layers)
        self.activation, self.fused = activation, fused

    def forward(self, *inputs: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """The output in the inputs' dtype: under ``torch.autocast`` the matmuls run in the
        autocast dtype, and what reads the output (the actor's distribution, the energies)
        stays float32. ``frozen``: the parameters enter as constants, so gradients reach the
        inputs only (the actor's step reads the critic so; the fused kernels then skip the
        weight gradients, which ``backward(inputs=...)`` alone cannot tell them)."""
        if frozen:
            constants = {name: p.detach() for name, p in self.named_parameters()}
            return torch.func.functional_call(self, constants, inputs)
        if self.fused:
            linears = [layer for layer in self if isinstance(layer, nn.Linear)]
            params = [p for layer in linears for p in (layer.weight, layer.bias)]
            if fused_mlp.can_run(inputs, params):
                return fused_mlp.fused_mlp(inputs, params, self.activation)
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=-1)
        return super().forward(x).to(x.dtype)

    def __getitem__(self, index: int | slice) -> nn.Module:
        """A layer, or a slice of layers as a plain ``nn.Sequential`` (e.g. ``net[:-1]``)."""
        if isinstance(index, slice):
            return nn.Sequential(*list(self)[index])
        return super().__getitem__(index)


class Encoder(MLP):
    """Maps the concatenation of its inputs to a representation: phi(s, a) or psi(g)."""


def tanh_log_det_jacobian(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - tanh(x)^2)`` computed stably as ``2 * (log 2 - x - softplus(-2x))``."""
    return 2.0 * (math.log(2.0) - x - F.softplus(-2.0 * x))


class TanhGaussianActor(nn.Module):
    """pi(a | s, g): a Gaussian over pre-tanh actions squashed into [-1, 1].

    The log standard deviation is squashed into [LOG_STD_MIN, LOG_STD_MAX] with a tanh, as in
    JaxGCRL's CRL actor.
    """

    def __init__(self, obs_dim: int, goal_dim: int, action_dim: int, **mlp_kwargs: Any) -> None:
        super().__init__()
        self.net = MLP(obs_dim + goal_dim, 2 * action_dim, **mlp_kwargs)

    def distribution_params(
        self, obs: torch.Tensor, goal: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log standard deviation of the pre-tanh Gaussian."""
        mean, log_std = self.net(obs, goal).chunk(2, dim=-1)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1.0)
        return mean, log_std

    def sample(self, obs: torch.Tensor, goal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action a ~ pi(.|s, g) and its log-probability log pi(a|s, g)."""
        mean, log_std = self.distribution_params(obs, goal)
        noise = torch.randn_like(mean)
        x = mean + noise * log_std.exp()
        gaussian_log_prob = -0.5 * noise.square() - log_std - 0.5 * math.log(2.0 * math.pi)
        log_prob = (gaussian_log_prob - tanh_log_det_jacobian(x)).sum(-1)
        return torch.tanh(x), log_prob

    def forward(
        self, obs: torch.Tensor, goal: torch.Tensor, deterministic: bool = False
    ) -> torch.Tensor:
        """An action: tanh(mean) if ``deterministic``, else a sample."""
        if deterministic:
            return torch.tanh(self.distribution_params(obs, goal)[0])
        return self.sample(obs, goal)[0]
