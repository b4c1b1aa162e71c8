"""The benchmark scripts run end to end at tiny sizes on CPU and write the JSON they promise
(results go to a temporary folder): a benchmark that breaks should break here, not on the GPU
machine's clock."""

from __future__ import annotations

import json
import math
import sys
import time

import pytest
import torch

from bench import (
    bench_buffer,
    bench_envs,
    bench_loss,
    bench_mlp,
    bench_train,
    bench_update,
    harness,
    probe_warp_specialize,
)
from crl_fast import fused_mlp

CASES = {
    "loss": (bench_loss, ["--sizes", "64", "--combos", "2"], {"impl", "median_ms", "status"}),
    "loss-partial": (  # gpu_check's single-pass stages: no combo table, a file of its own
        bench_loss,
        ["--sizes", "64", "--combos", "0", "--name", "loss-partial"],
        {"impl", "median_ms"},
    ),
    "loss-frozen-psi": (  # a file of its own, phi's gradient alone
        bench_loss,
        ["--sizes", "64", "--combos", "2", "--frozen-psi"],
        {"impl", "median_ms", "status", "frozen_psi"},
    ),
    "buffer": (
        bench_buffer,
        ["--capacity", "20", "--num-envs", "4", "--batch", "64", "--txt-envs", "2"],
        {"op", "mode", "us_per_call"},
    ),
    "envs": (
        bench_envs,
        ["--num-envs", "8", "--envs", "point_umaze", "--compiled", "point_umaze"],
        {"env_steps_per_s"},
    ),
    "envs-partial": (  # any benchmark's partial run: a file of its own
        bench_envs,
        ["--num-envs", "8", "--envs", "reacher", "--name", "envs-partial"],
        {"env_steps_per_s"},
    ),
    "update": (bench_update, ["--batch-size", "16"], {"mode", "updates_per_s"}),
    "train": (
        bench_train,
        ["--num-envs", "8", "--env-steps", "10400", "20400"],  # a gap no load noise hides
        {"env_steps_per_s", "updates_per_s", "projected_10M_s"},
    ),
    "probe-ws": (
        probe_warp_specialize,
        ["--batch", "100", "--dim", "16"],
        {"variant", "rel_error", "status"},
    ),
    "mlp": (bench_mlp, ["--batch", "40", "--width", "32"], {"impl", "path", "rel_error", "status"}),
}
FEW_CALLS = {"warmup": 1, "rep": 3}
"""The timed calls a script's rows take here: the scripts' own 20-100 (for a GPU's statistics)
made the interpreted fused MLP's rows most of this file's time; 3 still give the deciles."""
CUDA_ROWS = {bench_loss, bench_buffer, bench_envs, bench_update}
"""The scripts with rows a CPU run leaves out (CUDA graph replays, a second CUDA stream)."""
PROBES = (probe_warp_specialize,)  # no --device: it takes CUDA when there is one
# The cases that run Triton kernels on CPU tensors (the probe only where there is no CUDA).
ON_CPU_KERNELS = {"mlp"} | (set() if torch.cuda.is_available() else {"probe-ws"})


@pytest.fixture(autouse=True)
def keep_matmul_precision():
    """The scripts set float32 matmul precision for their whole process (bench_loss's
    --fp32-precision, TF32 by default; bench_mlp's TF32 on CUDA): run in pytest's, the tests
    after them would compare float32 kernels in TF32 on a GPU."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.interpreter) if n in ON_CPU_KERNELS else n for n in CASES],
)
def test_benchmark_runs_and_writes_its_results(name, tmp_path, monkeypatch, capsys):
    module, argv, keys = CASES[name]
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    if hasattr(module, "measure"):
        measure = harness.measure
        monkeypatch.setattr(module, "measure", lambda fn, **kw: measure(fn, **kw | FEW_CALLS))
    monkeypatch.setattr(sys, "argv", [module.__name__, "--device", "cpu", *argv])
    if module in PROBES:
        monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    module.main()
    (path,) = tmp_path.glob(f"{name}-*.json")
    result = json.loads(path.read_text())
    facts = {"device", "torch", "torch_threads", "cpu", "cpu_count", "git_sha", "date"}
    assert facts <= result["env"].keys()
    assert result["env"]["complete"] is True  # the last write of a run that finished
    assert not list(tmp_path.glob("*.tmp"))  # each write replaced the file whole
    assert result["rows"] and all(keys <= row.keys() for row in result["rows"])
    assert all(row.get("status", "ok") == "ok" for row in result["rows"]), result["rows"]
    for row in result["rows"]:  # every time and rate measured is a positive number (fixed_s
        for key, value in row.items():  # too: set-up and the first 10k steps, which collect only)
            timed = key.endswith(("_per_s", "_ms", "_us", "_s", "us_per_call"))
            if timed and value is not None:
                values = value if isinstance(value, list) else [value]  # wall_s: per repeat
                flat = [v for v in values for v in (v if isinstance(v, list) else [v])]
                assert all(math.isfinite(v) and v > 0 for v in flat), (key, value)
    out = capsys.readouterr().out
    assert "CPU" in out or module in PROBES
    if module in CUDA_ROWS:  # one line says which rows a CPU run leaves out, and why
        assert sum("left out on cpu" in line for line in out.splitlines()) == 1, out
    timed = [row for row in result["rows"] if "median_ms" in row or "us_per_pass" in row]
    assert all(row["calls"] >= 1 and row["timer"] for row in timed)
    assert "timed calls" in out or not timed
    if module is bench_mlp:  # the fused rows ran the kernels (the interpreter's), not the layers
        fused = [row for row in result["rows"] if row["impl"].startswith("fused")]
        assert fused and all(row["path"] == "triton" for row in fused)


def test_a_fused_mode_without_the_kernels_says_the_layers_ran(tmp_path, monkeypatch):
    """``eager+fused`` on a CPU without Triton's interpreter times PyTorch's layers: its row
    says so, rather than passing for the fused kernels' figure."""
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(fused_mlp, "runs_on", lambda device: False)
    argv = ["--device", "cpu", "--batch-size", "16", "--modes", "eager", "eager+fused"]
    monkeypatch.setattr(sys, "argv", ["bench_update", *argv])
    bench_update.main()
    (path,) = tmp_path.glob("update-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [row["mlp"] for row in rows] == ["layers", "layers (no Triton here)"]


def test_a_table_says_what_its_times_are_the_median_of(capsys):
    """A printed time names how many calls it is the median of and how they were timed (the
    JSON row too): a CPU's perf_counter figure is not read as CUDA events'."""
    rows = [harness.measure(lambda: None, device="cpu", warmup=0, rep=n) for n in (3, 7)]
    harness.print_table(rows, ["median_ms"])
    out = capsys.readouterr().out
    assert "median of 3-7 timed calls" in out and "perf_counter" in out
    assert [row["calls"] for row in rows] == [3, 7]


def test_a_crl_fast_loss_row_says_which_backend_ran():
    """On the CPU ``crl_fast`` is the chunked PyTorch path, not the Triton kernels: the row (and
    the table) say so, so that its time is not read as the kernels'."""
    row = bench_loss.run_one("crl_fast", 64, 16, torch.float32, torch.device("cpu"))
    assert row["backend"] == "torch" and row["status"] == "ok"
    assert "backend" not in bench_loss.run_one("eager", 64, 16, torch.float32, torch.device("cpu"))


def test_a_cpu_training_row_shows_no_gpu_target(monkeypatch):
    """The 2-minute target is an H100's: a CPU row leaves it out, as bench_update's do, rather
    than print it beside a CPU projection."""
    monkeypatch.setattr(bench_train, "train_seconds", lambda steps, *args: steps / 1000)
    row = bench_train.bench("eager", (12_800, 25_600), 8, "cpu")
    assert row["target_s"] is None and row["projected_10M_s"] > 0


class _TimeLimit(BaseException):
    """A stage's time limit, as the script sees it: the run stops between two timings."""


CUT = {  # each script's run of two timings or more, stopped at its second
    "loss": (bench_loss, ["--sizes", "64", "--combos", "0"]),
    "buffer": CASES["buffer"][:2],
    "envs": (bench_envs, ["--num-envs", "8", "--envs", "point_umaze", "reacher"]),
    "update": (bench_update, ["--batch-size", "16", "17"]),
    "mlp": CASES["mlp"][:2],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CUT)
def test_a_run_cut_short_keeps_its_rows_and_says_so(name, tmp_path, monkeypatch):
    """gpu_check.sh's stages run under time limits: what was measured before the limit is in
    the JSON, marked incomplete (not mistaken for the full table)."""
    module, argv = CUT[name]
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(sys, "argv", [module.__name__, "--device", "cpu", *argv])
    timings = []

    def measure_until_the_limit(*args, **kwargs):
        if timings:
            raise _TimeLimit
        timings.append(harness.measure(*args, **kwargs))
        return timings[-1]

    monkeypatch.setattr(module, "measure", measure_until_the_limit)
    with pytest.raises(_TimeLimit):
        module.main()
    (path,) = tmp_path.glob(f"{name}-*.json")
    result = json.loads(path.read_text())
    assert len(result["rows"]) == 1  # the row measured before the limit
    assert result["env"]["complete"] is False


class _Benchmark:
    """pytest-benchmark's fixture, as far as the entry points use it: one call."""

    def __init__(self) -> None:
        self.extra_info: dict = {}

    def __call__(self, fn):
        return fn()


@pytest.mark.parametrize(
    "entry",
    [
        lambda b: bench_loss.test_loss_forward_backward(b, "eager", "binary", "dot", 0.0),
        bench_buffer.test_extend_one_step,
    ],
    ids=["loss", "buffer"],
)
def test_benchmark_entry_points_record_their_device(entry):
    """pytest-benchmark's JSON names the host's CPU, not the torch device: the entry points add
    it, so that a run that fell back to the CPU cannot pass for a GPU's."""
    benchmark = _Benchmark()
    entry(benchmark)
    assert benchmark.extra_info["device"] == harness.device_name(bench_loss._DEVICE)


def test_pytest_benchmark_output_names_the_device():
    """``pytest bench --benchmark-only`` prints pytest-benchmark's table, which names no device:
    the session header does, and a CPU's figures are marked as such."""
    from bench import conftest

    header = conftest.pytest_report_header()
    assert harness.device_label(bench_loss._DEVICE) in header
    assert torch.cuda.is_available() or "CPU figures" in header


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        (bench_loss, ["--sizes", "-5"]),
        (bench_loss, ["--combos", "-1"]),
        (bench_loss, ["--impls", "crl_fast-graph"]),  # a CUDA graph on the CPU
        (bench_loss, ["--device", "tpu"]),
        (bench_mlp, ["--width", "0"]),
        (bench_mlp, ["--width", "512"]),  # wider than the fused kernels take
        (bench_buffer, ["--txt-envs", "0"]),
        (bench_envs, ["--threads", "-1"]),
        (bench_update, ["--modes", "graph"]),
        (bench_update, ["--name", "../elsewhere"]),
        (bench_train, ["--env-steps", "1000", "11000"]),  # SHORT before learning starts
        (bench_train, ["--repeats", "0"]),
        (bench_train, ["--modes", "cuda-graph"]),  # a CUDA graph on the CPU
        (probe_warp_specialize, ["--dim", "24"]),
    ],
    ids=lambda x: x.__name__.split(".")[-1] if hasattr(x, "__name__") else " ".join(x),
)
def test_bad_arguments_are_one_line_errors(module, argv, tmp_path, monkeypatch, capsys):
    """Nonsense sizes and CUDA-only settings on the CPU: argparse's one-line error, exit code 2,
    and no results file (not a traceback, nor a run that writes rows of nothing)."""
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    device = [] if module in PROBES or "--device" in argv else ["--device", "cpu"]
    monkeypatch.setattr(sys, "argv", [module.__name__, *device, *argv])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["loss", "buffer", "envs", "update", "train", "mlp"])
def test_scripts_run_without_pytest(name):
    """The main set-up installs no test extra: each script imports and parses without pytest."""
    import subprocess

    code = (
        "import sys, runpy; sys.modules['pytest'] = None; sys.argv = ['x', '--help']; "
        f"runpy.run_module('bench.bench_{name}', run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout


def test_gpu_check_refuses_an_unknown_stage_before_running_any(tmp_path):
    """A misspelt stage costs a second of device time, not the stages before it; the list of
    stages it checks against is the one its ``case`` runs."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = (root / "bench" / "gpu_check.sh").read_text()
    known = set(" ".join(re.findall(r'^KNOWN\+?="([^"]*)"', script, re.MULTILINE)).split())
    cases = re.findall(r"^ {8}([a-z0-9|-]+)\)", script, re.MULTILINE)
    assert known == {name for case in cases for name in case.split("|")}
    for stages in (["loss", "singel"], ["update update-bf16"]):  # two names in one argument
        done = subprocess.run(
            ["bash", "bench/gpu_check.sh", *stages],
            cwd=root,
            env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and f"unknown stage '{stages[-1]}'" in done.stderr
        assert not (tmp_path / "out").exists()  # nothing ran, not even the log's header


def test_gpu_check_refuses_stages_needing_gymnasium_without_it(tmp_path):
    """The GPU machine has no gymnasium unless .whl is carried: the stages that import it (the
    tests' collection, envs, train) are refused before any stage spends device time."""
    import subprocess
    from pathlib import Path

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\nexit 1\n")  # a Python without gymnasium
    (fake / "python3").chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "loss", "envs"],
        cwd=root,
        env={"PATH": f"{fake}:/usr/bin:/bin", "OUT": str(tmp_path / "out")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "stage 'envs' needs gymnasium" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing ran, not even the loss stage


def _gpu_check_copy(tmp_path) -> dict:
    """subprocess.run's arguments for gpu_check.sh in a copy of its tree, with a python3 that
    does nothing (the stages that pass its checks run it; the checkout is left alone) and
    $OUT under ``tmp_path``."""
    import shutil
    from pathlib import Path

    tree = tmp_path / "tree"
    (tree / "bench" / "results").mkdir(parents=True)
    (tree / "crl_fast").mkdir()
    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "bench" / "gpu_check.sh", tree / "bench")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\nexit 0\n")
    (fake / "python3").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "OUT": str(tmp_path / "out")}
    return {"cwd": tree, "env": env, "capture_output": True, "text": True, "timeout": 60}


def test_gpu_check_refuses_more_result_files_than_out_returns(tmp_path):
    """$OUT returns 8 files, the log one of them, and every stage but compile, tests and rest
    writes a result JSON of its own: a ninth file would come back missing after the device time
    was spent, so such a list is refused before any stage runs (a repeated stage counts once:
    it rewrites its file; compile, tests and rest count none)."""
    import subprocess

    run = _gpu_check_copy(tmp_path)
    writers = ["loss", "tma", "single", "single256", "frozen", "fp16", "jax", "update"]
    done = subprocess.run(["bash", "bench/gpu_check.sh", "compile", *writers], **run)
    assert done.returncode == 2 and "8 result files" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()  # nothing ran, not even the log's header
    stages = [*writers[:7], "loss", "tests", "rest"]
    done = subprocess.run(["bash", "bench/gpu_check.sh", *stages], **run)
    assert "result files" not in done.stderr and (tmp_path / "out" / "log.txt").exists()


@pytest.mark.parametrize("knows_reasons", [True, False], ids=["driver-535", "older-driver"])
def test_gpu_check_logs_the_gpus_clocks_after_each_stage(tmp_path, knows_reasons):
    """Clocks, temperature, power and the reasons the clocks are held down, read after every
    stage (read-only queries): a stage timed on a throttled or idle-clocked GPU shows in the
    log, not only the idle clock read before the first stage. A driver without
    clocks_event_reasons (it prints an error on stdout and fails) still gives the rest."""
    import subprocess

    run = _gpu_check_copy(tmp_path)
    calls = tmp_path / "nvidia-smi-calls"
    smi = tmp_path / "bin" / "nvidia-smi"
    unknown = "" if knows_reasons else 'case "$*" in *event_reasons*) echo no; exit 2;; esac\n'
    smi.write_text(f'#!/bin/sh\necho "$*" >>{calls}\n{unknown}echo 1980 MHz\n')
    smi.chmod(0o755)
    subprocess.run(["bash", "bench/gpu_check.sh", "buffer", "loss"], **run)
    log = (tmp_path / "out" / "log.txt").read_text()
    after = [part.split("===")[0] for part in log.split(": exit 0")[1:]]  # each stage's end
    state = "1980 MHz" if knows_reasons else "1980 MHz (no event reasons)"
    assert len(after) == 2 and all(f": {state}\n" in text for text in after), log
    queries = calls.read_text().splitlines()
    assert all("clocks.sm" in q and "--format" in q for q in queries), queries


def test_cuda_results_record_the_l2_size_and_multiprocessors(monkeypatch):
    """Calls are timed back to back with no cache flush: the L2 size in a CUDA result says which
    problems stayed in it between calls (d = 64 bf16 inputs fit in 50 MB up to B = 65,536)."""
    from types import SimpleNamespace

    props = SimpleNamespace(multi_processor_count=132, L2_cache_size=50 * 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    env = harness.environment("cuda")
    assert (env["sm_count"], env["l2_cache_mb"]) == (132, 50.0)
    assert "l2_cache_mb" not in harness.environment("cpu")


def test_keep_busy_calls_its_work_until_the_time_passed():
    """The wake before a timing (``measure``'s on CUDA, jax_baselines' after XLA's compile, whose
    tests need JAX): ``work`` is called again and again until ``seconds`` passed."""
    calls = []
    t0 = time.perf_counter()
    harness.keep_busy(lambda: calls.append(1), seconds=0.05)
    assert time.perf_counter() - t0 >= 0.05 and len(calls) > 1


class _FakeCuda:
    """``torch.cuda`` as far as the harness calls it, on a machine without CUDA: a current device
    that ``torch.cuda.device`` switches, and a log of the device each event is recorded on, each
    stream is made on, each graph captures on, each synchronize waits for and each timed call
    runs on (``call``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import contextlib

        self.current = 0
        self.log: list[tuple[str, int]] = []
        fake = self

        def index(device: object) -> int:
            found = torch.device("cuda", device) if isinstance(device, int) else device
            found = torch.device(found) if found is not None else None
            return fake.current if found is None or found.index is None else found.index

        class Stream:
            def __init__(self, device: object = None) -> None:
                self.device_index = index(device)
                fake.log.append(("stream", self.device_index))

            def wait_stream(self, other: Stream) -> None:
                pass

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                pass

            def record(self, stream: Stream | None = None) -> None:
                fake.log.append(("event", index(None if stream is None else stream.device_index)))

            def synchronize(self) -> None:
                pass

            def elapsed_time(self, end: Event) -> float:
                return 1.0

        @contextlib.contextmanager
        def switch(device: object):
            before, fake.current = fake.current, index(device)
            try:
                yield
            finally:
                fake.current = before

        class CUDAGraph:
            device = -1

            def replay(self) -> None:  # on the device it captured on, as torch's replay
                with switch(self.device):
                    fake.call()

        @contextlib.contextmanager
        def graph(cuda_graph: CUDAGraph):
            fake.log.append(("capture", fake.current))
            cuda_graph.device = fake.current
            yield

        def synchronize(device: object = None) -> None:
            fake.log.append(("synchronize", index(device)))

        patches = {
            "device": switch,
            "stream": lambda stream: switch(stream.device_index),
            "current_device": lambda: fake.current,
            "current_stream": lambda device=None: Stream(device),
            "Stream": Stream,
            "Event": Event,
            "CUDAGraph": CUDAGraph,
            "graph": graph,
            "synchronize": synchronize,
            "reset_peak_memory_stats": lambda device=None: None,
            "memory_allocated": lambda device=None: 0,
            "max_memory_allocated": lambda device=None: 0,
        }
        for name, value in patches.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def call(self) -> None:
        """A timed call: it logs the device current when it runs."""
        self.log.append(("call", self.current))


def test_the_harness_times_the_cuda_device_it_is_given(monkeypatch):
    """``--device cuda:1``: the events bracket the calls on cuda:1's stream, the syncs wait for
    cuda:1, graphs capture there and the kernels are counted there, and cuda:0 is current again
    after (with cuda:0's events the timings would be of nothing: cuda:1's work is not on that
    stream)."""
    import contextlib
    from types import SimpleNamespace

    cuda = _FakeCuda(monkeypatch)
    monkeypatch.setitem(harness._BUSY_UNTIL, torch.device("cuda:1"), time.perf_counter())  # awake
    no_events = SimpleNamespace(events=lambda: [])  # the profiler, which needs CUDA to start
    monkeypatch.setattr(harness, "profile", lambda **kw: contextlib.nullcontext(no_events))
    harness.measure(cuda.call, device="cuda:1", warmup=1, rep=2)
    harness.graphed(cuda.call, "cuda:1")()
    harness.cuda_kernels(cuda.call, "cuda:1")
    kinds = {kind for kind, _ in cuda.log}
    assert kinds == {"event", "synchronize", "call", "stream", "capture"}, cuda.log
    assert all(device == 1 for _, device in cuda.log), cuda.log
    assert cuda.current == 0


def test_a_training_timing_on_another_device_waits_for_that_device(monkeypatch):
    """bench_train's wall time of a run on cuda:1 ends when cuda:1 has done its work, not
    cuda:0 (which is current: train() makes cuda:1 current only for the run)."""
    import crl_fast.train

    cuda = _FakeCuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(crl_fast.train, "train", lambda config: cuda.call())
    assert bench_train.train_seconds(1000, "eager", 8, "cuda:1") > 0
    assert ("synchronize", 1) in cuda.log and ("synchronize", 0) not in cuda.log, cuda.log


def test_a_bare_cuda_device_samples_with_the_current_devices_generator(monkeypatch):
    """The graph rows of bench_update and bench_buffer sample with the default generator of the
    device they time: for a bare ``--device cuda`` with cuda:1 current, cuda:1's (cuda:0's, from
    its index None read as 0, is refused by a buffer on cuda:1)."""
    cuda = _FakeCuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    generators = (torch.Generator(), torch.Generator())  # stand-ins for cuda:0's and cuda:1's
    monkeypatch.setattr(torch.cuda, "default_generators", generators)
    cuda.current = 1
    assert harness.default_generator("cuda") is generators[1]
    assert harness.default_generator(torch.device("cuda:0")) is generators[0]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_timing_on_the_second_gpu_times_its_work():
    """On a real cuda:1, with cuda:0 current: the events bracket cuda:1's work (cuda:0's would
    time an idle stream, microseconds for milliseconds of matmuls), a graph captured for cuda:1
    replays its work there and the profiler counts its kernels."""
    torch.cuda.set_device(0)
    x = torch.randn(4096, 4096, device="cuda:1") / 64
    y = torch.zeros_like(x)

    def work() -> None:
        for _ in range(8):
            torch.matmul(x, x, out=y)

    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        work()
        torch.cuda.synchronize(1)
        walls.append((time.perf_counter() - t0) * 1e3)
    timing = harness.measure(work, device="cuda:1", warmup=1, rep=3)
    assert timing["median_ms"] > 0.5 * min(walls), (timing, walls)
    replay = harness.graphed(lambda: torch.matmul(x, x, out=y), "cuda:1")
    y.zero_()
    replay()
    torch.cuda.synchronize(1)
    torch.testing.assert_close(y, x @ x)
    kernels = harness.cuda_kernels(work, "cuda:1")
    assert not kernels or kernels["kernels_per_update"] >= 8  # {} where CUPTI records nothing
    assert torch.cuda.current_device() == 0


def test_an_eager_update_call_is_a_block_of_updates(monkeypatch):
    """The eager and compile modes time ``updates_per_call`` updates back to back in a call (one
    sync after them on CUDA: each update launches while the GPU runs the last, as in training),
    the last with the critic's metrics, as a graph's and as the training loop asks for them
    (only for the update it logs); the rate is per update."""
    from crl_fast.agent import CRL

    flags: list[bool] = []
    update = CRL.update
    monkeypatch.setattr(
        CRL,
        "update",
        lambda self, batch, critic_metrics=True, *args: (
            flags.append(critic_metrics) or update(self, batch, critic_metrics, *args)
        ),
    )
    calls = []

    def measure(fn, **kwargs):
        flags.clear()
        fn()
        calls.append(list(flags))
        return harness.measure(fn, **kwargs | FEW_CALLS)

    monkeypatch.setattr(bench_update, "measure", measure)
    row = bench_update.bench("eager", 16, torch.device("cpu"), 4)
    assert calls == [[False, False, False, True]]
    assert row["updates_per_call"] == 4 and row["timed_call"] == "4 updates, run back to back"
    assert row["updates_per_s"] == pytest.approx(4e3 / row["median_ms"])


def _spy_env_steps(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The actions of every env step taken from now on (bench_envs' envs are torch envs)."""
    from crl_fast.envs import TorchGoalVectorEnv

    actions: list[torch.Tensor] = []
    step = TorchGoalVectorEnv.step
    monkeypatch.setattr(
        TorchGoalVectorEnv,
        "step",
        lambda self, action: actions.append(action.clone()) or step(self, action),
    )
    return actions


def test_an_env_call_is_a_block_of_steps(monkeypatch):
    """bench_envs times ``steps_per_call`` steps back to back in a call, each with its own
    actions (one sync after them on CUDA: a collection loop does not wait for the GPU after each
    step); the rate and the time per step are per step."""
    actions = _spy_env_steps(monkeypatch)
    calls = []

    def measure(fn, **kwargs):
        actions.clear()
        fn()
        calls.append(len({tuple(a.flatten().tolist()) for a in actions}))
        return harness.measure(fn, **kwargs | FEW_CALLS)

    monkeypatch.setattr(bench_envs, "measure", measure)
    row = bench_envs.bench("point_umaze", 8, "cpu", steps_per_call=4)
    assert calls == [4]  # four steps, four different actions
    assert row["steps_per_call"] == 4 and row["timed_call"] == "4 steps, run back to back"
    assert row["env_steps_per_s"] == pytest.approx(8 * 4e3 / row["median_ms"])
    assert row["us_per_step"] == pytest.approx(row["median_ms"] * 1e3 / 4)


def test_an_env_graph_replays_a_block_of_steps(monkeypatch):
    """bench_envs' graph rows capture ``steps_per_call`` steps in the graph a call replays (with
    the fake torch.cuda: two warm-up blocks on a side stream, then the captured one)."""
    cuda = _FakeCuda(monkeypatch)
    actions = _spy_env_steps(monkeypatch)
    row = bench_envs.bench_graphed("point_umaze", 8, "cpu", steps_per_call=4)
    assert ("capture", 0) in cuda.log and len(actions) == 3 * 4
    assert row["steps_per_call"] == 4 and row["timed_call"] == "4 steps, one CUDA graph replay"
    assert row["env_steps_per_s"] == pytest.approx(8 * 4e3 / row["median_ms"])


def test_a_block_of_no_calls_is_refused():
    """``back_to_back`` of 0 calls would time nothing and return nothing: a ValueError."""
    with pytest.raises(ValueError, match="calls must be a positive int, got 0"):
        harness.back_to_back(lambda i: i, 0)
