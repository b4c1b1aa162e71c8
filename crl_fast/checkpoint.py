"""Atomic checkpoints and the random-generator state that makes a resumed run continue exactly.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then renamed
over the old one with :func:`os.replace`, so a run killed mid-write leaves the previous
checkpoint intact. Files load with ``torch.load(weights_only=True)``: plain containers and tensors.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename)."""
    return _write_atomically(path, lambda f: torch.save(state, f))


def write_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` as :func:`save_checkpoint` writes: whole or not at all."""
    return _write_atomically(path, lambda f: f.write(text.encode()))


def _write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:  # a full disk fails the write, the flush or the close
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except Exception as error:  # torch.save wraps a full disk's OSError in a RuntimeError
            cause = error if isinstance(error, OSError) else error.__context__
            if not isinstance(cause, OSError):
                raise
            message = f"cannot write {path} ({cause.strerror or cause})"
            if path.exists():
                message += f"; the previous {path.name} there is left as it was"
            args = (message,) if cause.errno is None else (cause.errno, message)
            raise OSError(*args) from error
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # cleanup only: keep the error that got us here
            tmp.unlink(missing_ok=True)
    if os.name == "posix":  # make the rename itself durable (Windows cannot open a folder)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def load_checkpoint(
    path: str | os.PathLike[str], map_location: Any = None, keys: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a ValueError naming ``path`` if
    there is none, it cannot be read, or it is not a dict holding ``keys``."""
    if Path(path).is_dir():
        inside = Path(path) / "checkpoint.pt"
        hint = f" (a run's is {inside})" if inside.is_file() else ""
        raise ValueError(f"{path} is a directory, not a checkpoint file{hint}")
    if not Path(path).is_file():
        raise ValueError(f"no checkpoint file at {path}")
    if problem := _zip_problem(path):  # torch.save writes zip archives, a CRC-32 per record
        raise ValueError(f"cannot read checkpoint {path}: {problem}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a damaged file fails anywhere in the unpickler
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights only" in first.lower():  # not torch's advice to unpickle arbitrary code
            detail = [line.strip() for line in str(error).splitlines() if "Unsupported" in line]
            first = "it holds objects other than tensors and plain values, or is damaged"
            first += f" ({detail[0]})" if detail else ""
        raise ValueError(
            f"cannot read checkpoint {path} (damaged, truncated or not one?): {first}"
        ) from error
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{path} is not a crl-fast training checkpoint: no {missing}")
    return state


def _zip_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a whole zip archive, or None. torch.load checks no CRC, so without
    this a checkpoint damaged on disk would load its damaged bytes."""
    with open(path, "rb") as file:  # a file we may not read stays an OSError
        try:
            with zipfile.ZipFile(file) as archive:
                damaged = next(
                    filter(None, map(_damaged_record(archive), archive.infolist())), None
                )
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError):
            return (
                "not a zip-format torch.save file (damaged, truncated, or another file: a run's "
                "is <run>/checkpoint.pt)"
            )
    return None if damaged is None else f"its record {damaged} is damaged (fails its check)"


def _damaged_record(archive: zipfile.ZipFile) -> Callable[[zipfile.ZipInfo], str | None]:
    """A record's name if it fails its check, else None. torch's reader takes a record marked
    as a folder (MS-DOS attribute) as empty and loads uninitialised memory for it (torch.save
    marks none); a CRC of 0 is torch's "not computed" (``set_crc32_options(False)``)."""

    def check(record: zipfile.ZipInfo) -> str | None:
        if record.external_attr & 0x10:
            return record.filename
        if record.CRC == 0:
            return None
        try:
            with archive.open(record) as data:  # zipfile checks the CRC-32 at the end
                while data.read(1 << 24):
                    pass
        except zipfile.BadZipFile:
            return record.filename
        return None

    return check


@functools.cache
def git_commit(root: Path) -> str | None:
    """``git describe`` of the checkout at ``root`` (its commit, ``-dirty`` with uncommitted
    changes to tracked files), where ``root`` holds ``.git`` and git runs; else None. Only the
    root: crl_fast installed in a venv inside another repository is not that repository's
    commit. Cached: a process runs the code it imported, whatever the tree holds later."""
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"],
            capture_output=True,
            text=True,
            cwd=root,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):  # no git, or a tree it cannot read
        return None
    return done.stdout.strip() or None


def versions() -> dict[str, str | None]:
    """The versions that produced a run or a number: crl-fast, its git commit where it runs
    from a checkout (else ``$CRL_FAST_GIT_SHA``, for a copied one, or None), torch, Triton
    (None if absent), Python."""
    from crl_fast import __version__

    try:
        import triton

        triton_version = str(triton.__version__)
    except ImportError:
        triton_version = None
    checkout = Path(__file__).resolve().parent.parent
    return {  # plain str: torch's version is a TorchVersion, which weights-only loads refuse
        "crl_fast": __version__,
        "crl_fast_git": git_commit(checkout) or os.environ.get("CRL_FAST_GIT_SHA") or None,
        "torch": str(torch.__version__),
        "triton": triton_version,
        "python": platform.python_version(),
    }


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device): the run's one seeding point."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device | str) -> dict[str, Any]:
    """The states of the global generators a run on ``device`` draws from: Python's, NumPy's,
    torch's CPU one and, on CUDA, that device's (the only GPU a run touches)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    device = torch.device(device)
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(np.asarray(keys, np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
    }


def set_rng_state(state: dict[str, Any], device: torch.device | str) -> None:
    """Restore what :func:`rng_state` returned, the CUDA state onto ``device`` (which may have
    another index than the run's had: a run resumed on another machine). Checkpoints written
    before this took a device hold every visible GPU's state: the one of ``device``'s index."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    device = torch.device(device)
    cuda = state["cuda"]
    if device.type == "cuda" and cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_rng_state(cuda[index if index < len(cuda) else 0].cpu(), device)
