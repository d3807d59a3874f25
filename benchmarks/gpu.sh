#!/usr/bin/env bash
# One call on a fresh GPU machine: the CUDA tests and the benchmarks, JSON into OUTDIR.
#
#   PYTHONPATH=src bash benchmarks/gpu.sh OUTDIR [STEP ...]     (from the project folder)
#
# Made for a machine with PyTorch preinstalled, no internet and the project
# copied as a folder (no install, no make): run from the project root, with
# PYTHON (default python3) having torch and cilab's dependencies. It finishes in
# GPU_SH_BUDGET seconds (default 470, under 8 minutes): each step has its own
# timeout, cut to what is left of the budget (the environment check before the
# first step takes ~13 s), and a failing or timed-out step is recorded and the
# next one runs. STEPs (default: suite protocol, what the H100 session of
# 2026-11-27 left unmeasured; README, "GPU figures"), with their timeouts:
#   tests        190 s  pytest: tests/test_cuda.py, tests/test_gpu_paths.py and the two
#                       reliability tests of repeatability (their runs use train.deterministic=true);
#                       GPU_SH_TESTS (space-separated) picks others, GPU_SH_PYTEST_ARGS adds options
#                       (the device image has pytest-timeout: "-p timeout --timeout=170")
#   concurrency  100 s  cilab bench concurrency (N = 1,2,4,8) and the study's projected wall time
#   mps          100 s  the same with a CUDA MPS control daemon started for the step (N = 4,8),
#                       skipped where nvidia-cuda-mps-control is missing
#   batched       60 s  cilab bench batched (N = 1,2,4,8 ResNet-32s fused into one grouped network)
#   fusedmps     150 s  the same in GPU_SH_FUSED_PROCESSES processes at once (default 4), each its own fused
#                       network, under an MPS daemon started for the step (without one where it does not start):
#                       the two levers together, batched_mps.json
#   protocol     260 s  cilab bench protocol: iCaRL, 10 tasks x GPU_SH_PROTOCOL_EPOCHS (default 30:
#                       ~95 s on an H100, fits after the suite; 10 x 70 takes ~190 s), once per
#                       variant of GPU_SH_PROTOCOL_VARIANTS (as GPU_SH_VARIANTS below);
#                       GPU_SH_PROTOCOL_TIMEOUT sets the timeout
#   throughput   100 s  cilab bench throughput, one round per variant of GPU_SH_VARIANTS
#                       (space-separated NAME=key=value,key=value; default: one, no overrides);
#                       GPU_SH_THROUGHPUT_TIMEOUT sets the timeout (a compile variant compiles first)
#   suite        420 s  the whole test suite as make test runs it: pytest-xdist, GPU_SH_WORKERS processes
#                       (default auto: one per core), GPU_SH_DIST (default loadfile: a file per worker)
#   study        240 s  the whole study end to end: cilab reproduce all, seed 0, GPU_SH_STUDY_JOBS runs at
#                       once (default 8) under an MPS daemon where one starts (study.json's "mps" says), every run cut to 1 epoch a
#                       task on random CIFAR-shaped data (GPU_SH_STUDY_PER_CLASS training images a class,
#                       default 50; DeepInversion 20 iterations): every method's CUDA path, the copies of
#                       shared runs and the reports; study.json has every planned run's status ("missing" without metrics.json) and times
#   tsne         200 s  benchmarks/tsne.py: the reports' t-SNE panels (GPU_SH_TSNE_ROWS rows of three CIFAR-100
#                       panels, default 4) one after another with scikit-learn's threads against one
#                       thread each in a pool of a process a core (the machine's CPU, no GPU)
# OUTDIR gets steps.json (every step: command, exit code, seconds, timed out or
# not), env.json (python, torch, CUDA, GPU, which dependencies import, MPS), one
# JSON per benchmark and per throughput or protocol variant (concurrency's and batched's written
# after each N, protocol's after each task, "partial": true until they end), and logs.tgz (each step's
# output and pytest's junit xml). A lent machine sends back at most 8 files:
# the default steps write 4. The last lines printed sum it up. The timeouts
# are caps: on an H100 the suite ran past 319 s (12 workers) and 10 x 30 epochs
# of protocol took 93 s.
# GPU_SH_SMOKE=1 makes every step tiny (seconds on a CPU), to test this script's plumbing.
set -u
OUT=${1:?usage: PYTHONPATH=src bash benchmarks/gpu.sh OUTDIR [STEP ...]}
shift
WANTED=${*:-suite protocol}
mkdir -p "$OUT/logs"
PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:-src}
# cuBLAS reads this once, when it starts: set before any CUDA work, so every test
# process and every run of train.deterministic=true gets the repeatable setting.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
SMOKE=${GPU_SH_SMOKE:-0}
# smoke mode checks the plumbing on a (possibly busy) CPU: no 8-minute budget there
BUDGET=${GPU_SH_BUDGET:-$([[ $SMOKE == 1 ]] && echo 1800 || echo 470)}
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
    timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    local rc=$?
    local secs=$(($(date +%s) - t0))
    local timed_out=false
    ((rc == 124 || rc == 137)) && timed_out=true
    "$PY" -c 'import json, sys; print(json.dumps({"step": sys.argv[1], "rc": int(sys.argv[2]), "seconds": int(sys.argv[3]),
        "timed_out": sys.argv[4] == "true", "timeout_s": int(sys.argv[5]), "command": sys.argv[6:]}))' \
        "$name" "$rc" "$secs" "$timed_out" "$limit" "$@" >> "$STEPS"
    echo "   $name: exit $rc after ${secs}s" >&2
}

"$PY" - > "$OUT/env.json" 2> "$OUT/logs/env.err" <<'EOF'
import importlib, json, os, platform, shutil, sys
info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "CUDA_MPS_PIPE_DIRECTORY": os.environ.get("CUDA_MPS_PIPE_DIRECTORY"),
        "nvidia_cuda_mps_control": shutil.which("nvidia-cuda-mps-control")}
missing = []
for mod in ["torch", "torchvision", "numpy", "yaml", "tqdm", "sklearn", "matplotlib", "threadpoolctl", "PIL", "pytest"]:
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{mod}: {type(e).__name__}: {e}")
info["missing_modules"] = missing
# what torch.compile's Inductor needs to build its kernels on this machine: a C compiler, Triton, Python.h
import importlib.util, sysconfig
info["compile_toolchain"] = {"cc": shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc"),
                             "triton": importlib.util.find_spec("triton") is not None,
                             "python_h": os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))}
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

PROTOCOL_EPOCHS=${GPU_SH_PROTOCOL_EPOCHS:-30}
if [[ $SMOKE == 1 ]]; then
    TESTS=(tests/test_cuda.py "tests/test_gpu_paths.py::test_warmups_and_captures_share_one_side_stream")
    CONC=(--images 32 --epochs 1 --warmup-epochs 0 --threads 1 train.batch_size=32)
    JOBS=1,2 MPS_JOBS=2
    THRU=(--rounds 1 --images 64 --exemplars 0 --epochs 1 --workers 0 train.batch_size=32)
    PROT=(--tasks 2 --epochs 1 --train-per-class 2 --quiet train.batch_size=32 memory.size=100)
    BATCHED=(--models 1,2 --steps 1 train.batch_size=4 model.name=resnet20)
    SUITE=(tests/test_gpu_paths.py)
    STUDY=(train.epochs=1 train.milestones=[] model.name=resnet20 train.batch_size=32 memory.size=200
           memory.deepinversion.iterations=2)
    STUDY_PER=${GPU_SH_STUDY_PER_CLASS:-2}
    T_TESTS=400 T_CONC=400 T_BATCHED=400 T_FUSED=400 T_PROT=400 T_THRU=400 T_SUITE=400 T_STUDY=900 T_TSNE=400
    TSNE_ROWS=${GPU_SH_TSNE_ROWS:-1}
else
    TESTS=(tests/test_cuda.py tests/test_gpu_paths.py
           "tests/test_reliability.py::test_sigkill_during_task_3_then_resume_equals_the_uninterrupted_run"
           "tests/test_reliability.py::test_same_seed_same_config_twice_gives_identical_numbers")
    CONC=(--epochs 10)
    JOBS=1,2,4,8 MPS_JOBS=4,8
    THRU=(--rounds 1)
    PROT=(--tasks 10 --epochs "$PROTOCOL_EPOCHS" --quiet)
    BATCHED=()
    SUITE=(tests)
    STUDY=(train.epochs=1 train.milestones=[] memory.deepinversion.iterations=20)
    STUDY_PER=${GPU_SH_STUDY_PER_CLASS:-50}
    T_TESTS=190 T_CONC=100 T_BATCHED=60 T_FUSED=150 T_PROT=${GPU_SH_PROTOCOL_TIMEOUT:-260} T_THRU=${GPU_SH_THROUGHPUT_TIMEOUT:-100} T_SUITE=420 T_STUDY=240
    T_TSNE=200 TSNE_ROWS=${GPU_SH_TSNE_ROWS:-4}
fi

# with_mps CMD...: CMD under a control daemon of our own (pipe and log folders under /tmp),
# stopped after it: a daemon left running would change every later step. Runs in its own bash.
# Where the daemon does not start: exit 3, or, with MPS_OPTIONAL=1, CMD without MPS.
with_mps() {
    local dir=/tmp/cilab-mps
    mkdir -p "$dir/pipe" "$dir/log"
    export CUDA_MPS_PIPE_DIRECTORY=$dir/pipe CUDA_MPS_LOG_DIRECTORY=$dir/log
    if ! nvidia-cuda-mps-control -d; then
        [[ ${MPS_OPTIONAL:-0} == 1 ]] || return 3
        echo "gpu.sh: the MPS control daemon did not start; running without MPS" >&2
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        "$@"
        return
    fi
    "$@"
    local rc=$?
    echo quit | nvidia-cuda-mps-control
    tail -5 "$dir/log/control.log" 2>/dev/null
    return $rc
}
HAVE_MPS=$(command -v nvidia-cuda-mps-control > /dev/null && echo 1 || echo 0)

# study_run PY OUT JOBS PER_CLASS OVERRIDES...: random CIFAR-shaped data, `cilab reproduce all` on it,
# then OUT/study.json from the run folders. Runs in its own bash.
study_run() {
    local py=$1 out=$2 jobs=$3 per=$4 dir=/tmp/cilab-study
    shift 4
    rm -rf "$dir" && mkdir -p "$dir" || return 3
    "$py" -c 'import sys, numpy as np; n = int(sys.argv[2]); r = np.random.default_rng(0)
np.savez(sys.argv[1], x_train=r.integers(0, 256, (100 * n, 32, 32, 3), dtype=np.uint8),
         y_train=np.arange(100 * n) % 100, x_test=r.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8),
         y_test=np.arange(1000) % 100)' "$dir/data.npz" "$per" || return 3
    local t0=$(date +%s)
    "$py" -m cilab.cli reproduce all --out "$dir/runs" --seeds 0 --jobs "$jobs" --quiet --no-tsne \
        data.name=npz "data.path=$dir/data.npz" "$@"
    local rc=$?
    "$py" -c 'import json, sys; from pathlib import Path
from cilab.bench import study_images
from cilab.executors import mps_running
runs = []
try:  # every run the plan had (a run that failed before writing metrics.json is listed too, "missing")
    planned = study_images(seeds=[0], overrides=sys.argv[7:])
except Exception as e:  # a plan reproduce refused too: study.json still says so, with rc and wall_s
    planned, runs = [], [{"run": "(plan)", "copy_of": None, "evaluated_from": None,
                          "status": f"failed: {type(e).__name__}: {e}"}]
for r in planned:
    f = Path(sys.argv[1]) / r["group"] / r["name"] / "metrics.json"
    m = json.loads(f.read_text()) if f.exists() else {"status": "missing: no metrics.json"}
    runs.append({"run": r["group"] + "/" + r["name"], "copy_of": r["copy_of"], "evaluated_from": r["evaluated_from"],
                 "status": m.get("status"), "device": m.get("device"), "cuda_graphs": m.get("cuda_graphs"),
                 "train_images": m.get("train_images"), **m.get("timing", {})})
    runs[-1].pop("per_task", None)
json.dump({"wall_s": int(sys.argv[3]), "rc": int(sys.argv[4]), "jobs": int(sys.argv[5]), "per_class": int(sys.argv[6]),
           "mps": mps_running(),
           "overrides": sys.argv[7:], "runs": runs}, open(sys.argv[2], "w"), indent=1)' \
        "$dir/runs" "$out/study.json" "$(($(date +%s) - t0))" "$rc" "$jobs" "$per" \
        data.name=npz "data.path=$dir/data.npz" "$@"
    return $rc
}

# variants BENCH TIMEOUT "NAME=key=value,key=value ..." ARGS...: one step BENCH_NAME per variant,
# `cilab bench BENCH ARGS...` with the variant's overrides, JSON in OUT/BENCH_NAME.json
variants() {
    local bench=$1 limit=$2 list=$3 v name ov
    shift 3
    for v in $list; do
        name=${v%%=*} ov=${v#*=}
        # shellcheck disable=SC2086  # the overrides split on the commas on purpose
        step "${bench}_$name" "$limit" "$PY" -m cilab.cli bench "$bench" --out "$OUT/${bench}_$name.json" "$@" ${ov//,/ }
    done
}

for s in $WANTED; do
    case $s in
    tests) [[ -n ${GPU_SH_TESTS:-} ]] && read -ra TESTS <<< "$GPU_SH_TESTS"
           # shellcheck disable=SC2086  # extra options split on spaces on purpose
           step tests "$T_TESTS" "$PY" -m pytest -v --durations=20 -p no:cacheprovider --junitxml="$OUT/logs/tests.xml" \
               ${GPU_SH_PYTEST_ARGS:-} "${TESTS[@]}" ;;
    concurrency) step concurrency "$T_CONC" "$PY" -m cilab.cli bench concurrency --out "$OUT/concurrency.json" \
                     --jobs "$JOBS" "${CONC[@]}" ;;
    mps) if ((HAVE_MPS)); then
             step mps "$T_CONC" bash -c "$(declare -f with_mps); with_mps \"\$@\"" mps \
                 "$PY" -m cilab.cli bench concurrency --out "$OUT/concurrency_mps.json" --jobs "$MPS_JOBS" "${CONC[@]}"
             # a daemon left by a step cut off at its timeout stops here
             echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/cilab-mps/pipe nvidia-cuda-mps-control > /dev/null 2>&1
         else
             echo '{"step": "mps", "skipped": "nvidia-cuda-mps-control not found"}' >> "$STEPS"
         fi ;;
    batched) step batched "$T_BATCHED" "$PY" -m cilab.cli bench batched --out "$OUT/batched.json" ${BATCHED[@]+"${BATCHED[@]}"} ;;
    fusedmps) MPS_OPTIONAL=1 step fusedmps "$T_FUSED" bash -c "$(declare -f with_mps); $( ((HAVE_MPS)) && echo with_mps) \"\$@\"" \
                  fusedmps "$PY" -m cilab.cli bench batched --out "$OUT/batched_mps.json" \
                  --processes "${GPU_SH_FUSED_PROCESSES:-4}" ${BATCHED[@]+"${BATCHED[@]}"}
              echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/cilab-mps/pipe nvidia-cuda-mps-control > /dev/null 2>&1 ;;
    protocol) variants protocol "$T_PROT" "${GPU_SH_PROTOCOL_VARIANTS:-default=}" "${PROT[@]}" ;;
    throughput) variants throughput "$T_THRU" "${GPU_SH_VARIANTS:-default=}" "${THRU[@]}" ;;
    # make test's options (-n auto: a worker per core; a file per worker); -v: a suite cut off at its
    # timeout still says which tests passed (the xml is written at the end)
    suite) step suite "$T_SUITE" "$PY" -m pytest -v --durations=30 -p no:cacheprovider -n "${GPU_SH_WORKERS:-auto}" \
               --dist "${GPU_SH_DIST:-loadfile}" \
               --junitxml="$OUT/logs/suite.xml" "${SUITE[@]}" ;;
    study) MPS_OPTIONAL=1 step study "$T_STUDY" bash -c "$(declare -f with_mps study_run); $( ((HAVE_MPS)) && echo with_mps) \
               study_run \"\$@\"" study "$PY" "$OUT" "${GPU_SH_STUDY_JOBS:-8}" "$STUDY_PER" "${STUDY[@]}"
           echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/cilab-mps/pipe nvidia-cuda-mps-control > /dev/null 2>&1 ;;
    tsne) step tsne "$T_TSNE" "$PY" benchmarks/tsne.py --rows "$TSNE_ROWS" --ways threads,pool --out "$OUT/tsne.json" ;;
    *) echo "unknown step '$s' (tests concurrency mps batched fusedmps protocol throughput suite study tsne)" >&2 ;;
    esac
done

"$PY" -c 'import json, sys; steps = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
json.dump({"smoke": sys.argv[3] == "1", "total_s": int(sys.argv[4]), "steps": steps}, open(sys.argv[2], "w"), indent=1)' \
    "$STEPS" "$OUT/steps.json" "$SMOKE" "$(($(date +%s) - START))"
rm -f "$STEPS"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
# the figures in a few lines (a lent machine's reply carries the end of the output)
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for s in json.load(open(out / "steps.json"))["steps"]:
    print(f"step {s['step']}: " + (s["skipped"] if "skipped" in s else f"rc {s['rc']} in {s['seconds']} s"
          + (" TIMED OUT" if s["timed_out"] else "")))
for f in sorted(out.glob("concurrency*.json")):
    c = json.load(open(f))
    for r in c["results"]:
        speedup = r.get("speedup_over_one_run")
        print(f"{f.stem} N={r['jobs']}: " + (r["error"] if "error" in r else
              f"{r['aggregate_images_per_s']:.0f} img/s" + (f", x{speedup:.2f} over N=1" if speedup else "")))
    st = c.get("study", {})  # none in a JSON cut off at the step's timeout ("partial")
    if c.get("partial"):
        print(f"{f.stem}: PARTIAL, the step was cut off after these N")
    if "projected_wall_s" in st:
        one = st["projected_wall_s_one_at_a_time"]
        print(f"{f.stem}: study {st['runs']} runs, {st['train_images'] / 1e6:.0f}M images, projected "
              f"{st['projected_wall_s'] / 60:.1f} min at N={st['best_jobs']}"
              + (f" (one at a time {one / 60:.1f} min)" if one else ""))
for f in sorted(out.glob("protocol*.json")):
    p = json.load(open(f))
    print(f"{f.stem} {p['tasks']}x{p['epochs']} (cudnn_benchmark {p['cudnn_benchmark']}): {p['wall_s']:.1f} s wall, "
          f"train {p['train_s']:.1f} s, {p['train_images_per_s']:.0f} img/s, "
          f"memory+eval {100 * p['memory_and_eval_fraction']:.1f}%" + (f"; WARNINGS {p['warnings']}" if p.get("warnings") else "")
          + (f"; PARTIAL, cut off after {p['completed_tasks']} of {p['tasks']} tasks" if p.get("partial") else ""))
for f in sorted(out.glob("batched*.json")):
    b = json.load(open(f))
    where = f"{b['processes']} processes, MPS {'on' if b.get('mps_running') else 'off or unknown'}" \
        if b["processes"] > 1 else "1 process"
    for r in b["results"]:
        print(f"{f.stem} N={r['models']} ({where}): " + (r["error"] if "error" in r else
              f"{r['images_per_s']:.0f} img/s" + (f", x{r['speedup_over_one_model']:.2f} over N=1"
                                                  if r.get("speedup_over_one_model") else "")
              + (f"; WARNINGS {r['warnings']}" if r.get("warnings") else "")))
    if b.get("partial"):
        print(f"{f.stem}: PARTIAL, the step was cut off after these N")
    else:
        print(f"{f.stem}: study training at N={b['best_models']}: {b['projected_study_train_s_at_best'] / 60:.1f} min"
              " (a ceiling)")
if (out / "study.json").exists():
    st = json.load(open(out / "study.json"))
    runs = [r for r in st["runs"] if not r["copy_of"] and not r["evaluated_from"]]  # their timings are a trained run's
    statuses = {s: sum(r["status"] == s for r in runs) for s in dict.fromkeys(r["status"] for r in runs)}
    print(f"study (reproduce all, seed 0, 1 epoch a task, {st['per_class']} images a class, {st['jobs']} at once, "
          f"MPS {'on' if st['mps'] else 'off'}): "
          f"rc {st['rc']}, {st['wall_s']} s wall, {len(st['runs'])} run folders, {len(runs)} trained {statuses}, "
          f"{sum(bool(r['evaluated_from']) for r in st['runs'])} evaluated; "
          f"train {sum(r.get('train_s', 0) for r in runs):.0f} s, memory {sum(r.get('memory_s', 0) for r in runs):.0f} s, "
          f"eval {sum(r.get('eval_s', 0) for r in runs):.0f} s summed over runs")
if (out / "tsne.json").exists():
    t = json.load(open(out / "tsne.json"))
    print(f"tsne: {t['panels']} panels on {t['cores']} cores: {t['seconds']} s, pool x{t['pool_over_threads']}")
for f in sorted(out.glob("throughput*.json")):
    t = json.load(open(f))
    print(f"{f.stem}: a {t['a_bare_step_img_s']:.0f} b {t['b_cilab_trainer_img_s']:.0f} "
          f"c {t['c_reference_dataloader_img_s']:.0f} img/s" + (f"; WARNINGS {t['warnings']}" if t.get("warnings") else ""))
EOF
echo "results in $OUT (steps.json says which steps passed)" >&2

