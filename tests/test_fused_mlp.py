"""The fused MLP kernels (Triton interpreter on CPU) against the float64 reference.

Forward and every gradient must be no worse than eager PyTorch's ``nn.Linear`` layers in the same
dtype, against float64 truth; the layers also stand in wherever the kernels cannot run.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from unittest import mock

import pytest
import torch

from crl_fast import fused_mlp as fused_mlp_module
from crl_fast.agent import CRL
from crl_fast.buffer import GoalBatch
from crl_fast.config import AgentConfig
from crl_fast.fused_mlp import mlp_reference
from crl_fast.networks import MLP
from tests.helpers import assert_no_worse_than_eager

SHAPES = [  # (input widths, hidden width, output, rows)
    ((35,), 64, 32, 40),
    ((27, 8), 32, 16, 130),  # several row blocks and weight-gradient row steps
    ((3, 2), 48, 5, 17),  # odd: padded width and output, a partial row block
    ((70,), 16, 16, 1),  # two input blocks, one row
    ((65, 1), 100, 70, 33),  # two layer-2 column blocks, several weight-gradient tiles
    ((1, 1), 1, 1, 1),  # every size 1: compiled, ints equal to 1 are specialised to constants
]
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.interpreter),
    pytest.param("cuda", marks=pytest.mark.gpu),  # compiled: padding, masks, specialisations
]
ACTIVATIONS = ("swish", "relu")
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _net(in_dims: tuple[int, ...], width: int, out: int, activation: str) -> MLP:
    torch.manual_seed(0)
    net = MLP(sum(in_dims), out, width=width, activation=activation, fused=True)
    for layer in net[::2]:  # the Linears: non-zero biases, so that the check covers them
        torch.nn.init.normal_(layer.bias, std=0.3)
    return net


def _layers(net: MLP) -> MLP:
    """A copy of ``net`` that runs its PyTorch layers (``fused=False``): what the kernels match."""
    layers = copy.deepcopy(net)
    layers.fused = False
    return layers


def _run(net: MLP, inputs: list[torch.Tensor], grad: torch.Tensor, autocast=None):
    """(output, input gradients, parameter gradients) of ``net`` on fresh leaf copies, under
    autocast on their device in that dtype if one is given (else in the caller's autocast)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    net.zero_grad(set_to_none=True)
    device = leaves[0].device.type
    with torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext():
        y = net(*leaves)
    y.backward(grad.to(y.dtype))
    return y.detach(), [x.grad for x in leaves], [p.grad for p in net.parameters()]


@contextlib.contextmanager
def fused_calls() -> Iterator[list[int]]:
    """Counts the fused MLP's calls in the block: a net with ``fused=True`` falls back to its
    layers where the kernels cannot run, and would then match the layers trivially."""
    calls, real = [], fused_mlp_module.fused_mlp
    with mock.patch.object(fused_mlp_module, "fused_mlp", lambda *a: calls.append(1) or real(*a)):
        yield calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(
    "autocast",
    [None, torch.bfloat16, torch.float16],
    ids=["float32", "bf16-autocast", "fp16-autocast"],
)
def test_forward_and_gradients_no_worse_than_eager(shape, activation, autocast, device):
    in_dims, width, out, rows = shape
    net = _net(in_dims, width, out, activation).to(device)
    inputs = [torch.randn(rows, d).to(device) for d in in_dims]
    grad = torch.randn(rows, out).to(device)  # grad_output != 1
    eager_net = _layers(net)
    truth_net = copy.deepcopy(eager_net).double()

    with fused_calls() as calls:
        kernel = _run(net, inputs, grad, autocast)
    assert calls == [1]
    eager = _run(eager_net, inputs, grad, autocast)
    truth = _run(truth_net, [x.double() for x in inputs], grad.double())
    rtol = RTOL[autocast or torch.float32]
    assert kernel[0].dtype == torch.float32  # the inputs' dtype, autocast or not
    assert_no_worse_than_eager("y", kernel[0], eager[0], truth[0], rtol)
    for name, k, e, t in zip(("dx", "dparams"), kernel[1:], eager[1:], truth[1:], strict=True):
        for i, (kk, ee, tt) in enumerate(zip(k, e, t, strict=True)):
            assert_no_worse_than_eager(f"{name}[{i}]", kk, ee, tt, rtol)


@pytest.mark.interpreter
def test_the_kernels_run_and_the_reference_is_the_layers():
    """The fused path is taken (not silently the layers), and mlp_reference equals the layers."""
    net = _net((4, 3), 32, 8, "swish")
    params = [p for layer in net[::2] for p in (layer.weight, layer.bias)]
    x1, x2 = torch.randn(5, 4), torch.randn(5, 3)
    with fused_calls() as calls:
        y = net(x1, x2)
    assert calls == [1]
    with torch.no_grad():
        reference = mlp_reference((x1, x2), params, "swish")
        layers = torch.nn.Sequential(*net)(torch.cat([x1, x2], -1))
    torch.testing.assert_close(reference, layers, rtol=0, atol=0)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)


class _CountLaunches:
    """Stands in for a Triton kernel: counts launches, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.interpreter
def test_partial_requires_grad(monkeypatch):
    """Frozen weights get no gradient and the weight-gradient kernel is not launched; inputs
    without requires_grad get none either; the rest match the layers."""
    from crl_fast.kernels import mlp as kernels

    weight_kernel = _CountLaunches(kernels.backward_weight_kernel)
    monkeypatch.setattr(kernels, "backward_weight_kernel", weight_kernel)
    net = _net((6, 2), 32, 8, "swish")
    eager = _layers(net)
    x1, x2 = torch.randn(9, 6), torch.randn(9, 2, requires_grad=True)
    for p in (*net.parameters(), *eager.parameters()):
        p.requires_grad_(False)
    net(x1, x2).square().sum().backward()
    dx2 = x2.grad.clone()
    x2.grad = None
    eager(x1, x2).square().sum().backward()
    torch.testing.assert_close(dx2, x2.grad, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in net.parameters())
    assert weight_kernel.launches == 0

    net.requires_grad_(True)
    x = torch.randn(9, 8)
    net(x).sum().backward()  # inputs without gradient: only the weights'
    assert all(p.grad is not None for p in net.parameters())
    assert weight_kernel.launches == 1


@pytest.mark.interpreter
def test_odd_layouts_leading_dims_and_many_inputs():
    """Inputs with a row stride, with a column stride, with leading dimensions, and three of them,
    all as the layers compute them."""
    net = _net((4, 3), 32, 8, "relu")
    eager = _layers(net)
    big = torch.randn(2, 5, 16)
    a, b = big[..., :4], big[..., 4:10:2]  # row-strided; column-strided
    three = (torch.randn(3, 4), torch.randn(3, 1), torch.randn(3, 2))
    with fused_calls() as calls:
        two_inputs, three_inputs = net(a, b), net(*three)
    assert calls == [1, 1]
    torch.testing.assert_close(two_inputs, eager(a, b), rtol=1e-5, atol=1e-5)
    assert two_inputs.shape == (2, 5, 8)
    torch.testing.assert_close(three_inputs, eager(*three), rtol=1e-5, atol=1e-5)


def test_the_layers_take_what_the_kernels_cannot():
    """float64 and an empty batch go through the layers: same results as fused=False."""
    net = _net((5,), 16, 4, "swish").double()
    eager = _layers(net)
    x = torch.randn(7, 5, dtype=torch.float64)
    assert not fused_mlp_module.can_run([x], list(net.parameters()))
    torch.testing.assert_close(net(x), eager(x), rtol=0, atol=0)
    empty = net.float()(torch.randn(0, 5))
    assert empty.shape == (0, 4)
    empty.sum().backward()  # zero gradients, no kernel launch
    assert all((p.grad == 0).all() for p in net.parameters())


@pytest.mark.parametrize(
    "kwargs",
    [{"depth": 3}, {"layer_norm": True}, {"residual": True, "depth": 4}, {"width": 512}],
    ids=str,
)
def test_fused_rejects_networks_the_kernels_do_not_cover(kwargs):
    with pytest.raises(ValueError, match=r"fused MLP kernels \(fused=True, --fused-mlp\) take"):
        MLP(5, 4, fused=True, **kwargs)


def test_state_dict_is_the_same_with_and_without_fused():
    fused = _net((5,), 16, 4, "swish")
    plain = MLP(5, 4, width=16)
    plain.load_state_dict(fused.state_dict())
    assert list(plain.state_dict()) == list(fused.state_dict())


def test_compiled_forward_and_backward():
    """Under torch.compile (AOT autograd over the custom ops' fake kernels) the fused MLP gives
    the eager results."""
    net = _net((6, 2), 32, 8, "swish")
    x1, x2 = torch.randn(9, 6), torch.randn(9, 2, requires_grad=True)
    want = _run(net, [x1, x2], torch.ones(9, 8))
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    got = _run(compiled, [x1, x2], torch.ones(9, 8))
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[1] + got[2], want[1] + want[2], strict=True):
        torch.testing.assert_close(g, w)


def test_agent_update_with_fused_networks_matches_the_layers():
    """One update of an agent built with fused_mlp computes every gradient as the layers do (the
    gradients, not only the stepped weights: Adam's first step is lr * sign(g), whatever |g|)."""
    torch.manual_seed(1)
    batch = GoalBatch(torch.randn(32, 5), torch.rand(32, 2) * 2 - 1, torch.randn(32, 3))
    agents = []
    for fused in (False, True):
        torch.manual_seed(0)
        agent = CRL(5, 2, 3, AgentConfig(width=32, repr_dim=16, fused_mlp=fused))
        torch.manual_seed(2)  # the same actor noise
        agent.update(batch)
        agents.append(agent)
    torch.testing.assert_close(agents[1].log_alpha, agents[0].log_alpha)
    for net in ("sa_encoder", "goal_encoder", "actor"):
        layers = dict(getattr(agents[0], net).named_parameters())
        for name, p in getattr(agents[1], net).named_parameters():
            want = layers[name]
            torch.testing.assert_close(p.grad, want.grad, rtol=1e-4, atol=1e-7, msg=name)
            torch.testing.assert_close(p, want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_mlp_matches_the_layers_and_replays_in_a_cuda_graph(dtype):
    """On CUDA: JaxGCRL's encoder shape (35 -> 256 -> 256 -> 64), 256 and 1000 rows, against
    float64 truth (bfloat16: under autocast); then forward + backward captured in a CUDA graph
    and replayed on new inputs."""
    autocast = dtype == torch.bfloat16
    for rows in (256, 1000):
        net = _net((27, 8), 256, 64, "swish").cuda()
        eager = _layers(net)
        truth_net = copy.deepcopy(eager).double()
        inputs = [torch.randn(rows, d, device="cuda") for d in (27, 8)]
        grad = torch.randn(rows, 64, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            with fused_calls() as calls:
                kernel = _run_cuda(net, inputs, grad)
            assert calls == [1]
            want = _run_cuda(eager, inputs, grad)
        truth = _run_cuda(truth_net, [x.double() for x in inputs], grad.double())
        for i, (k, e, t) in enumerate(zip(kernel, want, truth, strict=True)):
            assert_no_worse_than_eager(f"output/grad {i}", k, e, t, RTOL[dtype])

    static = [torch.randn(256, d, device="cuda") for d in (27, 8)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        net(*static).sum().backward()  # warm-up: compiles the kernels
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    net.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        out = net(*static)
        out.sum().backward()
    new = [torch.randn(256, d, device="cuda") for d in (27, 8)]
    for s, n in zip(static, new, strict=True):
        s.copy_(n)
    net.zero_grad(set_to_none=False)
    graph.replay()
    torch.testing.assert_close(out, eager(*new), rtol=2e-2, atol=2e-2)


def _run_cuda(net, inputs, grad):
    y, _, dparams = _run(net, inputs, grad)
    return [y, *dparams]


@pytest.mark.parametrize(
    "inputs",
    [
        [torch.randn(8, 10)],  # too narrow
        [torch.randn(8, 40)],  # too wide
        [torch.randn(64, 6), torch.randn(1, 6)],  # different batches
        [torch.randn(2, 3, 6), torch.randn(3, 2, 6)],
        [torch.randn(8, 12, dtype=torch.bfloat16)],  # float32 weights, no autocast
        [torch.tensor(1.0)],  # no dimension to take the features from
    ],
    ids=["narrow", "wide", "rows", "leading", "dtype", "scalar"],
)
def test_inputs_the_layers_reject_get_their_error(inputs):
    """What the layers cannot take never reaches the kernels (which would read past a weight or
    an input): the layers raise their own error."""
    net = _net((12,), 32, 5, "swish")
    assert not fused_mlp_module.can_run(inputs, list(net.parameters()))
    layers = _layers(net)
    with pytest.raises(RuntimeError) as expected:
        layers(*inputs)
    with pytest.raises(RuntimeError) as got:
        net(*inputs)
    assert str(got.value) == str(expected.value)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's matmul
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_and_inf_propagate_as_in_the_layers(activation):
    net = _net((6,), 16, 4, activation)
    eager = _layers(net)
    x = torch.randn(5, 6)
    x[1, 2], x[3, 0], x[4, 4] = float("nan"), float("inf"), -float("inf")
    with fused_calls() as calls:
        got = net(x)
    assert calls == [1]
    torch.testing.assert_close(got, eager(x), equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's matmul
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("width", [3, 16], ids=["padded", "unpadded"])
def test_non_finite_inputs_give_the_layers_outputs_and_gradients(activation, width):
    """Rows with inf, -inf or NaN: the layers' outputs and every gradient, finite ones included.
    Padded hidden units (width 3) must not make inf * 0 = NaN for the real ones through their zero
    weights, and relu's gradient passes where its input is NaN, as torch's threshold_backward's."""
    net = _net((6,), width, 4, activation)
    eager = _layers(net)
    torch.manual_seed(3)
    x, grad = torch.randn(6, 6), torch.randn(6, 4)
    x[1, 2], x[3, 0], x[4, 4], x[5, 1] = float("nan"), float("inf"), -float("inf"), float("inf")
    with fused_calls() as calls:
        got = _run(net, [x], grad)
    assert calls == [1]
    want = _run(eager, [x], grad)
    for g, w in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]], strict=True):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_an_input_without_columns_after_the_first():
    """An encoder input of width 0 after the first: the kernels take it, as the layers do."""
    net = _net((5,), 16, 3, "relu")
    eager = _layers(net)
    inputs, grad = [torch.randn(2, 4, 5), torch.randn(2, 4, 0)], torch.randn(2, 4, 3)
    with fused_calls() as calls:
        got = _run(net, inputs, grad)
    assert calls == [1]
    want = _run(eager, inputs, grad)
    for g, w in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
def test_batched_gradients_raise_a_clear_error():
    """is_grads_batched=True (and jacobian(vectorize=True)) vmaps the backward: the ops' error,
    not Triton's "Cannot access storage of BatchedTensorImpl"."""
    net = _net((6,), 16, 4, "swish")
    x = torch.randn(3, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="vmapped backward"):
        torch.autograd.grad(net(x), x, torch.eye(12).reshape(12, 3, 4), is_grads_batched=True)
    with pytest.raises(RuntimeError, match="vmapped backward"):
        torch.autograd.functional.jacobian(net, x, vectorize=True)


@pytest.mark.interpreter
def test_double_backward_is_refused():
    """create_graph=True would make the kernels' gradients constants: refused, not wrong."""
    net = _net((6,), 16, 4, "swish")
    x = torch.randn(5, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(net(x).sum(), x, create_graph=True)


@pytest.mark.interpreter
def test_custom_ops_pass_opcheck():
    """torch.library's checks of both ops: schema, fake kernels, autograd registration."""
    from crl_fast.fused_mlp import _backward_op, _forward_op

    net = _net((6, 2), 32, 8, "swish")
    params = [p for layer in net[::2] for p in (layer.weight, layer.bias)]
    x1, x2 = torch.randn(9, 6, requires_grad=True), torch.randn(9, 2)
    torch.library.opcheck(_forward_op, (x1, x2, *params, 0, torch.float32, True))
    y, z1, z2 = _forward_op(x1.detach(), x2, *(p.detach() for p in params), 0, torch.float32, True)
    dy = torch.randn_like(y)
    args = (dy, x1.detach(), x2, *(p.detach() for p in params[::2]), z1, z2, 0, True, True)
    torch.library.opcheck(_backward_op, args)


@pytest.mark.parametrize("fused", [False, True], ids=["layers", "fused_mlp"])
def test_frozen_forward_gives_input_gradients_only(fused, monkeypatch):
    """frozen=True: the same output and input gradient, no parameter gradient, and with the
    fused kernels no weight-gradient launch."""
    from crl_fast.kernels import mlp as kernels

    weight_kernel = _CountLaunches(kernels.backward_weight_kernel)
    monkeypatch.setattr(kernels, "backward_weight_kernel", weight_kernel)
    net = _net((6, 2), 32, 8, "swish")
    net.fused = fused
    x1, x2 = torch.randn(9, 6), torch.randn(9, 2, requires_grad=True)
    y = net(x1, x2, frozen=True)
    (dx2,) = torch.autograd.grad(y.square().sum(), x2, retain_graph=True)
    y.sum().backward()  # the graph holds no parameter
    assert all(p.grad is None for p in net.parameters())
    assert weight_kernel.launches == 0
    want = net(x1, x2)
    (want_dx2,) = torch.autograd.grad(want.square().sum(), x2)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    torch.testing.assert_close(dx2, want_dx2, rtol=0, atol=0)


@pytest.mark.interpreter
def test_agent_update_launches_no_weight_gradients_for_the_actors_critic(monkeypatch):
    """The actor's step reads phi(s, pi(s, g)) frozen: one update launches the weight-gradient
    kernel for the critic's two encoders and the actor only."""
    from crl_fast.kernels import mlp as kernels

    weight_kernel = _CountLaunches(kernels.backward_weight_kernel)
    monkeypatch.setattr(kernels, "backward_weight_kernel", weight_kernel)
    agent = CRL(5, 2, 3, AgentConfig(width=32, repr_dim=16, fused_mlp=True))
    agent.update(GoalBatch(torch.randn(32, 5), torch.rand(32, 2) * 2 - 1, torch.randn(32, 3)))
    assert weight_kernel.launches == 3


def test_kernel_launcher_refuses_strided_columns():
    """The fused MLP's launcher passes a row stride only: column-strided inputs are refused (the
    MLP module makes such inputs contiguous before it calls the kernels)."""
    from crl_fast.kernels import mlp as kernels

    net = _net((6,), 16, 4, "swish")
    params = tuple(p.detach() for layer in net[::2] for p in (layer.weight, layer.bias))
    x = torch.randn(6, 5).t()  # (5, 6), strides (1, 5)
    with pytest.raises(ValueError, match="x1 needs unit column stride"):
        kernels.forward(x, x[:, :0], params, 0, torch.float32, False)
