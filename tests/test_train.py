"""Training loop, checkpoints, resume, logging and the command line, on small CPU runs."""

import builtins
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import crl_fast
from crl_fast import run_dir as run_dir_module
from crl_fast import train as train_module
from crl_fast.agent import CRL
from crl_fast.checkpoint import (
    git_commit,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from crl_fast.checks import resolve_device
from crl_fast.cli import main
from crl_fast.config import AgentConfig, TrainConfig
from crl_fast.envs import make_env, register_env
from crl_fast.logger import MetricsLogger, read_jsonl
from crl_fast.run_dir import LOCK_NAME, claimed_run_dir, new_run_dir
from crl_fast.stats import success_summary, wilson_interval
from crl_fast.train import EVAL_SEED_OFFSET, eval_seed, evaluate, load_agent, restart_seed, train
from tests.free_point_env import FreePoint


def tiny_config(tmp_path, name: str = "run", **overrides) -> TrainConfig:
    """A run of a few seconds: few envs, short episodes, a small network."""
    settings = dict(
        device="cpu",  # also on a GPU machine: these tests compare CPU runs bit for bit
        env="point_umaze",
        num_envs=8,
        max_episode_steps=32,
        total_env_steps=1024,
        learning_starts=256,
        batch_size=32,
        updates_per_env_step=1 / 8,
        buffer_capacity=4096,
        eval_every=512,
        eval_episodes=8,
        log_every=256,
        checkpoint_every=0,
        run_dir=str(tmp_path / name),
        tensorboard=False,
        progress=False,
        agent=AgentConfig(width=32),
    )
    return TrainConfig(**(settings | overrides))


class RandomPolicy:
    """Uniform actions: the baseline a trained agent must beat."""

    def act(self, obs, goal, deterministic=False):
        return torch.rand(obs.shape[0], 2) * 2 - 1


def test_short_run_beats_a_random_policy(tmp_path):
    """About 600 updates of a small InfoNCE critic: well above chance and a random policy."""
    config = tiny_config(
        tmp_path,
        num_envs=16,
        max_episode_steps=None,
        total_env_steps=12_000,
        learning_starts=2048,
        batch_size=128,
        updates_per_env_step=1 / 16,
        buffer_capacity=100_000,
        eval_every=12_000,
        eval_episodes=64,
        log_every=2048,
        agent=AgentConfig(
            width=64,
            loss="infonce",
            energy="norm",
            logsumexp_penalty=0.1,
            critic_lr=1e-3,
            actor_lr=1e-3,
        ),
    )
    result = train(config)
    rows = read_jsonl(result["run_dir"] / "metrics.jsonl")
    accuracy = [
        r["critic/categorical_accuracy"] for r in rows if "critic/categorical_accuracy" in r
    ]
    torch.manual_seed(0)
    env = make_env(config.env, num_envs=config.eval_episodes, seed=0)
    random = evaluate(RandomPolicy(), env, eval_seed(config))
    assert accuracy[-1] > 3 * max(accuracy[0], 1 / config.batch_size)  # chance: 1 / batch
    assert result["eval/success"] > random["eval/success"] + 0.1  # a random walk often passes
    assert result["eval/success_final"] > random["eval/success_final"] + 0.3  # but rarely stays


def agent_tensors(checkpoint) -> dict[str, torch.Tensor]:
    agent = checkpoint["agent"]
    return {
        f"{net}.{k}": v
        for net in ("sa_encoder", "goal_encoder", "actor")
        for k, v in agent[net].items()
    } | {"log_alpha": agent["log_alpha"]}


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    straight = train(tiny_config(tmp_path, "straight", checkpoint_every=512))
    train(tiny_config(tmp_path, "killed", total_env_steps=512))  # as if killed at step 512
    resumed = train(tiny_config(tmp_path, "killed", resume=True))

    a = load_checkpoint(straight["run_dir"] / "checkpoint.pt")
    b = load_checkpoint(resumed["run_dir"] / "checkpoint.pt")
    timeless = ("env_steps", "updates", "update_credit")
    assert all(a["loop"][k] == b["loop"][k] for k in timeless)
    ta, tb = agent_tensors(a), agent_tensors(b)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert all(torch.equal(a["buffer"][k], b["buffer"][k]) for k in ("rows", "segment_end"))
    assert straight["eval/success"] == resumed["eval/success"]
    steps = [r["step"] for r in read_jsonl(resumed["run_dir"] / "metrics.jsonl")]
    assert steps == [r["step"] for r in read_jsonl(straight["run_dir"] / "metrics.jsonl")]


class Killed(Exception):
    """Raised in place of a kill signal."""


def killed_after_logging(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the run raise Killed right after it logs its first row at or past ``step``."""
    log = MetricsLogger.log

    def log_then_die(self, at, metrics):
        log(self, at, metrics)
        if at >= step:
            raise Killed

    monkeypatch.setattr(MetricsLogger, "log", log_then_die)


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("charts/")} for row in rows]


def assert_same_weights_and_rows(straight: dict, resumed: dict) -> None:
    """The two runs' final weights and metrics rows (timing columns aside) are equal."""
    a = agent_tensors(load_checkpoint(straight["run_dir"] / "checkpoint.pt"))
    b = agent_tensors(load_checkpoint(resumed["run_dir"] / "checkpoint.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = without_timings(read_jsonl(resumed["run_dir"] / "metrics.jsonl"))
    assert rows == without_timings(read_jsonl(straight["run_dir"] / "metrics.jsonl"))


def test_the_seed_alone_decides_the_run(tmp_path):
    """Two runs with the same seed: the same weights and metrics rows (timing columns aside),
    also where evaluations, logs and checkpoints come more often (they change which rows are
    written, not the training); a run with another seed differs in its weights, its first
    evaluation's goals and its losses."""
    first = train(tiny_config(tmp_path, "first", total_env_steps=512))
    again = train(tiny_config(tmp_path, "again", total_env_steps=512))
    assert_same_weights_and_rows(first, again)
    often = dict(eval_every=256, log_every=64, checkpoint_every=256)
    reported = train(tiny_config(tmp_path, "reported", total_env_steps=512, **often))
    other = train(tiny_config(tmp_path, "other", total_env_steps=512, seed=1))
    a, c, b = (
        agent_tensors(load_checkpoint(r["run_dir"] / "checkpoint.pt"))
        for r in (first, reported, other)
    )
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert not any(torch.equal(a[k], b[k]) for k in a if a[k].numel() > 1)
    rows, reported_rows, other_rows = (
        without_timings(read_jsonl(r["run_dir"] / "metrics.jsonl"))
        for r in (first, reported, other)
    )
    assert len(reported_rows) > len(rows) and all(r in reported_rows for r in rows)
    assert [r["step"] for r in rows] == [r["step"] for r in other_rows]
    assert all(x != y for x, y in zip(rows, other_rows, strict=True))


def test_killed_run_resumes_with_the_same_metrics_rows(tmp_path, monkeypatch):
    """Killed at step 608, between its checkpoint at 512 and the end, then resumed: the same weights
    and metrics rows as an uninterrupted run, also at the log steps 544-640 where no update ran
    since the checkpoint (one update per 200 env steps here)."""
    settings = dict(updates_per_env_step=0.005, log_every=32, checkpoint_every=512)
    straight = train(tiny_config(tmp_path, "straight", **settings))
    killed_after_logging(monkeypatch, 600)
    with pytest.raises(Killed):
        train(tiny_config(tmp_path, "killed", **settings))
    monkeypatch.undo()
    assert max(r["step"] for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl")) == 608
    resumed = train(tiny_config(tmp_path, "killed", resume=True, **settings))

    assert_same_weights_and_rows(straight, resumed)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists open files via /proc")
def test_a_run_that_fails_closes_its_files(tmp_path, monkeypatch):
    """A run that raises mid-way leaves none of its run directory's files open, even while the
    exception (and so its frames: a notebook keeps the last one) is alive."""
    killed_after_logging(monkeypatch, 600)
    with pytest.raises(Killed) as failed:
        train(tiny_config(tmp_path))
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own, closed by now
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert failed.value is not None
    assert [t for t in targets if t.startswith(str(tmp_path))] == []


def test_logger_memory_does_not_grow_with_its_rows(tmp_path):
    """A week-long run logs hundreds of thousands of rows: the logger keeps them on disk, not
    in memory, and metrics.csv still holds them all."""
    logger = MetricsLogger(tmp_path, tensorboard=False)
    metrics = {f"critic/metric_{i}": 0.5 for i in range(10)}
    logger.log(0, metrics)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for step in range(1, 2001):
            logger.log(step, metrics | {"charts/sps": float(step)})
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    logger.close()
    assert grown < 100_000, f"{grown:,} bytes kept for 2,000 rows"
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 2002


def test_kill_between_final_eval_and_final_checkpoint_logs_each_row_once(tmp_path, monkeypatch):
    """The loop's checkpoint at the last step, then the final evaluation's row, then a kill
    during the final checkpoint: the resumed run evaluates again and logs that row once."""
    import crl_fast.train as train_module

    settings = dict(eval_every=384, checkpoint_every=512)  # 1024: a checkpoint, not an eval
    straight = train(tiny_config(tmp_path, "straight", **settings))
    saves, save = [], train_module.save_checkpoint

    def third_save_dies(state, path):
        saves.append(state["loop"]["env_steps"])
        if len(saves) == 3:
            raise Killed
        return save(state, path)

    monkeypatch.setattr(train_module, "save_checkpoint", third_save_dies)
    with pytest.raises(Killed):
        train(tiny_config(tmp_path, "killed", **settings))
    monkeypatch.undo()
    assert saves == [512, 1024, 1024]
    resumed = train(tiny_config(tmp_path, "killed", resume=True, **settings))
    rows = without_timings(read_jsonl(resumed["run_dir"] / "metrics.jsonl"))
    assert rows == without_timings(read_jsonl(straight["run_dir"] / "metrics.jsonl"))


SIGKILLED_MID_CHECKPOINT = """
import os, signal, sys
from pathlib import Path
import torch
from crl_fast.train import train
from tests.test_train import tiny_config

save, saves = torch.save, []

def save_then_die(state, file):  # the second checkpoint: a few bytes written, then SIGKILL
    saves.append(state)
    if len(saves) == 2:
        file.write(b"PK half a checkpoint")
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    save(state, file)

torch.save = save_then_die
train(tiny_config(Path(sys.argv[1]), "killed", total_env_steps=512, checkpoint_every=256))
"""


def test_a_run_sigkilled_mid_checkpoint_resumes_exactly(tmp_path):
    """A real SIGKILL, which runs no cleanup (the tests raising in its place do), while the
    second checkpoint is half written: the resume is not blocked by the lock file left, ends
    as an uninterrupted run does, and leaves no temp file."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    child = [sys.executable, "-c", SIGKILLED_MID_CHECKPOINT, str(tmp_path)]
    assert subprocess.run(child, cwd=root, capture_output=True).returncode == -signal.SIGKILL
    run_dir = tmp_path / "killed"
    assert (run_dir / LOCK_NAME).exists()
    assert list(run_dir.glob(".checkpoint.pt.*.tmp"))  # what the kill left mid-write
    settings = dict(total_env_steps=512, checkpoint_every=256)
    resumed = train(tiny_config(tmp_path, "killed", resume=True, **settings))
    straight = train(tiny_config(tmp_path, "straight", **settings))
    assert_same_weights_and_rows(straight, resumed)
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))


def test_a_torn_last_metrics_line_is_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "eval/succ')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2, "eval\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


def test_stored_goal_of_an_ending_step_is_its_final_state(tmp_path, monkeypatch):
    """Where an episode ends, the next state the buffer stores is the ended episode's last one
    (``final_obs``), not the first state of the next episode (which the env already returns)."""
    import crl_fast.train
    from crl_fast.buffer import TrajectoryBuffer

    stepped, stored = [], []
    make_run_env = crl_fast.train.make_run_env

    def recording_env(config, device, num_envs, seed):
        env = make_run_env(config, device, num_envs, seed)
        if num_envs == config.num_envs:  # the training env, not the evaluation one
            step = env.step

            def recording_step(action):
                out = step(action)
                stepped.append(out)
                return out

            env.step = recording_step
        return env

    extend = TrajectoryBuffer.extend

    def recording_extend(self, batch):
        stored.append(batch["next_achieved_goal"][0].clone())
        return extend(self, batch)

    monkeypatch.setattr(crl_fast.train, "make_run_env", recording_env)
    monkeypatch.setattr(TrajectoryBuffer, "extend", recording_extend)
    config = tiny_config(
        tmp_path, total_env_steps=96, max_episode_steps=5, learning_starts=96, eval_episodes=4
    )
    train(config)
    assert len(stepped) == len(stored) == 12
    ended = 0
    for (obs, _, terminated, truncated, info), goal in zip(stepped, stored, strict=True):
        done = terminated | truncated
        final, new = info["final_obs"]["achieved_goal"], obs["achieved_goal"]
        assert torch.equal(goal, torch.where(done[:, None], final, new))
        assert (final[done] != new[done]).any(1).all()  # the two differ where episodes end
        ended += int(done.sum())
    assert ended == 2 * 8  # steps 5 and 10 of 12


def test_evaluation_goals_are_not_the_first_training_goals(tmp_path):
    """The evaluation's fixed goals come from a seed of their own, not from the run's seed:
    else they would be the goals the training env's first episodes chase."""
    from crl_fast.train import make_eval_env, make_run_env, stream_seed

    config, cpu = tiny_config(tmp_path), torch.device("cpu")
    seed = stream_seed(config, "env")
    training, _ = make_run_env(config, cpu, 8, seed).reset(seed=seed)
    evaluation, _ = make_eval_env(config, cpu, 8).reset(seed=eval_seed(config))
    assert not torch.equal(training["desired_goal"], evaluation["desired_goal"])


def test_a_runs_generators_draw_from_seeds_of_their_own(tmp_path, monkeypatch):
    """The global generator (network init, actor noise), the training env's, the evaluation
    env's and the buffer's are seeded apart: seeded alike, the buffer's index draws and the
    env's start and goal draws would repeat the numbers that initialised the networks."""
    made: dict[str, int | object] = {}
    make_run_env, make_buffer = train_module.make_run_env, train_module.make_buffer

    def recording_env(config, device, num_envs, seed):
        made.setdefault("global", torch.initial_seed())  # seed_everything came just before
        made["train" if num_envs == config.num_envs else "eval"] = env = make_run_env(
            config, device, num_envs, seed
        )
        return env

    def recording_buffer(config, env, device):
        made["buffer"] = buffer = make_buffer(config, env, device)
        return buffer

    monkeypatch.setattr(train_module, "make_run_env", recording_env)
    monkeypatch.setattr(train_module, "make_buffer", recording_buffer)
    train(tiny_config(tmp_path, total_env_steps=128, learning_starts=64, eval_episodes=4))
    seeds = {
        name: thing if name == "global" else thing.generator.initial_seed()
        for name, thing in made.items()
    }
    assert len(seeds) == 4 and len(set(seeds.values())) == 4, seeds


def test_resuming_a_finished_run_adds_no_rows(tmp_path):
    config = tiny_config(tmp_path, total_env_steps=64, learning_starts=0, eval_episodes=2)
    first = train(config)
    rows = read_jsonl(first["run_dir"] / "metrics.jsonl")
    again = train(dataclasses.replace(config, resume=True))
    assert read_jsonl(again["run_dir"] / "metrics.jsonl") == rows
    assert again["eval/success_final"] == first["eval/success_final"]


@pytest.mark.parametrize(
    ("num_envs", "per_env_step"), [(8, 1 / 32), (8, 1 / 8), (16, 1 / 2)], ids=str
)
def test_only_logged_updates_compute_the_critic_metrics(
    tmp_path, monkeypatch, num_envs, per_env_step
):
    """A quarter, one and eight updates a loop iteration: exactly the update whose metrics a
    log row shows computes the critic's accuracies (they cost a pass over the logits), and
    every row has them."""
    calls = []
    update = CRL.update

    def spy(self, batch, critic_metrics=True, actor_batch=None):
        metrics = update(self, batch, critic_metrics, actor_batch)
        calls.append((critic_metrics, metrics["critic/loss"].item()))
        return metrics

    monkeypatch.setattr(CRL, "update", spy)
    config = tiny_config(
        tmp_path, num_envs=num_envs, updates_per_env_step=per_env_step, log_every=200
    )
    train(config)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "critic/loss" in r]
    measured = [loss for flag, loss in calls if flag]
    assert len(rows) >= 3 and all("critic/categorical_accuracy" in r for r in rows)
    assert [r["critic/loss"] for r in rows] == pytest.approx(measured[: len(rows)], rel=1e-6)
    assert len(measured) <= len(rows) + 1 < len(calls)  # + the last update, logged or not


@pytest.mark.parametrize("mode", ["critic", "uniform_future"])
def test_the_actor_draws_its_own_batch_when_asked(tmp_path, monkeypatch, mode):
    """``actor_goal_mode``: every update gets an actor batch drawn in that mode without random
    or current-state goals, after the critic's batch (drawn as the buffer says); with
    ``"critic"`` none."""
    from crl_fast.buffer import TrajectoryBuffer

    draws, actor_rows = [], []
    sample, update = TrajectoryBuffer.sample, CRL.update

    def sample_spy(self, batch_size, **kwargs):
        draws.append(kwargs)
        return sample(self, batch_size, **kwargs)

    def update_spy(self, batch, critic_metrics=True, actor_batch=None):
        actor_rows.append(None if actor_batch is None else actor_batch.observation.shape[0])
        return update(self, batch, critic_metrics, actor_batch)

    monkeypatch.setattr(TrajectoryBuffer, "sample", sample_spy)
    monkeypatch.setattr(CRL, "update", update_spy)
    train(tiny_config(tmp_path, actor_goal_mode=mode, random_goal_fraction=0.3))
    critic_draw = {"generator": None}
    assert len(actor_rows) > 10
    if mode == "critic":
        assert actor_rows == [None] * len(actor_rows) and draws == [critic_draw] * len(draws)
        return
    actor_draw = {"goal_mode": mode, "random_goal_fraction": 0.0, "current_goal_fraction": 0.0}
    assert actor_rows == [32] * len(actor_rows)
    assert draws == [critic_draw, actor_draw | critic_draw] * len(actor_rows)


def test_a_run_resumed_between_logs_logs_the_critic_metrics(tmp_path, monkeypatch):
    """The checkpoint holds the metrics of an update that computed the critic's accuracies,
    though no log fell there: a run resumed with a shorter log_every logs them before its first
    update."""
    import crl_fast.train

    save = crl_fast.train.save_checkpoint

    def save_then_die(state, path):
        save(state, path)
        raise Killed

    monkeypatch.setattr(crl_fast.train, "save_checkpoint", save_then_die)
    settings = dict(updates_per_env_step=1 / 32, checkpoint_every=288, total_env_steps=1024)
    with pytest.raises(Killed):
        train(tiny_config(tmp_path, log_every=256, **settings))
    monkeypatch.setattr(crl_fast.train, "save_checkpoint", save)
    train(tiny_config(tmp_path, log_every=8, resume=True, **settings))
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "critic/loss" in r]
    assert any(r["step"] == 296 for r in rows)  # before the resumed run's first update
    assert all("critic/categorical_accuracy" in r for r in rows)


def test_a_run_continued_past_its_end_logs_the_critic_metrics_of_its_last_update(tmp_path):
    """A run's last update computes the critic's accuracies though no log falls after it (its
    end comes first): continued to a larger total_env_steps, the run logs them before its first
    update."""
    settings = dict(updates_per_env_step=1 / 32, log_every=256)  # updates at 280, 312, ...
    train(tiny_config(tmp_path, total_env_steps=296, **settings))
    train(tiny_config(tmp_path, total_env_steps=320, resume=True, **settings | {"log_every": 8}))
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "critic/loss" in r]
    assert rows[0]["step"] == 304  # the saved metrics, before the continued run's first update
    assert all("critic/categorical_accuracy" in r for r in rows)


@pytest.mark.parametrize(
    ("total", "learning_starts", "per_env_step", "updates"),
    [
        (250, 256, 1 / 8, 1),
        (240, 256, 1 / 8, 0),
        (256, 256, 1 / 16, 0),
        (264, 256, 1 / 16, 1),
        (256, 250, 1 / 16, 0),  # step 248 earns nothing: 250 is not a multiple of 8
        (80, 0, 1 / 80, 0),  # 10 x 0.1 sums to 0.9999999999999999: no update, said
    ],
)
def test_a_run_too_short_to_train_says_so(tmp_path, capsys, total, learning_starts, per_env_step,
                                          updates):  # fmt: skip
    """8 envs: a run of 250 steps ends at 256 and trains once; one of 256 steps with 1/16 of
    an update per env step earns half an update's credit there, and does not."""
    config = tiny_config(
        tmp_path, total_env_steps=total, learning_starts=learning_starts, num_envs=8,
        updates_per_env_step=per_env_step, batch_size=8,
    )  # fmt: skip
    train(config)
    out = capsys.readouterr().out
    said = "no updates: the run earns" in out
    done = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["loop"]["updates"]
    assert done == updates and said == (updates == 0)
    assert f"env steps, {updates} update{'s' * (updates != 1)} in " in out
    assert ("is not a multiple of --num-envs 8" in out) == (total % 8 != 0)


def test_a_run_says_what_it_does_other_than_asked(tmp_path, capsys, monkeypatch):
    """Steps rounded up to a multiple of the envs; --fused-mlp where its kernels cannot run
    (here a CPU without Triton's interpreter); a buffer rounded down to whole steps of every
    env, and batches larger than the buffer holds when updates start. It also says, and its
    checkpoints keep, the versions it ran with."""
    monkeypatch.setattr("crl_fast.fused_mlp.runs_on", lambda device: False)
    agent = AgentConfig(width=32, fused_mlp=True)
    config = tiny_config(
        tmp_path, total_env_steps=250, learning_starts=12, buffer_capacity=4092, agent=agent
    )
    train(config)
    out = capsys.readouterr().out
    assert "--fused-mlp: its kernels need CUDA (and Triton); the layers run on cpu" in out
    assert "--total-env-steps 250 is not a multiple of --num-envs 8: the run takes 256 steps" in out
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["loop"]["env_steps"] == 256
    assert (
        "--buffer-capacity 4,092 is not a multiple of --num-envs 8: the buffer keeps 511 steps "
        "of each env (4,088 transitions)" in out
    )
    assert "updates start with 16 transitions stored, fewer than --batch-size 32" in out
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["versions"]  # and printed:
    assert saved["torch"] == torch.__version__ and f"torch {torch.__version__}" in out
    assert saved["crl_fast"] == crl_fast.__version__ and f"crl_fast {saved['crl_fast']}" in out
    commit = saved["crl_fast_git"]  # None where crl_fast is not a git checkout's
    assert commit == checkout_commit() and (commit is None or f"crl_fast_git {commit}, " in out)
    train(dataclasses.replace(config, resume=True, total_env_steps=512))
    assert "updates start" not in capsys.readouterr().out  # a resumed run is past them
    train(tiny_config(tmp_path, "default"))
    assert "--buffer-capacity" not in capsys.readouterr().out
    train(tiny_config(tmp_path, "small", buffer_capacity=16))
    assert "the buffer holds at most 16 transitions, fewer than --batch-size 32" in (
        capsys.readouterr().out
    )


def checkout_commit() -> str | None:
    """``git describe`` of the checkout crl_fast was imported from, or None if it is none."""
    root = Path(crl_fast.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    cmd = ["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True).stdout.strip() or None


def test_only_crl_fasts_own_checkout_names_its_commit():
    """A crl_fast installed inside another git repository (a venv in a project's folder) is not
    that repository's commit: only a folder holding .git beside crl_fast/ names one."""
    root = Path(crl_fast.__file__).resolve().parent.parent
    assert git_commit(root) == checkout_commit()
    assert git_commit(root / "tests") is None  # in the same repository, not its root


def test_a_run_resumed_by_other_versions_keeps_the_versions_it_ran_with(
    tmp_path, monkeypatch, capsys
):
    """A run trained with one torch and resumed with another (another machine's) keeps in its
    checkpoint the versions each earlier part ran with and up to which step, not only the last
    part's; a part resumed with the same versions adds nothing."""
    real = train_module.versions()
    older = real | {"torch": "2.10.0+other", "triton": "3.5.0"}
    monkeypatch.setattr(train_module, "versions", lambda: older)
    config = tiny_config(tmp_path, total_env_steps=64, learning_starts=0, eval_episodes=2)
    train(config)
    path = tmp_path / "run" / "checkpoint.pt"
    assert load_checkpoint(path)["earlier_versions"] == []
    monkeypatch.setattr(train_module, "versions", lambda: real)
    train(dataclasses.replace(config, resume=True, total_env_steps=128))
    out = capsys.readouterr().out
    assert "the checkpoint was written with crl_fast" in out and "torch 2.10.0+other" in out
    saved = load_checkpoint(path)
    assert saved["versions"] == real
    assert saved["earlier_versions"] == [older | {"until_env_step": 64}]
    train(dataclasses.replace(config, resume=True, total_env_steps=192))  # the same versions
    assert "was written with" not in capsys.readouterr().out
    assert load_checkpoint(path)["earlier_versions"] == [older | {"until_env_step": 64}]
    monkeypatch.setattr(train_module, "versions", lambda: older)  # and back to the first
    train(dataclasses.replace(config, resume=True, total_env_steps=256))
    assert load_checkpoint(path)["earlier_versions"] == [
        older | {"until_env_step": 64},
        real | {"until_env_step": 192},
    ]


@pytest.mark.parametrize(
    ("learning_starts", "per_env_step"), [(12, 1 / 8), (20, 1 / 16), (0, 1 / 8), (5, 1 / 64)]
)
def test_updates_start_with_the_transitions_the_notice_counts(
    tmp_path, monkeypatch, learning_starts, per_env_step
):
    """The notice's first update (schedule.first_update_step) is the loop's: the buffer holds
    that many transitions at the first sample, also where an iteration earns less than one
    update."""
    from crl_fast.buffer import TrajectoryBuffer
    from crl_fast.schedule import first_update_step

    stored, sample = [], TrajectoryBuffer.sample

    def sample_spy(self, batch_size, **kwargs):
        stored.append(len(self))
        return sample(self, batch_size, **kwargs)

    monkeypatch.setattr(TrajectoryBuffer, "sample", sample_spy)
    config = tiny_config(
        tmp_path,
        total_env_steps=128,
        learning_starts=learning_starts,
        updates_per_env_step=per_env_step,
    )
    train(config)
    assert stored[0] == first_update_step(config, cuda_graph=False)


def test_progress_says_when_actions_are_random(tmp_path, monkeypatch, capsys):
    """The progress line says why the first steps run faster, and the latest eval success with
    its episodes (eval_episodes, not num_envs) and interval, as the closing line does."""
    from crl_fast.logger import Progress

    seen = []
    monkeypatch.setattr(
        Progress, "update", lambda self, steps, updates, info="": seen.append((steps, info))
    )
    train(tiny_config(tmp_path, progress=True, eval_episodes=5))
    assert {steps < 256 for steps, _ in seen} == {True, False}  # both phases reported
    assert all(
        ("random actions until 256" in info) == (steps < 256)
        and re.search(r"eval success [01]\.\d\d of 5 episodes \(95% CI ", info)
        for steps, info in seen
    )
    done = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r"; eval/success [01]\.\d\d of 5 episodes \(95% CI [^)]*\), ", done)
    assert "eval/success_final" in done and "ci95" not in done  # the interval said once
    assert done.count("eval/success ") == 1  # the success said once


def test_the_policy_acts_from_learning_starts_on(tmp_path, monkeypatch):
    """Uniform random actions for the first learning_starts env steps, the policy's samples
    from there on: an off-by-one in either direction changes the number of sampled steps."""
    sampled, act = [], CRL.act

    def spy(self, obs, goal, deterministic=False):
        sampled.append(deterministic)
        return act(self, obs, goal, deterministic)

    monkeypatch.setattr(CRL, "act", spy)
    train(tiny_config(tmp_path, total_env_steps=128, learning_starts=64))
    assert sampled.count(False) == (128 - 64) // 8  # 8 envs a step


def test_progress_of_a_resumed_run_counts_its_time_from_the_runs_start(monkeypatch):
    """A resumed run's progress line shows the run's time so far, as its metrics' charts/time_s
    and its closing line do, not the time since the resume."""
    from crl_fast import logger as logger_module

    clock = iter([100.0, 100.0, 200.0])  # made, first update, second update
    monkeypatch.setattr(
        logger_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock))
    )
    out = io.StringIO()
    progress = logger_module.Progress(1000, stream=out, elapsed_s=50.0)
    progress.update(100, 1)
    progress.update(200, 2)
    assert re.search(r"updates/s +150s", out.getvalue()), out.getvalue()  # 50 s before, 100 now


def test_progress_writes_to_the_stdout_of_its_time(monkeypatch):
    """sys.stdout as it is when the run starts, not as it was when crl-fast was imported (a
    closed stream there made a later run fail)."""
    import contextlib
    import io

    from crl_fast.logger import Progress

    monkeypatch.setattr("time.perf_counter", iter(range(0, 100, 40)).__next__)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        progress = Progress(1000)
        progress.update(0, 0)
        progress.update(500, 20, "eval success 0.5")
    assert "500/1,000 steps" in out.getvalue() and "eval success 0.5" in out.getvalue()


def test_an_env_of_your_own_trains_from_the_command_line(tmp_path, capsys):
    run_dir = tmp_path / "own"
    flags = "--num-envs 4 --total-env-steps 256 --learning-starts 64 --batch-size 16"
    flags += " --width 16 --eval-episodes 4 --eval-every 128 --log-every 64"
    env = ["--env", "tests.free_point_env:free_point"]
    main(["train", *env, *flags.split(), "--run-dir", str(run_dir), "--no-tensorboard"])
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["env"] == "tests.free_point_env:free_point"
    assert "registered by this process" not in capsys.readouterr().out  # eval can rebuild it
    checkpoint = ["eval", "--checkpoint", str(run_dir / "checkpoint.pt")]
    main(checkpoint)
    last = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "eval/success" in row][-1]
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval/final_distance"] == pytest.approx(last["eval/final_distance"], abs=1e-6)
    with pytest.raises(SystemExit):  # refused before evaluating: FreePoint draws no frames
        main([*checkpoint, "--video", str(tmp_path / "v.gif")])
    assert "FreePoint does not draw frames" in capsys.readouterr().err


def test_a_run_of_an_env_registered_by_a_script_says_what_cannot_rebuild_it(tmp_path, capsys):
    from crl_fast.envs import register_env

    register_env("script_point", FreePoint, replace=True)
    train(tiny_config(tmp_path, env="script_point", total_env_steps=64, learning_starts=64))
    out = capsys.readouterr().out
    assert "--env script_point is registered by this process" in out
    assert "parameters: sa_encoder " in out  # and the networks' sizes


def test_python_m_crl_fast_is_the_command_line():
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "crl_fast", "eval", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--video-envs" in done.stdout


def test_train_help_heads_each_flag_group_with_its_summary():
    """--help heads each config's flags with the first sentence of its docstring, not the
    developers' notes and Sphinx markup that follow it."""
    from crl_fast.cli import build_parser

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    titles = [g.title for g in train_parser._action_groups]
    assert "Networks, losses and optimisers of the CRL agent" in titles
    env = "Environment, replay buffer, training schedule, evaluation, logging and checkpoints"
    assert env in titles
    assert not any(":class:" in t or "\n" in t for t in titles if t), titles


def test_warmup_updates_count_as_updates(tmp_path, monkeypatch):
    """A CUDA graph's warm-up updates (made while it is built) are real updates: counted in
    the run's updates and paid from its update credit. Checked on the CPU with a train step
    that says it made 3."""
    calls, make = [], train_module.make_train_step

    def with_warmup(config, agent, buffer, cuda_graph):
        step, per_call, _ = make(config, agent, buffer, cuda_graph)

        def counted(logged: bool) -> dict[str, torch.Tensor]:
            calls.append(logged)
            return step(logged)

        return counted, per_call, 3

    monkeypatch.setattr(train_module, "make_train_step", with_warmup)
    train(tiny_config(tmp_path))  # env steps 256 to 1024 earn 1 update each 8: 97
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["loop"]["updates"] == 97
    assert len(calls) == 97 - 3


def test_no_updates_means_no_train_step(tmp_path, monkeypatch):
    """updates_per_env_step=0 collects only: not even the CUDA graph's warm-up updates run."""

    def refuse(*args):
        raise AssertionError("a train step was built")

    monkeypatch.setattr("crl_fast.train.make_train_step", refuse)
    config = tiny_config(tmp_path, total_env_steps=64, learning_starts=0, updates_per_env_step=0)
    train(config)
    assert load_checkpoint(config.run_dir + "/checkpoint.pt")["loop"]["updates"] == 0


def test_cli_resume_refuses_changed_settings(tmp_path, capsys):
    """Changing what defines the run is refused with a one-line message naming old and new values,
    before anything in the run directory changes; changing the schedule is allowed. Run as a
    background job (SIGINT ignored): its notice comes once the run starts, not before an error."""
    config = tiny_config(tmp_path, total_env_steps=64, learning_starts=0, eval_episodes=2)
    run_dir = train(config)["run_dir"]
    saved = (run_dir / "config.json").read_text()
    resume = ["train", "--resume", "--run-dir", str(run_dir)]
    capsys.readouterr()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for flags, message in [
            ("--env point_large --seed 7", "env 'point_umaze' -> 'point_large', seed 0 -> 7"),
            ("--width 64", "width 32 -> 64"),
        ]:
            with pytest.raises(SystemExit) as exit_info:
                main([*resume, *flags.split()])
            assert exit_info.value.code == 2
            err = capsys.readouterr().err
            assert message in err and len(err.strip().splitlines()) == 1
            assert (run_dir / "config.json").read_text() == saved
        main([*resume, "--total-env-steps", "128", "--log-every", "16"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "SIGINT is ignored in this process" in capsys.readouterr().err
    assert load_checkpoint(run_dir / "checkpoint.pt")["loop"]["env_steps"] == 128


def test_out_of_memory_is_one_line_naming_the_sizes(tmp_path, capsys, monkeypatch):
    """An allocation that fails (here a batch past any address space: the CPU allocator's error;
    then CUDA's, raised by hand) ends the command with a line naming the flags that size it,
    not a traceback; any other RuntimeError keeps its traceback."""
    argv = "train --total-env-steps 64 --learning-starts 32 --num-envs 8 --eval-episodes 2"
    argv = [*argv.split(), "--device", "cpu", "--run-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--batch-size", str(2**50)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert (
        "can't allocate memory" in err[-1] and "lower --batch-size or --buffer-capacity" in err[-1]
    )

    def fail(error):
        def update(*args, **kwargs):
            raise error

        monkeypatch.setattr(CRL, "update", update)

    fail(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB.\nmore"))
    with pytest.raises(SystemExit):
        main([*argv, "--run-dir", str(tmp_path / "run2")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        "crl-fast train: error: CUDA out of memory. Tried to allocate 9.00 GiB.; "
        "lower --batch-size or --buffer-capacity"
    )
    fail(RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        main([*argv, "--run-dir", str(tmp_path / "run3")])


def test_a_run_that_fails_at_its_first_update_leaves_its_folder_as_it_was(tmp_path):
    """A batch far too large fails at the first update, after the run wrote its config.json and
    first evaluation: those go, so that the same --run-dir takes the run again (it was refused
    there, and by --resume); a folder the user made stays."""
    config = tiny_config(tmp_path, total_env_steps=64, learning_starts=32, eval_episodes=2)
    too_large = dataclasses.replace(config, batch_size=2**50)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        train(too_large)
    assert not Path(config.run_dir).exists()
    Path(config.run_dir).mkdir()
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        train(too_large)
    assert list(Path(config.run_dir).iterdir()) == []
    train(config)


@pytest.mark.parametrize("flag", ["cuda_graph", "actor_stream"])
def test_cuda_only_flags_refuse_the_cpu(tmp_path, flag):
    with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} needs a CUDA device"):
        train(tiny_config(tmp_path, device="cpu", **{flag: True}))
    assert not (tmp_path / "run").exists()


def test_a_new_run_never_overwrites_an_old_one(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, total_env_steps=64, learning_starts=0, eval_episodes=2)
    train(config)
    with pytest.raises(ValueError, match="--resume"):
        train(config)
    # A run that has not checkpointed yet: its metrics and config stay untouched.
    young = tmp_path / "young"
    young.mkdir()
    (young / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(ValueError, match="not empty"):
        train(tiny_config(tmp_path, name="young"))
    assert (young / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert [p.name for p in young.iterdir()] == ["metrics.jsonl"]  # no lock file left behind
    # Default names taken in the same second do not collide.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20261127-000000")
    first = new_run_dir(config)
    assert first.is_dir() and new_run_dir(config) == first.with_name(f"{first.name}-2")


def test_a_run_directory_in_use_is_refused(tmp_path):
    """Two runs started on the same --run-dir: the second is refused while the first runs."""
    config = tiny_config(tmp_path, total_env_steps=64, learning_starts=0, eval_episodes=2)
    with claimed_run_dir(config) as run_dir:
        with pytest.raises(ValueError, match="another run is using"):
            train(config)
        assert [p.name for p in run_dir.iterdir()] == [LOCK_NAME]
    train(config)  # free again


def test_a_failed_run_cleans_up_while_still_holding_the_lock(tmp_path, monkeypatch):
    """A run that wrote nothing removes its claim before it lets the lock go: a run trying the
    folder meanwhile is refused, instead of locking a lock file about to be deleted (which let
    two later runs in at once)."""
    config = tiny_config(tmp_path)
    folder = Path(config.run_dir)
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    undo = run_dir_module._leave_as_it_was
    tried = []

    def meanwhile(run_dir, created):
        with pytest.raises(ValueError, match="another run is using"), claimed_run_dir(config):
            pass
        tried.append(run_dir)
        undo(run_dir, created)

    monkeypatch.setattr(run_dir_module, "_leave_as_it_was", meanwhile)
    with pytest.raises(ValueError, match="not empty"):
        train(config)
    assert tried == [folder] and sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_a_run_killed_before_its_first_checkpoint_is_not_sent_to_resume(tmp_path, monkeypatch):
    """A run killed before its first checkpoint leaves its config.json and first rows. Started
    again there it is refused, and the message must not say to pass --resume, which refuses a
    folder without a checkpoint: each message sent the user to the other."""

    def killed(state, path):
        raise Killed

    config = tiny_config(tmp_path, checkpoint_every=512)
    monkeypatch.setattr(train_module, "save_checkpoint", killed)
    with pytest.raises(Killed):
        train(config)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="stopped before its first checkpoint") as again:
        train(config)
    assert "--resume to continue" not in str(again.value)
    with pytest.raises(ValueError, match=r"cannot resume: .* stopped before its first checkpoint"):
        train(dataclasses.replace(config, resume=True))


def test_resume_names_a_folder_a_run_left_before_writing_anything(tmp_path, capsys):
    """A run killed before it wrote anything leaves only its lock file: --resume (the command's,
    which looks for config.json first, and train's) says so and sends the user to start the run
    without it, which that folder takes. A --run-dir that does not exist is named as such."""
    config = tiny_config(tmp_path, total_env_steps=64, learning_starts=0, eval_episodes=2)
    resume = dataclasses.replace(config, resume=True)
    with pytest.raises(ValueError, match=r"cannot resume: --run-dir .*run does not exist"):
        train(resume)
    folder = Path(config.run_dir)
    folder.mkdir()
    (folder / LOCK_NAME).touch()
    with pytest.raises(SystemExit):
        main(["train", "--resume", "--run-dir", str(folder)])
    with pytest.raises(ValueError, match="only a lock file") as refused:
        train(resume)
    for message in (capsys.readouterr().err, str(refused.value)):
        assert "killed before it wrote anything" in message
        assert "start the run without --resume" in message
    assert [p.name for p in folder.iterdir()] == [LOCK_NAME]
    train(config)  # as the message says


def test_a_file_system_without_locks_still_trains(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(run_dir_module.fcntl, "flock", no_locks)
    train(tiny_config(tmp_path, total_env_steps=64, learning_starts=0, eval_episodes=2))
    assert "a second run there is not refused" in capsys.readouterr().out


def test_a_run_that_fails_to_start_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for run_dir in ("fresh", None):  # a --run-dir it creates, a default one
        config = tiny_config(tmp_path, run_dir=run_dir, env_kwargs={"dt": -1})
        with pytest.raises(ValueError, match="dt"):
            train(config)
    assert not (tmp_path / "fresh").exists() and not list(tmp_path.glob("runs/*"))


def test_cli_reports_os_errors_as_messages(monkeypatch, capsys):
    def read_only(config):
        raise OSError(30, "Read-only file system", "runs/x")

    monkeypatch.setattr(train_module, "train", read_only)
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("crl-fast train: error: [Errno 30]")


def test_cli_shows_the_traceback_of_a_bug_outside_crl_fast(tmp_path, monkeypatch, capsys):
    """crl-fast's own checks are one-line messages; an error in code it calls (an env factory
    with a bug) keeps its traceback, rather than looking like a bad setting."""

    def buggy_factory(num_envs, **kwargs):
        return num_envs + "envs"

    from crl_fast.envs import register_env

    register_env("buggy_factory", buggy_factory, replace=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["train", "--env", "buggy_factory", "--env-kwargs", '{"x": 1}'])
    assert capsys.readouterr().err == ""  # a background job's SIGINT notice comes later


class _DoubleAfterAStep(FreePoint):
    def _advance(self, action):
        self.pos = (self.pos + 0.1 * action).double()


class _CrashesAtTheFifthStep(FreePoint):
    def _advance(self, action):
        if int(self.elapsed_steps.max()) == 4:
            raise RuntimeError("a bug in the env")
        super()._advance(action)


@pytest.mark.parametrize(
    ("env", "error"), [(_DoubleAfterAStep, SystemExit), (_CrashesAtTheFifthStep, RuntimeError)]
)
def test_an_env_that_fails_in_its_first_steps_leaves_no_run_directory(
    env, error, tmp_path, monkeypatch
):
    """The first evaluation runs before the run writes a file: a one-line error (float64
    observations after a step) or the env's own traceback, and nothing left in runs/."""
    from crl_fast.envs import register_env

    register_env("failing_env", env, replace=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error):
        main(["train", "--env", "failing_env", "--num-envs", "4", "--no-progress"])
    assert not list(tmp_path.glob("runs/*"))


def test_logged_rates_leave_out_evaluation_and_checkpoint_time(tmp_path, monkeypatch):
    """A slow evaluation (at 512) and a slow checkpoint (at 256, after that step's log) would
    each stretch the interval they fall in past the pause, and lower its env steps/s. The loop's
    clock jumps by the pause inside them (no sleep: a loaded machine cannot blur the test)."""
    pause, calls, clock = 1000.0, {"evaluate": 0, "save": 0}, [0.0]

    def slow(name, fn, at_call):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            if calls[name] == at_call:
                clock[0] += pause
            return fn(*args, **kwargs)

        return wrapper

    loop_time = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + clock[0])
    monkeypatch.setattr(train_module, "time", loop_time)
    monkeypatch.setattr(train_module, "evaluate", slow("evaluate", train_module.evaluate, 2))
    monkeypatch.setattr(
        train_module, "save_checkpoint", slow("save", train_module.save_checkpoint, 1)
    )
    train(tiny_config(tmp_path, checkpoint_every=256))
    assert calls == {"evaluate": 3, "save": 5}  # at 0, 512, 1024; every 256 and at the end
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "charts/sps" in r]
    assert [r["step"] for r in rows] == [256, 512, 768, 1024]
    assert all(256 / r["charts/sps"] < pause / 10 for r in rows)


def test_train_restores_the_torch_settings_it_changes(tmp_path):
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    train(tiny_config(tmp_path, threads=1 if threads > 1 else min(2, os.cpu_count() or 1)))
    assert torch.get_num_threads() == threads
    assert torch.get_float32_matmul_precision() == precision


@pytest.mark.gpu
def test_train_sets_and_restores_tf32_on_cuda(tmp_path, monkeypatch):
    """tf32=False means float32 matmuls on CUDA ("highest"), whatever the process had set; the
    process's setting comes back afterwards."""
    real = torch.set_float32_matmul_precision
    seen = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda p: seen.append(p) or real(p))
    real("medium")
    try:
        train(tiny_config(tmp_path, device="cuda", tf32=False, total_env_steps=256))
        assert (seen[0], seen[-1]) == ("highest", "medium")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        real("highest")


def test_resume_reads_auto_as_the_device_it_chose_and_keeps_steps_done(tmp_path):
    config = tiny_config(tmp_path, device="auto", total_env_steps=64, learning_starts=0)
    if resolve_device("auto").type != "cpu":
        pytest.skip("auto is CUDA here")
    run_dir = str(train(config)["run_dir"])
    resume = ["train", "--resume", "--run-dir", run_dir, "--device", "cpu"]
    main([*resume, "--total-env-steps", "128"])  # auto ran on the CPU: the same device
    with pytest.raises(SystemExit):
        main([*resume, "--total-env-steps", "96"])  # below the 128 steps done
    assert json.loads(Path(run_dir, "config.json").read_text())["total_env_steps"] == 128
    main([*resume, "--total-env-steps", "128"])  # the same schedule: nothing to do


def test_resume_takes_a_total_that_rounds_up_to_the_steps_done(tmp_path):
    """A run of 60 steps in 8 envs took 64: resumed with 61 (also 64 steps: nothing to do), it is
    not refused as going below the steps done; 56 is."""
    run_dir = str(train(tiny_config(tmp_path, total_env_steps=60, learning_starts=0))["run_dir"])
    resume = ["train", "--resume", "--run-dir", run_dir]
    main([*resume, "--total-env-steps", "61"])
    with pytest.raises(SystemExit):
        main([*resume, "--total-env-steps", "56"])


def test_a_checkpoint_cut_anywhere_is_a_value_error(tmp_path):
    """torch.load fails a truncated file with EOFError, RuntimeError or OSError by where it is
    cut; each is the same ValueError naming the file."""
    path = tmp_path / "checkpoint.pt"
    data = save_checkpoint({"config": {}, "weights": torch.randn(20_000)}, path).read_bytes()
    for cut in range(0, len(data), 997):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"checkpoint\.pt"):
            load_checkpoint(path)
    for damaged in (b"hello\n", b"a"):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=r"checkpoint\.pt"):
            load_checkpoint(path)


class _Pickled:
    """An object weights-only loading refuses (a checkpoint crl-fast did not write)."""


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path):
    """A config.json given as the checkpoint, or a pickle of arbitrary objects: named, and
    without torch's advice to load with weights_only=False (it would run the pickle's code)."""
    (tmp_path / "config.json").write_text(json.dumps(TrainConfig().to_dict()))
    with pytest.raises(ValueError, match=r"config\.json: not a zip-format torch\.save file"):
        load_checkpoint(tmp_path / "config.json")
    torch.save({"agent": _Pickled()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="holds objects other than tensors") as error:
        load_checkpoint(tmp_path / "other.pt")
    assert "weights_only" not in str(error.value) and "_Pickled" in str(error.value)


def test_a_damaged_checkpoint_is_a_value_error_or_loads_unchanged(tmp_path):
    """A flipped byte anywhere: the same ValueError naming the file, or (a flip in padding the
    zip reader skips) the saved values. Never a changed weight: torch.load does not check the
    records' CRCs, load_checkpoint does."""
    path = tmp_path / "checkpoint.pt"
    saved = {"config": {"a": 1}, "weights": torch.randn(64)}
    data = save_checkpoint(saved, path).read_bytes()
    refused = 0
    for at in range(len(data)):
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
        try:
            state = load_checkpoint(path)
        except ValueError as error:
            assert "checkpoint.pt" in str(error)
            refused += 1
        else:
            assert state["config"] == saved["config"], at
            assert torch.equal(state["weights"], saved["weights"]), at
    assert refused > 100


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    (tmp_path / ".checkpoint.pt.99999.tmp").write_bytes(b"a killed process's partial write")
    save_checkpoint({"step": 3}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_seeding_and_rng_state_cover_python_numpy_and_torch():
    """What an env or a loss of the user's draws from Python's or NumPy's global generator
    repeats after seed_everything, and continues after set_rng_state (NumPy's cached Gaussian
    too), as torch's does: the run's own draws use torch only, so no run test sees these."""

    def draws() -> tuple[float, ...]:
        return random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item()

    seed_everything(3)
    first = draws()
    state = rng_state("cpu")
    after = draws()
    draws()
    set_rng_state(state, "cpu")
    assert draws() == after
    seed_everything(3)
    assert draws() == first


@pytest.mark.parametrize(
    ("saved", "device", "restored"),
    [
        (2, "cuda:2", 2),  # a run on cuda:2 saves that device's state only
        (1, "cuda:0", 1),  # a run on cuda:1 resumed on a machine with one GPU
        ([0, 1, 2], "cuda:0", 0),  # written before rng_state took a device: every GPU's
        ([0, 1, 2], "cuda:2", 2),
        ([0, 1], "cuda:3", 0),
    ],
)
def test_rng_state_keeps_the_run_devices_cuda_state(monkeypatch, saved, device, restored):
    """Checkpoints hold the CUDA generator of the run's device (getting every GPU's started a
    context on each, and restoring them all raised IndexError on a machine with fewer GPUs),
    restored onto the device the run resumes on, whatever its index."""
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    calls: list[tuple[int, int]] = []  # (state, device index) of each set_rng_state
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: states[torch.device(d).index])
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda s, d: calls.append((int(s[0]), torch.device(d).index))
    )
    if isinstance(saved, int):
        state = rng_state(f"cuda:{saved}")
        assert [int(s[0]) for s in state["cuda"]] == [saved]
    else:
        state = rng_state("cpu") | {"cuda": [states[i] for i in saved]}
    set_rng_state(state, device)
    assert calls == [(restored, torch.device(device).index)]
    assert rng_state("cpu")["cuda"] == []


def test_logger_drops_rows_after_the_resumed_checkpoint(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (10, 20, 30):
        logger.log(step, {"critic/loss": float(step)})
    logger.log(20, {"eval/success": 0.5})
    logger.close()
    resumed = MetricsLogger(tmp_path, tensorboard=False, resume_step=20)
    resumed.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 20]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,critic/loss,eval/success"


@pytest.mark.parametrize("reader", ["event_accumulator", "plugin_event_accumulator"])
def test_tensorboard_shows_a_resumed_run_without_the_killed_runs_extra_steps(tmp_path, reader):
    """Where TensorBoard is installed (not in CI): the resumed writer's purge step hides what
    the killed run logged after its checkpoint, as the JSONL rewrite drops those rows. The
    plugin reader (TensorBoard's server with --load_fast=false) takes a run's first session
    start as no restart: the new run's writer must log one."""
    accumulator = pytest.importorskip(f"tensorboard.backend.event_processing.{reader}")
    logger = MetricsLogger(tmp_path)
    for step in (10, 20, 30):
        logger.log(step, {"critic/loss": float(step)})
    logger.close()
    resumed = MetricsLogger(tmp_path, resume_step=20)
    for step in (30, 40):
        resumed.log(step, {"critic/loss": step + 0.5})
    resumed.close()
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    if reader == "event_accumulator":
        shown = [(e.step, e.value) for e in events.Scalars("critic/loss")]
    else:  # scalars as tensors
        from tensorboard.util.tensor_util import make_ndarray

        tensors = events.Tensors("critic/loss")
        shown = [(e.step, make_ndarray(e.tensor_proto).item()) for e in tensors]
    assert shown == [(10, 10.0), (20, 20.0), (30, 30.5), (40, 40.5)]


def test_every_tensorboard_writer_starts_a_session(tmp_path, monkeypatch):
    """Without TensorBoard too (the test above needs it): a new run's writer purges from step 0
    (starts a session, which the plugin reader needs), a resumed one past its checkpoint."""
    purge_steps = []

    class Writer:
        def __init__(self, logdir, purge_step=None):
            purge_steps.append(purge_step)

        def close(self):
            pass

        flush = close

    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer)
    )
    MetricsLogger(tmp_path).close()
    MetricsLogger(tmp_path, resume_step=20).close()
    assert purge_steps == [0, 21]


def test_metrics_jsonl_is_strict_json(tmp_path):
    """NaN and infinities are logged as null: Python's json writes them as NaN / Infinity, which
    strict parsers (jq, JavaScript) reject. A resumed logger rewrites an older file's too, and
    its CSV is the one an uninterrupted run writes."""

    def strict_rows(path):
        def refuse(constant):
            raise ValueError(f"{constant} is not JSON")

        return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]

    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(10, {"a": float("nan"), "b": float("inf"), "c": -float("inf"), "d": 1.5})
    logger.close()
    expected = [{"step": 10, "a": None, "b": None, "c": None, "d": 1.5}]
    assert strict_rows(tmp_path / "metrics.jsonl") == expected
    csv_text = (tmp_path / "metrics.csv").read_text()
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 10, "a": NaN, "b": Infinity, "c": -Infinity, "d": 1.5}\n'
    )
    MetricsLogger(tmp_path, tensorboard=False, resume_step=10).close()
    assert strict_rows(tmp_path / "metrics.jsonl") == expected
    assert (tmp_path / "metrics.csv").read_text() == csv_text


def test_a_new_logger_keeps_the_metrics_it_finds(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(10, {"critic/loss": 1.0})
    logger.close()
    old = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="another run's metrics"):
        MetricsLogger(tmp_path, tensorboard=False)
    assert (tmp_path / "metrics.jsonl").read_text() == old


def test_logger_crash_while_rewriting_keeps_the_old_metrics(tmp_path, monkeypatch):
    """A run killed while the resumed logger rewrites metrics.jsonl loses none of its rows."""
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (10, 20, 30):
        logger.log(step, {"critic/loss": float(step)})
    logger.close()
    old = (tmp_path / "metrics.jsonl").read_text()
    real_open = builtins.open

    def open_then_die(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and "metrics.jsonl" in str(file):  # killed right after truncating
            f.close()
            raise Killed
        return f

    monkeypatch.setattr(builtins, "open", open_then_die)
    monkeypatch.setattr(io, "open", open_then_die)
    with pytest.raises(Killed):
        MetricsLogger(tmp_path, tensorboard=False, resume_step=20)
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == old


def test_logger_says_when_tensorboard_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    MetricsLogger(tmp_path, tensorboard=True).close()
    assert "tensorboard is not installed" in capsys.readouterr().err


def test_the_curve_labels_both_axes_of_every_panel(tmp_path, monkeypatch):
    """Each panel of curve.png says what its y axis counts, and in which unit, not only the
    metric's name in its title."""
    from crl_fast.logger import CURVE_PANELS, plot_curve

    figure = pytest.importorskip("matplotlib.figure")
    saved = []
    monkeypatch.setattr(figure.Figure, "savefig", lambda self, *a, **k: saved.append(self))
    plot_curve([{"step": 0, **dict.fromkeys(CURVE_PANELS, 0.5)}], tmp_path / "curve.png")
    (axes,) = [fig.axes for fig in saved]
    for ax, key in zip(axes, CURVE_PANELS, strict=True):
        assert ax.get_title() == key and ax.get_ylabel(), key
    assert [ax.get_xlabel() for ax in axes[2:]] == ["environment steps"] * 2  # the shared x


def test_the_curve_shades_the_success_interval(tmp_path, monkeypatch):
    """The success panel shades each evaluation's 95% interval (where its row has one: a
    resumed run's curve may hold rows of an older version), so the curve shows which of its
    changes the episodes can tell apart."""
    from crl_fast.logger import plot_curve

    figure = pytest.importorskip("matplotlib.figure")
    saved = []
    monkeypatch.setattr(figure.Figure, "savefig", lambda self, *a, **k: saved.append(self))
    band = {"eval/success_ci95_low": 0.25, "eval/success_ci95_high": 0.75}
    rows = [
        {"step": 0, "eval/success": 0.5},
        {"step": 1, "eval/success": 0.5, **band},
        {"step": 2, "eval/success": 0.6, "eval/success_ci95_low": 0.4, "eval/success_ci95_high": 1},
    ]
    plot_curve(rows, tmp_path / "curve.png")
    (axes,) = [fig.axes for fig in saved]
    (shaded,) = axes[0].collections
    x, y = shaded.get_paths()[0].vertices.T
    assert (x.min(), x.max(), y.min(), y.max()) == (1, 2, 0.25, 1)
    assert "95%" in axes[0].get_legend().get_texts()[0].get_text()
    plot_curve(rows[:1], tmp_path / "curve.png")  # no interval: no band
    assert not saved[-1].axes[0].collections


def test_the_curve_leaves_out_the_null_values_of_non_finite_metrics(tmp_path, monkeypatch):
    from crl_fast.logger import CURVE_PANELS, plot_curve

    figure = pytest.importorskip("matplotlib.figure")
    saved = []
    monkeypatch.setattr(figure.Figure, "savefig", lambda self, *a, **k: saved.append(self))
    rows = [
        {"step": 0, **dict.fromkeys(CURVE_PANELS)},
        {"step": 1, **dict.fromkeys(CURVE_PANELS, 0.5)},
    ]
    plot_curve(rows, tmp_path / "curve.png")
    (axes,) = [fig.axes for fig in saved]
    assert [list(ax.lines[0].get_xdata()) for ax in axes] == [[1]] * len(CURVE_PANELS)


def test_cli_train_then_eval(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "cli"
    flags = "--num-envs 4 --max-episode-steps 16 --total-env-steps 256 --learning-starts 64"
    flags += " --batch-size 16 --width 16 --eval-episodes 4 --eval-every 128 --log-every 64"
    main(["train", *flags.split(), "--run-dir", str(run_dir), "--no-tensorboard", "--no-progress"])
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["num_envs"] == 4 and saved["agent"]["width"] == 16
    for name in ("checkpoint.pt", "metrics.csv", "metrics.jsonl", "curve.png"):
        assert (run_dir / name).exists(), name
    capsys.readouterr()
    main(["eval", "--checkpoint", str(run_dir / "checkpoint.pt")])  # the run's eval episodes
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The run's own last evaluation: the same 4 goals (its seed), the same weights, CPU.
    last = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "eval/success" in row][-1]
    assert result["episodes"] == 4
    for key in ("eval/success", "eval/success_final", "eval/final_distance"):
        assert result[key] == pytest.approx(last[key], abs=1e-6), key
    successes = round(result["eval/success"] * 4)
    low, high = wilson_interval(successes, 4)  # with its 95% interval, in the run's rows too
    assert (result["eval/success_ci95_low"], result["eval/success_ci95_high"]) == (low, high)
    assert (last["eval/success_ci95_low"], last["eval/success_ci95_high"]) == (low, high)
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]  # columns parsed by place
    assert header.startswith("step,eval/success,eval/success_final,eval/final_distance,")
    agent, _ = load_agent(run_dir / "checkpoint.pt", "cpu")
    saved = load_checkpoint(run_dir / "checkpoint.pt")["agent"]["actor"]
    assert all(torch.equal(v, saved[k]) for k, v in agent.actor.state_dict().items())

    # With a video: the same evaluation, and a GIF of 2 of its episodes, one frame a step.
    video = tmp_path / "eval.gif"
    checkpoint = ["eval", "--checkpoint", str(run_dir / "checkpoint.pt"), "--episodes", "4"]
    main([*checkpoint, "--video", str(video), "--video-envs", "2"])
    filmed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert filmed == result | {"video": str(video)}
    from PIL import Image

    with Image.open(video) as gif:  # Pillow merges equal frames, adding their durations
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
        # the reset, then the 16 steps up to the final observations, at 10 frames/s
        assert sum(durations) == 17 * 100 and gif.size == (2 * 160 + 2, 160)
    main([*checkpoint[:3], "--episodes", "2", "--video", str(video)])  # 2 envs: 2 filmed
    with Image.open(video) as gif:
        assert gif.size == (2 * 160 + 2, 160)
    directory = tmp_path / "frames.gif"
    directory.mkdir()
    for flags, named in [
        (["--video", str(tmp_path / "no" / "eval.gif")], "does not exist"),
        (["--video", str(video), "--video-envs", "5"], "--video-envs"),
        (["--video", str(tmp_path / "eval.mp4")], ".gif"),
        (["--video", str(tmp_path)], ".gif"),
        (["--video", str(directory)], "is a directory"),
        (["--video-envs", "2"], "give --video too"),
        (["--video", ""], "--video needs a path"),  # wrote no video, silently
    ]:
        monkeypatch.setattr(train_module, "evaluate", None)  # refused before evaluating
        with pytest.raises(SystemExit):
            main([*checkpoint, *flags])
        assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "value"), [([], None), (["--compile"], True), (["--no-compile"], False)]
)
def test_cli_speed_flags_default_to_the_device(flags, value):
    """--compile / --no-compile set the flag; without either it stays None: on for CUDA."""
    from crl_fast.cli import build_parser, train_config
    from crl_fast.train import Speed, speed_flags

    args = vars(build_parser().parse_args(["train", *flags, "--cuda-graph"]))
    config = train_config({k: v for k, v in args.items() if k != "command"})
    assert config.compile is value and config.cuda_graph is True
    auto = dataclasses.replace(config, cuda_graph=None)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert speed_flags(auto, cuda) == Speed(compile=value is not False, cuda_graph=True)
    assert speed_flags(auto, cpu) == Speed(compile=bool(value), cuda_graph=False)


def test_cli_jaxgcrl_critic_shorthand():
    from crl_fast.cli import build_parser, train_config

    def config(*flags):
        args = vars(build_parser().parse_args(["train", *flags]))
        return train_config({k: v for k, v in args.items() if k != "command"}).agent

    assert config("--actor-random-goals", "0.5").actor_random_goals == 0.5
    agent = config("--jaxgcrl-critic", "--energy", "norm", "--exclude-positive-from-lse")
    assert (agent.loss, agent.energy, agent.logsumexp_penalty) == ("infonce", "norm", 0.1)
    assert agent.exclude_positive_from_lse
    with pytest.raises(ValueError, match="--loss"):
        config("--jaxgcrl-critic", "--loss", "binary")


def test_configs_refuse_wrong_types_and_take_paths_as_strings(tmp_path):
    """A config is saved as JSON with its run: a wrong type stops it before it starts."""
    config = TrainConfig(run_dir=tmp_path / "run", device=torch.device("cpu"))
    assert (config.run_dir, config.device) == (str(tmp_path / "run"), "cpu")
    assert AgentConfig(critic_lr=1).critic_lr == 1.0 and type(AgentConfig(alpha=1).alpha) is float
    for make, kwargs, match in [
        (TrainConfig, {"batch_size": 32.0}, "batch_size must be int"),
        (TrainConfig, {"num_envs": True}, "num_envs must be int"),
        (TrainConfig, {"max_episode_steps": "10"}, "max_episode_steps must be int | None"),
        (TrainConfig, {"compile": 1}, "compile must be bool | None"),
        (TrainConfig, {"env_kwargs": {"dt": np.float32(0.1)}}, "env_kwargs must hold JSON"),
        (AgentConfig, {"actor_random_goals": True}, "actor_random_goals must be float"),
        (AgentConfig, {"layer_norm": "yes"}, "layer_norm must be bool"),
        (TrainConfig, {"agent": {"width": 8}}, r"agent must be an AgentConfig, got dict \(Train"),
    ]:
        with pytest.raises(TypeError, match=match):
            make(**kwargs)
    for make, kwargs in [(TrainConfig, {"batch_size": 10**30}), (AgentConfig, {"width": 2**63})]:
        with pytest.raises(ValueError, match="must fit in 64 bits"):  # torch failed in C++
            make(**kwargs)
    with pytest.raises(ValueError, match="run_dir must name a directory"):
        TrainConfig(run_dir="")  # `--run-dir ""` ran in a new runs/... directory instead
    # Saved before "" was refused, where it meant the default: such a run still evaluates.
    assert TrainConfig.from_dict(TrainConfig().to_dict() | {"run_dir": ""}).run_dir is None


def test_evaluate_make_env_and_flags_name_what_they_take():
    """A non-agent, a non-env (a plain Gymnasium env, say), a non-str name or a non-bool flag:
    a TypeError saying what is wanted, not an AttributeError from inside or a truthy string."""
    env = make_env("point_umaze", 2, max_episode_steps=5)
    agent = CRL(env.obs_dim, env.action_dim, env.goal_dim, AgentConfig(width=8))
    with pytest.raises(TypeError, match=r"deterministic=True\) \(a CRL\), got object"):
        evaluate(object(), env, 0)
    with pytest.raises(TypeError, match=r"takes a crl-fast vector env .*, got object"):
        evaluate(agent, object(), 0)
    with pytest.raises(TypeError, match="an env name is a str, got NoneType"):
        make_env(None, 2)
    with pytest.raises(TypeError, match="replace must be True or False"):
        register_env("free_point_again", FreePoint, replace="no")
    with pytest.raises(TypeError, match="actor_stream must be True or False"):
        CRL(env.obs_dim, env.action_dim, env.goal_dim, AgentConfig(width=8), actor_stream="no")


def test_threads_beyond_this_cpu_refuse_a_run_not_a_saved_config(tmp_path):
    """A run made on a larger machine still loads (e.g. for `crl-fast eval`) on this one."""
    many = (os.cpu_count() or 1) + 1
    config = TrainConfig.from_dict(tiny_config(tmp_path, threads=many).to_dict())
    with pytest.raises(ValueError, match="--threads must be at most"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_resume_treats_fields_newer_than_the_checkpoint_as_defaults():
    from crl_fast.config import check_resume

    saved = TrainConfig().to_dict()
    del saved["env_kwargs"], saved["agent"]["exclude_positive_from_lse"]  # an older checkpoint
    check_resume(saved, TrainConfig(total_env_steps=10**6))
    with pytest.raises(ValueError, match="env_kwargs"):
        check_resume(saved, TrainConfig(env_kwargs={"success_distance": 5.0}))
    with pytest.raises(ValueError, match="exclude_positive_from_lse"):
        check_resume(saved, TrainConfig(agent=AgentConfig(exclude_positive_from_lse=True)))


def test_resume_takes_an_actor_size_given_as_the_one_it_inherited():
    """--actor-depth / --actor-width equal to the encoders' build the same actor as leaving them
    unset, so a resume may give them; another actor size is still refused."""
    from crl_fast.config import check_resume

    deep = {"residual": True, "layer_norm": True, "depth": 8, "width": 32}
    saved = TrainConfig(agent=AgentConfig(**deep)).to_dict()
    check_resume(saved, TrainConfig(agent=AgentConfig(**deep, actor_depth=8, actor_width=32)))
    explicit = TrainConfig(agent=AgentConfig(**deep, actor_depth=8)).to_dict()
    check_resume(explicit, TrainConfig(agent=AgentConfig(**deep)))
    with pytest.raises(ValueError, match="actor_depth 8 -> 4"):
        check_resume(saved, TrainConfig(agent=AgentConfig(**deep, actor_depth=4)))


def test_resume_compares_a_device_this_machine_lacks_by_name():
    from crl_fast.config import check_resume

    saved = TrainConfig(device="cuda:99").to_dict()
    check_resume(saved, TrainConfig(device="cuda:99"))
    with pytest.raises(ValueError, match="device 'cuda:99' -> 'cpu'"):
        check_resume(saved, TrainConfig(device="cpu"))


def test_env_kwargs_reach_the_env(tmp_path):
    from crl_fast.cli import build_parser, train_config
    from crl_fast.train import make_eval_env

    argv = ["train", "--env-kwargs", '{"success_distance": 0.3, "terminate_on_success": true}']
    args = vars(build_parser().parse_args(argv))
    config = train_config({k: v for k, v in args.items() if k != "command"})
    env = make_eval_env(config, torch.device("cpu"), 2)
    assert (env.success_distance, env.terminate_on_success) == (0.3, True)
    with pytest.raises(ValueError, match="env_kwargs"):
        make_eval_env(dataclasses.replace(config, env_kwargs={"colour": 1}), "cpu", 2)
    with pytest.raises(ValueError, match="fixes the maze"):  # not point_large under another name
        make_eval_env(dataclasses.replace(config, env_kwargs={"maze": "large"}), "cpu", 2)


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["train", "--env-kwargs", "[1, 2]"], "invalid JSON object value"),
        (["train", "--resume"], "--resume needs --run-dir"),
        (["train", "--resume", "--run-dir", "none"], "--resume needs --run-dir"),
        (["train", "--gamma", "1.5"], r"gamma must lie in \(0, 1\)"),
        (["train", "--residual", "--depth", "6"], "positive multiple of 4"),
        (["train", "--loss", "flatnce", "--batch-size", "1"], "batch_size must be >= 2"),
        (["train", "--alpha", "0"], "alpha must be positive"),
        (["train", "--actor-lr", "-1"], "actor_lr must be >= 0"),
        (["train", "--critic-lr", "-0.5"], "critic_lr must be >= 0"),
        (["train", "--seed", "-1"], r"seed must lie in \[0, 2\*\*32\)"),
        (["train", "--seed", str(2**32)], r"seed must lie in \[0, 2\*\*32\)"),
        (["train", "--actor-random-goals", "0.3"], "invalid choice: 0.3"),
        (["train", "--actor-random-goals", "1", "--batch-size", "1"], "batch_size must be >= 2"),
        (["train", "--threads", "100000"], "--threads must be at most"),
        (["train", "--device", "meta"], "runs on CPU and CUDA devices"),
        (["train", "--env", "gymnasium:Nope-v0"], "cannot make the Gymnasium env 'Nope-v0'"),
        (["train", "--env-kwargs", '{"terminate_on_success": "false"}'], "must be True or False"),
        (["train", "--updates-per-env-step", "nan"], "updates_per_env_step must be a finite"),
        (["train", "--alpha", "nan", "--no-autotune-alpha"], "alpha must be a finite number"),
        (["train", "--buffer-capacity", "4", "--num-envs", "8"], "buffer_capacity must hold"),
        (["train", "--env-kwargs", '{"dt": -1}'], "dt must be a positive number"),
        (["train", "--env-kwargs", '{"success_distance": 0}'], "success_distance must be a"),
        (["train", "--goal-mode", "future"], "invalid choice: 'future'"),
        (["train", "--actor-goal-mode", "random"], "invalid choice: 'random'"),
        (["train", "--env-kwargs", '{"seed": 3}'], "env_kwargs cannot set 'seed': the run sets"),
        (["eval", "--checkpoint", "x.pt", "--episodes", "0"], "--episodes: must be a positive"),
        (["eval", "--checkpoint", "x.pt", "--episodes", "1.5"], "--episodes: invalid positive int"),
        (["eval", "--checkpoint", "x.pt", "--seed", str(2**32)], r"--seed: seed must lie in \[0,"),
        (["eval", "--checkpoint", "x.pt", "--seed", "1.5"], "--seed: invalid seed value"),
    ],
)
def test_cli_rejects_bad_configs_with_a_message(argv, reason, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "train":  # a check that let its value through: a 64-step run, not 500,000
        argv = [*argv, "--total-env-steps", "64"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert re.search(f"error: .*{reason}", capsys.readouterr().err)
    assert not list(tmp_path.glob("runs/*"))  # a run that failed to start leaves no folder


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("gamma", 1.0, r"gamma must lie in \(0, 1\)"),
        ("gamma", 0.0, r"gamma must lie in \(0, 1\)"),
        ("updates_per_env_step", -0.5, "updates_per_env_step must be >= 0"),
        ("learning_starts", -1, "learning_starts must be >= 0"),
        ("eval_episodes", 0, "eval_episodes must be positive"),
        ("max_episode_steps", 0, r"max_episode_steps must be positive \(or None\), got 0"),
        ("resume", True, "--resume needs --run-dir"),
    ],
)
def test_train_config_refuses_values_out_of_range(field, value, message):
    """Refused where the config is made (a negative rate or start would run as 0, silently;
    the others would fail later, naming something else).
    Checked on TrainConfig, not through the command line: without the check, a command line
    taking the value would start a whole default run instead of failing."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_a_config_cannot_change_after_its_checks(tmp_path):
    """A change after construction would skip the checks made there (a loss needing more rows
    than batch_size, say): the config is frozen, and train() checks again what it is given (a
    field set with object.__setattr__, env_kwargs with dict.__setitem__), with the construction's
    message."""
    flatnce = AgentConfig(width=32, loss="flatnce")  # 2 goal rows
    with pytest.raises(ValueError) as made:
        tiny_config(tmp_path, batch_size=1, agent=flatnce)
    config = tiny_config(tmp_path, batch_size=1)
    with pytest.raises(dataclasses.FrozenInstanceError, match="'agent'"):
        config.agent = flatnce
    with pytest.raises(ValueError, match=re.escape(str(made.value))):
        dataclasses.replace(config, agent=flatnce)  # another config: checked
    object.__setattr__(config, "agent", flatnce)
    with pytest.raises(ValueError, match=re.escape(str(made.value))):
        train(config)
    config = tiny_config(tmp_path)
    dict.__setitem__(config.env_kwargs, "seed", 1)  # past its read-only methods
    with pytest.raises(ValueError, match="env_kwargs cannot set 'seed': the run sets it"):
        train(config)
    assert not (tmp_path / "run").exists()  # refused before the run started
    with pytest.raises(TypeError, match=r"config must be a TrainConfig .*, got dict"):
        train(config.to_dict())


def test_env_kwargs_cannot_change_after_the_checks(tmp_path):
    """The frozen config's env_kwargs is a read-only copy: a change in place (to the config's
    or the caller's dict) would skip the checks. It still saves, loads, copies and compares as
    the dict it was given."""
    given = {"success_distance": 0.5, "sizes": [1]}
    config = tiny_config(tmp_path, env_kwargs=given)
    given["seed"] = 1
    given["sizes"].append(2)  # a deep copy: the caller's nested values are its own
    want = {"success_distance": 0.5, "sizes": [1]}
    changes = {
        "set": lambda d: d.__setitem__("seed", 1),
        "del": lambda d: d.__delitem__("success_distance"),
        "|=": lambda d: d.__ior__({"seed": 1}),
        "update": lambda d: d.update(seed=1),
        "setdefault": lambda d: d.setdefault("seed", 1),
        "pop": lambda d: d.pop("success_distance"),
        "popitem": lambda d: d.popitem(),
        "clear": lambda d: d.clear(),
    }
    for name, change in changes.items():
        with pytest.raises(TypeError, match="env_kwargs is read-only"):
            change(config.env_kwargs)
        assert config.env_kwargs == want, name
    edited = config.to_dict()["env_kwargs"]  # a plain dict and a deep copy, to edit and load
    edited["sizes"].append(2)
    assert type(edited) is dict and config.env_kwargs == want
    saved = json.loads(json.dumps(config.to_dict()))
    assert saved["env_kwargs"] == want and TrainConfig.from_dict(saved) == config
    assert copy.deepcopy(config) == config == pickle.loads(pickle.dumps(config))


def test_config_file_starts_a_new_run_from_saved_settings(tmp_path, capsys):
    """--config takes a run's config.json (or some of its fields), flags on top; the file's
    run_dir and resume are not taken: it is a new run."""
    from crl_fast.cli import build_parser, train_config

    def config(*argv: str) -> TrainConfig:
        args = vars(build_parser().parse_args(["train", *argv]))
        return train_config({k: v for k, v in args.items() if k != "command"})

    saved = TrainConfig(num_envs=8, run_dir="runs/old", resume=True, agent=AgentConfig(depth=3))
    (tmp_path / "run.json").write_text(json.dumps(saved.to_dict()))
    got = config("--config", str(tmp_path / "run.json"), "--seed", "5")
    assert got == dataclasses.replace(saved, seed=5, run_dir=None, resume=False)
    assert "run_dir='runs/old', resume=True not taken: this is a new run" in capsys.readouterr().err
    (tmp_path / "some.json").write_text('{"num_envs": 4, "agent": {"loss": "infonce"}}')
    got = config("--config", str(tmp_path / "some.json"), "--jaxgcrl-critic")
    assert (got.num_envs, got.agent.loss, got.agent.energy) == (4, "infonce", "norm")
    assert got.batch_size == TrainConfig().batch_size  # the rest: defaults
    (tmp_path / "warp.json").write_text('{"warp": 9}')
    (tmp_path / "agent.json").write_text('{"agent": [1]}')
    (tmp_path / "flat.json").write_text('{"depth": 3}')
    for argv, named in [
        (["--config", str(tmp_path / "nope.json")], "nope.json does not exist"),
        (["--config", str(tmp_path)], "is a directory, not a config file"),
        (["--config", ""], "--config needs a JSON file, got ''"),
        (["--config", str(tmp_path / "flat.json")], "agent fields ['depth'] at the top"),
        (["--config", str(tmp_path / "warp.json")], "['warp']"),
        (["--config", str(tmp_path / "agent.json")], "agent must be a JSON object"),
        (["--config", str(tmp_path / "run.json"), "--resume", "--run-dir", "x"], "drop --config"),
    ]:
        with pytest.raises(SystemExit):
            main(["train", *argv])
        assert named in capsys.readouterr().err, argv


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_config_from_a_pipe_is_read_not_called_missing(tmp_path):
    """``--config <(jq ... config.json)`` hands the run a pipe: it exists, and reads as a file."""
    from crl_fast.cli import train_config

    pipe = tmp_path / "config.fifo"
    os.mkfifo(pipe)

    def feed() -> None:
        with open(pipe, "w") as writer:
            writer.write('{"seed": 4}')

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        assert train_config({"config": str(pipe)}).seed == 4
    finally:
        feeder.join(timeout=1)  # it ends as the read ends
        if feeder.is_alive():  # the pipe was never read: let the writer's open() return
            # Non-blocking: a blocking open would wait for a writer that has opened already.
            os.close(os.open(pipe, os.O_RDONLY | os.O_NONBLOCK))
            feeder.join(timeout=5)


def test_cli_file_and_device_errors_are_one_line_messages(tmp_path, capsys):
    """A missing, empty or foreign checkpoint, a corrupt config.json or an unknown device: a
    message naming the file or device and exit code 2, not a traceback."""
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(TrainConfig().to_dict()))
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04truncated")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")
    damaged = tmp_path / "damaged"  # bytes that are not text (a damaged disk block)
    damaged.mkdir()
    (damaged / "config.json").write_bytes(b"\xd5\xff{")
    wrong = {}  # valid JSON, but not a run's config, or of the wrong types
    for name, text in (("list", "[]"), ("empty", "{}"), ("no_agent", '{"agent": null}')):
        wrong[name] = tmp_path / name
        wrong[name].mkdir()
        (wrong[name] / "config.json").write_text(text)
    wrong["typed"] = tmp_path / "typed"
    wrong["typed"].mkdir()
    (wrong["typed"] / "config.json").write_text(
        json.dumps(TrainConfig().to_dict() | {"num_envs": "8"})
    )
    newer = tmp_path / "newer"  # a config written by a version with more options
    newer.mkdir()
    (newer / "config.json").write_text(json.dumps(TrainConfig().to_dict() | {"warp": 9}))
    save_checkpoint({"agent": {}}, tmp_path / "foreign.pt")
    (tmp_path / "a_file").write_text("")
    for argv, named in [
        (["eval", "--checkpoint", str(tmp_path / "nope.pt")], "nope.pt"),
        (["eval", "--checkpoint", str(tmp_path)], str(tmp_path)),
        (["eval", "--checkpoint", str(run)], f"a run's is {run / 'checkpoint.pt'}"),
        (["eval", "--checkpoint", str(tmp_path / "empty.pt")], "empty.pt"),
        (["eval", "--checkpoint", str(tmp_path / "junk.pt")], "junk.pt"),
        (["eval", "--checkpoint", str(tmp_path / "junk.pt"), "--device", "tpu"], "tpu"),
        (["train", "--resume", "--run-dir", str(run), "--device", "cpu"], "checkpoint.pt"),
        (["train", "--resume", "--run-dir", str(broken)], "config.json"),
        (["train", "--resume", "--run-dir", str(damaged)], "config.json"),
        (["train", "--device", "tpu", "--run-dir", str(tmp_path / "new")], "tpu"),
        (["train", "--resume", "--run-dir", str(newer)], "['warp']"),
        (["eval", "--checkpoint", str(tmp_path / "foreign.pt")], "not a crl-fast training"),
        (["train", "--run-dir", str(tmp_path / "a_file")], "is a file"),
        *[(["train", "--resume", "--run-dir", str(wrong[k])], "config.json") for k in wrong][:3],
        (["train", "--resume", "--run-dir", str(wrong["typed"])], "num_envs must be int"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err
        assert named in err and err.startswith(f"crl-fast {argv[0]}: error:"), (argv, err)
    assert not (tmp_path / "new").exists()


def test_gymnasium_env_trains_and_resumes(tmp_path):
    """A registered Gymnasium goal env through ``gymnasium:<id>``: it cannot save its state, so
    the checkpoint holds everything else and resume restarts its episodes, cutting the buffer's
    running episodes so that no future goal crosses the restart."""
    from tests.tiny_goal_env import TINY_ID

    config = tiny_config(
        tmp_path, env=f"gymnasium:{TINY_ID}", max_episode_steps=None, total_env_steps=512
    )
    first = train(config)
    checkpoint = load_checkpoint(first["run_dir"] / "checkpoint.pt")
    assert checkpoint["env"] is None
    assert set(first) >= {"eval/success", "eval/success_final", "eval/final_distance"}
    last = 512 // config.num_envs - 1  # newest step before the restart; episodes last 6 steps
    assert not checkpoint["buffer"]["truncated"][last].any()
    resumed = train(TrainConfig(**(vars(config) | {"resume": True, "total_env_steps": 1024})))
    final = load_checkpoint(resumed["run_dir"] / "checkpoint.pt")
    assert final["loop"]["env_steps"] == 1024
    assert final["buffer"]["truncated"][last].all()  # every running episode was cut there
    with pytest.raises(SystemExit):  # no film of a Gymnasium env (refused before evaluating)
        main(
            ["eval", "--checkpoint", str(resumed["run_dir"] / "checkpoint.pt"), "--video", "v.gif"]
        )


def test_run_seeds_stay_apart_and_in_32_bits():
    """The eval envs' seed wraps into the 32 bits seeds take (a run seed of 2**32 - 1 would
    otherwise be refused at its first evaluation), and a resumed run's reset seed is neither
    eval_seed nor the same for two steps."""
    assert eval_seed(TrainConfig(seed=2**32 - 1)) == EVAL_SEED_OFFSET - 1
    for seed in (0, 7, 2**32 - 1):
        config = TrainConfig(seed=seed)
        seeds = {restart_seed(config, steps) for steps in (0, 256, EVAL_SEED_OFFSET)}
        assert len(seeds) == 3 and eval_seed(config) not in seeds
        assert all(0 <= s < 2**32 for s in seeds)
        assert restart_seed(config, 256) == restart_seed(TrainConfig(seed=seed), 256)


def test_evaluate_runs_the_overridden_episode_length():
    """Evaluation runs the episode length given to make_env, and refuses to report episodes that
    did not end in the steps it ran (their final distance was never measured)."""
    from tests.tiny_goal_env import TINY_ID

    env = make_env(f"gymnasium:{TINY_ID}", 4, max_episode_steps=10)  # registered: 6
    assert evaluate(RandomPolicy(), env, seed=0)["eval/final_distance"] > 0
    env.max_episode_steps = 4  # shorter than its episodes really are
    with pytest.raises(ValueError, match="did not end"):
        evaluate(RandomPolicy(), env, seed=0)
    env.max_episode_steps = None  # an adapter's env registered without a limit
    with pytest.raises(ValueError, match="episode limit"):
        evaluate(RandomPolicy(), env, seed=0)


class SeekThenFlee:
    """Tiny goal env: 7 steps to the goal (each moves at most 0.5 per axis, exactly onto it once
    within reach), then 3 steps of +0.5 per axis away: success yes, success at the end no."""

    def __init__(self):
        self.t = 0

    def act(self, obs, goal, deterministic=False):
        self.t += 1
        if self.t > 7:
            return torch.ones_like(goal)
        return ((goal - obs) / 0.5).clamp(-1, 1)


def test_evaluate_reports_the_last_step():
    from tests.tiny_goal_env import TINY_ID

    env = make_env(f"gymnasium:{TINY_ID}", 4, max_episode_steps=10)
    result = evaluate(SeekThenFlee(), env, seed=0)
    assert result["eval/success"] == 1.0 and result["eval/success_final"] == 0.0
    assert result["eval/final_distance"] == pytest.approx(1.5 * 2**0.5, rel=1e-5)
    # the interval of eval/success (4 of 4), not of eval/success_final (0 of 4)
    low, high = wilson_interval(4, 4)
    assert (result["eval/success_ci95_low"], result["eval/success_ci95_high"]) == (low, high)


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [  # scipy 1.18.1: binomtest(successes, trials).proportion_ci(method="wilson")
        (8, 10, 0.4901624715366418, 0.9433178485456248),
        (32, 64, 0.3810209474394701, 0.6189790525605299),
        (52, 64, 0.7002563943589847, 0.8893535682705119),
        (60, 64, 0.8500251490779133, 0.9754287986033819),
        (0, 64, 0.0, 0.05662405979280534),
        (64, 64, 0.9433759402071946, 1.0),
        (0, 1, 0.0, 0.7934506856227626),
        (1, 1, 0.20654931437723745, 1.0),
    ],
)
def test_wilson_interval_matches_scipy(successes, trials, low, high):
    assert wilson_interval(successes, trials) == pytest.approx((low, high), rel=1e-12, abs=1e-15)


def test_wilson_interval_at_none_and_all():
    """0 of n and n of n: the bound at the observed end is exactly 0 or 1 (not a rounding off
    it), the other z^2 / (n + z^2) from it (by hand: the square root is then z^2 / 2)."""
    z2 = 1.959963984540054**2
    for n in (1, 10, 64, 10**6):
        low, high = wilson_interval(0, n)
        assert low == 0.0 and high == pytest.approx(z2 / (n + z2), rel=1e-12)
        low, high = wilson_interval(n, n)
        assert high == 1.0 and low == pytest.approx(n / (n + z2), rel=1e-12)


@pytest.mark.parametrize(
    ("successes", "trials", "message"),
    [
        (5, 4, "successes must lie in"),
        (-1, 4, "successes must lie in"),
        (0.5, 4, "successes must be an int"),
        (True, 4, "successes must be an int"),
        (0, 0, "trials must be a positive int"),
        (0, 4.0, "trials must be a positive int"),
    ],
)
def test_wilson_interval_refuses_what_is_not_a_count(successes, trials, message):
    with pytest.raises(ValueError, match=message):
        wilson_interval(successes, trials)


def test_success_summary_says_episodes_and_interval():
    """The progress and closing lines' success: its episodes and interval, counted back from
    the fraction (a float32 mean of the episodes: 7 of 10 is 0.69999999, rounded, not cut, to 7)."""
    success = torch.tensor([True] * 60 + [False] * 4).float().mean().item()
    assert success_summary(success, 64) == "0.94 of 64 episodes (95% CI 0.85-0.98)"
    success = torch.tensor([True] * 7 + [False] * 3).float().mean().item()
    assert success_summary(success, 10) == "0.70 of 10 episodes (95% CI 0.40-0.89)"
    assert success_summary(0.0, 8) == "0.00 of 8 episodes (95% CI 0.00-0.32)"


def test_evaluate_counts_the_first_episode_of_each_env_only():
    """An episode that ends early (a failure: the point left the box) resets its env, which
    goes on stepping until the slowest episode ends: what later episodes reach is not success."""
    import gymnasium as gym

    from tests.tiny_goal_env import TinyGoalEnv

    class LeavesTheBox(TinyGoalEnv):
        def step(self, action):
            obs, reward, terminated, truncated, info = super().step(action)
            return obs, reward, terminated or np.abs(self.pos).max() > 1.5, truncated, info

    class FleeThenSeek:
        """6 steps straight away from the goal (out of the box by then), then to it."""

        def __init__(self):
            self.t = 0

        def act(self, obs, goal, deterministic=False):
            self.t += 1
            seek = ((goal - obs) / 0.5).clamp(-1, 1)
            return -seek.sign() if self.t <= 6 else seek

    gym.register("CrlFastTinyGoalLeaves-v0", entry_point=LeavesTheBox, max_episode_steps=10)
    try:
        env = make_env("gymnasium:CrlFastTinyGoalLeaves-v0", 16)
        result = evaluate(FleeThenSeek(), env, seed=0)
    finally:
        del gym.registry["CrlFastTinyGoalLeaves-v0"]
    assert result["eval/success"] == result["eval/success_final"] == 0.0


def test_unknown_env_names_the_choices():
    with pytest.raises(ValueError, match="gymnasium:<gymnasium id>"):
        make_env("point_maze_huge", num_envs=2)


@pytest.mark.gpu
def test_default_run_on_cuda_compiles_and_replays_graphs(tmp_path, capsys):
    """The defaults on CUDA: the update compiled and replayed from CUDA graphs, end to end."""
    result = train(tiny_config(tmp_path, device="cuda", total_env_steps=512))
    assert "update: torch.compile on, CUDA graph on" in capsys.readouterr().out
    assert 0.0 <= result["eval/success"] <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_run_on_the_second_gpu_runs_there(tmp_path):
    """Triton launches, and CUDA graphs capture, on the current device: a run on cuda:1 makes it
    current for the run (with CUDA graphs and compile on, the defaults) and cuda:0 again after."""
    torch.cuda.set_device(0)
    result = train(tiny_config(tmp_path, device="cuda:1", total_env_steps=512))
    assert torch.cuda.current_device() == 0
    agent, _ = load_agent(tmp_path / "run" / "checkpoint.pt", "cuda:1")
    assert agent.log_alpha.device == torch.device("cuda", 1)
    assert 0.0 <= result["eval/success"] <= 1.0


def test_devices_this_machine_lacks_are_refused():
    with pytest.raises(ValueError, match="CUDA"):
        resolve_device(f"cuda:{max(torch.cuda.device_count(), 1)}")


@contextlib.contextmanager
def sigterm_after_logging(monkeypatch, step: int) -> Iterator[None]:
    """SIGTERM to this process right after the metrics row of env step ``step`` is logged, with
    SIGTERM's default handler meanwhile (whatever pytest inherited comes back after)."""
    log = MetricsLogger.log

    def log_then_term(self, at, metrics):
        log(self, at, metrics)
        if at == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLogger, "log", log_then_term)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        monkeypatch.setattr(MetricsLogger, "log", log)


def test_sigterm_writes_a_checkpoint_and_the_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    """SIGTERM (a preemption) or Ctrl-C mid-run: the loop writes a checkpoint at the end of that
    step (608 here, off the checkpoint schedule) and stops; resumed, the run logs the rows and
    reaches the weights of an uninterrupted one."""
    settings = dict(updates_per_env_step=0.005, log_every=32, checkpoint_every=512)
    straight = train(tiny_config(tmp_path, "straight", **settings))
    with sigterm_after_logging(monkeypatch, 608):
        with pytest.raises(train_module.TrainingInterrupted, match="SIGTERM at env step 608"):
            train(tiny_config(tmp_path, "killed", **settings))
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["loop"]["env_steps"] == 608
    resumed = train(tiny_config(tmp_path, "killed", resume=True, **settings))
    assert_same_weights_and_rows(straight, resumed)


def test_a_signal_at_the_last_step_lets_the_run_finish_and_says_so(tmp_path, monkeypatch, capsys):
    """SIGTERM during the last step's log: the final evaluation and checkpoint run, train()
    returns, and the message it printed ("then stopping") is followed by what happened."""
    with sigterm_after_logging(monkeypatch, 1024):
        result = train(tiny_config(tmp_path))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["loop"]["env_steps"] == 1024
    assert "eval/success" in result
    assert "SIGTERM came at the run's end (its last step, " in capsys.readouterr().err


def test_a_full_disk_while_checkpointing_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError ('unexpected pos ...'): the caller gets
    an OSError naming the checkpoint, and the previous checkpoint stays whole."""
    import crl_fast.checkpoint as checkpoint_module

    path = save_checkpoint({"a": torch.ones(3)}, tmp_path / "checkpoint.pt")

    def full_disk(state, f):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos"
            ) from None

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*checkpoint.pt \(No space left on device\)"):
        save_checkpoint({"a": torch.zeros(3)}, path)
    with pytest.raises(OSError, match=r"device\)$"):  # a first checkpoint: no previous to keep
        save_checkpoint({"a": torch.zeros(3)}, tmp_path / "first.pt")
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("numel", [3, 4_000_000])
def test_a_checkpoint_written_to_a_full_disk_is_an_oserror_naming_it(tmp_path, numel, monkeypatch):
    """A real full disk (/dev/full) fails torch.save's writes or, for a small file, only the
    close: either way one OSError naming the checkpoint, and the previous one is left whole."""
    import crl_fast.checkpoint as checkpoint_module

    path = save_checkpoint({"a": torch.ones(3)}, tmp_path / "checkpoint.pt")

    def full_disk_for_the_temp_file(file, *args, **kwargs):
        return builtins.open("/dev/full" if str(file).endswith(".tmp") else file, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "open", full_disk_for_the_temp_file, raising=False)
    with pytest.raises(OSError, match=r"cannot write .*checkpoint.pt \(No space left on device\)"):
        save_checkpoint({"a": torch.zeros(numel)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(3))


def test_a_checkpoint_saved_without_crcs_loads(tmp_path):
    """torch.serialization.set_crc32_options(False) writes a CRC of 0 in every record: nothing
    to check, not a damaged file."""
    set_crc32 = torch.serialization.set_crc32_options
    set_crc32(False)
    try:
        path = save_checkpoint({"weights": torch.arange(5.0)}, tmp_path / "checkpoint.pt")
    finally:
        set_crc32(True)
    assert torch.equal(load_checkpoint(path)["weights"], torch.arange(5.0))


def test_stop_requests_leave_ignored_signals_alone_and_a_second_sigterm_changes_nothing(capsys):
    """A background job's ignored SIGINT stays ignored (a Ctrl-C for its shell must not stop
    it); after the first SIGTERM another is ignored and a SIGINT stops at once; the handlers
    are restored after. (SIGINT is set both ways here: pytest may itself run in the background,
    where it starts ignored.)"""
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with train_module.stop_requests() as request:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert request.notice is not None and request.notice.startswith(
                f"SIGINT is ignored in this process (a background job): stop the run with "
                f"SIGTERM (kill {os.getpid()})"
            )
            assert capsys.readouterr().err == ""  # the run prints it after its checks
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            assert request.signal == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(KeyboardInterrupt), train_module.stop_requests() as request:
            os.kill(os.getpid(), signal.SIGTERM)
            assert request.signal == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises at the next bytecode; it never gets this far
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_sigterm_offers_ctrl_c_only_where_sigint_stops_the_run(capsys):
    """The SIGTERM notice's "Ctrl-C again: stop now" holds only where SIGINT is caught: a
    background job ignores it, and is told what does stop it at once."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        for sigint, offered in ((signal.SIG_IGN, False), (signal.default_int_handler, True)):
            signal.signal(signal.SIGINT, sigint)
            with train_module.stop_requests():
                os.kill(os.getpid(), signal.SIGTERM)
            err = capsys.readouterr().err
            assert err.startswith("\nSIGTERM: writing a checkpoint")
            assert ("Ctrl-C again" in err) == offered
            assert ("SIGKILL" in err) != offered
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_refused_run_never_removes_the_directory_another_run_locked(tmp_path, monkeypatch):
    """Two runs started together on a new --run-dir: the one that created it but lost the lock
    to the other is refused and leaves the directory (and the other's lock) alone."""
    import fcntl
    from pathlib import Path as P

    config = tiny_config(tmp_path, "new")
    mkdir, other = P.mkdir, []

    def mkdir_then_other_run_locks(self, *args, **kwargs):
        mkdir(self, *args, **kwargs)
        if self == tmp_path / "new":  # the other run claims it before this one opens the lock
            other.append(open(self / LOCK_NAME, "a"))  # noqa: SIM115
            fcntl.flock(other[0].fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    monkeypatch.setattr(P, "mkdir", mkdir_then_other_run_locks)
    with pytest.raises(ValueError, match="another run is using"), claimed_run_dir(config):
        pass
    assert (tmp_path / "new" / LOCK_NAME).exists()
    other[0].close()


def test_a_run_whose_losses_turn_nan_says_so(tmp_path, capsys):
    """An env whose observations hold NaN trained to the end with NaN losses, silently."""

    class NanPoint(FreePoint):
        def _observe(self):
            obs = super()._observe()
            obs["observation"] = obs["observation"] * float("nan")
            return obs

    register_env("nan_point", NanPoint, replace=True)
    train(tiny_config(tmp_path, env="nan_point", max_episode_steps=None, total_env_steps=512,
                      eval_every=512))  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("not finite") == 1 and "critic/loss" in err


def test_a_batch_of_one_is_not_warned_about(tmp_path, capsys):
    """With one row there are no negatives: critic/logits_neg is NaN by definition, the losses
    are finite, and nothing is wrong with the run."""
    train(tiny_config(tmp_path, batch_size=1, total_env_steps=512, eval_every=512))
    captured = capsys.readouterr()
    assert "not finite" not in captured.err
    row = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "critic/loss" in r][-1]
    assert math.isfinite(row["critic/loss"]) and row["critic/logits_neg"] is None  # NaN
