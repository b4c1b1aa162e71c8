#!/usr/bin/env bash
# Device check in one call (the default stages' limits sum to 460 s: with the machine's start,
# about 10 of a session's 15 device minutes, leaving time to rerun a stage): run the GPU tests
# and the benchmarks from this checkout, copy the result JSONs to $OUT.
# Stages: tests loss update buffer (the default, in that order; update includes the
# fused-network modes), and opt-in: probe, single (the sigmoid loss in one pass, dpsi through
# atomics, CRL_FAST_SINGLE_PASS=1, on 128-row programs), single256 (the same on 256-row
# programs: half the atomics), envs, mlp, jax, compile, tma, fp16, frozen, train, autotune,
# update-bf16, update-autotune, update-maxtune and rest; a stage name not in this list is refused
# before anything runs. A stage's limit may cut its benchmark short on purpose:
# every script writes its JSON after each row ("complete": false until its last) and runs the
# issues' targets first (the loss stage: crl-fast's bf16 d = 64 rows and every loss, then eager
# and torch.compile, whose graphs take ~20 s each, then the d = 256 and float32 tables, where
# 90 s end; `bench_loss` alone runs them all).
# - fp16 times float16 against bfloat16 (float16's gradient products run in tf32).
# - frozen times the loss with psi needing no gradient (LiT's locked tower), every loss: the pass
#   that only dpsi needs is skipped (compare with the loss stage's rows).
# - tma times the loss with CRL_FAST_TMA=1, the copy-engine tile loads (about a minute).
# - train runs three trainings per mode (2-4 minutes).
# - autotune compiles many tile variants (a call of its own).
# - update-bf16 times the update's +bf16 modes (AgentConfig(amp="bfloat16"): matmuls and loss
#   under autocast).
# - update-autotune times the compiled update with the loss kernels' tiles tuned per shape (at
#   batch 256 the default 64-row tiles give 4 programs).
# - update-maxtune compiles the update with inductor's max-autotune, whose Triton GEMM templates
#   can fuse bias and activation into the matmuls (inductor on CPU makes 33 matmul calls and 31
#   fused pointwise kernels per update; the update stage counts the GPU's kernels).
# - probe times the loss row pass with TMA loads and warp specialization (seconds).
# - mlp times one encoder pass (forward; forward + weight gradients), the fused MLP kernels (16-
#   and 32-row programs) against PyTorch's layers, float32 and bf16 autocast; counts kernels.
# `jax` times JaxGCRL-style JAX/XLA baselines on the same GPU (bench/jax_baselines.py); the GPU
# image already has JAX with CUDA (no flax / optax, which the baselines do not need).
# `tests` runs the GPU tests in 8 pytest-xdist workers (the image has pytest-xdist) so that the
# Triton and inductor compiles of the many kernel variants overlap on the CPU cores.
# `compile` builds every kernel variant on all CPU cores (tests/compile_kernels.py).
# `rest` runs the README's test command's other tests (not gpu-marked) on the GPU machine, where
# TRITON_INTERPRET is unset and the interpreter-marked ones skip: a GPU user's full run passes.
#
# The GPU machine has torch, triton and numpy but no gymnasium and no network (without it the
# stages tests, rest, envs and train are refused). Before the call, here (.whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 --platform any \
#     -d .whl gymnasium farama-notifications
# then call the device tool's run with carry [".whl"]:
#   CRL_FAST_GIT_SHA=<git describe --always --dirty, run here> bash bench/gpu_check.sh [stages...]
# (the copied tree has no .git; the SHA goes into the result JSONs, "-dirty" where the tree held
# uncommitted changes).
set -uo pipefail
stages=("$@")
# The default stages bring back 4 files (the log and 3 result JSONs); $OUT takes 8.
[ ${#stages[@]} -gt 0 ] || stages=(tests loss update buffer)
KNOWN=" compile tests loss autotune buffer envs update update-bf16 update-autotune update-maxtune"
KNOWN+=" train probe mlp tma single single256 frozen fp16 jax rest "
for stage in "${stages[@]}"; do  # a misspelt stage fails at once, not after the others ran
    [[ $stage != *[[:space:]]* && $KNOWN == *" $stage "* ]] ||
        { echo "unknown stage '$stage'; stages:$KNOWN" >&2; exit 2; }
done
# Every stage but compile, tests and rest writes a result JSON of its own; $OUT returns 8 files,
# the log among them: a ninth would come back missing after its device time was spent.
writers=$(printf '%s\n' "${stages[@]}" | grep -vxE 'compile|tests|rest' | sort -u | wc -l)
[ "$writers" -le 7 ] ||
    { echo "these stages write $writers result files, and \$OUT returns 8 files with the log:" \
        "split them over two calls" >&2; exit 2; }
export PYTHONUNBUFFERED=1
# The checkout on the path of every stage (python -m puts it there; tests/compile_kernels.py,
# run as a file, would not find crl_fast, which the GPU machine does not have installed).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# crl_fast.envs imports gymnasium: without it the tests stages stop at collection (no test runs)
# and envs / train fail at import, after the stages before them took their device time.
for stage in "${stages[@]}"; do
    [[ " tests rest envs train " != *" $stage "* ]] || python3 -c "import gymnasium" 2>/dev/null ||
        { echo "stage '$stage' needs gymnasium, which is not installed here: carry .whl" \
            "(this script's header) or leave the stage out" >&2; exit 2; }
done
OUT=${OUT:-/tmp/crl-fast-out}
mkdir -p "$OUT"
# The checkout itself, as an editable install sees it: crl_fast.kernels is kernels/ (a plain
# `pip install .` would be shadowed by ./crl_fast, which has no kernels/, from the repo root).
ln -sfn ../kernels crl_fast/kernels
XDIST=()
python3 -c "import xdist" 2>/dev/null && XDIST=(-n 8)
NEW_TESTS="single_pass or actor_stream or compiled_step or default_run_on_cuda"
NEW_TESTS+=" or gradients_in_forward or column_loss or compiled_update or confident_critic"
NEW_TESTS+=" or float16_ipo or small_loss_weight or autocast or metrics_leave"
NEW_TESTS+=" or auto_takes_pytorch or fused or nan_input or cuda_graph_replay or tf32_on_cuda"
NEW_TESTS+=" or past_element_2_to_the_31"
NEW_TESTS+=" or example or goals_close or exact_law or matches_torch_cuda"
NEW_TESTS+=" or side_without or specialise or batched_gradients or row_losses or rollback"
NEW_TESTS+=" or in_the_thousands or generator_of_another or every_size_one"
NEW_TESTS+=" or forward_and_gradients_no_worse_than_eager or tma_loads_of_wide_rows"
NEW_TESTS+=" or softplus_of_equal_negative_logits or a_nan_row_with_metrics"
NEW_TESTS+=" or log_future_over_marginal or cuda_matches_semantics"
START=$(mktemp)  # results newer than this come back
LOG="$OUT/log.txt"  # one log: $OUT returns at most 8 files (the rest are result JSONs)
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    [ -n "${CRL_FAST_GIT_SHA:-}" ] || echo "WARNING: CRL_FAST_GIT_SHA unset: results say unknown"
} 2>&1 | tee -a "$LOG"
# Read-only: the clocks, temperature and power a stage left the GPU at, and why the clocks were
# held down (driver 535 on: clocks_event_reasons; a mask, 0x0 none), so a stage timed on an
# idle-clocked or throttled GPU shows in the log.
QUERY=clocks.sm,clocks.mem,temperature.gpu,power.draw
gpu_state() {  # (nvidia-smi prints a field it does not know on stdout, and fails)
    local state
    state=$(nvidia-smi --query-gpu=$QUERY,clocks_event_reasons.active --format=csv,noheader 2>&1) ||
        state="$(nvidia-smi --query-gpu=$QUERY --format=csv,noheader 2>&1) (no event reasons)"
    echo "$state"
}
FAILED=$(mktemp)  # the stages that failed or ran out of time (stages run in a pipe: a file)
step() {
    local name=$1 limit=$2 status
    shift 2
    echo "=== $name (limit ${limit}s)"
    SECONDS=0
    timeout -k 5 "$limit" "$@"
    status=$?
    echo "=== $name: exit $status, ${SECONDS}s"
    [ "$status" -eq 0 ] || echo "$name (exit $status)" >>"$FAILED"
}
for stage in "${stages[@]}"; do
    case $stage in
        compile) step compile 70 python3 tests/compile_kernels.py --quick --jobs "$(nproc)" ;;
        tests)  # this session's new GPU tests first, so that a time limit cannot cut them
            step "tests (new)" 100 python3 -m pytest -q -m gpu tests -p no:cacheprovider \
                "${XDIST[@]}" -k "$NEW_TESTS"
            step tests 120 python3 -m pytest -q -m gpu tests -p no:cacheprovider \
                "${XDIST[@]}" -k "not ($NEW_TESTS)" ;;
        rest) step "tests (not gpu)" 240 python3 -m pytest -q -m "not gpu" tests \
            -p no:cacheprovider "${XDIST[@]}" ;;
        loss) step loss 90 python3 -m bench.bench_loss ;;
        autotune) step autotune 500 python3 -m bench.bench_loss --quick --autotune ;;
        buffer) step buffer 20 python3 -m bench.bench_buffer ;;
        envs) step envs 30 python3 -m bench.bench_envs ;;
        update) step update 130 python3 -m bench.bench_update ;;
        update-bf16) step "update bf16" 80 python3 -m bench.bench_update \
            --modes compile-graph+bf16 graph+bf16 compile-graph+fused+bf16 --name update-bf16 ;;
        update-autotune) CRL_FAST_AUTOTUNE=1 step "update autotune" 120 \
            python3 -m bench.bench_update --modes compile-graph ;;
        update-maxtune) step "update max-autotune" 240 \
            python3 -m bench.bench_update --modes autotune-graph --batch-size 256 \
            --name update-maxtune ;;
        train) step train 240 python3 -m bench.bench_train ;;
        probe) step probe 35 python3 -m bench.probe_warp_specialize ;;
        mlp) step mlp 60 python3 -m bench.bench_mlp ;;
        tma) CRL_FAST_TMA=1 step tma 60 python3 -m bench.bench_loss --sizes 16384 65536 \
            --dims 64 --dtypes bfloat16 --impls crl_fast-graph --combos 2 ;;
        single|single256) rows=${stage#single}  # 128 rows by default; 256 halves the atomics
            CRL_FAST_SINGLE_PASS=1 CRL_FAST_SINGLE_PASS_ROWS=${rows:-128} step "$stage" 25 \
                python3 -m bench.bench_loss --sizes 16384 65536 --dims 64 \
                --dtypes bfloat16 --impls crl_fast-graph --combos 0 ;;
        frozen) step frozen 60 python3 -m bench.bench_loss --sizes 16384 65536 --dims 64 \
            --dtypes bfloat16 --impls crl_fast-graph --frozen-psi ;;
        fp16) step fp16 40 python3 -m bench.bench_loss --sizes 16384 65536 --dims 64 \
            --dtypes float16 bfloat16 --impls crl_fast-graph --combos 2 --name loss-fp16 ;;
        jax) step jax 120 python3 -m bench.jax_baselines --dtypes bfloat16 ;;
    esac 2>&1 | tee -a "$LOG"
    # after each stage, what this run wrote (a timeout keeps what ran; $OUT takes 8 files)
    find bench/results -name '*.json' -newer "$START" -exec cp {} "$OUT/" \;
    echo "--- GPU after $stage ($QUERY,clocks_event_reasons.active): $(gpu_state)" | tee -a "$LOG"
done
ls "$OUT"
if [ -s "$FAILED" ]; then  # the exit status says so too, not only the log
    echo "failed stages: $(paste -sd ';' "$FAILED")" | tee -a "$LOG"
    exit 1
fi
