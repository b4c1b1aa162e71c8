"""Argument checks shared by the loss, the buffer, the envs and the training loop."""

from __future__ import annotations

import contextlib
import math
import numbers
from types import ModuleType
from typing import TypeGuard

import torch


def is_real(value: object) -> TypeGuard[float]:
    """Whether ``value`` is a real number (numpy's too) other than a bool: a flag given where a
    number belongs is more likely a mistake than a choice."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an integer (numpy's too) other than a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value: object) -> int:
    """``value`` as an int if it is a positive integer (numpy's too; bool is not), else a
    ValueError naming ``name``."""
    if not is_integer(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def positive_real(name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number > 0, else an error naming ``name``:
    a TypeError for what is not a number (bool and strings included), else a ValueError."""
    if not is_real(value):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value}")
    return float(value)


def fraction(name: str, value: object) -> float:
    """``value`` as a float if it is a number in [0, 1], else a TypeError or ValueError naming
    ``name``."""
    if not is_real(value):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def seed_int(value: object) -> int:
    """``value`` as an int if it is an integer in [0, 2**32) (numpy's ints too, bool not), else a
    TypeError or ValueError. torch's CPU generator reads only a seed's low 32 bits, so a larger
    seed would repeat the stream of a smaller one (2**32 + 5 that of 5) without a word."""
    if not is_integer(value):
        raise TypeError(f"seed must be an int, got {value!r}")
    if not 0 <= value < 2**32:
        raise ValueError(
            f"seed must lie in [0, 2**32) (torch's CPU generator reads 32 bits), got {value}"
        )
    return int(value)


def check_bool(name: str, value: object) -> None:
    """A TypeError naming ``name`` unless ``value`` is True or False (numpy's bools, 0 and 1
    are not: a flag given a wrong value is more likely a mistake than a choice)."""
    if not isinstance(value, bool):
        kind = type(value)
        where = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
        raise TypeError(f"{name} must be True or False, got {value!r} ({where}{kind.__qualname__})")


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else CPU. A bare ``"cuda"`` gets the current
    index, so that it compares equal to the device of the tensors made on it. Other device
    types (meta, mps, ...) are refused: the buffer, envs and agent are tested on these two."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"not a torch device: {device!r}") from error
    if device.type == "cpu":
        return torch.device("cpu")  # "cpu:1" too: tensors made there say "cpu"
    if device.type != "cuda":
        raise ValueError(f"crl-fast runs on CPU and CUDA devices, got {device}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but CUDA is not available")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise ValueError(f"device {device} asked for, but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")  # fmt: skip
    return device


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``device`` made the current CUDA device for the block; a no-op for the CPU and where it is
    current already. Triton launches its kernels, and ``torch.cuda.graph`` captures, on the
    current device, whatever device the tensors are on."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def generator_state(state: object, device: torch.device, what: str) -> torch.Tensor:
    """``state`` (on the CPU) if a generator on ``device`` takes it, else a ValueError naming
    ``what``. Tried on a probe generator, so that a caller can check a whole state before it
    changes anything. CPU and CUDA generator states differ: a state saved on one device type
    does not load on the other."""
    if not isinstance(state, torch.Tensor):
        raise ValueError(f"{what} must be a generator state tensor, got {type(state).__name__}")
    state, probe = state.cpu(), torch.Generator(device=device)
    try:
        probe.set_state(state)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"{what} ({state.numel()} bytes) is not a state of a {device.type} generator "
            f"({probe.get_state().numel()} bytes): was it saved on another device type? "
            "(a run resumes on the device type it trained on)"
        ) from error
    return state


def triton_available() -> bool:
    """Whether Triton imports (Linux only): ``backend="auto"`` falls back to PyTorch without."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def require_triton() -> None:
    """For an explicit ``backend="triton"``: a ValueError naming the install where Triton is
    missing (macOS, Windows, ``pip install --no-deps``), not the kernels' own ``import triton``
    failing. (The caller then imports its kernels plainly: torch.compile cannot trace
    ``importlib``.)"""
    if not triton_available():
        raise ValueError(
            "backend='triton' needs Triton, which is not installed: pip install 'triton>=3.6' "
            "(Linux x86_64 / aarch64); backend='auto' runs the PyTorch path without it"
        )


def triton_runs_on(device: torch.device, kernels: ModuleType) -> bool:
    """Whether the Triton kernels of ``kernels`` (a ``crl_fast.kernels`` module) take tensors on
    ``device``: compiled ones CUDA tensors, the interpreter's CPU tensors (TRITON_INTERPRET=1
    set when the module was imported)."""
    return device.type == "cuda" or (device.type == "cpu" and kernels.TAKES_CPU_TENSORS)
