"""Run directories: a new one per run, locked while a run writes in it; which directories a run
may start in (a new run an empty one, ``--resume`` one with a checkpoint), and the undo of a
start that failed before there was anything to resume."""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if sys.platform != "win32":  # Windows has no fcntl: run directories are not locked there
    import fcntl

from crl_fast.config import TrainConfig

LOCK_NAME = ".lock"  # held by the run writing in the directory
CHECKPOINT_NAME = "checkpoint.pt"
RUN_OUTPUTS = ("config.json", "metrics.jsonl", "metrics.csv", "tensorboard")
"""What a new run writes in its directory before its first checkpoint."""


def new_run_dir(config: TrainConfig) -> Path:
    """Create ``runs/<env>__<seed>__<time>``, with a suffix when another run took that name
    (``mkdir`` fails on a taken one, so runs started in the same second get different names)."""
    env = config.env.replace(":", "_").replace("/", "_")
    base = Path("runs") / f"{env}__{config.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, n = base, 1
    while True:
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")


@contextlib.contextmanager
def claimed_run_dir(config: TrainConfig) -> Iterator[Path]:
    """The run's directory (``--run-dir``, else a new default one), created if needed and locked
    for the run: a second run given it meanwhile gets a ValueError instead of writing into the
    same files. If the run fails before writing in it, the directory is left as it was: removed
    if created here, else without the lock file if that was new."""
    if config.run_dir:
        run_dir = Path(config.run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"--run-dir {run_dir} is a file, not a directory")
        try:  # atomic: of two runs started together, only one creates it
            run_dir.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False
    else:
        run_dir, created = new_run_dir(config), True
    before = _names(run_dir)
    with open(run_dir / LOCK_NAME, "a") as lock:
        if sys.platform != "win32":  # advisory: released when the process ends, as it may
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                raise ValueError(f"another run is using {run_dir} now") from error
            except OSError as error:  # a file system without locks (some network ones)
                print(f"cannot lock {run_dir} ({error}): a second run there is not refused")
        try:
            yield run_dir
        except BaseException:
            # Still holding the lock, so a run trying the directory meanwhile is refused.
            if LOCK_NAME not in before and _names(run_dir) - {LOCK_NAME} == before:
                _leave_as_it_was(run_dir, created)
            raise


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _leave_as_it_was(run_dir: Path, created: bool) -> None:
    """Undo the claim of a run that wrote nothing: remove the directory if the run created it,
    else the lock file (a folder of the user's, refused as not empty, say). Best effort: Windows
    refuses to delete open files, and the run's own error is the one to report."""
    with contextlib.suppress(OSError):
        if created:
            shutil.rmtree(run_dir)
        else:
            (run_dir / LOCK_NAME).unlink()


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse (ValueError) a directory the run cannot start in: for ``resume``, one without a
    checkpoint; for a new run, one holding anything but the run's own lock."""
    refusal = resume_refusal(run_dir) if resume else None
    if refusal:
        raise ValueError(refusal)
    if not resume and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        raise ValueError(_occupied_refusal(run_dir))


def _occupied_refusal(run_dir: Path) -> str:
    """Why a new run refuses ``run_dir``, which holds files, and what to do instead: --resume
    only where it can continue (a run killed before its first checkpoint has nothing to resume,
    and --resume refuses it)."""
    if (run_dir / CHECKPOINT_NAME).exists():
        return (
            f"{run_dir} is not empty (another run's files): pass --resume to continue a run "
            "there, or another --run-dir"
        )
    if (run_dir / "config.json").exists():
        return (
            f"{run_dir} holds a run stopped before its first checkpoint (its config.json, no "
            f"{CHECKPOINT_NAME}: --resume cannot continue it): delete the directory to start "
            "that run again there, or give another --run-dir"
        )
    return f"{run_dir} is not empty and holds no run (no config.json): give another --run-dir"


def resume_refusal(run_dir: Path) -> str | None:
    """Why --resume cannot continue a run in ``run_dir`` and what to do instead; None where it
    holds a checkpoint."""
    if (run_dir / CHECKPOINT_NAME).exists():
        return None
    if not run_dir.is_dir():
        problem = "is a file, not a directory" if run_dir.exists() else "does not exist"
        return f"cannot resume: --run-dir {run_dir} {problem}"
    if (run_dir / "config.json").exists():
        return (
            f"cannot resume: {run_dir} holds a run stopped before its first checkpoint (its "
            f"config.json, no {CHECKPOINT_NAME}): nothing to continue; delete the directory to "
            "start that run again there, or give another --run-dir"
        )
    if not any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        return (
            f"cannot resume: {run_dir} holds only a lock file (its run was killed before it "
            "wrote anything, even its config.json, or is still starting): nothing to continue; "
            "start the run without --resume, in this --run-dir or another"
        )
    return (
        f"cannot resume: {run_dir} holds no run (no {CHECKPOINT_NAME}, no config.json): "
        "check --run-dir"
    )


def undo_failed_start(run_dir: Path, updated: Callable[[], bool]) -> Callable[..., bool]:
    """An ``__exit__`` callback removing a new run's files from ``run_dir`` where it fails before
    its first update (``updated()`` False) and checkpoint (a batch far too large for the device,
    say): such a start holds nothing to resume, and left there its config.json would make the
    same --run-dir refuse the run. A new run starts only in a folder without them, so none is the
    user's; the directory or the lock file go with :func:`claimed_run_dir`. Best effort, as
    there: the run's own error is the one to report."""

    def undo(kind: type[BaseException] | None, *_: object) -> bool:
        if kind is not None and not updated() and not (run_dir / CHECKPOINT_NAME).exists():
            for name in RUN_OUTPUTS:
                path = run_dir / name
                with contextlib.suppress(OSError):
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
        return False  # the error goes on

    return undo
