"""Run configuration as dataclasses; the ``crl-fast`` command line is generated from these fields.

Every field carries a one-line help string (``metadata["help"]``) that becomes its ``--flag`` help.
The defaults are the README's main job: point U-maze, tuned to learn in minutes on a 2-core CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypedDict

import torch

from crl_fast.buffer import GOAL_MODES, check_goal_mix
from crl_fast.checks import is_integer, is_real, resolve_device
from crl_fast.energy import ENERGIES
from crl_fast.fused_mlp import check_supported
from crl_fast.loss import LOSSES, LossConfig
from crl_fast.networks import ACTIVATIONS, INITS


class CriticFields(TypedDict):
    """The :class:`AgentConfig` fields that pick the critic's loss (typed, so that the dict can be
    splatted into an :class:`AgentConfig`)."""

    loss: str
    energy: str
    logsumexp_penalty: float


JAXGCRL_CRITIC: CriticFields = {"loss": "infonce", "energy": "norm", "logsumexp_penalty": 0.1}
"""JaxGCRL's default critic as :class:`AgentConfig` fields (`crl-fast train --jaxgcrl-critic`)."""

ACTOR_RANDOM_GOALS = (0.0, 0.5, 1.0)
"""``--actor-random-goals`` choices (see :func:`crl_fast.agent.actor_goals`)."""

AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bfloat16": torch.bfloat16}
"""``--amp`` choices: the ``torch.autocast`` dtype of the agent's forward passes (None: none).
float16 is left out: it would need loss scaling (a GradScaler) to keep small gradients."""

_RUN_OWNED_ENV_KWARGS = {
    "num_envs": "--num-envs (and --eval-episodes)",
    "device": "--device",
    "seed": "--seed",
    "max_episode_steps": "--max-episode-steps",
}
"""make_env keyword arguments that the run passes itself, with the flags that set them."""

RESUME_SAFE_FIELDS = (
    "total_env_steps",  # the schedule
    "eval_every",
    "log_every",
    "checkpoint_every",
    "tensorboard",  # what is reported
    "progress",
    "threads",  # how fast the updates run (CUDA graphs draw other batches: see the README)
    "compile",
    "cuda_graph",
    "graph_updates",
    "actor_stream",
    "fused_mlp",
    "run_dir",  # where the run lies
    "resume",
)
"""The :class:`TrainConfig` fields a resumed run may change; the others define the run (env, seed,
networks, losses, buffer, device, precision) and must match its checkpoint."""


def check_types(config: Any) -> None:
    """A TypeError naming the first field of dataclass ``config`` whose value is not of its
    annotated type: int fields take integers (not bools), float fields any real number (kept as
    a float), ``X | None`` fields None too. A path or torch.device given for a str field is
    taken as its string. The config is saved as JSON with the run, so a wrong type must stop
    the run before it starts, not when it first saves. (object.__setattr__: the config may be
    frozen.)"""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        hint, value = hints[f.name], getattr(config, f.name)
        kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if (value is None and type(None) in kinds) or dataclasses.is_dataclass(kinds[0]):
            continue
        kind = typing.get_origin(kinds[0]) or kinds[0]
        if kind is float and is_real(value):
            object.__setattr__(config, f.name, float(value))
        elif kind is int and is_integer(value):
            if not -(2**63) <= value < 2**63:  # torch's sizes and counts are 64-bit
                raise ValueError(f"{f.name} must fit in 64 bits, got {value}")
            object.__setattr__(config, f.name, int(value))
        elif kind is str and isinstance(value, os.PathLike | torch.device):
            object.__setattr__(config, f.name, str(value))
        elif not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            name = hint.__name__ if isinstance(hint, type) else hint  # int, or int | None
            raise TypeError(f"{f.name} must be {name}, got {value!r}")


def check_choices(config: Any) -> None:
    """A ValueError naming the first field of dataclass ``config`` whose value is not one of its
    :func:`option` choices."""
    for f in dataclasses.fields(config):
        choices, value = f.metadata.get("choices"), getattr(config, f.name)
        if choices is not None and value not in choices:
            raise ValueError(f"{f.name} must be one of {choices}, got {value!r}")


def check_finite(config: Any) -> None:
    """A ValueError naming the first float field of dataclass ``config`` that is NaN or infinite
    (no option means anything there: a NaN rate would make no updates and say nothing)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


class ReadOnlyDict(dict[str, Any]):
    """A dict whose methods that would change it raise a TypeError: a frozen config's
    ``env_kwargs``, which a change in place would alter after its checks. It compares, copies,
    pickles and encodes to JSON as a dict (``dict.__setitem__`` still writes to it, as
    ``object.__setattr__`` does to a frozen dataclass: ``train`` checks the config again)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(
            "env_kwargs is read-only (the config is frozen): dataclasses.replace(config, "
            "env_kwargs=...) makes another config, checked"
        )

    __setitem__ = __delitem__ = __ior__ = _refuse  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[type, tuple[dict[str, Any]]]:
        """Pickled and copied through a plain dict (unpickling would call the methods that
        refuse)."""
        return type(self), (dict(self),)


def option(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with a default, a help string and optional choices for the command line."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class AgentConfig:
    """Networks, losses and optimisers of the CRL agent. Frozen: an agent reads some fields when
    it is built (sizes, learning rates) and others at each update (the loss), so a change after
    would half-apply; ``dataclasses.replace(config, ...)`` makes another."""

    width: int = option(256, "hidden width of the encoders and the actor")
    depth: int = option(
        2,
        "hidden layers; with --residual, the layers of the residual blocks after an input layer "
        "(a multiple of 4: the 1000-layer paper's depth, depth / 4 blocks)",
    )
    repr_dim: int = option(64, "representation size of phi(s, a) and psi(g)")
    activation: str = option("swish", "hidden activation", tuple(ACTIVATIONS))
    layer_norm: bool = option(False, "LayerNorm after each hidden Linear (residual blocks: always)")
    residual: bool = option(
        False,
        "residual blocks of 4 x [Linear, LayerNorm, --activation] + skip; with --layer-norm also "
        "after the first Linear, as in '1000 Layer Networks for Self-Supervised RL'",
    )
    init: str = option(
        "lecun",
        "weight init, zero biases: lecun (U(+-sqrt(3/fan_in)), variance 1/fan_in) or jaxgcrl "
        "(U(+-sqrt(1/fan_in)): JaxGCRL's and the 1000-layer paper's variance_scaling(1/3))",
        tuple(INITS),
    )
    actor_width: int | None = option(None, "hidden width of the actor; unset, --width")
    actor_depth: int | None = option(
        None, "hidden layers of the actor, counted as --depth; unset, --depth"
    )
    fused_mlp: bool = option(
        False,
        "run each network's forward in one Triton kernel and its backward in two (CUDA; "
        "depth 2, no layer norm or residual; experimental: not yet timed on a GPU)",
    )
    loss: str = option("binary", "critic loss (see crl_fast.contrastive_loss)", LOSSES)
    energy: str = option("dot", "critic energy f(phi, psi)", ENERGIES)
    logsumexp_penalty: float = option(0.0, "weight of the logsumexp^2 regulariser")
    exclude_positive_from_lse: bool = option(
        False, "leave the positive out of the logsumexp of the InfoNCE losses and the penalty"
    )
    actor_random_goals: float = option(
        0.0,
        "share of the actor's goals taken from other rows of the batch, i.e. random goals (the "
        "original contrastive_rl's random_goals; its default is 0.5: each state twice, with its "
        "future goal and a random one)",
        ACTOR_RANDOM_GOALS,
    )
    critic_lr: float = option(3e-4, "Adam learning rate of the encoders")
    actor_lr: float = option(3e-4, "Adam learning rate of the actor")
    alpha_lr: float = option(3e-4, "Adam learning rate of the entropy temperature")
    autotune_alpha: bool = option(True, "tune alpha towards the target entropy")
    alpha: float = option(
        1.0, "initial (or, without --autotune-alpha, fixed; 0: no entropy term) entropy weight"
    )
    target_entropy_scale: float = option(0.5, "target entropy = -scale * action_dim")
    amp: str = option(
        "off",
        "mixed precision: bfloat16 runs the networks' matmuls and the critic loss in bfloat16 "
        "under torch.autocast (weights, Adam and the actor's distribution stay float32)",
        tuple(AMP_DTYPES),
    )

    def actor_size(self) -> dict[str, int]:
        """The actor's hidden ``width`` and ``depth``: ``actor_*`` where set, else the encoders'."""
        return {"width": self.actor_width or self.width, "depth": self.actor_depth or self.depth}

    def __post_init__(self) -> None:
        check_types(self)
        check_finite(self)
        check_choices(self)
        self.loss_config()  # names any other bad loss option
        for name in ("width", "depth", "repr_dim", "actor_width", "actor_depth"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.residual:
            for flag, depth in (("--depth", self.depth), ("--actor-depth", self.actor_depth)):
                if depth is not None and depth % 4:
                    raise ValueError(
                        f"--residual needs {flag} a positive multiple of 4, got {depth}"
                    )
        for name in ("critic_lr", "actor_lr", "alpha_lr"):  # 0 freezes, as in torch.optim
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.fused_mlp:
            check_supported(self.depth, self.layer_norm, self.residual, self.width, self.repr_dim)
            actor = self.actor_size()  # its output, 2 x the action size, is checked when built
            check_supported(actor["depth"], self.layer_norm, self.residual, actor["width"], 1)
        if self.alpha < 0 or (self.alpha == 0 and self.autotune_alpha):
            raise ValueError(
                f"alpha must be positive (or 0 with --no-autotune-alpha), got {self.alpha}"
            )

    def loss_config(self) -> LossConfig:
        """The critic's loss options."""
        return LossConfig(
            self.loss, self.energy, self.logsumexp_penalty, self.exclude_positive_from_lse
        )


@dataclass(frozen=True)
class TrainConfig:
    """Environment, replay buffer, training schedule, evaluation, logging and checkpoints.
    Frozen, as :class:`AgentConfig` is: a change after construction would skip its checks (a
    loss needing more rows than batch_size); ``dataclasses.replace(config, ...)`` makes another,
    checked. Its ``env_kwargs`` is a :class:`ReadOnlyDict`, a deep copy of the mapping given."""

    env: str = option("point_umaze", "environment name (see crl_fast.envs)")
    num_envs: int = option(64, "parallel environments used for collection")
    max_episode_steps: int | None = option(None, "episode length (None: the environment's)")
    env_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": 'env keyword arguments as a JSON object, e.g. \'{"terminate_on_success": '
            "true}' (gymnasium:<id> envs: the adapter's and gymnasium.make's)",
        },
    )
    seed: int = option(0, "seed of every random generator")
    device: str = option("auto", "torch device: auto (cuda if available), cpu, cuda, cuda:1")
    threads: int | None = option(None, "CPU threads for torch (None: torch's default)")
    total_env_steps: int = option(500_000, "environment steps (summed over envs) to train for")
    learning_starts: int = option(10_000, "environment steps collected before the first update")
    batch_size: int = option(256, "transitions per gradient update")
    updates_per_env_step: float = option(1 / 16, "gradient updates per environment step")
    buffer_capacity: int = option(
        1_000_000, "replay capacity in transitions, all envs (rounded down to a multiple of them)"
    )
    gamma: float = option(0.99, "discount of the geometric future-goal distribution")
    goal_mode: str = option("geometric", "law of the future-goal offset", GOAL_MODES)
    random_goal_fraction: float = option(0.0, "fraction of goals drawn from random stored states")
    current_goal_fraction: float = option(0.0, "fraction of goals that are the anchor's own state")
    actor_goal_mode: str = option(
        "critic",
        "the actor's goals: 'critic' (the critic's batch) or a goal mode, drawn in a batch of its "
        "own without random or current-state goals (OGBench's CRL: uniform_future)",
        ("critic", *GOAL_MODES),
    )
    eval_every: int = option(25_000, "environment steps between evaluations")
    eval_episodes: int = option(64, "episodes per evaluation, on fixed goals")
    log_every: int = option(5_000, "environment steps between training-metric logs")
    checkpoint_every: int = option(100_000, "environment steps between checkpoints (0: only last)")
    run_dir: str | None = option(None, "run directory (None: runs/<env>__<seed>__<timestamp>)")
    resume: bool = option(False, "continue the run in --run-dir from its last checkpoint")
    tf32: bool = option(True, "float32 matmuls may use TF32 tensor cores on CUDA (as JAX does)")
    compile: bool | None = option(
        None, "torch.compile the update, act and a torch env's step (None: on CUDA only)"
    )
    cuda_graph: bool | None = option(
        None, "replay sample + update from a CUDA graph (None: on CUDA; CUDA only)"
    )
    graph_updates: int = option(
        16, "updates per CUDA graph replay (the last one computes the critic's metrics)"
    )
    actor_stream: bool = option(
        False, "run the actor step on a second CUDA stream, beside the critic's (CUDA only)"
    )
    tensorboard: bool = option(True, "also log to TensorBoard when it is installed")
    progress: bool = option(True, "print a status line with env steps/s and updates/s")
    agent: AgentConfig = field(default_factory=AgentConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.agent, AgentConfig):
            raise TypeError(
                f"agent must be an AgentConfig, got {type(self.agent).__name__} "
                "(TrainConfig.from_dict takes a dict)"
            )
        check_types(self)
        check_choices(self)
        check_finite(self)
        check_goal_mix(self.random_goal_fraction, self.current_goal_fraction)
        if not 0 <= self.seed < 2**32:  # NumPy's global seed takes 32 bits
            raise ValueError(f"seed must lie in [0, 2**32), got {self.seed}")
        positive = ("num_envs", "total_env_steps", "batch_size", "buffer_capacity", "graph_updates")
        for name in (*positive, "eval_every", "eval_episodes", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.buffer_capacity < self.num_envs:
            raise ValueError(
                f"buffer_capacity must hold a step of every env: >= num_envs = {self.num_envs}, "
                f"got {self.buffer_capacity}"
            )
        if self.updates_per_env_step < 0:
            raise ValueError(f"updates_per_env_step must be >= 0, got {self.updates_per_env_step}")
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"gamma must lie in (0, 1), got {self.gamma}")
        for key in set(self.env_kwargs) & set(_RUN_OWNED_ENV_KWARGS):
            flag = _RUN_OWNED_ENV_KWARGS[key]
            raise ValueError(f"env_kwargs cannot set {key!r}: the run sets it from {flag}")
        try:
            json.dumps(self.env_kwargs)
        except TypeError as error:
            raise TypeError(
                f"env_kwargs must hold JSON values (saved with the run): {error}"
            ) from error
        object.__setattr__(self, "env_kwargs", ReadOnlyDict(copy.deepcopy(self.env_kwargs)))
        if self.run_dir == "":  # an unset shell variable, say: not "a new runs/... directory"
            raise ValueError("run_dir must name a directory (None: a new one under runs/), got ''")
        if self.resume and self.run_dir is None:
            raise ValueError("--resume needs --run-dir pointing at the run to continue")
        for name in ("threads", "max_episode_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive (or None), got {getattr(self, name)}")
        for name in ("checkpoint_every", "learning_starts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        rows = 1 + bool(self.agent.actor_random_goals)  # another row's goal needs 2
        smallest = max(*self.agent.loss_config().minimum_batch(), rows)
        if self.batch_size < smallest:
            raise ValueError(
                f"loss {self.agent.loss!r} (or --actor-random-goals, other rows' goals) compares "
                f"off-diagonal pairs: batch_size must be >= {smallest}, got {self.batch_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (nested dataclasses and env_kwargs become dicts)."""
        return dataclasses.asdict(self) | {"env_kwargs": copy.deepcopy(dict(self.env_kwargs))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; a ValueError naming fields this version does not know
        (a config written by a newer one). Fields it lacks take their defaults."""
        d = dict(d)
        if d.get("run_dir") == "":  # saved before "" was refused, where it meant a new default
            d["run_dir"] = None
        agent = d.pop("agent", {})
        for known, given in ((cls, d), (AgentConfig, agent)):
            unknown = set(given) - {f.name for f in dataclasses.fields(known)}
            if unknown:
                raise ValueError(
                    f"unknown {known.__name__} fields {sorted(unknown)} (written by another "
                    "version of crl-fast?)"
                )
        return cls(**d, agent=AgentConfig(**agent))


def check_resume(saved: dict[str, Any], config: TrainConfig) -> None:
    """Raise ValueError naming every field outside :data:`RESUME_SAFE_FIELDS` in which ``config``
    differs from ``saved`` (the :meth:`TrainConfig.to_dict` of the checkpoint it resumes)."""

    def flat(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k != "agent"} | d.get("agent", {})

    # A field newer than the checkpoint ran with its default value.
    old, new = flat(TrainConfig().to_dict()) | flat(saved), flat(config.to_dict())
    for fields in (old, new):  # an unset actor size is the encoders': the same networks
        for size in ("width", "depth"):
            fields[f"actor_{size}"] = fields.get(f"actor_{size}") or fields.get(size)
    if _device(old["device"]) == _device(new["device"]):  # "auto" is "cpu" on a CPU machine
        new["device"] = old["device"]
    changed = [
        f"{name} {old[name]!r} -> {value!r}"
        for name, value in new.items()
        if name not in RESUME_SAFE_FIELDS and name in old and old[name] != value
    ]
    if changed:
        raise ValueError(
            f"cannot resume with settings that differ from the checkpoint: {', '.join(changed)}"
            f" (only {', '.join(RESUME_SAFE_FIELDS)} may change)"
        )


def _device(name: str) -> str:
    """The device ``name`` means on this machine, or ``name`` where it has none such."""
    try:
        return str(resolve_device(name))
    except ValueError:
        return name
