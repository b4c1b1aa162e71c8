"""One network pass, the fused MLP kernels (``crl_fast.fused_mlp``) against PyTorch's layers.

    python -m bench.bench_mlp                                     # GPU: batch 256 and 4096
    python -m bench.bench_mlp --device cpu --batch 40 --width 32  # CPU (TRITON_INTERPRET=1: fused)

JaxGCRL's state-action encoder: 27 + 8 inputs -> 256 -> 256 -> 64, swish. Passes: ``forward``
(no gradient, as acting) and ``train`` (forward, then backward to the weights, as the critic's
step). Precisions: float32 (TF32 on CUDA, as training) and bfloat16 autocast. ``fused 32 rows``
runs the row kernels on 32-row programs instead of 16 (half the programs, so half the weight
reads from L2 at large batches; compiles for sm_90 with at most 8 B spilled). Before timing, the
output and the weight gradients of each implementation are checked against float64: the fused
ones must be no worse than twice the layers' error plus 1e-6 (status WRONG otherwise, untimed).
On CUDA each timing replays a CUDA graph of ``--graph-reps`` passes (the GPU work alone; the
graph's own launch spread over them), and the kernels of one pass are counted. The update
benchmark (``bench_update``'s ``+fused`` modes) says what this is worth in a whole update. Writes
bench/results/mlp-<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Callable, Iterator

import torch

from bench.harness import (
    add_device_argument,
    add_name_argument,
    cuda_kernels,
    device_label,
    graphed,
    measure,
    positive_int,
    print_table,
    write_results,
)
from crl_fast import fused_mlp
from crl_fast.networks import MLP

ROWS = {"layers": None, "fused": None, "fused 32 rows": 32}
"""Each implementation and the rows per program of its row kernels (None: the library's)."""

INPUTS, OUT_DIM = (27, 8), 64  # bench_update's state and action -> repr 64


def _pass(
    net: MLP, inputs: list[torch.Tensor], kind: str, amp: bool
) -> Callable[[], list[torch.Tensor]]:
    """A callable running one pass; it returns the output and, for ``train``, the weights'
    gradients (``torch.autograd.grad``: nothing accumulates, so a graph can replay it)."""
    params = list(net.parameters())
    device = inputs[0].device.type

    def run() -> list[torch.Tensor]:
        autocast = torch.autocast(device, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with torch.set_grad_enabled(kind == "train"), autocast:
            y = net(*inputs)
        if kind == "forward":
            return [y]
        return [y.detach(), *torch.autograd.grad(y.square().mean(), params)]

    return run


@contextlib.contextmanager
def _row_tile(rows: int | None) -> Iterator[None]:
    """The fused row kernels on ``rows``-row programs inside the block (None: unchanged)."""
    from crl_fast.kernels import mlp as kernels

    saved = kernels.FORWARD_TILE
    if rows is not None:
        kernels.FORWARD_TILE = saved | {"BLOCK_M": rows}
    try:
        yield
    finally:
        kernels.FORWARD_TILE = saved


def _error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest relative (Frobenius) error over the output and the gradients."""
    return max(((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[256, 4096])
    most = fused_mlp.MAX_WIDTH
    parser.add_argument("--width", type=positive_int, default=256, help=f"at most {most}")
    parser.add_argument("--graph-reps", type=positive_int, default=20, help="passes per graph")
    add_name_argument(parser, "mlp")
    args = parser.parse_args()
    if args.width > most:
        parser.error(f"--width: the fused kernels take at most {most}, got {args.width}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32, as training on CUDA
    torch.manual_seed(0)
    fused = MLP(sum(INPUTS), OUT_DIM, width=args.width, fused=True).to(device)
    for layer in fused:  # the Linears: non-zero biases, so that the check covers them
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.bias, std=0.1)
    layers = copy.deepcopy(fused)
    layers.fused = False
    exact = copy.deepcopy(layers).double()
    rows: list[dict[str, object]] = []
    extra = {"fp32_matmul_precision": torch.get_float32_matmul_precision()}  # high: TF32
    for batch in args.batch:
        inputs = [torch.randn(batch, d, device=device) for d in INPUTS]
        params = list(fused.parameters())
        fused_path = "triton" if fused_mlp.can_run(inputs, params) else "layers (no Triton here)"
        for amp in (False, True):
            for kind in ("forward", "train"):
                want = _pass(exact, [x.double() for x in inputs], kind, amp=False)()
                impls = {
                    name: _pass(layers if name == "layers" else fused, inputs, kind, amp)
                    for name in ROWS
                }
                errors = {}
                for name, fn in impls.items():
                    with _row_tile(ROWS[name]):
                        errors[name] = _error(fn(), want)
                ok = all(err <= 2 * errors["layers"] + 1e-6 for err in errors.values())
                for name, fn in impls.items():
                    row: dict[str, object] = {
                        "impl": name,
                        "path": "layers" if name == "layers" else fused_path,
                    }
                    row |= {"pass": kind, "B": batch, "width": args.width}
                    row |= {"precision": "bf16 autocast" if amp else "float32"}
                    row |= {"rel_error": errors[name], "status": "ok" if ok else "WRONG"}
                    if ok:
                        reps = args.graph_reps if cuda else 1
                        with _row_tile(ROWS[name]):  # a graph keeps the tile it captured
                            step: Callable[[], object] = fn
                            if cuda:

                                def passes(
                                    fn: Callable[[], object] = fn, n: int = reps
                                ) -> list[object]:
                                    return [fn() for _ in range(n)]

                                step = graphed(passes, device)
                            timing = measure(step, device=device, warmup=3, rep=20, memory=False)
                            row["us_per_pass"] = timing["median_ms"] * 1e3 / reps
                            row |= {"calls": timing["calls"], "timer": timing["timer"]}
                            if cuda:
                                row |= cuda_kernels(fn, device, per="pass")
                    rows.append(row)
                    print(row, flush=True)
                    # after every row: a run stopped by a time limit keeps its rows
                    write_results(args.name or "mlp", device, rows, extra=extra, complete=False)
    path = write_results(args.name or "mlp", device, rows, extra=extra)
    label = device_label(device)
    cols = ["impl", "path", "pass", "B", "precision", "rel_error", "us_per_pass", "status"]
    print_table(rows, [*cols, "kernels_per_pass"], title=f"MLP pass, {label} ({path.name})")


if __name__ == "__main__":
    main()
