"""JAX/XLA baselines (JaxGCRL's way), timed by our own run on the same device as crl-fast.

    python -m bench.jax_baselines                  # every size (GPU; CPU: small sizes)
    python -m bench.jax_baselines --quick          # one size per table
    python -m bench.jax_baselines --device cpu --precision highest

Our issues quote JaxGCRL on an H100 (critic loss B = 16384, d = 64: infonce + norm + 0.1 penalty
2.75 ms bf16 / 4.6 ms fp32, sigmoid BCE + dot 2.3 ms; update 6,550/s at batch 256, 1,405/s at
batch 4096; T x T goal sampler 122 M samples/s at 256 envs x 1001 steps). This script measures
those baselines itself, so the claims can be checked. It needs only jax (the GPU image has no
flax / optax): MLPs, Adam and the tanh-Gaussian actor are written out here.

* loss: forward + backward (``jax.value_and_grad`` w.r.t. phi and psi, jitted). Sigmoid BCE with
  the dot energy (logits by one matmul, ``phi @ psi.T``) and JaxGCRL's critic, infonce + norm +
  0.1 * mean(logsumexp^2), whose norm energy is JaxGCRL's ``energy_fn`` over the broadcast
  ``phi[:, None] - psi[None]`` (no tensor cores; whether XLA fuses the B x B x d difference or
  stores it shows in ``peak_mem_mb``: the CPU backend stores it). The maths is
  ``crl_fast.reference_contrastive_loss`` (the tests hold it there), so JaxGCRL's ``+ 1e-6``
  inside the penalty's logsumexp is left out. bf16 rows compute the logits as plain JAX does on
  bf16 arrays (the matmul and ``jnp.sum`` accumulate in float32, the logits are rounded to bf16;
  the backward pass rounds the logit gradient to bf16 before its products, as crl-fast's kernels
  do) and the loss on them in float32. Matmuls use ``--precision`` (JAX's ``default``: TF32 for
  float32 on Ampere and later GPUs), recorded in the JSON.
* update: CRL updates per second with bench_update's networks and sizes (2 x 256 swish MLPs,
  repr 64, infonce + norm + 0.1, Adam 3e-4; state 27, action 8, goal 2). As JaxGCRL's
  ``training_step`` after ``flatten_batch``: one jitted call permutes a pool of K x B flattened
  transitions, cuts it into K batches and ``lax.scan``s K updates over them. Each update mirrors
  ``crl_fast.agent.CRL`` (where JaxGCRL differs in details, ours is followed): the actor step
  against the critic as it stands (no gradient into the encoders), the alpha step on the
  actor's log-probabilities, the critic step with the loss above and its metrics (every update:
  more than bench_update's modes, which compute them once per call of 16; the batches come from the
  permuted pool, with no future-goal sampling inside the call, less than crl-fast's, which
  samples its buffer inside the graph); LeCun-uniform
  init with bound sqrt(3 / fan_in), log-std squashed into [-5, 2], the tanh correction
  ``2 (log 2 - x - softplus(-2x))``, alpha starting at 1, target entropy -0.5 * action_dim
  (JaxGCRL: bound sqrt(1 / fan_in), correction ``log(1 - tanh(x)^2 + 1e-6)``, two output
  layers for mean and log-std; the same work). The tests check every metric against CRL.update.
* sampler: JaxGCRL's ``flatten_batch``, vmapped over envs: per env a T x T matrix of
  gamma^(j - i) over later steps of the same episode (+ 1e-5 on the diagonal), one categorical
  draw per row, then the (state, action, goal) rows our buffer's ``sample`` returns (obs 29,
  action 8, goal 2 as bench_buffer; episodes cut every 400 steps). samples = envs x steps draws,
  counted as bench_buffer's ``txt_baseline`` row counts them. Sizes: JaxGCRL's 256 envs x 1001
  steps and bench_buffer's 1000 envs (CPU: 8 envs).

Timing: the host clock around a call ending in ``block_until_ready`` (harness.measure's
``perf_counter`` path), median of many calls after warm-up (calls for ``harness.WAKE_S``
seconds, so that the GPU left idle by the compile is back at its clocks); compilation is done
ahead of time and reported as ``compile_s``. ``peak_mem_mb`` is the memory one call needs
besides its inputs (XLA buffer assignment: temporaries + outputs); ``device_peak_mb`` is the
process's high-water mark from ``memory_stats()`` where the backend keeps one (it never resets:
an upper bound). Out-of-memory rows are recorded as such. Writes bench/results/jax-<device>.json;
CPU rows are CPU figures, never GPU numbers.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.bench_buffer import ACT, EPISODE, GOAL, OBS
from bench.bench_update import ACTION_DIM, GOAL_DIM, JAXGCRL_AGENT, OBS_DIM
from bench.harness import (
    add_name_argument,
    device_name,
    keep_busy,
    measure,
    positive_int,
    print_table,
    run_facts,
    save_results,
)
from crl_fast.config import AgentConfig
from crl_fast.energy import NORM_EPS
from crl_fast.networks import LOG_STD_MAX, LOG_STD_MIN

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax: torch may share
try:
    import jax
    import jax.numpy as jnp
except ImportError:
    HAS_JAX = False
else:
    HAS_JAX = True

Array = Any  # jax.Array
Params = list[tuple[Array, Array]]  # an MLP's (weight [in, out], bias [out]) per layer
DIM = 64
LOSS_COMBOS = (("binary", "dot", 0.0), ("infonce", "norm", 0.1))
# Per platform: loss B, update batch sizes, sampler envs; --quick keeps the first of each (the
# loss: B = 16384 on GPUs). On CPUs JaxGCRL's norm energy is slow (B x B x d in memory): small B.
SIZES = {
    "gpu": {"loss": (4096, 16384, 65536), "update": (256, 4096), "sampler": (256, 1000)},
    "cpu": {"loss": (512, 1024), "update": (256,), "sampler": (8,)},
}
EPISODE_CUT = 400  # bench_buffer's txt_baseline episodes
GAMMA = 0.99  # JaxGCRL's and our buffer's default discount


# ---------------------------------------------------------------- critic losses


def energy(x: Array, y: Array, name: str) -> Array:
    """JaxGCRL's ``energy_fn`` over the last axis, in the inputs' dtype (``jnp.sum`` adds
    bf16 values up in float32 and rounds the result)."""
    if name == "dot":
        return jnp.sum(x * y, axis=-1)
    if name == "norm":
        return -jnp.sqrt(jnp.sum(jnp.square(x - y), axis=-1) + NORM_EPS)
    raise ValueError(f"energy must be 'dot' or 'norm', got {name!r}")


def pairwise_logits(phi: Array, psi: Array, name: str) -> Array:
    """The B x M logits, computed in the inputs' dtype and returned in float32 (float64 stays):
    dot as one matmul, norm over the broadcast difference as JaxGCRL writes it."""
    logits = phi @ psi.T if name == "dot" else energy(phi[:, None, :], psi[None, :, :], name)
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def critic_loss(logits: Array, loss: str, logsumexp_penalty: float = 0.0) -> Array:
    """``binary`` (sigmoid BCE, identity labels, mean over all pairs) or ``infonce``, plus
    ``logsumexp_penalty * mean(logsumexp_j L_ij ** 2)``."""
    lse = jax.nn.logsumexp(logits, axis=1)
    if loss == "binary":
        value = jnp.mean(jax.nn.softplus(logits)) - jnp.trace(logits) / logits.size
    elif loss == "infonce":
        value = jnp.mean(lse - jnp.diagonal(logits))
    else:
        raise ValueError(f"loss must be 'binary' or 'infonce', got {loss!r}")
    if logsumexp_penalty:
        value = value + logsumexp_penalty * jnp.mean(jnp.square(lse))
    return value


def critic_metrics(logits: Array) -> dict[str, Array]:
    """The metrics ``contrastive_loss(..., return_metrics=True)`` returns."""
    b = logits.shape[0]
    pos = jnp.diagonal(logits)
    eye = jnp.eye(b, logits.shape[1], dtype=bool)
    return {
        "categorical_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(b)),
        "binary_accuracy": jnp.mean((logits > 0) == eye),
        "logits_pos": jnp.mean(pos),
        "logits_neg": (jnp.sum(logits) - jnp.sum(pos)) / (logits.size - b),
        "logsumexp_sq": jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=1))),
    }


def loss_and_grads(
    phi: Array, psi: Array, loss: str, energy_name: str, penalty: float
) -> tuple[Array, tuple[Array, Array]]:
    """The timed loss step: value and gradients w.r.t. phi and psi."""

    def value(phi: Array, psi: Array) -> Array:
        return critic_loss(pairwise_logits(phi, psi, energy_name), loss, penalty)

    return jax.value_and_grad(value, argnums=(0, 1))(phi, psi)


# ---------------------------------------------------------------- networks, Adam, the update


def init_mlp(key: Array, sizes: list[int]) -> Params:
    """LeCun-uniform weights (bound sqrt(3 / fan_in)) and zero biases, as crl_fast.networks."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.uniform(k, (i, o), minval=-math.sqrt(3 / i), maxval=math.sqrt(3 / i)),
         jnp.zeros(o))
        for k, i, o in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]  # fmt: skip


def mlp(params: Params, *inputs: Array) -> Array:
    """Swish hidden layers and a linear output, on the concatenated inputs."""
    x = jnp.concatenate(inputs, axis=-1)
    for w, b in params[:-1]:
        x = jax.nn.swish(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def actor_sample(params: Params, obs: Array, goal: Array, key: Array) -> tuple[Array, Array]:
    """A reparameterised tanh-Gaussian action and its log-probability (TanhGaussianActor)."""
    mean, log_std = jnp.split(mlp(params, obs, goal), 2, axis=-1)
    log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (jnp.tanh(log_std) + 1.0)
    noise = jax.random.normal(key, mean.shape, mean.dtype)
    x = mean + noise * jnp.exp(log_std)
    log_det = 2.0 * (math.log(2.0) - x - jax.nn.softplus(-2.0 * x))
    log_prob = -0.5 * jnp.square(noise) - log_std - 0.5 * math.log(2.0 * math.pi) - log_det
    return jnp.tanh(x), jnp.sum(log_prob, axis=-1)


def adam_init(params: Any) -> dict[str, Any]:
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return {"m": zeros, "v": zeros, "t": jnp.zeros((), jnp.float32)}


def adam_step(params: Any, grads: Any, opt: dict[str, Any], lr: float) -> tuple[Any, dict]:
    """One Adam step (betas 0.9 / 0.999, eps 1e-8 outside the root: torch's and optax's)."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    tree_map = jax.tree_util.tree_map
    t = opt["t"] + 1
    m = tree_map(lambda m, g: b1 * m + (1 - b1) * g, opt["m"], grads)
    v = tree_map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), opt["v"], grads)
    c1, c2 = 1 - b1**t, 1 - b2**t
    params = tree_map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), params, m, v)
    return params, {"m": m, "v": v, "t": t}


def init_state(
    key: Array, obs_dim: int, action_dim: int, goal_dim: int, cfg: AgentConfig
) -> dict[str, Any]:
    """Parameters, Adam states and the random key of the agent (plain swish MLPs).

    One jitted call: op by op, JAX would compile each of its many small ops.
    """
    hidden = [cfg.width] * cfg.depth

    @jax.jit
    def init(key: Array) -> dict[str, Any]:
        k_sa, k_g, k_actor, key = jax.random.split(key, 4)
        critic = {
            "sa": init_mlp(k_sa, [obs_dim + action_dim, *hidden, cfg.repr_dim]),
            "goal": init_mlp(k_g, [goal_dim, *hidden, cfg.repr_dim]),
        }
        actor = init_mlp(k_actor, [obs_dim + goal_dim, *hidden, 2 * action_dim])
        log_alpha = jnp.asarray(math.log(cfg.alpha), jnp.float32)
        return {
            "critic": critic,
            "actor": actor,
            "log_alpha": log_alpha,
            "critic_opt": adam_init(critic),
            "actor_opt": adam_init(actor),
            "alpha_opt": adam_init(log_alpha),
            "key": key,
        }

    return init(key)


def crl_update(
    state: dict[str, Any], batch: tuple[Array, Array, Array], cfg: AgentConfig
) -> tuple[dict[str, Any], dict[str, Array]]:
    """One actor, alpha and critic step on ``(obs, action, goal)``: ``CRL.update``'s maths."""
    obs, action, goal = batch
    key, noise_key = jax.random.split(state["key"])
    critic, log_alpha = state["critic"], state["log_alpha"]
    target_entropy = -cfg.target_entropy_scale * action.shape[-1]

    # Actor, against the critic as it stands before this step.
    alpha = jnp.exp(log_alpha)
    psi_target = mlp(critic["goal"], goal)

    def actor_loss(actor: Params) -> tuple[Array, Array]:
        new_action, log_prob = actor_sample(actor, obs, goal, noise_key)
        q = energy(mlp(critic["sa"], obs, new_action), psi_target, cfg.energy)
        return jnp.mean(alpha * log_prob - q), log_prob

    (a_loss, log_prob), grads = jax.value_and_grad(actor_loss, has_aux=True)(state["actor"])
    actor, actor_opt = adam_step(state["actor"], grads, state["actor_opt"], cfg.actor_lr)

    # Alpha: move the policy entropy towards the target.
    def alpha_loss(log_alpha: Array) -> Array:
        return jnp.mean(jnp.exp(log_alpha) * (-log_prob - target_entropy))

    al_loss, grad = jax.value_and_grad(alpha_loss)(log_alpha)
    alpha_opt = state["alpha_opt"]
    if cfg.autotune_alpha:
        log_alpha, alpha_opt = adam_step(log_alpha, grad, alpha_opt, cfg.alpha_lr)

    # Critic: classify which goal in the batch is the future of each (s, a).
    def c_loss(critic: dict[str, Params]) -> tuple[Array, Array]:
        logits = pairwise_logits(mlp(critic["sa"], obs, action), mlp(critic["goal"], goal),
                                 cfg.energy)  # fmt: skip
        return critic_loss(logits, cfg.loss, cfg.logsumexp_penalty), logits

    (c_value, logits), grads = jax.value_and_grad(c_loss, has_aux=True)(critic)
    critic, critic_opt = adam_step(critic, grads, state["critic_opt"], cfg.critic_lr)

    metrics = {f"critic/{k}": v for k, v in critic_metrics(logits).items()}
    metrics |= {
        "critic/loss": c_value,
        "actor/loss": a_loss,
        "actor/entropy": -jnp.mean(log_prob),
        "alpha": alpha,
        "alpha/loss": al_loss,
    }
    state = {
        "critic": critic,
        "actor": actor,
        "log_alpha": log_alpha,
        "critic_opt": critic_opt,
        "actor_opt": actor_opt,
        "alpha_opt": alpha_opt,
        "key": key,
    }
    return state, metrics


def train_updates(
    state: dict[str, Any], batches: tuple[Array, Array, Array], cfg: AgentConfig
) -> tuple[dict[str, Any], dict[str, Array]]:
    """``lax.scan`` of :func:`crl_update` over batches shaped [K, B, ...]; metrics stacked [K]."""
    return jax.lax.scan(functools.partial(crl_update, cfg=cfg), state, batches)


def shuffled_updates(
    state: dict[str, Any], pool: tuple[Array, Array, Array], cfg: AgentConfig, batch_size: int
) -> tuple[dict[str, Any], dict[str, Array]]:
    """JaxGCRL's ``training_step`` after ``flatten_batch``: permute the pool of transitions, cut
    it into batches of ``batch_size`` and scan the update over them."""
    key, perm_key = jax.random.split(state["key"])
    size = pool[0].shape[0]
    perm = jax.random.permutation(perm_key, size)
    batches = tuple(x[perm].reshape(size // batch_size, batch_size, -1) for x in pool)
    return train_updates(state | {"key": key}, batches, cfg)


# ---------------------------------------------------------------- JaxGCRL's T x T goal sampler


def future_goals(
    key: Array, obs: Array, action: Array, traj_id: Array, gamma: float, goal_indices: tuple
) -> tuple[Array, Array, Array]:
    """``flatten_batch`` for one env's [T, ...] sequence: (obs, action, goal) of its first T - 1
    steps, the goal being the state at j > i of the same episode drawn with weight gamma^(j-i)
    (a row with no such j draws itself)."""
    steps = obs.shape[0]
    idx = jnp.arange(steps)
    is_future = (idx[:, None] < idx[None, :]).astype(jnp.float32)
    probs = is_future * gamma ** (idx[None, :] - idx[:, None]).astype(jnp.float32)
    same = traj_id[:, None] == traj_id[None, :]
    probs = probs * same + jnp.eye(steps) * 1e-5
    goal_index = jax.random.categorical(key, jnp.log(probs))
    goal = obs[goal_index[:-1]][:, list(goal_indices)]
    return obs[:-1], action[:-1], goal


def sample_future_goals(
    key: Array, obs: Array, action: Array, traj_id: Array, gamma: float, goal_indices: tuple
) -> tuple[Array, Array, Array]:
    """:func:`future_goals` over envs: inputs [envs, T, ...], outputs [envs, T - 1, ...]."""
    keys = jax.random.split(key, obs.shape[0])
    per_env = functools.partial(future_goals, gamma=gamma, goal_indices=goal_indices)
    return jax.vmap(per_env)(keys, obs, action, traj_id)


# ---------------------------------------------------------------- timing and the three tables


def timed(
    fn: Callable, args: tuple, device: Any, *, carry: bool = False, budget_s: float = 1.0
) -> dict[str, Any]:
    """Compile ``fn(*args)`` ahead of time, then time calls that block until ready.

    With ``carry`` each call's first output becomes the next call's first argument (a training
    state). Repetitions fill about ``budget_s`` seconds (5 to 100).
    """
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    args_now = list(args)

    def call() -> None:
        out = jax.block_until_ready(compiled(*args_now))
        if carry:
            args_now[0] = out[0]

    t0 = time.perf_counter()
    call()
    rep = int(min(100, max(5, budget_s / max(time.perf_counter() - t0, 1e-6))))
    keep_busy(call)  # the device idled through the compile: wake it, as measure does for torch
    timing = measure(call, device="cpu", warmup=2, rep=rep)  # the host clock: call() blocks
    # Its median, deciles, calls and timer, under the other bench scripts' names.
    row: dict[str, Any] = {**timing, "compile_s": compile_s}
    stats = compiled.memory_analysis()
    if stats is not None:
        extra = stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
        row["peak_mem_mb"] = extra / 2**20
    device_stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in device_stats:
        row["device_peak_mb"] = device_stats["peak_bytes_in_use"] / 2**20
    return row


def guarded(row: dict, run: Callable[[], dict]) -> dict:
    """``row`` with ``run()``'s figures and status ``ok``, or status ``out of memory``."""
    try:
        return row | run() | {"status": "ok"}
    except Exception as error:  # XlaRuntimeError: its class moved between jax versions
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return row | {"status": "out of memory"}


def bench_loss(b: int, dtype: Any, combo: tuple[str, str, float], device: Any) -> dict:
    loss, energy_name, penalty = combo
    row = {"loss": loss, "energy": energy_name, "penalty": penalty, "B": b, "d": DIM}

    def run() -> dict:
        k_phi, k_psi = jax.random.split(jax.random.PRNGKey(0))
        phi = (jax.random.normal(k_phi, (b, DIM)) / DIM**0.5).astype(dtype)
        psi = (jax.random.normal(k_psi, (b, DIM)) / DIM**0.5).astype(dtype)
        fn = functools.partial(loss_and_grads, loss=loss, energy_name=energy_name, penalty=penalty)
        return timed(fn, (phi, psi), device)

    return guarded(row | {"dtype": jnp.dtype(dtype).name}, run)


def bench_update(batch_size: int, updates: int, device: Any) -> dict:
    row = {"batch": batch_size, "updates_per_call": updates}

    def run() -> dict:
        k_obs, k_act, k_goal, k_init = jax.random.split(jax.random.PRNGKey(0), 4)
        size = updates * batch_size
        pool = (
            jax.random.normal(k_obs, (size, OBS_DIM)),
            jax.random.uniform(k_act, (size, ACTION_DIM), minval=-1.0, maxval=1.0),
            jax.random.normal(k_goal, (size, GOAL_DIM)),
        )
        state = init_state(k_init, OBS_DIM, ACTION_DIM, GOAL_DIM, JAXGCRL_AGENT)
        fn = functools.partial(shuffled_updates, cfg=JAXGCRL_AGENT, batch_size=batch_size)
        out = timed(fn, (state, pool), device, carry=True)
        return out | {"updates_per_s": updates * 1e3 / out["median_ms"]}

    return guarded(row, run)


def bench_sampler(envs: int, device: Any) -> dict:
    steps = EPISODE + 1
    row = {"envs": envs, "steps": steps, "samples": envs * steps}

    def run() -> dict:
        k_obs, k_act, key = jax.random.split(jax.random.PRNGKey(0), 3)
        obs = jax.random.normal(k_obs, (envs, steps, OBS))
        action = jax.random.normal(k_act, (envs, steps, ACT))
        traj_id = jnp.broadcast_to(jnp.arange(steps) // EPISODE_CUT, (envs, steps))
        fn = functools.partial(sample_future_goals, gamma=GAMMA, goal_indices=tuple(range(GOAL)))
        out = timed(fn, (key, obs, action, traj_id), device)
        return out | {"samples_per_s": envs * steps / (out["median_ms"] / 1e3)}

    return guarded(row, run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("gpu", "cpu"), help="default: JAX's default backend")
    parser.add_argument("--quick", action="store_true", help="one size per table")
    parser.add_argument(
        "--precision",
        default="default",
        choices=("default", "high", "highest"),
        help="jax_default_matmul_precision (default: TF32 for float32 matmuls on GPUs)",
    )
    parser.add_argument(
        "--scan-updates", type=positive_int, help="updates per call (GPU 100, CPU 10)"
    )
    for table, what in (("loss", "loss B"), ("update", "update batch sizes"), ("sampler", "envs")):
        parser.add_argument(
            f"--{table}-sizes", type=positive_int, nargs="*", help=f"{what}; none: skip"
        )
    parser.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float32"))
    add_name_argument(parser, "jax")
    args = parser.parse_args()
    if not HAS_JAX:
        print(
            "bench.jax_baselines needs JAX: pip install -e '.[jax]' (a CUDA build on a GPU)",
            file=sys.stderr,
        )
        sys.exit(2)
    import jaxlib

    try:
        device = jax.devices(args.device)[0]
    except RuntimeError as error:
        parser.error(f"no JAX {args.device} device: {error}")
    jax.config.update("jax_default_device", device)
    jax.config.update("jax_default_matmul_precision", args.precision)
    kind = "cpu" if device.platform == "cpu" else "gpu"
    label = " [CPU figures, not GPU]" if kind == "cpu" else f" ({device.device_kind})"
    env = {
        "device": device_name("cpu") if kind == "cpu" else device.device_kind,
        "platform": device.platform,
        "platform_version": device.client.platform_version,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "matmul_precision": args.precision,
        "xla_python_client_preallocate": os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"],
        **run_facts(),
    }
    sizes = dict(SIZES[kind])
    if args.quick:
        sizes = {key: value[:1] for key, value in sizes.items()}
        sizes["loss"] = (16384,) if kind == "gpu" else sizes["loss"]
    for table in sizes:
        if (given := getattr(args, f"{table}_sizes")) is not None:
            sizes[table] = tuple(given)
    updates = args.scan_updates or (100 if kind == "gpu" else 10)
    dtypes = (jnp.bfloat16, jnp.float32) if kind == "gpu" else (jnp.float32,)
    dtypes = tuple(getattr(jnp, name) for name in args.dtypes) if args.dtypes else dtypes
    rows: list[dict] = []

    def record(row: dict) -> dict:
        """Print and save after every row, so a run stopped by a time limit keeps its rows."""
        rows.append(row | {"platform": kind, "matmul_precision": args.precision})
        print(rows[-1], flush=True)
        save_results(args.name or "jax", env, rows, complete=False)
        return rows[-1]

    # Updates first: JaxGCRL's norm energy at B = 16384 compiles for over a minute on an H200.
    update_rows = [
        record({"bench": "update"} | bench_update(b, updates, device)) for b in sizes["update"]
    ]
    loss_rows = [
        record({"bench": "loss"} | bench_loss(b, dtype, combo, device))
        for dtype in dtypes
        for b in sizes["loss"]
        for combo in LOSS_COMBOS
    ]
    sampler_rows = [
        record({"bench": "sampler"} | bench_sampler(n, device)) for n in sizes["sampler"]
    ]
    if rows:
        save_results(args.name or "jax", env, rows)  # the run finished: complete

    common = ["median_ms", "peak_mem_mb", "compile_s", "status"]
    print_table(
        loss_rows,
        ["loss", "energy", "penalty", "B", "d", "dtype", *common],
        title=f"JAX critic loss, forward + backward{label}",
    )
    print_table(
        update_rows,
        ["batch", "updates_per_call", "updates_per_s", *common],
        title=f"JAX CRL update, jit + lax.scan{label}",
    )
    print_table(
        sampler_rows,
        ["envs", "steps", "samples", "samples_per_s", *common],
        title=f"JAX T x T future-goal sampler{label}",
    )


if __name__ == "__main__":
    main()
