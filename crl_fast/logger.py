"""Run outputs: metrics to JSONL and CSV (and TensorBoard if installed), a status line, a PNG curve.

``metrics.jsonl`` is the record of truth, appended one row per log call, strict JSON (a NaN
or infinite value is ``null``); ``metrics.csv`` is regenerated from it on
:meth:`MetricsLogger.flush` because train and eval rows carry different columns. matplotlib and
TensorBoard are optional and imported only when used.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from crl_fast.checkpoint import write_atomically

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

CURVE_PANELS = {  # the metrics curve.png draws, with their y axes' labels
    "eval/success": "episodes reaching the goal (fraction)",
    "eval/final_distance": "last step's distance to the goal (env units)",
    "critic/categorical_accuracy": "rows whose top logit is the positive (fraction)",
    "critic/loss": "critic loss (one update's batch)",
}


class MetricsLogger:
    """Appends ``{"step": ..., **metrics}`` rows to ``run_dir/metrics.jsonl`` (and TensorBoard).
    Without ``resume_step`` it refuses a non-empty ``metrics.jsonl``: those rows are another
    run's, not its to drop. The rows stay on disk, not in memory (a long run logs hundreds of
    thousands); ``row_count`` counts them.

    With ``resume_step`` set, the rows a run killed after its last checkpoint logged are
    dropped, so a resumed run's metrics hold each row once: the first ``resume_rows`` rows (the
    count that checkpoint recorded; rows logged at its step after it was written go too), or
    for checkpoints without that count the rows up to ``resume_step``. The file is rewritten
    atomically (:func:`crl_fast.checkpoint.write_atomically`), so a crash meanwhile leaves the
    old one whole; so is ``metrics.csv``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = True,
        resume_step: int | None = None,
        resume_rows: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.csv_path = self.run_dir / "metrics.csv"
        if resume_step is None and self.jsonl_path.exists() and self.jsonl_path.stat().st_size:
            raise ValueError(
                f"{self.jsonl_path} holds another run's metrics: give resume_step to continue "
                "that run, or log to another directory"
            )
        rows = read_jsonl(self.jsonl_path) if resume_step is not None else []
        rows = [r for r in rows if r["step"] <= (resume_step or 0)][:resume_rows]
        rows = [_finite_or_null(r) for r in rows]  # an older file's NaN / Infinity
        write_atomically(self.jsonl_path, "".join(_json_line(r) for r in rows))
        self.row_count = len(rows)
        self._file = open(self.jsonl_path, "a")  # noqa: SIM115 (open for the run's lifetime)
        purge = 0 if resume_step is None else resume_step + 1
        self._tb = _summary_writer(self.run_dir, purge) if tensorboard else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` (plain floats) at environment step ``step``; a non-finite value
        as ``None`` (TensorBoard gets it as it is)."""
        row = _finite_or_null({"step": step, **metrics})
        self._file.write(_json_line(row))
        self.row_count += 1
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)

    def flush(self) -> None:
        """Rewrite ``metrics.csv`` from every row so far (columns: the union of all keys)."""
        rows = self.read_rows()
        columns = list(dict.fromkeys(k for row in rows for k in row))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_atomically(self.csv_path, text.getvalue())
        if self._tb is not None:
            self._tb.flush()

    def read_rows(self) -> list[dict[str, Any]]:
        """Every row logged so far, read back from ``metrics.jsonl``."""
        return read_jsonl(self.jsonl_path)

    def close(self) -> None:
        """Write ``metrics.csv``, then :meth:`release` the files."""
        self.flush()
        self.release()

    def release(self) -> None:
        """Close ``metrics.jsonl`` and TensorBoard without rewriting ``metrics.csv`` (a run that
        failed: its CSV stays as its last checkpoint wrote it); again, nothing."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _finite_or_null(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its NaN and infinite floats ``None``: Python's ``json`` writes them as
    ``NaN`` / ``Infinity``, which are not JSON (``jq`` and JavaScript refuse the line)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def _json_line(row: dict[str, Any]) -> str:
    """One strict-JSON line (``allow_nan=False``: a non-finite value raises, never slips in)."""
    return json.dumps(row, allow_nan=False) + "\n"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file (empty if it does not exist). A torn last line (a write cut
    short by a crash or a full disk) is left out; a bad line before it is a ValueError."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {error}") from error
    return rows


def _summary_writer(run_dir: Path, purge_step: int) -> SummaryWriter | None:
    """A TensorBoard writer whose session start purges the events at ``purge_step`` and after (on
    resume, a killed run's steps past its checkpoint). A new run's writer starts a session too,
    at step 0: TensorBoard's Python reader (``--load_fast=false``) takes a run's first session
    start as no restart, so without it the first resume purged nothing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        print("tensorboard is not installed: skipping the TensorBoard logs", file=sys.stderr)
        return None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)


def plot_curve(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Save a PNG of success, final distance and critic metrics against environment steps
    (a value that is ``None``, as a non-finite one is logged, or not finite is left out).

    Returns the path, or ``None`` (with a message) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the learning-curve PNG", file=sys.stderr)
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (key, label) in zip(axes.flat, CURVE_PANELS.items(), strict=True):
        points = [
            (r["step"], v) for r in rows if (v := r.get(key)) is not None and math.isfinite(v)
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None)
        if key == "eval/success":
            _shade_interval(ax, rows)
        ax.set_title(key)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("environment steps")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _shade_interval(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Shade the success's 95% interval of the rows that have one (a resumed run's curve may hold
    rows of a version that logged none), so the curve shows which changes its episodes resolve."""
    band = [
        (r["step"], low, high)
        for r in rows
        if (low := r.get("eval/success_ci95_low")) is not None
        and (high := r.get("eval/success_ci95_high")) is not None
    ]
    if band:
        ax.fill_between(
            *zip(*band, strict=True), color="C0", alpha=0.2, label="95% Wilson interval"
        )
        ax.legend(loc="lower right")


class Progress:
    """A one-line status (env steps/s, updates/s, the run's time, latest metrics), redrawn at
    most every second. Its rates are wall-clock over the time since the previous redraw,
    evaluations and checkpoints included (the logged ``charts/sps`` leaves them out).

    On a terminal the line is redrawn in place; otherwise a new line is printed every 30 s.
    ``elapsed_s``: the run's time before this part (a resumed run's), counted in its time.
    """

    def __init__(
        self,
        total_steps: int,
        enabled: bool = True,
        stream: TextIO | None = None,
        elapsed_s: float = 0.0,
    ) -> None:
        self.total_steps = total_steps
        self.enabled = enabled
        # sys.stdout when called, not when imported: it may have been replaced since
        # (contextlib.redirect_stdout, a notebook, pytest's capture).
        self.stream = sys.stdout if stream is None else stream
        self.tty = self.stream.isatty()
        self.interval = 1.0 if self.tty else 30.0
        self._start_time = time.perf_counter() - elapsed_s
        self._last: tuple[float, int, int] | None = None  # time, steps, updates of the last redraw

    def update(self, steps: int, updates: int, info: str = "") -> None:
        """Report progress; rates are averaged since the previous redraw."""
        now = time.perf_counter()
        last, self._last = self._last, (now, steps, updates)
        if last is None:
            return
        if now - last[0] < self.interval:
            self._last = last
            return
        dt = now - last[0]
        env_sps, ups = (steps - last[1]) / dt, (updates - last[2]) / dt
        if self.enabled:
            line = (
                f"{steps:>11,}/{self.total_steps:,} steps  {env_sps:8,.0f} env steps/s  "
                f"{ups:7,.1f} updates/s  {now - self._start_time:6.0f}s  {info}"
            )
            self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
