#!/usr/bin/env bash
# One call on a fresh GPU machine: the CUDA tests and the benchmarks, JSON into OUTDIR.
#
#   PYTHONPATH=src bash benchmarks/gpu.sh OUTDIR          (from the project folder)
#
# Made for a machine with PyTorch preinstalled, no internet and the project
# copied as a folder (no install, no make): run from the project root, with
# PYTHON (default python3) having torch and cilab's dependencies. It finishes in
# GPU_SH_BUDGET seconds (default 465, under 8 minutes): each step has its own
# timeout, cut to what is left of the budget, and a failing or timed-out step
# is recorded and the next one runs. OUTDIR gets
#   steps.json         every step: command, exit code, seconds, timed out or not
#   env.json           python, torch, CUDA, GPU, which dependencies import
#   tests.log/.xml     pytest: tests/test_cuda.py, tests/test_gpu_paths.py and the
#                      reliability kill-and-resume test (its runs use train.deterministic=true)
#   concurrency.json   cilab bench concurrency (N = 1,2,4,8) and the study's projected wall time
#   protocol.json      cilab bench protocol: iCaRL 10 tasks x 70 epochs
#   throughput.json    cilab bench throughput, one round
#   *.log              each step's output
# GPU_SH_SMOKE=1 makes every step tiny (seconds on a CPU), to test this script's plumbing.
set -u
OUT=${1:?usage: PYTHONPATH=src bash benchmarks/gpu.sh OUTDIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:-src}
# cuBLAS reads this once, when it starts: set before any CUDA work, so every test
# process and every run of train.deterministic=true gets the repeatable setting.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
SMOKE=${GPU_SH_SMOKE:-0}
# smoke mode checks the plumbing on a (possibly busy) CPU: no 8-minute budget there
BUDGET=${GPU_SH_BUDGET:-$([[ $SMOKE == 1 ]] && echo 1800 || echo 465)}
START=$(date +%s)
STEPS="$OUT/steps.jsonl"
: > "$STEPS"

# step NAME TIMEOUT_S COMMAND...: runs COMMAND with output in OUT/NAME.log, its
# timeout cut to the budget left (less 10 s to write up); never stops the script.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START) - 10))
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        echo "{\"step\": \"$name\", \"skipped\": \"out of time budget\"}" >> "$STEPS"
        echo "== $name: skipped, out of time" >&2
        return
    fi
    echo "== $name (timeout ${limit}s): $*" >&2
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local secs=$(($(date +%s) - t0))
    local timed_out=false
    ((rc == 124 || rc == 137)) && timed_out=true
    "$PY" -c 'import json, sys; print(json.dumps({"step": sys.argv[1], "rc": int(sys.argv[2]), "seconds": int(sys.argv[3]),
        "timed_out": sys.argv[4] == "true", "timeout_s": int(sys.argv[5]), "command": sys.argv[6:]}))' \
        "$name" "$rc" "$secs" "$timed_out" "$limit" "$@" >> "$STEPS"
    echo "   $name: exit $rc after ${secs}s" >&2
}

"$PY" - > "$OUT/env.json" 2>&1 <<'EOF'
import importlib, json, os, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "CUDA_MPS_PIPE_DIRECTORY": os.environ.get("CUDA_MPS_PIPE_DIRECTORY")}
missing = []
for mod in ["torch", "torchvision", "numpy", "yaml", "tqdm", "sklearn", "matplotlib", "threadpoolctl", "PIL", "pytest"]:
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{mod}: {type(e).__name__}: {e}")
info["missing_modules"] = missing
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cudnn"] = torch.backends.cudnn.version()
except Exception as e:  # noqa: BLE001
    info["torch_error"] = repr(e)
print(json.dumps(info, indent=1))
EOF

if [[ $SMOKE == 1 ]]; then
    TESTS=(tests/test_cuda.py "tests/test_gpu_paths.py::test_warmups_and_captures_share_one_side_stream")
    CONC=(--jobs 1,2 --images 32 --epochs 1 --warmup-epochs 0 --threads 1 train.batch_size=32)
    THRU=(--rounds 1 --images 64 --exemplars 0 --epochs 1 --workers 0 train.batch_size=32)
    PROT=(--tasks 2 --epochs 1 --train-per-class 2 --quiet train.batch_size=32 memory.size=40)
    T_TESTS=400 T_CONC=400 T_PROT=400 T_THRU=400
else
    TESTS=(tests/test_cuda.py tests/test_gpu_paths.py
           "tests/test_reliability.py::test_sigkill_during_task_3_then_resume_equals_the_uninterrupted_run"
           "tests/test_reliability.py::test_same_seed_same_config_twice_gives_identical_numbers")
    CONC=(--jobs 1,2,4,8 --epochs 5)
    THRU=(--rounds 1)
    PROT=(--tasks 10 --epochs 70 --quiet)
    T_TESTS=110 T_CONC=100 T_PROT=200 T_THRU=60
fi

# The tests first (correctness), then the figures of issue 17's targets (the study's
# wall time, one iCaRL run), then throughput, which earlier sessions' figures cover.
step tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" "${TESTS[@]}"
step concurrency "$T_CONC" "$PY" -m cilab.cli bench concurrency --out "$OUT/concurrency.json" "${CONC[@]}"
step protocol "$T_PROT" "$PY" -m cilab.cli bench protocol --out "$OUT/protocol.json" "${PROT[@]}"
step throughput "$T_THRU" "$PY" -m cilab.cli bench throughput --out "$OUT/throughput.json" "${THRU[@]}"

"$PY" -c 'import json, sys; steps = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
json.dump({"smoke": sys.argv[3] == "1", "total_s": int(sys.argv[4]), "steps": steps}, open(sys.argv[2], "w"), indent=1)' \
    "$STEPS" "$OUT/steps.json" "$SMOKE" "$(($(date +%s) - START))"
rm -f "$STEPS"
echo "results in $OUT (steps.json says which steps passed)" >&2
