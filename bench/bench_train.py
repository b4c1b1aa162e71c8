"""End-to-end training speed: ``crl_fast.train`` on the point U-maze, env steps and updates per s.

    python -m bench.bench_train                        # GPU: the graph modes; CPU: eager, small
    python -m bench.bench_train --modes eager --env-steps 20000 60000

Issue target (H100): 10 M env steps with training in <= 2 minutes, with 1,024 envs and one update
of batch 256 per 16 env steps (625,000 updates). Each mode first trains once untimed for the
short budget (torch.compile, Triton JIT and CUDA start-up land there, not in one timed run),
then ``--repeats`` times for each of the two ``--env-steps`` budgets; the rates come from the
difference of the median wall times, so set-up, graph capture and the evaluations at start and
end (the same in both runs) drop out, and ``fixed_s`` is that set-up plus the first
``learning_starts`` env steps, which collect without updates (short run minus its training steps
at the rate). ``projected_10M_s`` is the other 10 M - ``learning_starts`` env steps at that rate
plus ``fixed_s``: a projection, not a 10 M run; a cold process adds its compile time on top. Modes:
``eager`` (host-bound on GPUs: not run there unless asked), ``cuda-graph`` (sample + update
replayed from a graph), ``compile+cuda-graph``, ``compile+cuda-graph+stream`` (the actor step on
a second stream).
Writes bench/results/train-<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from typing import TypedDict

import torch

from bench.harness import (
    add_device_argument,
    add_name_argument,
    device_label,
    positive_int,
    print_table,
    write_results,
)
from crl_fast.config import TrainConfig


class _Mode(TypedDict):
    cuda_graph: bool
    compile: bool


class Mode(_Mode, total=False):
    """The :class:`TrainConfig` fields that a mode sets."""

    actor_stream: bool


MODES: dict[str, Mode] = {
    "eager": {"cuda_graph": False, "compile": False},
    "cuda-graph": {"cuda_graph": True, "compile": False},
    "compile+cuda-graph": {"cuda_graph": True, "compile": True},
    "compile+cuda-graph+stream": {"cuda_graph": True, "compile": True, "actor_stream": True},
}
GPU_MODES = ["compile+cuda-graph", "compile+cuda-graph+stream"]
TARGET_S = 120.0
TARGET_STEPS = 10_000_000


def train_seconds(env_steps: int, mode: str, num_envs: int, device: str) -> float:
    """Wall time of one ``train`` run of ``env_steps``, its console output swallowed; each run
    starts from a fresh dynamo state, as a new process would."""
    from crl_fast.train import train

    torch._dynamo.reset()
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            env="point_umaze", num_envs=num_envs, device=device, total_env_steps=env_steps,
            eval_every=10 * env_steps, eval_episodes=16, log_every=10 * env_steps,
            checkpoint_every=0, run_dir=f"{tmp}/run", tensorboard=False, progress=False,
            **MODES[mode],
        )  # fmt: skip
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            train(config)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start


def bench(
    mode: str, budgets: tuple[int, int], num_envs: int, device: str, repeats: int = 1
) -> dict:
    warmup_s = train_seconds(budgets[0], mode, num_envs, device)
    walls = [[train_seconds(n, mode, num_envs, device) for _ in range(repeats)] for n in budgets]
    short, long = (statistics.median(w) for w in walls)
    if long <= short:
        raise RuntimeError(
            f"the {budgets[1]}-step run took {long:.2f} s, the {budgets[0]}-step run {short:.2f} s:"
            " timing noise swamps their difference (larger budgets or --repeats)"
        )
    steps = budgets[1] - budgets[0]
    env_steps_per_s = steps / (long - short)
    # The first learning_starts steps only collect (no updates): they are not at the training
    # rate, so they stay in the intercept (subtracting them at the rate made it negative on CPU).
    warm = TrainConfig.learning_starts
    fixed_s = short - (budgets[0] - warm) / env_steps_per_s
    updates = steps * TrainConfig.updates_per_env_step
    return {
        "mode": mode,
        "num_envs": num_envs,
        "batch": TrainConfig.batch_size,
        "updates_per_env_step": TrainConfig.updates_per_env_step,
        "env_steps": list(budgets),
        "warmup_s": warmup_s,
        "wall_s": walls,
        "env_steps_per_s": env_steps_per_s,
        "updates_per_s": updates / (long - short),
        "fixed_s": fixed_s,
        "projected_10M_s": (TARGET_STEPS - warm) / env_steps_per_s + fixed_s,
        "target_s": TARGET_S if torch.device(device).type == "cuda" else None,  # an H100's
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=None)
    parser.add_argument("--num-envs", type=positive_int, default=None, help="GPU 1024, CPU 64")
    parser.add_argument(
        "--env-steps", type=positive_int, nargs=2, default=None, metavar=("SHORT", "LONG")
    )
    parser.add_argument("--repeats", type=positive_int, default=1, help="timed runs per budget")
    add_name_argument(parser, "train")
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    modes = args.modes or (GPU_MODES if cuda else ["eager"])
    if not cuda and any(MODES[mode]["cuda_graph"] for mode in modes):
        parser.error("the cuda-graph modes need a CUDA device")
    num_envs = args.num_envs or (1024 if cuda else 64)
    budgets = tuple(args.env_steps or ((100_000, 600_000) if cuda else (12_800, 25_600)))
    if budgets[1] <= budgets[0]:
        parser.error("--env-steps: the second budget must be larger")
    if budgets[0] < TrainConfig.learning_starts:  # the difference must be all training steps
        parser.error(
            f"--env-steps: SHORT must be >= learning_starts ({TrainConfig.learning_starts:,}): "
            "before it no updates run, and the rates assume every step in LONG - SHORT trains"
        )
    rows = []
    for mode in modes:
        rows.append(bench(mode, budgets, num_envs, args.device, args.repeats))
        print(rows[-1], flush=True)
        # After each row: a run stopped by a time limit keeps its rows.
        write_results(args.name or "train", args.device, rows, complete=False)
    path = write_results(args.name or "train", args.device, rows)
    label = device_label(args.device)
    columns = ["mode", "num_envs", "env_steps_per_s", "updates_per_s", "fixed_s", "projected_10M_s"]
    print_table(rows, [*columns, "target_s"], title=f"training, point_umaze, {label} ({path.name})")


if __name__ == "__main__":
    main()
