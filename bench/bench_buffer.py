"""Replay-buffer speed: ``sample`` of (obs, action, goal) triples and ``extend`` of lockstep steps.

Usage: ``python -m bench.bench_buffer [--device cuda]``; or ``pytest bench/bench_buffer.py
--benchmark-only``. Issue target (H100): 65,536 triples, obs 29 / action 8 / goal 2 floats, from
1000 steps x 1000 envs, <= 30 us; extend of one step for 1000 envs <= 15 us. CPU runs use smaller
sizes by default and are CPU figures. The ``txt_baseline`` row is JaxGCRL's sampler (a T x T
discounted future-same-episode matrix per env, then a categorical draw per row) in torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench.harness import (
    add_device_argument,
    add_name_argument,
    device_label,
    graphed,
    measure,
    positive_int,
    print_table,
    write_results,
)
from crl_fast.buffer import GOAL_MODES, TrajectoryBuffer

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


def bench_rows(device: str, sizes: dict[str, int]) -> list[dict]:
    cap, n, batch = sizes["capacity"], sizes["num_envs"], sizes["batch"]
    buf = filled_buffer(cap, n, device)
    rows = []
    common = {"capacity": cap, "num_envs": n}
    for mode in GOAL_MODES:
        t = measure(lambda m=mode: buf.sample(batch, goal_mode=m), device=device)
        rows.append({"op": "sample", "mode": mode, **common, "batch": batch, **t})
    if torch.device(device).type == "cuda":  # the GPU work alone: sample replayed from a graph
        generator = torch.cuda.default_generators[torch.device(device).index or 0]
        replay = graphed(lambda: buf.sample(batch, generator=generator))
        t = measure(replay, device=device, memory=False)
        rows.append({"op": "sample", "mode": "geometric, graph", **common, "batch": batch, **t})
    mix = {"random_goal_fraction": 0.2, "current_goal_fraction": 0.1}
    t = measure(lambda: buf.sample(batch, **mix), device=device)
    rows.append({"op": "sample", "mode": "geometric+mix", **common, "batch": batch, **t})
    for steps in (1, 100):
        data = step_batch(steps, n, 0, device)
        t = measure(lambda d=data: buf.extend(d), device=device)
        rows.append({"op": "extend", "mode": f"{steps} step", **common, "batch": steps * n, **t})

    envs, steps = sizes["txt_envs"], EPISODE + 1
    episodes = (torch.arange(steps, device=device) // 400).expand(envs, steps).contiguous()
    t = measure(txt_sampler(episodes), device=device, warmup=2, rep=5)
    rows.append(
        {"op": "txt_baseline", "mode": "geometric", "capacity": steps, "num_envs": envs,
         "batch": envs * steps, **t}
    )  # fmt: skip
    for row in rows:  # microseconds for the table: the targets are stated in them
        row["us_per_call"] = row["median_ms"] * 1e3
        for key in ("host", "p80"):
            if f"{key}_ms" in row:
                row[f"{key}_us"] = row[f"{key}_ms"] * 1e3
        row["samples_per_s"] = row["batch"] / (row["median_ms"] / 1e3)
    return rows


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
    rows = bench_rows(args.device, sizes)
    path = write_results(args.name or "buffer", args.device, rows)
    label = device_label(args.device)
    columns = ["op", "mode", "capacity", "num_envs", "batch", "us_per_call", "host_us", "p80_us"]
    print_table(rows, [*columns, "samples_per_s"], title=f"buffer on {label} ({path.name})")


# ---------------------------------------------------------------- pytest-benchmark entry points

_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_sample(benchmark) -> None:
    sizes = default_sizes(_DEVICE)
    buf = filled_buffer(sizes["capacity"], sizes["num_envs"], _DEVICE)

    def call() -> None:
        buf.sample(sizes["batch"])
        _sync(_DEVICE)

    call()  # Triton JIT, outside pytest-benchmark's calibration and rounds
    benchmark(call)


def test_extend_one_step(benchmark) -> None:
    sizes = default_sizes(_DEVICE)
    buf = filled_buffer(sizes["capacity"], sizes["num_envs"], _DEVICE)
    data = step_batch(1, sizes["num_envs"], 0, _DEVICE)

    def call() -> None:
        buf.extend(data)
        _sync(_DEVICE)

    call()
    benchmark(call)


if __name__ == "__main__":
    main()
