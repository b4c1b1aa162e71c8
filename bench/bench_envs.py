"""Env throughput: environment steps per second of each torch env for a batch of N envs.

Usage: ``python -m bench.bench_envs [--device cuda] [--num-envs 1024 16384]``. One timed call is
``--steps-per-call`` (16) ``env.step`` calls of all N envs (each with its own random actions,
drawn beforehand), autoresets included, launched back to back with one sync after them: an env
step makes no host sync, so a collection loop's launches overlap the GPU's work on the step
before (one step per sync would add the GPU's time to the host's). Rows give the time per call
and per step and env steps per second; ``timed_call`` says how a call ran. On CUDA, rows named
``<env>, graph`` replay the call's steps from a CUDA graph: the GPU work alone; rows named
``<env>, compiled`` step after ``env.compile()`` (point U-maze and reacher, by default), as
training on CUDA does.
"""

from __future__ import annotations

import argparse

import torch

from bench.harness import (
    Timing,
    add_device_argument,
    add_name_argument,
    back_to_back,
    device_label,
    graphed,
    measure,
    note_cuda_only,
    positive_int,
    print_table,
    timed_call,
    write_results,
)
from crl_fast.envs import ENV_NAMES, TorchGoalVectorEnv, make_env

STEPS_PER_CALL = 16
"""Env steps in a timed call, as many as bench_update's updates in one."""
WARMUP, REP = 2, 20
"""Calls before the timing, and timed calls: 352 steps a row at 16 a call, where one step a
call took 110 (gpu_check.sh's envs stage gives a CUDA run's 17 rows 30 s)."""


def per_step(row: dict, timing: Timing, num_envs: int, steps_per_call: int) -> dict:
    """``row`` with ``timing`` of calls of ``steps_per_call`` steps and the figures per step:
    microseconds per step of all ``num_envs``, env steps per second."""
    return row | {
        "steps_per_call": steps_per_call,
        **timing,
        "us_per_step": timing["median_ms"] * 1e3 / steps_per_call,
        "env_steps_per_s": num_envs * steps_per_call * 1e3 / timing["median_ms"],
    }


def bench(
    name: str,
    num_envs: int,
    device: str,
    compiled: bool = False,
    steps_per_call: int = STEPS_PER_CALL,
) -> dict:
    """A call of ``steps_per_call`` eager (or ``compiled``) steps, each with its own random
    actions (drawn beforehand), launched back to back as a collection loop launches them: an
    env step makes no host sync."""
    env = make_env(name, num_envs=num_envs, device=device, seed=0)
    if compiled:
        # --compiled takes ENV_NAMES alone: the built-in envs, all of them torch envs
        assert isinstance(env, TorchGoalVectorEnv)
        env.compile()
    env.reset(seed=0)
    actions = torch.rand(steps_per_call, num_envs, env.action_dim, device=device) * 2 - 1
    steps = back_to_back(lambda i: env.step(actions[i]), steps_per_call)
    timing = measure(steps, device=device, warmup=WARMUP, rep=REP)
    threads = torch.get_num_threads() if torch.device(device).type == "cpu" else None
    row = {
        "env": f"{name}, compiled" if compiled else name,
        "num_envs": num_envs,
        "cpu_threads": threads,
        "timed_call": timed_call(steps_per_call, "steps", device, graph=False),
    }
    return per_step(row, timing, num_envs, steps_per_call)


def bench_graphed(
    name: str, num_envs: int, device: str, steps_per_call: int = STEPS_PER_CALL
) -> dict:
    """The GPU work of ``steps_per_call`` steps: captured in a CUDA graph and replayed (each
    replay steps from the captured state, so only the timing means anything), or why capture
    failed (the env's own random generator, say)."""
    env = make_env(name, num_envs=num_envs, device=device, seed=0)
    env.reset(seed=0)
    actions = torch.rand(steps_per_call, num_envs, env.action_dim, device=device) * 2 - 1
    row = {
        "env": f"{name}, graph",
        "num_envs": num_envs,
        "cpu_threads": None,
        "timed_call": timed_call(steps_per_call, "steps", device, graph=True),
    }
    try:
        replay = graphed(back_to_back(lambda i: env.step(actions[i]), steps_per_call), device)
    except RuntimeError as error:
        return row | {"status": f"capture failed: {str(error).splitlines()[0][:120]}"}
    timing = measure(replay, device=device, warmup=WARMUP, rep=REP, memory=False)
    return per_step(row, timing, num_envs, steps_per_call)


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
    parser.add_argument(
        "--steps-per-call",
        type=positive_int,
        default=STEPS_PER_CALL,
        help=f"env steps per timed call (launched back to back); default: {STEPS_PER_CALL}",
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
            record(bench(name, n, args.device, steps_per_call=args.steps_per_call))
    cuda = torch.device(args.device).type == "cuda"
    compiled = args.compiled if args.compiled is not None else ["point_umaze", "reacher"] * cuda
    default = " and, by default, the compiled ones (--compiled runs them)"
    rows_left = "the '<env>, graph' rows (they replay a CUDA graph)"
    note_cuda_only(args.device, rows_left + (default if args.compiled is None else ""))
    for name in compiled:
        record(bench(name, max(args.num_envs), args.device, True, args.steps_per_call))
    for name in args.envs if cuda else ():
        record(bench_graphed(name, max(args.num_envs), args.device, args.steps_per_call))
    path = write_results(args.name or "envs", args.device, rows)
    label = device_label(args.device)
    columns = ["env", "num_envs", "steps_per_call", "median_ms", "host_ms", "p80_ms"]
    columns += ["us_per_step", "env_steps_per_s", "status"]
    print_table(rows, columns, title=f"env steps/s on {label} ({path.name})")


if __name__ == "__main__":
    main()
