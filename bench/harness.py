"""Shared benchmark harness: timing, peak memory, environment facts, JSON results, tables.

Each bench script defines only its setup and calls :func:`measure`; results go to
``bench/results/<name>-<device>.json`` with the device, versions, git SHA and date inside.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

from crl_fast.checkpoint import versions
from crl_fast.checks import on_device, resolve_device

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def positive_int(text: str) -> int:
    """argparse type of sizes, counts and threads: an integer >= 1 (0 is no size)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def count(text: str) -> int:
    """argparse type of a count that may be 0 (e.g. no loss combos): an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def results_name(text: str) -> str:
    """argparse type of ``--name``: a file name under bench/results/ (no folders)."""
    if not text or set(text) & set("/\\") or text.startswith("."):
        raise argparse.ArgumentTypeError(f"must be a file name under bench/results/, got {text!r}")
    return text


def add_name_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--name``: the results file's name, ``default`` (described) unless given."""
    parser.add_argument(
        "--name",
        type=results_name,
        help=f"results file bench/results/<name>-<device>.json (default: {default}); give a "
        "partial run a name of its own, or it replaces the full table",
    )


def device(text: str) -> str:
    """argparse type of ``--device``: cpu or a CUDA device this machine has (else a one-line
    error, not a traceback from the first tensor made there)."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from error
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"the benchmarks run on cpu or cuda, got {text!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return "cpu" if parsed.type == "cpu" else text


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``, CUDA by default where there is one."""
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", type=device, default=default, help=f"default: {default}")


class _MedianAndDeciles(TypedDict):
    median_ms: float
    p20_ms: float
    p80_ms: float
    calls: int
    timer: str


class Timing(_MedianAndDeciles, total=False):
    """What :func:`measure` returns: median, p20 and p80 of ``calls`` timed calls and the
    ``timer`` always; ``host_ms`` and ``peak_mem_mb`` on CUDA only (``peak_mem_mb`` None with
    ``memory=False``)."""

    host_ms: float
    peak_mem_mb: float | None


TIMERS = {
    "cuda": "CUDA events around each call, synchronised after it",
    "cpu": "time.perf_counter around each call",
}
"""How :func:`measure` times one call on each device type (recorded in each row it times)."""


def measure(
    fn: Callable[[], Any],
    *,
    device: torch.device | str,
    warmup: int = 5,
    rep: int = 30,
    memory: bool = True,
) -> Timing:
    """Time ``fn`` ``rep`` times after ``warmup`` calls; median/p20/p80 in ms, peak memory in MB.

    On CUDA ``device`` is current for the timing, each call is bracketed by CUDA events on its
    current stream (the device is synchronised before reading them) and ``host_ms`` is the
    median time the call takes to return (the host's share: launches, Python; where it is close
    to ``median_ms`` the call is host-bound); on CPU calls are timed by ``time.perf_counter``.
    Peak memory is the extra device memory the calls allocate; None with ``memory=False`` (a
    CUDA graph's replay allocates nothing: its memory is the graph's pool).
    Calls run back to back on the same inputs, with no cache flush: what fits in L2 (the result
    JSON records its size) is read from there by the next call, as a training step reads the
    encoders' outputs it has just written.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    with on_device(device):  # events record on, and kernels launch to, the current device
        for _ in range(warmup):
            fn()
        if cuda:
            _wake(device)  # after the warm-up calls, which may have compiled on the host for long
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        times, host = [], []
        for _ in range(rep):
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                t0 = time.perf_counter()
                fn()
                host.append((time.perf_counter() - t0) * 1e3)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
    # inclusive: the deciles lie within what was measured (3 runs at the largest sizes)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    out: Timing = {
        "median_ms": statistics.median(times),
        "p20_ms": q[1],
        "p80_ms": q[7],
        "calls": rep,
        "timer": TIMERS[device.type],
    }
    if cuda:
        out["host_ms"] = statistics.median(host)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        out["peak_mem_mb"] = peak if memory else None
        _BUSY_UNTIL[device] = time.perf_counter()
    return out


_BUSY_UNTIL: dict[torch.device, float] = {}
"""When each GPU last finished a timing: a gap of more than a second may have let it idle."""

WAKE_S = 0.25
"""Seconds of work before a timing that follows idle time, so that the GPU is at its working
clocks (on the H200, 2026-11-28, the first row of a buffer run took 161 us and the same kind of
call later in the run 96 us)."""


def keep_busy(work: Callable[[], Any], seconds: float = WAKE_S) -> None:
    """Call ``work`` (which must block until the device has done it) until ``seconds`` passed."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        work()


def _wake(device: torch.device) -> None:
    """Keep the GPU busy for :data:`WAKE_S` before a timing that follows an idle second (the
    first of a process, or one after a long host-side compile)."""
    if time.perf_counter() - _BUSY_UNTIL.get(device, float("-inf")) < 1.0:
        return
    x = torch.randn(4096, 4096, device=device)

    def work() -> None:
        torch.tanh(x @ x, out=x)
        torch.cuda.synchronize(device)

    keep_busy(work)


T = TypeVar("T")


def back_to_back(step: Callable[[int], T], calls: int) -> Callable[[], T]:
    """One timed call of ``step(0)``, ..., ``step(calls - 1)`` with no sync between them
    (:func:`measure` syncs once, after the last): each step's launches overlap the GPU's work on
    the one before, as in a training or collection loop (one step per sync would add the GPU's
    time to the host's). Returns the last step's result."""
    if calls < 1:
        raise ValueError(f"calls must be a positive int, got {calls!r}")

    def block() -> T:
        for i in range(calls - 1):
            step(i)
        return step(calls - 1)

    return block


def timed_call(calls: int, what: str, device: torch.device | str, *, graph: bool) -> str:
    """A row's ``timed_call``: one timed call is ``calls`` ``what`` (``"steps"``), replayed from
    a CUDA graph or a :func:`back_to_back` block."""
    if graph:
        how = "one CUDA graph replay"
    elif torch.device(device).type == "cpu":
        how = "run back to back"
    else:
        how = "launched back to back, one sync after them"
    return f"{calls} {what}, {how}"


def graphed(step: Callable[[], Any], device: torch.device | str) -> Callable[[], None]:
    """``step`` captured in a CUDA graph on ``device`` (warmed up on a side stream first):
    returns its replay, whose timing is the GPU work alone, without the host's launches."""
    with on_device(torch.device(device)):  # torch.cuda.graph captures on the current device
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    return graph.replay  # a replay runs on the device it was captured on


def default_generator(device: torch.device | str) -> torch.Generator:
    """The default CUDA generator of ``device``, a bare ``cuda``'s being the current device's
    (not cuda:0's): what a graph captured there samples with (a buffer's own generator would
    have to be registered with the graph)."""
    index = resolve_device(device).index
    assert index is not None  # resolve_device gives a CUDA device its index
    return torch.cuda.default_generators[index]


def cuda_kernels(fn: Callable[[], Any], device: torch.device | str, per: str = "update") -> dict:
    """The CUDA kernels (and memsets / copies) one call of ``fn`` (one ``per``) launches on
    ``device``, from the profiler: what a CUDA graph of it replays. Their count, their summed
    GPU time (next to a graph's time per call it shows how much is launch gaps and waiting) and
    the heaviest by name. Empty where the profiler fails or records no CUDA activity."""
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof, on_device(torch.device(device)):
            fn()
            torch.cuda.synchronize(device)
    except RuntimeError:
        return {}
    total: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = total.setdefault(e.name[:80], [0, 0.0])
            entry[0] += 1
            entry[1] += e.time_range.elapsed_us()
    if not total:  # no CUDA activity recorded (CUPTI unavailable): unknown, not zero kernels
        return {}
    heaviest = sorted(total.items(), key=lambda kv: -kv[1][1])[:10]
    return {
        f"kernels_per_{per}": sum(n for n, _ in total.values()),
        f"kernel_us_per_{per}": sum(us for _, us in total.values()),
        "heaviest_kernels": [[name, n, round(us, 1)] for name, (n, us) in heaviest],
    }


def device_name(device: torch.device | str) -> str:
    """The GPU's marketing name, or ``cpu-<processor>`` on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}"


def run_facts() -> dict[str, Any]:
    """Python version, host CPU and threads, git SHA, date, command line and the settings read
    from the environment (``CRL_FAST_*``, ``TORCHINDUCTOR_*``, ``TRITON_*``, ``OMP_*``,
    ``MKL_*``, ``XLA_*``: JAX's CPU threads) of this run; any framework's results carry them."""
    prefixes = ("CRL_FAST_", "TORCHINDUCTOR_", "TRITON_", "OMP_", "MKL_", "XLA_")
    return {
        "python": platform.python_version(),
        "cpu": _cpu_model(),  # the host: it launches the kernels, and times the CPU rows
        "cpu_count": os.cpu_count(),
        "git_sha": versions()["crl_fast_git"] or "unknown",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "env_vars": {k: v for k, v in sorted(os.environ.items()) if k.startswith(prefixes)},
    }


def _cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str) -> dict[str, Any]:
    """Facts that make a number reproducible: device, versions, git SHA, date; on CUDA the
    multiprocessors and the L2 size (no flush between timed calls: what fits stays there)."""
    found = versions()
    facts = {
        "device": device_name(device),
        "crl_fast": found["crl_fast"],
        "torch": found["torch"],
        "cuda": torch.version.cuda,
        "triton": found["triton"],
        "torch_threads": torch.get_num_threads(),
        **run_facts(),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts["sm_count"] = props.multi_processor_count
        facts["l2_cache_mb"] = props.L2_cache_size / 2**20
    return facts


def write_results(
    name: str,
    device: torch.device | str,
    rows: Sequence[dict],
    extra: dict | None = None,
    *,
    complete: bool = True,
) -> Path:
    """Write ``rows`` with the environment (and ``extra`` settings) to
    ``bench/results/<name>-<device>.json``; ``complete=False`` while the run has rows to come."""
    return save_results(name, environment(device) | (extra or {}), rows, complete=complete)


def save_results(
    name: str, env: dict[str, Any], rows: Sequence[dict], *, complete: bool = True
) -> Path:
    """Write ``rows`` with ``env`` (which names the ``device``) to
    ``bench/results/<name>-<device>.json``.

    The scripts write after every row, so that a run stopped by a time limit keeps its rows:
    ``env["complete"]`` is False in such a file (True only in the last write of a run that
    finished), and the file is replaced whole (a kill while writing leaves the last one).
    """
    slug = env["device"].lower().replace(" ", "-").replace("/", "-")
    path = RESULTS_DIR / f"{name}-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"env": env | {"complete": complete}, "rows": list(rows)}, indent=2)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text + "\n")
    partial.replace(path)
    return path


def tuned_configs() -> dict[str, dict[str, int]]:
    """The loss kernels' tiles autotuned so far (``CRL_FAST_AUTOTUNE=1``), keyed by the problem
    they were tuned for: what a result file records of such a run."""
    from crl_fast.kernels.pair_stats_tiling import _TUNED

    return {repr(key): config for key, config in _TUNED.items()}


def device_label(device: torch.device | str) -> str:
    """How a table's title names its device: a CUDA device by name, the CPU with its threads and
    a warning that its figures are not GPU figures."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads [CPU figures, not GPU]"


def note_cuda_only(device: torch.device | str, rows: str) -> None:
    """Print one line naming the ``rows`` a run on ``device`` other than CUDA leaves out, and
    why: a CPU table would otherwise pass for the whole benchmark."""
    if torch.device(device).type != "cuda":
        print(f"left out on {torch.device(device).type}: {rows}")


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str = "") -> None:
    """Print ``rows`` as an aligned text table of ``columns``."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[k]) for row in cells)]) for k, c in enumerate(columns)]
    if title:
        print(title)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    if note := timing_note(rows):
        print(note)


def timing_note(rows: Sequence[dict]) -> str:
    """What a table's timed figures are: the median of how many calls, by which timer (from
    the rows :func:`measure` timed; empty where none was)."""
    calls = sorted({row["calls"] for row in rows if "calls" in row})
    timers = sorted({row["timer"] for row in rows if "timer" in row})
    if not calls:
        return ""
    count = f"{calls[0]}" if len(calls) == 1 else f"{calls[0]}-{calls[-1]}"
    return f"each time: the median of {count} timed calls after warm-up ({'; '.join(timers)})"
