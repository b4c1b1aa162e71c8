"""Gradient updates per second of the CRL agent with JaxGCRL's default networks.

    python -m bench.bench_update       # batch 256 and 4096, DEFAULT_MODES' six (CPU: eager)
    python -m bench.bench_update --batch-size 256 --modes eager

JaxGCRL defaults: 2 x 256 swish MLPs, repr 64, infonce + norm + 0.1 logsumexp penalty, a
tanh-Gaussian actor, Adam 3e-4. Ant-sized inputs: state 27, action 8, goal 2. One update is one
buffer sample plus the actor, alpha and critic steps. A timed call does ``--updates-per-call``
updates (16), of which the last computes the critic's metrics (as a training loop asks for them
only for the update it logs). Modes: ``graph`` (sample + update replayed from a CUDA graph
holding them); ``compile-graph`` (the same with the update ``torch.compile``d first: fewer, fused
kernels in the graph); ``eager`` and ``compile`` (the updates launched back to back, the host
waiting for the GPU once, after the last: each update's launches overlap the GPU's work on the
one before, as in a training loop; one update per sync would add the GPU's time to the host's);
``autotune-graph`` (opt-in: compiled with ``mode="max-autotune-no-cudagraphs"``, whose Triton
matmul templates can take the bias and activation into the product; compiling takes minutes).
A ``+stream`` suffix (``graph+stream``, ``compile-graph+stream``) builds the agent with
``actor_stream=True``: the actor and alpha steps on a second CUDA stream, beside the critic's.
A ``+bf16`` suffix (opt-in: ``graph+bf16``, ``compile-graph+bf16``, ``eager+bf16``) builds it with
``amp="bfloat16"``: the networks' matmuls and the loss in bfloat16 under autocast.
A ``+fused`` suffix (``graph+fused``, ``compile-graph+fused``; opt-in: ``eager+fused``,
``compile-graph+fused+bf16``) builds it with ``fused_mlp=True``: each network's forward one Triton
kernel, its backward two (on the CPU only under TRITON_INTERPRET=1; the layers otherwise, which
the row's ``mlp`` says).
Rows are measured mode by mode, both batch sizes each, and written as they come (a timeout keeps
what ran). Issue targets (H100): batch 256 >= 13,000/s, batch 4096 >= 3,000/s. Writes
bench/results/update-<device>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable

import torch

from bench.harness import (
    add_device_argument,
    add_name_argument,
    back_to_back,
    cuda_kernels,
    default_generator,
    device_label,
    measure,
    note_cuda_only,
    positive_int,
    print_table,
    timed_call,
    tuned_configs,
    write_results,
)
from crl_fast import fused_mlp
from crl_fast.agent import CRL, GraphedUpdates
from crl_fast.buffer import TrajectoryBuffer
from crl_fast.config import JAXGCRL_CRITIC, AgentConfig

OBS_DIM, ACTION_DIM, GOAL_DIM = 27, 8, 2
JAXGCRL_AGENT = AgentConfig(width=256, depth=2, repr_dim=64, **JAXGCRL_CRITIC)
TARGETS = {256: 13_000, 4096: 3_000}
MODES = (
    "compile-graph",
    "compile-graph+fused",
    "graph",
    "graph+fused",
    "compile-graph+stream",
    "graph+stream",
    "eager",
    "compile",
    "autotune-graph",
    "compile-graph+bf16",
    "graph+bf16",
    "eager+bf16",
    "eager+fused",
    "compile-graph+fused+bf16",
)
DEFAULT_MODES = MODES[:6]
"""On CUDA, the fused networks' modes early (a time limit cuts the last); the CPU runs
``eager``."""
COMPILE_OPTIONS = {
    "compile": {},
    "compile-graph": {},
    "autotune-graph": {"mode": "max-autotune-no-cudagraphs"},
}


def filled_buffer(device: torch.device, num_envs: int = 256, steps: int = 1000) -> TrajectoryBuffer:
    """A buffer of random trajectories (episodes of 100 steps)."""
    buffer = TrajectoryBuffer(
        capacity=steps,
        num_envs=num_envs,
        obs_dim=OBS_DIM,
        action_dim=ACTION_DIM,
        goal_dim=GOAL_DIM,
        device=device,
        seed=0,
    )
    done = (torch.arange(steps, device=device) % 100 == 99)[:, None].expand(steps, num_envs)
    buffer.extend(
        {
            "observation": torch.randn(steps, num_envs, OBS_DIM, device=device),
            "action": torch.rand(steps, num_envs, ACTION_DIM, device=device) * 2 - 1,
            "next_achieved_goal": torch.randn(steps, num_envs, GOAL_DIM, device=device),
            "terminated": torch.zeros(steps, num_envs, dtype=torch.bool, device=device),
            "truncated": done,
        }
    )
    return buffer


def _mlp_path(fused: bool, device: torch.device) -> str:
    """What runs the networks: a ``+fused`` mode without the kernels on ``device`` (the CPU
    without TRITON_INTERPRET=1) times the layers, and its row must say so."""
    if not fused:
        return "layers"
    return "fused kernels" if fused_mlp.runs_on(device) else "layers (no Triton here)"


def bench(mode: str, batch_size: int, device: torch.device, updates_per_call: int) -> dict:
    torch.manual_seed(0)
    kind, *suffixes = mode.split("+")
    amp = "bfloat16" if "bf16" in suffixes else "off"
    config = dataclasses.replace(JAXGCRL_AGENT, amp=amp, fused_mlp="fused" in suffixes)
    agent = CRL(OBS_DIM, ACTION_DIM, GOAL_DIM, config, device, actor_stream="stream" in suffixes)
    buffer = filled_buffer(device)
    graphed = kind.endswith("graph")
    last = updates_per_call - 1

    def update(i: int) -> None:
        """A call's update ``i``: only the last computes the critic's metrics."""
        agent.update(buffer.sample(batch_size), critic_metrics=i == last)

    step: Callable[[], object]
    if kind in COMPILE_OPTIONS:
        # A fresh dynamo state, as a new process would have (each agent compiles into caches of
        # its own anyway: crl_fast.compiling.compile_isolated).
        torch._dynamo.reset()
        agent.compile(**COMPILE_OPTIONS[kind])
    if graphed:
        generator = default_generator(device)
        step = GraphedUpdates(
            agent, lambda: buffer.sample(batch_size, generator=generator), steps=updates_per_call
        )
    else:  # the graph's updates, launched: no sync between them
        step = back_to_back(update, updates_per_call)

    cpu = device.type == "cpu"
    timing = measure(
        step, device=device, warmup=3 if cpu else 20, rep=10 if cpu else 50, memory=not graphed
    )

    return {
        "mode": mode,
        "mlp": _mlp_path("fused" in suffixes, device),
        "batch": batch_size,
        "updates_per_call": updates_per_call,
        "timed_call": timed_call(updates_per_call, "updates", device, graph=graphed),
        "cpu_threads": torch.get_num_threads() if cpu else None,
        **timing,
        "updates_per_s": updates_per_call * 1e3 / timing["median_ms"],
        "target_per_s": None if cpu else TARGETS.get(batch_size),
        # the kernels of a call's first update, the kind every update but the last is
        **({} if cpu else cuda_kernels(lambda: update(0), device)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_argument(parser)
    parser.add_argument("--batch-size", type=positive_int, nargs="+", default=[256, 4096])
    parser.add_argument("--modes", nargs="+", default=None, choices=MODES)
    parser.add_argument(
        "--updates-per-call",
        "--graph-steps",
        type=positive_int,
        default=16,
        help="updates per timed call (a CUDA graph's, or the eager and compile modes' run back "
        "to back); default: 16",
    )
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's)")
    add_name_argument(parser, "update, or update-autotuned with CRL_FAST_AUTOTUNE=1")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.set_float32_matmul_precision("high")
    modes = args.modes or (DEFAULT_MODES if cuda else ["eager"])
    if not cuda and any("graph" in mode or "+stream" in mode for mode in modes):
        parser.error("the graph and +stream modes need a CUDA device")
    if not args.modes:
        note_cuda_only(
            device,
            "the graph and +stream modes (CUDA graphs, a second CUDA stream) and, by default, "
            "the others but eager (--modes runs them)",
        )
    # CRL_FAST_AUTOTUNE=1: the loss kernels' tiles are timed per shape in the warm-up updates
    # (before any graph capture); such a run writes a file of its own, with the winners.
    autotuned = os.environ.get("CRL_FAST_AUTOTUNE") == "1"
    name = args.name or ("update-autotuned" if autotuned else "update")
    extra: dict[str, object] = {"fp32_matmul_precision": torch.get_float32_matmul_precision()}
    rows = []
    for mode in modes:
        for batch_size in args.batch_size:
            rows.append(bench(mode, batch_size, device, args.updates_per_call))
            print(rows[-1], flush=True)
            if autotuned:
                extra["tuned_configs"] = tuned_configs()
            # each row: survives a timeout
            write_results(name, device, rows, extra=extra, complete=False)
    path = write_results(name, device, rows, extra=extra)
    label = device_label(device)
    columns = ["mode", "mlp", "batch", "updates_per_call", "median_ms", "updates_per_s"]
    columns += ["target_per_s", "kernels_per_update", "kernel_us_per_update"]
    print_table(rows, columns, title=f"CRL updates/s, JaxGCRL default nets, {label} ({path.name})")


if __name__ == "__main__":
    main()
