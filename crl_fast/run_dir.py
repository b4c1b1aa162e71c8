"""Run directories: a new one per run, locked while a run writes in it."""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

if sys.platform != "win32":  # Windows has no fcntl: run directories are not locked there
    import fcntl

from crl_fast.config import TrainConfig

LOCK_NAME = ".lock"  # held by the run writing in the directory


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
