"""The CRL training loop, top to bottom: act, step, store, train, evaluate, log, checkpoint.

Everything lives on one device. Collection steps ``num_envs`` envs at once and appends the step to
the replay buffer; every environment step earns ``updates_per_env_step`` gradient updates (a
fractional credit is carried over), each sampling a fresh batch. Training metrics stay on the
device until a log step reads them, so on a GPU the loop synchronises only to log, evaluate
and checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from crl_fast import fused_mlp
from crl_fast.agent import CRL, GraphedUpdates
from crl_fast.buffer import GoalBatch, TrajectoryBuffer
from crl_fast.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    versions,
    write_atomically,
)
from crl_fast.checks import on_device, resolve_device
from crl_fast.config import TrainConfig, check_resume
from crl_fast.envs import GoalVectorEnv, make_env, registered_at_run_time
from crl_fast.envs.base import GoalObs, TorchGoalVectorEnv
from crl_fast.logger import MetricsLogger, Progress, plot_curve
from crl_fast.run_dir import (
    CHECKPOINT_NAME,
    check_run_dir,
    claimed_run_dir,
    resume_refusal,
    undo_failed_start,
)
from crl_fast.schedule import (
    crossed,
    first_update_step,
    iterations,
    reports_metrics,
)
from crl_fast.stats import success_summary, wilson_interval

CHECKPOINT_KEYS = ("config", "dims", "agent", "buffer", "env", "obs", "loop", "rng")
EVAL_SEED_OFFSET = 10_000  # the eval envs' goals come from their own fixed seed
STREAMS = ("env", "buffer")  # the generators seeded apart from the global one (stream_seed)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run after it wrote a checkpoint; ``signum`` says which."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass
class StopRequest:
    """The first SIGINT or SIGTERM a run caught (None: none yet), and what the run says about
    them once it starts (after its checks: a refused run prints its error alone)."""

    signal: int | None = None
    notice: str | None = None


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Catch SIGINT and SIGTERM (main thread only; not where they are ignored, as a background
    job's SIGINT is): the first sets ``.signal``, which the loop reads to checkpoint and stop;
    a SIGINT after it stops at once (KeyboardInterrupt), another SIGTERM changes nothing."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        if request.signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        request.signal = signum
        print(
            f"\n{signal.Signals(signum).name}: writing a checkpoint at the end of this step, then "
            f"stopping ({now}: stop now, without it)",
            file=sys.stderr,
            flush=True,
        )

    caught = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN]
    # What stops the run at once: Ctrl-C, unless this process ignores SIGINT (a background job).
    now = "Ctrl-C again" if signal.SIGINT in caught else f"SIGKILL, kill -KILL {os.getpid()}"
    if signal.SIGINT not in caught and signal.SIGTERM in caught:  # kill -INT: nothing, silently
        request.notice = (
            f"SIGINT is ignored in this process (a background job): stop the run with SIGTERM "
            f"(kill {os.getpid()}), which writes a checkpoint first"
        )
    previous = {sig: signal.signal(sig, handler) for sig in caught}
    try:
        yield request
    finally:
        for sig, old in previous.items():  # None: set outside Python, which cannot restore it
            signal.signal(sig, signal.SIG_DFL if old is None else old)


@dataclass
class LoopState:
    """Counters of the loop and the latest evaluation, saved in checkpoints."""

    env_steps: int = 0
    updates: int = 0
    update_credit: float = 0.0
    elapsed_s: float = 0.0
    last_eval_step: int | None = None  # so that resuming a finished run does not evaluate again
    last_eval: dict[str, float] = field(default_factory=dict)


def seconds(fn: Callable[[], None]) -> float:
    """How long ``fn()`` took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_run_env(
    config: TrainConfig, device: torch.device, num_envs: int, seed: int
) -> GoalVectorEnv:
    """``num_envs`` copies of the run's env, with its episode limit and ``env_kwargs``."""
    try:
        return make_env(
            config.env,
            num_envs=num_envs,
            device=device,
            seed=seed,
            max_episode_steps=config.max_episode_steps,
            **config.env_kwargs,
        )
    except TypeError as error:  # an env_kwargs key the env does not take; else a bug: raise
        if not config.env_kwargs or "keyword argument" not in str(error):
            raise
        raise ValueError(f"cannot make {config.env} with env_kwargs: {error}") from error


def eval_seed(config: TrainConfig) -> int:
    """The seed of the run's fixed evaluation goals, apart from the training env's."""
    return (config.seed + EVAL_SEED_OFFSET) % 2**32  # seeds are 32-bit (checks.seed_int)


def stream_seed(config: TrainConfig, stream: str) -> int:
    """The seed of the training env's (``"env"``) or the buffer's (``"buffer"``) generator, one
    of its own drawn from ``config.seed`` (NumPy's SeedSequence, as JAX splits keys): seeded with
    ``config.seed``, which the global generator keeps, their draws would repeat the numbers that
    initialised the networks."""
    key = (STREAMS.index(stream),)  # a spawn key: apart from restart_seed's [seed, step] too
    return int(np.random.SeedSequence(config.seed, spawn_key=key).generate_state(1)[0])


def restart_seed(config: TrainConfig, env_steps: int) -> int:
    """The seed of a resumed run's env reset where the checkpoint holds no env state: one of this
    run and step, mixed (``config.seed + env_steps`` was :func:`eval_seed` at 10,000 steps, and
    the episodes would have started from the evaluation goals)."""
    return int(np.random.SeedSequence([config.seed, env_steps]).generate_state(1)[0])


def make_eval_env(config: TrainConfig, device: torch.device, num_episodes: int) -> GoalVectorEnv:
    """``num_episodes`` copies of the run's env, seeded apart from the training env."""
    return make_run_env(config, device, num_episodes, eval_seed(config))


@torch.no_grad()
def evaluate(
    agent: CRL,
    env: GoalVectorEnv,
    seed: int,
    record: Callable[[GoalObs, dict[str, Any] | None], None] | None = None,
) -> dict[str, float]:
    """One episode per env on the fixed goals of ``env.reset(seed)``, with deterministic actions.
    ``record(obs, info)`` sees the reset's observations (``info`` None) and every step's.

    ``eval/success``: reached the goal at any step; ``eval/success_ci95_low`` and ``_high``: its
    95% Wilson interval (:func:`crl_fast.stats.wilson_interval`: the goals and starts are drawn
    independently, so the successes are a binomial count); ``eval/success_final``: within the
    success distance at the last step; ``eval/final_distance``: mean distance to the goal at the
    last step.
    Runs ``env.max_episode_steps`` steps; raises ValueError if an episode has not ended by then
    (the env's limit is longer than it says), rather than report a distance it never measured.
    """
    if not callable(getattr(agent, "act", None)):  # a CRL, or any policy with its act()
        raise TypeError(
            f"evaluate() takes an agent with act(obs, goal, deterministic=True) (a CRL), got "
            f"{type(agent).__name__}"
        )
    if not isinstance(env, GoalVectorEnv):  # a plain Gymnasium env, say: make_env wraps one
        raise TypeError(
            f"evaluate() takes a crl-fast vector env (crl_fast.envs.make_env), got "
            f"{type(env).__name__}"
        )
    if env.max_episode_steps is None:
        raise ValueError("evaluate() needs an env with an episode limit (max_episode_steps)")
    obs, _ = env.reset(seed=seed)
    n = env.num_envs
    ended = torch.zeros(n, dtype=torch.bool, device=env.device)
    success = torch.zeros_like(ended)
    success_final = torch.zeros_like(ended)
    final_distance = torch.zeros(n, device=env.device)
    if record is not None:
        record(obs, None)
    for _ in range(env.max_episode_steps):
        action = agent.act(obs["observation"], obs["desired_goal"], deterministic=True)
        obs, _, terminated, truncated, info = env.step(action)
        if record is not None:
            record(obs, info)
        success |= info["success"] & ~ended
        last = info["final_obs"]
        distance = torch.linalg.vector_norm(last["achieved_goal"] - last["desired_goal"], dim=-1)
        ends_now = (terminated | truncated) & ~ended
        final_distance = torch.where(ends_now, distance, final_distance)
        success_final = torch.where(ends_now, info["success"], success_final)
        ended |= ends_now
    if not ended.all():
        raise ValueError(
            f"{int((~ended).sum())} of {n} evaluation episodes did not end within "
            f"env.max_episode_steps={env.max_episode_steps} steps"
        )
    low, high = wilson_interval(int(success.sum()), n)
    return {
        "eval/success": success.float().mean().item(),
        "eval/success_final": success_final.float().mean().item(),
        "eval/final_distance": final_distance.mean().item(),
        # last: the eval columns metrics.csv had before keep their places (its first four)
        "eval/success_ci95_low": low,
        "eval/success_ci95_high": high,
    }


def env_state(env: GoalVectorEnv) -> dict[str, torch.Tensor] | None:
    """The env's state for a checkpoint, or None where it cannot save it (Gymnasium adapters)."""
    try:
        return env.state_dict()
    except NotImplementedError:
        return None


def make_buffer(config: TrainConfig, env: GoalVectorEnv, device: torch.device) -> TrajectoryBuffer:
    """The run's buffer: ``buffer_capacity`` transitions split over the envs."""
    return TrajectoryBuffer(
        capacity=config.buffer_capacity // config.num_envs,  # steps per env
        num_envs=config.num_envs,
        obs_dim=env.obs_dim,
        action_dim=env.action_dim,
        goal_dim=env.goal_dim,
        gamma=config.gamma,
        goal_mode=config.goal_mode,
        random_goal_fraction=config.random_goal_fraction,
        current_goal_fraction=config.current_goal_fraction,
        device=device,
        seed=stream_seed(config, "buffer"),
    )


def buffer_notices(
    config: TrainConfig, buffer: TrajectoryBuffer, cuda_graph: bool, env_steps: int
) -> list[str]:
    """What the buffer does other than the flags say: a capacity rounded down to whole steps
    of every env, and batches larger than what it holds (sampling draws with replacement, so
    such batches repeat transitions): always, or when updates start (unless the run, at
    ``env_steps``, is past that)."""
    notices = []
    kept = buffer.capacity * config.num_envs
    if kept != config.buffer_capacity:
        notices.append(
            f"--buffer-capacity {config.buffer_capacity:,} is not a multiple of --num-envs "
            f"{config.num_envs}: the buffer keeps {buffer.capacity:,} steps of each env "
            f"({kept:,} transitions)"
        )
    first = first_update_step(config, cuda_graph)
    if first is None:
        return notices
    if kept < config.batch_size:
        notices.append(
            f"the buffer holds at most {kept:,} transitions, fewer than --batch-size "
            f"{config.batch_size:,}: every batch repeats transitions (drawn with replacement)"
        )
    elif env_steps < first and (stored := min(first, kept)) < config.batch_size:
        notices.append(
            f"updates start with {stored:,} transitions stored, fewer than --batch-size "
            f"{config.batch_size:,}: batches repeat transitions (drawn with replacement) until "
            "the buffer holds more"
        )
    return notices


class Speed(NamedTuple):
    """Whether a run compiles its update and env step, and captures its updates in CUDA graphs."""

    compile: bool
    cuda_graph: bool


def speed_flags(config: TrainConfig, device: torch.device) -> Speed:
    """``compile`` and ``cuda_graph`` as the run uses them: None means on for CUDA, off for CPU.
    Asking for a CUDA-only one (``cuda_graph``, ``actor_stream``) on another device is an error."""
    for flag in ("cuda_graph", "actor_stream"):
        if getattr(config, flag) and device.type != "cuda":
            raise ValueError(f"--{flag.replace('_', '-')} needs a CUDA device, got {device}")
    cuda = device.type == "cuda"
    return Speed(
        compile=cuda if config.compile is None else config.compile,
        cuda_graph=cuda if config.cuda_graph is None else config.cuda_graph,
    )


def make_agent(
    config: TrainConfig, env: GoalVectorEnv, device: torch.device, compiled: bool
) -> CRL:
    """The agent for ``env``'s sizes; ``compiled``: its update and ``act`` through torch.compile."""
    agent = CRL(
        env.obs_dim, env.action_dim, env.goal_dim, config.agent, device, config.actor_stream
    )
    if compiled:
        agent.compile()
    return agent


def make_train_step(
    config: TrainConfig, agent: CRL, buffer: TrajectoryBuffer, cuda_graph: bool
) -> tuple[Callable[[bool], dict[str, torch.Tensor]], int, int]:
    """A callable doing updates on fresh batches (``graph_updates`` of them per CUDA graph
    replay, else one), how many updates a call does, and how many building it did. Its argument
    says whether to compute the critic's metrics (a graph always does, in its last update)."""
    # CUDA graphs capture only draws from a registered generator: the default one.
    generator = torch.cuda.default_generators[buffer.device.index] if cuda_graph else None

    def sample() -> GoalBatch:
        return buffer.sample(config.batch_size, generator=generator)

    def sample_actor() -> GoalBatch:  # the actor's own batch: future goals only
        return buffer.sample(
            config.batch_size,
            goal_mode=config.actor_goal_mode,
            random_goal_fraction=0.0,
            current_goal_fraction=0.0,
            generator=generator,
        )

    actor = None if config.actor_goal_mode == "critic" else sample_actor
    if cuda_graph:
        graphed = GraphedUpdates(agent, sample, config.graph_updates, sample_actor=actor)
        return lambda _: graphed(), graphed.steps, graphed.warmup_updates

    def step(critic_metrics: bool) -> dict[str, torch.Tensor]:
        batch = sample()
        return agent.update(batch, critic_metrics, None if actor is None else actor())

    return step, 1, 0


def restore_run(
    checkpoint: dict[str, Any],
    config: TrainConfig,
    device: torch.device,
    agent: CRL,
    buffer: TrajectoryBuffer,
    env: GoalVectorEnv,
) -> tuple[LoopState, dict[str, torch.Tensor], list[dict[str, Any]], GoalObs]:
    """Put a checkpoint's agent, buffer, env and random generators back; returns its loop
    state, latest metrics, the versions of the run's earlier parts and the env's observations."""
    agent.load_state_dict(checkpoint["agent"])
    buffer.load_state_dict(checkpoint["buffer"])
    loop = LoopState(**checkpoint["loop"])
    set_rng_state(checkpoint["rng"], device)
    earlier_versions = list(checkpoint.get("earlier_versions", []))
    saved_versions = checkpoint.get("versions")
    if isinstance(saved_versions, dict) and saved_versions != versions():
        earlier_versions.append(saved_versions | {"until_env_step": loop.env_steps})
        print(
            "the checkpoint was written with "
            + ", ".join(f"{k} {v}" for k, v in saved_versions.items() if v)
            + ": the run continues with the versions below"
        )
    if checkpoint["env"] is None:  # the env could not save its state: restart episodes
        obs, _ = env.reset(seed=restart_seed(config, loop.env_steps))
        buffer.end_episodes()
        print("the env could not save its state: its episodes restart from a reset")
    else:
        env.load_state_dict(checkpoint["env"])
        obs = checkpoint["obs"]
    return loop, checkpoint.get("metrics", {}), earlier_versions, obs


def run_header(
    config: TrainConfig,
    device: torch.device,
    speed: Speed,
    agent: CRL,
    buffer: TrajectoryBuffer,
    env_steps: int,
) -> list[str]:
    """The lines a run prints before its loop (a resumed one at ``env_steps``): versions, device,
    network sizes and update mode, then whatever the run does other than its flags say."""
    lines = []
    # The loop's own sum of the credit decides (a product can round up to the 1 it never reaches).
    if config.updates_per_env_step and first_update_step(config, speed.cuda_graph) is None:
        lines.append(
            "no updates: the run earns less than one update's credit after --learning-starts "
            f"{config.learning_starts:,} (the networks keep their initial weights)"
        )
    lines.append(", ".join(f"{k} {v}" for k, v in versions().items() if v) + f"; device {device}")
    counts = agent.parameter_counts().items()
    lines.append("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts))
    lines.append(
        f"update: torch.compile {'on' if speed.compile else 'off'}, CUDA graph "
        f"{'on' if speed.cuda_graph else 'off'}"
    )
    if config.agent.fused_mlp and not fused_mlp.runs_on(device):
        lines.append(f"--fused-mlp: its kernels need CUDA (and Triton); the layers run on {device}")
    if config.total_env_steps % config.num_envs:
        lines.append(
            f"--total-env-steps {config.total_env_steps:,} is not a multiple of --num-envs "
            f"{config.num_envs}: the run takes {iterations(config) * config.num_envs:,} steps"
        )
    lines += buffer_notices(config, buffer, speed.cuda_graph, env_steps)
    if registered_at_run_time(config.env):
        lines.append(
            f"--env {config.env} is registered by this process: `crl-fast eval` and `--resume` "
            "cannot build it (register it again in Python first; --env <module>:<name> can)"
        )
    return lines


def rechecked(config: TrainConfig) -> TrainConfig:
    """``config`` built again, so that its checks hold for what the run reads: a change made
    after them (a field set with object.__setattr__, env_kwargs with dict.__setitem__) is
    refused with the message construction gives."""
    if not isinstance(config, TrainConfig):
        raise TypeError(
            f"config must be a TrainConfig (TrainConfig.from_dict for a dict), got "
            f"{type(config).__name__}"
        )
    return replace(config)


def train(config: TrainConfig) -> dict[str, Any]:
    """Train CRL as ``config`` says; returns the run directory and the last evaluation."""
    config = rechecked(config)
    device = resolve_device(config.device)
    speed = speed_flags(config, device)
    if config.threads:  # checked here, not in the config: a run may be evaluated elsewhere
        cores = os.cpu_count() or 1
        if config.threads > cores:
            raise ValueError(f"--threads must be at most this CPU's {cores}, got {config.threads}")
    if config.resume and config.run_dir and not Path(config.run_dir).exists():  # else created
        raise ValueError(resume_refusal(Path(config.run_dir)))
    with (
        torch_settings(config, device),
        claimed_run_dir(config) as run_dir,
        stop_requests() as stop,
        contextlib.ExitStack() as on_exit,
    ):
        return _train_in(run_dir, config, device, speed, stop, on_exit)


@contextlib.contextmanager
def torch_settings(config: TrainConfig, device: torch.device) -> Iterator[None]:
    """The run's process-wide torch settings, restored afterwards (a notebook or a sweep runs
    more than one): ``threads``; TF32 matmuls on CUDA as ``tf32`` says (the networks and the loss
    kernels read it; "highest" keeps float32 FMA); ``device`` as the current CUDA device."""
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high" if config.tf32 else "highest")
        with on_device(device):
            yield
    finally:  # only what the run set: the rest stays as the process has it
        if config.threads:
            torch.set_num_threads(threads)
        if device.type == "cuda":
            torch.set_float32_matmul_precision(precision)


def _train_in(
    run_dir: Path,
    config: TrainConfig,
    device: torch.device,
    speed: Speed,
    stop: StopRequest,
    on_exit: contextlib.ExitStack,
) -> dict[str, Any]:
    """The run itself, in the directory :func:`train` claimed for it (``on_exit``: what to undo
    should it fail, left to the callbacks it is given)."""
    check_run_dir(run_dir, config.resume)
    checkpoint = None
    if config.resume:
        checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME, device, CHECKPOINT_KEYS)
        check_resume(checkpoint["config"], config)
        done = checkpoint["loop"]["env_steps"]
        # The steps the run takes (the saved total's are never fewer than those done): a total
        # that rounds up to the steps done is no step back.
        if iterations(config) * config.num_envs < done:
            raise ValueError(
                f"the run is at env step {done:,} already: --total-env-steps cannot go below that"
            )
    seed_everything(config.seed)

    env_seed = stream_seed(config, "env")
    env = make_run_env(config, device, config.num_envs, env_seed)
    eval_env = make_eval_env(config, device, config.eval_episodes)
    if speed.compile and isinstance(env, TorchGoalVectorEnv):
        env.compile()
    buffer = make_buffer(config, env, device)
    agent = make_agent(config, env, device, speed.compile)
    obs, _ = env.reset(seed=env_seed)
    loop = LoopState()
    # The latest update's metrics, logged at each log step; checkpointed so that a resumed run
    # logs the same rows as an uninterrupted one.
    metrics: dict[str, torch.Tensor] = {}
    # The versions of the run's earlier parts where they differ from this one's (a run resumed
    # with another torch, on another machine, say): each checkpoint keeps them, not only ours.
    earlier_versions: list[dict[str, Any]] = []

    if checkpoint is not None:
        loop, metrics, earlier_versions, obs = restore_run(
            checkpoint, config, device, agent, buffer, env
        )
        print(f"resuming {run_dir} from env step {loop.env_steps:,}")
        if loop.env_steps >= config.total_env_steps:
            print(f"--total-env-steps {config.total_env_steps:,} is reached already: no training")
    print(json.dumps(config.to_dict(), indent=2))
    print(f"run directory: {run_dir}")
    # A new run's first evaluation comes before its first file: an env that fails in it (wrong
    # observations after a step, say) leaves no half-made run directory behind.
    first_eval = evaluate(agent, eval_env, eval_seed(config)) if loop.env_steps == 0 else None
    if checkpoint is None:
        on_exit.push(undo_failed_start(run_dir, lambda: loop.updates > 0))
    write_atomically(run_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    for line in run_header(config, device, speed, agent, buffer, loop.env_steps):
        print(line)
    if stop.notice:
        print(stop.notice, file=sys.stderr)
    logger = MetricsLogger(
        run_dir,
        config.tensorboard,
        resume_step=loop.env_steps if config.resume else None,
        resume_rows=checkpoint.get("log_rows") if checkpoint else None,
    )
    on_exit.callback(logger.release)  # a failed run's files too: a notebook keeps its frames
    progress = Progress(config.total_env_steps, config.progress, elapsed_s=loop.elapsed_s)

    def checkpoint_now() -> None:
        state = {
            "config": config.to_dict(),
            "dims": {
                "obs_dim": env.obs_dim,
                "action_dim": env.action_dim,
                "goal_dim": env.goal_dim,
            },
            "agent": agent.state_dict(),
            "buffer": buffer.state_dict(),
            "env": env_state(env),
            "obs": obs,
            "loop": vars(loop).copy(),
            "metrics": metrics,
            "log_rows": logger.row_count,  # what a resumed run keeps of metrics.jsonl
            "rng": rng_state(device),
            "versions": versions(),
            "earlier_versions": earlier_versions,
        }
        save_checkpoint(state, run_dir / CHECKPOINT_NAME)
        logger.flush()

    def log_eval(result: dict[str, float]) -> None:
        loop.last_eval, loop.last_eval_step = result, loop.env_steps
        logger.log(loop.env_steps, {**result, "charts/time_s": loop.elapsed_s})

    def evaluate_now() -> None:
        log_eval(evaluate(agent, eval_env, eval_seed(config)))

    if first_eval is not None:
        log_eval(first_eval)
    warned_non_finite = False
    train_step = None  # built at the first update (a CUDA graph needs a non-empty buffer)
    start = time.perf_counter() - loop.elapsed_s
    log_time, log_steps, log_updates = time.perf_counter(), loop.env_steps, loop.updates
    while loop.env_steps < config.total_env_steps:
        # Act: uniform random actions until learning starts, then samples from the policy.
        if loop.env_steps < config.learning_starts:
            action = torch.rand(config.num_envs, env.action_dim, device=device) * 2 - 1
        else:
            action = agent.act(obs["observation"], obs["desired_goal"])

        # Step; where an env reset, its achieved goal after this step is in final_obs.
        next_obs, _, terminated, truncated, info = env.step(action)
        reset = info["_final_obs"].unsqueeze(-1)
        next_goal = torch.where(
            reset, info["final_obs"]["achieved_goal"], next_obs["achieved_goal"]
        )

        # Store the transition (a time slice of length 1).
        buffer.extend(
            {
                "observation": obs["observation"].unsqueeze(0),
                "action": action.unsqueeze(0),
                "next_achieved_goal": next_goal.unsqueeze(0),
                "terminated": terminated.unsqueeze(0),
                "truncated": truncated.unsqueeze(0),
            }
        )
        obs = next_obs
        before, loop.env_steps = loop.env_steps, loop.env_steps + config.num_envs

        # Train: each env step earns updates_per_env_step updates.
        if loop.env_steps >= config.learning_starts and config.updates_per_env_step > 0:
            loop.update_credit += config.num_envs * config.updates_per_env_step
            if train_step is None:
                train_step, per_call, warmup = make_train_step(
                    config, agent, buffer, speed.cuda_graph
                )
                loop.updates += warmup
                loop.update_credit -= warmup
            while loop.update_credit >= per_call:
                # The critic's accuracies cost a pass over the logits: only for logged updates.
                logged = reports_metrics(
                    loop.update_credit, loop.env_steps, config, before, per_call
                )
                metrics = train_step(logged)
                loop.updates += per_call
                loop.update_credit -= per_call

        # Evaluate, log, checkpoint (the logged rates leave their time out).
        loop.elapsed_s = time.perf_counter() - start
        if crossed(before, loop.env_steps, config.eval_every):
            log_time += seconds(evaluate_now)
        if crossed(before, loop.env_steps, config.log_every) and metrics:
            dt = time.perf_counter() - log_time
            charts = {
                "charts/sps": (loop.env_steps - log_steps) / dt,
                "charts/updates_per_s": (loop.updates - log_updates) / dt,
                "charts/updates": loop.updates,
                "charts/time_s": loop.elapsed_s,
            }
            values = torch.stack(list(metrics.values())).tolist()  # one host sync
            logger.log(loop.env_steps, dict(zip(metrics, values, strict=True)) | charts)
            # The losses only: critic/logits_neg is NaN by definition at batch size 1 (no
            # negatives), and a NaN weight makes every loss NaN.
            bad = [
                k
                for k, v in zip(metrics, values, strict=True)
                if k.endswith("loss") and not math.isfinite(v)
            ]
            if bad and not warned_non_finite:  # once: the run goes on, as asked
                warned_non_finite = True
                print(
                    f"warning: {', '.join(bad)} not finite at env step {loop.env_steps:,} (an "
                    "update with a NaN gradient leaves the weights NaN): check the env's "
                    "observations and goals, whose values no env check reads",
                    file=sys.stderr,
                )
            log_time, log_steps, log_updates = time.perf_counter(), loop.env_steps, loop.updates
        if crossed(before, loop.env_steps, config.checkpoint_every):
            log_time += seconds(checkpoint_now)
        status = []
        if loop.last_eval:
            success = loop.last_eval["eval/success"]
            status.append(f"eval success {success_summary(success, config.eval_episodes)}")
        if loop.env_steps < config.learning_starts:  # why the first steps run faster
            status.append(f"random actions until {config.learning_starts:,}")
        progress.update(loop.env_steps, loop.updates, ", ".join(status))
        if stop.signal is not None and loop.env_steps < config.total_env_steps:
            if not crossed(before, loop.env_steps, config.checkpoint_every):
                checkpoint_now()
            logger.close()
            progress.close()
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(stop.signal).name} at env step "
                f"{loop.env_steps:,}, checkpoint written: continue with "
                f"crl-fast train --resume --run-dir {run_dir}",
                stop.signal,
            )
    progress.close()

    if loop.last_eval_step != loop.env_steps:
        evaluate_now()
    checkpoint_now()
    logger.close()
    title = f"CRL {config.env} seed {config.seed}"
    plot_curve(logger.read_rows(), run_dir / "curve.png", title=title)
    if stop.signal is not None:  # it came in the last step or after: nothing was cut short
        name = signal.Signals(stop.signal).name
        print(
            f"{name} came at the run's end (its last step, final evaluation or checkpoint): the "
            "run finished all the same",
            file=sys.stderr,
        )
    updates = f"{loop.updates:,} update" + "s" * (loop.updates != 1)
    # the success with its episodes and interval, said once; the other results as they are
    results = [
        f"eval/success {success_summary(loop.last_eval['eval/success'], config.eval_episodes)}"
    ]
    results += [
        f"{k} {v:.3f}"
        for k, v in loop.last_eval.items()
        if k not in ("eval/success", "eval/success_ci95_low", "eval/success_ci95_high")
    ]
    print(
        f"done: {loop.env_steps:,} env steps, {updates} in {loop.elapsed_s:.0f}s; "
        + ", ".join(results)
        + f"; outputs in {run_dir}"
    )
    return {"run_dir": run_dir, **loop.last_eval}


def load_agent(
    checkpoint_path: str | Path, device: torch.device | str = "auto"
) -> tuple[CRL, TrainConfig]:
    """The agent and config of a checkpoint written by :func:`train`."""
    device = resolve_device(device)
    checkpoint = load_checkpoint(checkpoint_path, device, ("config", "dims", "agent"))
    config = TrainConfig.from_dict(checkpoint["config"])
    agent = CRL(**checkpoint["dims"], config=config.agent, device=device)
    agent.load_state_dict(checkpoint["agent"])
    return agent, config
