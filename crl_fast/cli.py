"""``crl-fast`` command line: ``train`` (every config field is a flag) and ``eval``.

``crl-fast train`` with no arguments runs the default point U-maze job; ``--config FILE`` starts a
new run from a saved config instead of the defaults. ``crl-fast train --resume
--run-dir DIR`` continues DIR from its last checkpoint with its saved config, changed only by the
flags given, which may only be schedule, reporting and speed flags (for example a larger
``--total-env-steps``; see ``crl_fast.config.RESUME_SAFE_FIELDS``): others are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from crl_fast.checks import seed_int
from crl_fast.config import JAXGCRL_CRITIC, AgentConfig, TrainConfig
from crl_fast.run_dir import resume_refusal

T_ = TypeVar("T_")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_optional(inner: Callable[[str], T_]) -> Callable[[str], T_ | None]:
    """``inner``'s parser that also takes "none" (any case) for None."""

    def parse(text: str) -> T_ | None:
        return None if text.lower() == "none" else inner(text)

    parse.__name__ = inner.__name__
    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


_positive.__name__ = "positive integer"  # argparse names the type: "invalid positive integer value"


def _seed(text: str) -> int:
    value = int(text)  # a ValueError here: argparse's "invalid seed value: 'abc'"
    try:
        return seed_int(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_seed.__name__ = "seed"


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)  # a JSONDecodeError is a ValueError: argparse reports it
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object: {text}")
    return value


_json_object.__name__ = "JSON object"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of dataclass ``cls``, in a group per dataclass (nested ones flattened).

    Flags default to ``argparse.SUPPRESS``, so the parsed namespace holds only the flags given.
    """
    summary = (cls.__doc__ or cls.__name__).split(". ", 1)[0].split(".\n", 1)[0]
    group = parser.add_argument_group(summary.rstrip("."))  # the docstring's first sentence
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            add_config_arguments(parser, kind)
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default
        help_text = f"{f.metadata['help']} (default: {default})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if kind is bool or kind == bool | None:  # --flag / --no-flag; absent: the default
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is dict:
            kwargs["type"] = _json_object
        elif isinstance(kind, types.UnionType):  # ``X | None``
            (inner,) = [t for t in typing.get_args(kind) if t is not type(None)]
            kwargs["type"] = _parse_optional(inner)
        else:
            kwargs["type"] = kind
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument(_flag(f.name), **kwargs)


def config_from_args(given: dict[str, Any], base: dict[str, Any] | None = None) -> TrainConfig:
    """``base`` (a :meth:`TrainConfig.to_dict`; default: the defaults) updated by ``given``."""
    config = TrainConfig().to_dict() if base is None else base
    agent_fields = {f.name for f in dataclasses.fields(AgentConfig)}
    for key, value in given.items():
        (config["agent"] if key in agent_fields else config)[key] = value
    return TrainConfig.from_dict(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crl-fast", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser(
        "train", help="train CRL (no flags: the default point U-maze run)"
    )
    add_config_arguments(train_parser, TrainConfig)
    train_parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="start from this JSON config (a run's config.json, or any part of it, agent fields "
        'under "agent"), then apply the flags given; a new run: the file\'s run_dir and resume '
        "are not taken (it says so)",
    )
    train_parser.add_argument(
        "--jaxgcrl-critic",
        action="store_true",
        default=argparse.SUPPRESS,
        help="JaxGCRL's default critic: "
        + " ".join(f"{_flag(k)} {v}" for k, v in JAXGCRL_CRITIC.items()),
    )
    eval_parser = commands.add_parser("eval", help="evaluate a checkpoint")
    eval_parser.add_argument("--checkpoint", required=True, help="path to a checkpoint.pt")
    eval_parser.add_argument(
        "--episodes",
        type=_positive,
        default=None,
        help="episodes, run as parallel envs (default: the run's --eval-episodes)",
    )
    eval_parser.add_argument("--device", default="auto", help="torch device (default: auto)")
    eval_parser.add_argument(
        "--seed",
        type=_seed,
        default=None,
        help="goal seed (default: the run's evaluation goals, whose seed is not the run's --seed)",
    )
    eval_parser.add_argument(
        "--video",
        default=None,
        help="also write a GIF of the first --video-envs episodes here (torch envs with frames)",
    )
    eval_parser.add_argument(
        "--video-envs",
        type=int,
        default=None,
        help="episodes side by side in the GIF (default: 4, or --episodes if fewer)",
    )
    return parser


def train_config(given: dict[str, Any]) -> TrainConfig:
    """The config of ``crl-fast train``: defaults, a ``--config`` file or the resumed run's saved
    config, plus flags."""
    if given.pop("jaxgcrl_critic", False):
        clash = [_flag(k) for k, v in JAXGCRL_CRITIC.items() if given.get(k, v) != v]
        if clash:
            raise ValueError(f"--jaxgcrl-critic sets {', '.join(clash)}: give one or the other")
        given = given | JAXGCRL_CRITIC
    config_file = given.pop("config", None)
    if given.get("resume"):
        if config_file is not None:
            raise ValueError("--resume continues with the run's own config.json: drop --config")
        if given.get("run_dir") is None:  # not given, or given as none (a new run's default)
            raise ValueError("--resume needs --run-dir pointing at the run to continue")
        saved = Path(given["run_dir"]) / "config.json"
        if not saved.exists():  # a run directory without it: say what that means
            refusal = resume_refusal(saved.parent)
            if refusal:
                raise ValueError(refusal)
        base = _read_config(saved, "cannot resume")
        if not isinstance(base.get("agent"), dict):
            raise ValueError(f"cannot resume: {saved} is not a crl-fast run's config")
        return config_from_args(given, base=base)
    if config_file is None:
        return config_from_args(given)
    if config_file == "":  # an unset shell variable, say: not the current directory
        raise ValueError("--config needs a JSON file, got ''")
    fields = _read_config(Path(config_file), "--config")
    # The file's run is not this one (a new run never shares its directory), and continuing one
    # is --resume's: said where the file asked for either, which a hand-written file may mean.
    taken = {k: fields.pop(k, None) for k in ("run_dir", "resume")}
    dropped = {k: v for k, v in taken.items() if v not in (None, False, "")}
    if dropped:
        names = ", ".join(f"{k}={v!r}" for k, v in dropped.items())
        print(f"--config: {config_file}'s {names} not taken: this is a new run", file=sys.stderr)
    base = TrainConfig().to_dict()
    agent = fields.pop("agent", {})
    if not isinstance(agent, dict):
        raise ValueError(f"--config: {config_file}'s agent must be a JSON object")
    agent_fields = {f.name for f in dataclasses.fields(AgentConfig)}
    flat = sorted(set(fields) & agent_fields)
    if flat:
        raise ValueError(
            f"--config: {config_file} has agent fields {flat} at the top: nest them "
            'under "agent", as a run\'s config.json does'
        )
    base.update(fields)
    base["agent"].update(agent)
    return config_from_args(given, base=base)


def _read_config(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``, or a ValueError starting with ``what``."""
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a directory, not a config file (its config.json?)")
    if not path.exists():  # a pipe (--config <(...)) exists and reads as a file does
        raise ValueError(f"{what}: {path} does not exist")
    try:
        value = json.loads(path.read_bytes())  # bytes: json detects UTF-8/16/32 itself
    except (json.JSONDecodeError, UnicodeDecodeError) as error:  # damaged: not text, or not JSON
        raise ValueError(f"{what}: {path} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{what}: {path} is not a crl-fast config (a JSON object)")
    return value


def run_eval(args: argparse.Namespace) -> dict[str, float]:
    from crl_fast.envs.render import save_gif
    from crl_fast.train import eval_seed, evaluate, load_agent, make_eval_env

    if args.video == "":  # an unset shell variable, say: not "no video"
        raise ValueError("--video needs a path ending in .gif, got ''")
    if args.video_envs is not None and args.video is None:
        raise ValueError("--video-envs sets the episodes of --video's GIF: give --video too")
    agent, config = load_agent(args.checkpoint, args.device)
    if args.episodes is None:
        args.episodes = config.eval_episodes
    env = make_eval_env(config, agent.device, args.episodes)
    film = _film(args, env) if args.video else None
    seed = eval_seed(config) if args.seed is None else args.seed
    result = evaluate(agent, env, seed, record=film)
    written = {}
    if film is not None:
        written = {"video": str(save_gif(film.frames, args.video, env.metadata["render_fps"]))}
    summary = {"checkpoint": str(args.checkpoint), "episodes": args.episodes, **written}
    print(json.dumps(summary | result))
    return result


def _film(args: argparse.Namespace, env: Any) -> Any:
    """The recorder of ``--video``, after checking what it needs (before the evaluation runs)."""
    from crl_fast.envs.base import TorchGoalVectorEnv
    from crl_fast.envs.render import FirstEpisodes, gif_path

    if not isinstance(env, TorchGoalVectorEnv):
        raise ValueError(
            "--video draws the torch envs (crl_fast.envs); for gymnasium:<id> envs use "
            "Gymnasium's own video recording"
        )
    if type(env).frames is TorchGoalVectorEnv.frames:
        raise ValueError(
            f"--video: {type(env).__name__} does not draw frames (no frames method: an env "
            "of your own defines frames(obs), returning uint8 (rows, height, width, 3))"
        )
    if args.video_envs is None:
        args.video_envs = min(4, args.episodes)
    if not 1 <= args.video_envs <= args.episodes:
        raise ValueError(f"--video-envs must lie in [1, --episodes], got {args.video_envs}")
    if not gif_path(args.video).parent.is_dir():
        raise ValueError(f"--video: the folder of {args.video} does not exist")
    try:
        import PIL  # noqa: F401
    except ImportError as error:
        raise ValueError(
            "--video writes a GIF with Pillow: pip install 'crl-fast[plot]'"
        ) from error
    return FirstEpisodes(env, args.video_envs)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "eval":
            run_eval(args)
        else:
            from crl_fast.train import TrainingInterrupted, train

            try:
                train(train_config({k: v for k, v in vars(args).items() if k != "command"}))
            except TrainingInterrupted as stopped:
                print(f"crl-fast train: {stopped}", file=sys.stderr)
                raise SystemExit(128 + stopped.signum) from None
    except (ValueError, TypeError, ImportError, OSError) as error:
        if not isinstance(error, OSError) and not raised_by_crl_fast(error):
            raise  # a bug (in an env of your own, say): its traceback
        # settings, files, a missing dependency: crl-fast's own message says what to change
        print(f"crl-fast {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    except RuntimeError as error:  # CUDA's torch.OutOfMemoryError is one too
        if not _out_of_memory(error):
            raise
        sizes = "--episodes" if args.command == "eval" else "--batch-size or --buffer-capacity"
        first_line = str(error).strip().splitlines()[0]
        print(f"crl-fast {args.command}: error: {first_line}; lower {sizes}", file=sys.stderr)
        raise SystemExit(2) from error


def _out_of_memory(error: RuntimeError) -> bool:
    """Whether ``error`` is an allocation that failed (on the GPU, or the CPU allocator's)."""
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def raised_by_crl_fast(error: BaseException) -> bool:
    """Whether crl-fast's own code raised ``error`` (one of its checks, with a message that says
    what to change), rather than code it called."""
    import crl_fast
    import crl_fast.kernels

    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = Path(tb.tb_frame.f_code.co_filename).resolve() if tb is not None else None
    packages = {Path(p).resolve() for m in (crl_fast, crl_fast.kernels) for p in m.__path__}
    return where is not None and any(where.is_relative_to(p) for p in packages)


if __name__ == "__main__":
    main()
