"""Env throughput: environment steps per second of each torch env for a batch of N envs.

Usage: ``python -m bench.bench_envs [--device cuda] [--num-envs 1024 16384]``. One timed call is
one ``env.step`` of all N envs (random actions generated beforehand), autoresets included.
"""

from __future__ import annotations

import argparse

import torch

from bench.harness import measure, print_table, write_results
from crl_fast.envs import ENV_NAMES, make_env


def bench(name: str, num_envs: int, device: str) -> dict:
    env = make_env(name, num_envs=num_envs, device=device, seed=0)
    env.reset(seed=0)
    actions = torch.rand(64, num_envs, env.action_dim, device=device) * 2 - 1
    calls = iter(range(10**9))

    def step() -> None:
        env.step(actions[next(calls) % len(actions)])

    timing = measure(step, device=device, warmup=10, rep=100)
    steps_per_s = num_envs / (timing["median_ms"] / 1e3)
    threads = torch.get_num_threads() if torch.device(device).type == "cpu" else None
    return {
        "env": name,
        "num_envs": num_envs,
        "cpu_threads": threads,
        **timing,
        "env_steps_per_s": steps_per_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--envs", nargs="+", default=list(ENV_NAMES), choices=ENV_NAMES)
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [bench(name, n, args.device) for name in args.envs for n in args.num_envs]
    path = write_results("envs", args.device, rows)
    label = f"CPU, {torch.get_num_threads()} threads" if args.device == "cpu" else args.device
    columns = ["env", "num_envs", "median_ms", "p20_ms", "p80_ms", "env_steps_per_s"]
    print_table(rows, columns, title=f"env steps/s on {label} ({path.name})")


if __name__ == "__main__":
    main()
