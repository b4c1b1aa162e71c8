"""Env throughput: environment steps per second of each torch env for a batch of N envs.

Usage: ``python -m bench.bench_envs [--device cuda] [--num-envs 1024 16384]``. One timed call is
one ``env.step`` of all N envs (random actions generated beforehand), autoresets included. On
CUDA, rows named ``<env>, graph`` replay one step from a CUDA graph: the GPU work alone; rows named
``<env>, compiled`` step after ``env.compile()`` (point U-maze and reacher, by default), as
training on CUDA does.
"""

from __future__ import annotations

import argparse

import torch

from bench.harness import (
    add_device_argument,
    add_name_argument,
    device_label,
    graphed,
    measure,
    note_cuda_only,
    positive_int,
    print_table,
    write_results,
)
from crl_fast.envs import ENV_NAMES, TorchGoalVectorEnv, make_env


def bench(name: str, num_envs: int, device: str, compiled: bool = False) -> dict:
    env = make_env(name, num_envs=num_envs, device=device, seed=0)
    if compiled:
        # --compiled takes ENV_NAMES alone: the built-in envs, all of them torch envs
        assert isinstance(env, TorchGoalVectorEnv)
        env.compile()
    env.reset(seed=0)
    actions = torch.rand(64, num_envs, env.action_dim, device=device) * 2 - 1
    calls = iter(range(10**9))

    def step() -> None:
        env.step(actions[next(calls) % len(actions)])

    timing = measure(step, device=device, warmup=10, rep=100)
    steps_per_s = num_envs / (timing["median_ms"] / 1e3)
    threads = torch.get_num_threads() if torch.device(device).type == "cpu" else None
    return {
        "env": f"{name}, compiled" if compiled else name,
        "num_envs": num_envs,
        "cpu_threads": threads,
        **timing,
        "env_steps_per_s": steps_per_s,
    }


def bench_graphed(name: str, num_envs: int, device: str) -> dict:
    """The GPU work of one step: a step captured in a CUDA graph and replayed (each replay
    steps from the captured state, so only the timing means anything), or why capture failed
    (the env's own random generator, say)."""
    env = make_env(name, num_envs=num_envs, device=device, seed=0)
    env.reset(seed=0)
    action = torch.rand(num_envs, env.action_dim, device=device) * 2 - 1
    row = {"env": f"{name}, graph", "num_envs": num_envs, "cpu_threads": None}
    try:
        replay = graphed(lambda: env.step(action), device)
    except RuntimeError as error:
        return row | {"status": f"capture failed: {str(error).splitlines()[0][:120]}"}
    timing = measure(replay, device=device, warmup=10, rep=100, memory=False)
    return row | timing | {"env_steps_per_s": num_envs / (timing["median_ms"] / 1e3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    parser.add_argument("--num-envs", type=positive_int, nargs="+", default=[1024, 16384])
    parser.add_argument("--envs", nargs="+", default=list(ENV_NAMES), choices=ENV_NAMES)
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--compiled",
        nargs="*",
        choices=ENV_NAMES,
        help="envs also timed after env.compile(), at the largest N (default on CUDA: "
        "point_umaze reacher; on CPU: none)",
    )
    add_name_argument(parser, "envs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict] = []

    def record(row: dict) -> None:
        """Save after every row, so a run stopped by a time limit keeps its rows."""
        rows.append(row)
        write_results(args.name or "envs", args.device, rows, complete=False)

    for name in args.envs:
        for n in args.num_envs:
            record(bench(name, n, args.device))
    cuda = torch.device(args.device).type == "cuda"
    compiled = args.compiled if args.compiled is not None else ["point_umaze", "reacher"] * cuda
    default = " and, by default, the compiled ones (--compiled runs them)"
    rows_left = "the '<env>, graph' rows (they replay a CUDA graph)"
    note_cuda_only(args.device, rows_left + (default if args.compiled is None else ""))
    for name in compiled:
        record(bench(name, max(args.num_envs), args.device, compiled=True))
    for name in args.envs if cuda else ():
        record(bench_graphed(name, max(args.num_envs), args.device))
    path = write_results(args.name or "envs", args.device, rows)
    label = device_label(args.device)
    columns = ["env", "num_envs", "median_ms", "host_ms", "p80_ms", "env_steps_per_s", "status"]
    print_table(rows, columns, title=f"env steps/s on {label} ({path.name})")


if __name__ == "__main__":
    main()
