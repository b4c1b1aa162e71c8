"""Replay-buffer speed: ``sample`` of (obs, action, goal) triples and ``extend`` of lockstep steps.

Usage: ``python -m bench.bench_buffer [--device cuda]``; or ``pytest bench/bench_buffer.py
--benchmark-only``. Issue target (H100): 65,536 triples, obs 29 / action 8 / goal 2 floats, from
1000 steps x 1000 envs, <= 30 us; extend of one step for 1000 envs <= 15 us. CPU runs use smaller
sizes by default and are CPU figures. The ``txt_baseline`` row is JaxGCRL's sampler (a T x T
discounted future-same-episode matrix per env, then a categorical draw per row) in torch. The
``from_dataset`` row loads capacity x num_envs flat rows into a one-column buffer (offline data).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from typing import Any

import torch

from bench.harness import (
    Timing,
    add_device_argument,
    add_name_argument,
    default_generator,
    device_label,
    device_name,
    graphed,
    measure,
    note_cuda_only,
    positive_int,
    print_table,
    write_results,
)
from crl_fast.buffer import GOAL_MODES, GoalBatch, TrajectoryBuffer

OBS, ACT, GOAL = 29, 8, 2
EPISODE = 1000  # truncation length, as JaxGCRL's episodes


def default_sizes(device: str) -> dict[str, int]:
    if torch.device(device).type == "cuda":
        return {"capacity": 1000, "num_envs": 1000, "batch": 65536, "txt_envs": 256}
    return {"capacity": 1000, "num_envs": 100, "batch": 8192, "txt_envs": 8}


def step_batch(steps: int, num_envs: int, t0: int, device: str) -> dict[str, torch.Tensor]:
    """Random transitions; envs terminate at random and truncate every ``EPISODE`` steps."""
    t = torch.arange(t0, t0 + steps, device=device)[:, None]
    return {
        "observation": torch.randn(steps, num_envs, OBS, device=device),
        "action": torch.randn(steps, num_envs, ACT, device=device),
        "next_achieved_goal": torch.randn(steps, num_envs, GOAL, device=device),
        "terminated": torch.rand(steps, num_envs, device=device) < 1e-3,
        # contiguous, as env outputs are: an expanded view would add a copy to each timed extend
        "truncated": ((t + 1) % EPISODE == 0).expand(steps, num_envs).contiguous(),
    }


def filled_buffer(capacity: int, num_envs: int, device: str) -> TrajectoryBuffer:
    buf = TrajectoryBuffer(
        capacity=capacity, num_envs=num_envs, obs_dim=OBS, action_dim=ACT, goal_dim=GOAL,
        device=device, seed=0,
    )  # fmt: skip
    chunk = 100
    for t0 in range(0, capacity + chunk // 2, chunk):  # a little over full: the ring has wrapped
        buf.extend(step_batch(chunk, num_envs, t0, device))
    return buf


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def txt_sampler(
    episodes: torch.Tensor, gamma: float = 0.99
) -> Callable[[], tuple[torch.Tensor, ...]]:
    """JaxGCRL's goal sampler: per env a [T, T] matrix of gamma^(j-i) over same-episode j > i,
    a future step drawn from each row, and (as ``sample`` returns them) every step's
    observation and action with its future step's goal, gathered from [envs, T, width] rows."""
    envs, steps = episodes.shape
    rows = torch.randn(envs, steps, OBS + ACT + GOAL, device=episodes.device)
    idx = torch.arange(steps, device=episodes.device)
    future = idx[None, :] > idx[:, None]
    disc = gamma ** (idx[None, :] - idx[:, None]).clamp(min=0).float()

    def draw() -> tuple[torch.Tensor, ...]:
        same = episodes[:, :, None] == episodes[:, None, :]  # [envs, T, T]
        probs = torch.where(same & future, disc, 0.0)
        probs[:, :, -1] += probs.sum(-1) == 0  # rows without a future: any valid stand-in
        drawn = torch.multinomial(probs.view(-1, steps), 1).view(envs, steps, 1)
        goal = rows[:, :, OBS + ACT :].gather(1, drawn.expand(-1, -1, GOAL))
        return rows[:, :, :OBS].contiguous(), rows[:, :, OBS : OBS + ACT].contiguous(), goal

    return draw


def timed_row(
    op: str, mode: str, capacity: int, num_envs: int, batch: int, t: Timing
) -> dict[str, object]:
    """A table row: the call's sizes and timing ``t``, in microseconds too (the targets are
    stated in them), and samples per second."""
    row: dict[str, object] = {
        "op": op, "mode": mode, "capacity": capacity, "num_envs": num_envs, "batch": batch, **t
    }  # fmt: skip
    row["us_per_call"] = t["median_ms"] * 1e3
    if "host_ms" in t:
        row["host_us"] = t["host_ms"] * 1e3
    row["p80_us"] = t["p80_ms"] * 1e3
    row["samples_per_s"] = batch / (t["median_ms"] / 1e3)
    return row


def bench_rows(device: str, sizes: dict[str, int]) -> Iterator[dict[str, object]]:
    """The table's rows, each as soon as it is measured."""
    cap, n, batch = sizes["capacity"], sizes["num_envs"], sizes["batch"]
    buf = filled_buffer(cap, n, device)
    for mode in GOAL_MODES:

        def sample(m: str = mode) -> GoalBatch:
            return buf.sample(batch, goal_mode=m)

        t = measure(sample, device=device)
        yield timed_row("sample", mode, cap, n, batch, t)
    if torch.device(device).type == "cuda":  # the GPU work alone: sample replayed from a graph
        generator = default_generator(device)
        replay = graphed(lambda: buf.sample(batch, generator=generator), device)
        t = measure(replay, device=device, memory=False)
        yield timed_row("sample", "geometric, graph", cap, n, batch, t)
    t = measure(
        lambda: buf.sample(batch, random_goal_fraction=0.2, current_goal_fraction=0.1),
        device=device,
    )
    yield timed_row("sample", "geometric+mix", cap, n, batch, t)
    for steps in (1, 100):
        data = step_batch(steps, n, 0, device)

        def extend(d: dict[str, torch.Tensor] = data) -> None:
            buf.extend(d)

        t = measure(extend, device=device)
        yield timed_row("extend", f"{steps} step", cap, n, steps * n, t)

    envs, steps = sizes["txt_envs"], EPISODE + 1
    episodes = (torch.arange(steps, device=device) // 400).expand(envs, steps).contiguous()
    t = measure(txt_sampler(episodes), device=device, warmup=2, rep=5)
    yield timed_row("txt_baseline", "geometric", steps, envs, envs * steps, t)

    # An offline dataset of capacity x num_envs flat rows loaded into one column (from_dataset's
    # default), by torch's ops: a GPU has not timed it yet.
    flat = {k: v.flatten(0, 1) for k, v in step_batch(cap, n, 0, device).items()}
    t = measure(
        lambda: TrajectoryBuffer.from_dataset(flat, device=device, seed=0),
        device=device, warmup=1, rep=3,
    )  # fmt: skip
    yield timed_row("from_dataset", "1 column", cap * n, 1, cap * n, t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    for key in ("capacity", "num_envs", "batch", "txt_envs"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=positive_int, default=None)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    add_name_argument(parser, "buffer")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = default_sizes(args.device)
    sizes.update({k: v for k, v in vars(args).items() if k in sizes and v is not None})
    rows = []
    note_cuda_only(args.device, "the 'geometric, graph' sample row (it replays a CUDA graph)")
    for row in bench_rows(args.device, sizes):
        rows.append(row)  # each row saved: a run stopped by a time limit keeps what ran
        write_results(args.name or "buffer", args.device, rows, complete=False)
    path = write_results(args.name or "buffer", args.device, rows)
    label = device_label(args.device)
    columns = ["op", "mode", "capacity", "num_envs", "batch", "us_per_call", "host_us", "p80_us"]
    print_table(rows, [*columns, "samples_per_s"], title=f"buffer on {label} ({path.name})")


# ---------------------------------------------------------------- pytest-benchmark entry points

_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _record_device(benchmark: Any, sizes: dict[str, int]) -> None:
    """pytest-benchmark's JSON records the host, not the device: a CPU fallback says so."""
    benchmark.extra_info |= {"device": device_name(_DEVICE), **sizes}


def test_sample(benchmark: Any) -> None:
    sizes = default_sizes(_DEVICE)
    _record_device(benchmark, sizes)
    buf = filled_buffer(sizes["capacity"], sizes["num_envs"], _DEVICE)

    def call() -> None:
        buf.sample(sizes["batch"])
        _sync(_DEVICE)

    call()  # Triton JIT, outside pytest-benchmark's calibration and rounds
    benchmark(call)


def test_extend_one_step(benchmark: Any) -> None:
    sizes = default_sizes(_DEVICE)
    _record_device(benchmark, sizes)
    buf = filled_buffer(sizes["capacity"], sizes["num_envs"], _DEVICE)
    data = step_batch(1, sizes["num_envs"], 0, _DEVICE)

    def call() -> None:
        buf.extend(data)
        _sync(_DEVICE)

    call()
    benchmark(call)


if __name__ == "__main__":
    main()
