#!/usr/bin/env bash
# The GPU run in one command of at most 5 minutes on a bare machine (`make gpu`): build the
# extension with CUDA, every GPU-marked test, the benchmark rows of $GPU_BENCH_FILES (the
# attention rows at the issue's target and N >= 64, with TTSCALE_BENCH_QUICK=1), then
# `ttscale selfcheck` if time is left; logs and a machine-readable results.json under $OUT.
# compute-sanitizer memcheck over a subset of the CUDA kernels' tests runs when asked for
# (GPU_SH_STAGES="env build sanitizer").
#
# On the GPU machine, from the repository root:
#     OUT=/path/to/logs bash bench/gpu.sh
# The Tokasaurus workload on all 128 problems (about 6 minutes at 95,000 tokens/s) is a second,
# separate run of up to 10 minutes (`make gpu-headline`):
#     OUT=/path/to/logs bash bench/gpu.sh --headline
# (with .whl/ beside the checkout when bench/fetch_wheels.sh has filled it: wheels a machine
# without a package index lacks, such as scikit-build-core, hypothesis, safetensors, tokenizers,
# math-verify and transformers.)
# Dry run on a CPU machine: every stage that can run there, tiny shapes, GPU-only parts skipped
# with a logged reason:
#     OUT=/tmp/gpu-dry bash bench/gpu.sh --dry-run        (or GPU_SH_DRY_RUN=1)
#
# $OUT gets (flat, 6 files): env.txt build.log tests.log sanitizer.log bench.log results.json.
# Time: GPU_SH_BUDGET seconds in all (default 270: with the machine's start, one call of at most 5
# minutes; 590 with --headline). Every stage has its own timeout, and stages before the
# benchmarks leave them at least GPU_SH_BENCH_MIN seconds (default 100), so one hang cannot eat
# the run. The last lines printed are the benchmark tables
# and the summary of which stages passed.
# Other knobs: PYTHON (default python3; .venv/bin/python in a dry run when it exists),
# TTSCALE_CUDA (ON; OFF in a dry run), GPU_SH_BUILD=cmake (skip pip, build with CMake directly),
# GPU_SH_SANITIZER_TESTS (how many tests run under memcheck, default 12), GPU_SH_BENCH (the
# benchmark files to run, in order, by name: "attention engine"; default $GPU_BENCH_FILES below;
# "all" for every bench/bench_*.py but the command-line bench_serve.py), GPU_SH_BENCH_SELECT
# (a pytest -k expression applied to every benchmark file), GPU_SH_TESTS_LIMIT (seconds for the
# GPU tests, default 110), GPU_SH_BENCH_FILE_LIMIT (seconds for one benchmark file, default
# 300), GPU_SH_BENCH_LIMIT (seconds for the whole benchmark stage, default 420), GPU_SH_STAGES
# (the stages to run, default "env build tests bench selfcheck"; they run in the order env build
# tests sanitizer bench selfcheck), GPU_SH_TEST_WORKERS (pytest-xdist processes for the GPU
# tests when xdist is there: Triton compiles in parallel; default 8).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# The benchmark files of `make gpu`, in order (bench/bench_<name>.py). A file whose rows the
# issue asks for goes here; its rows must fit the budget beside the others (each file can read
# TTSCALE_BENCH_QUICK=1 to keep its most valuable rows).
GPU_BENCH_FILES="attention sampling sampling_filters fused_elementwise"

DRY_RUN=${GPU_SH_DRY_RUN:-0}
HEADLINE=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    --headline) HEADLINE=1 ;;
    *) echo "[gpu.sh] unknown argument: $arg (expected --dry-run, --headline)"; exit 2 ;;
  esac
done
if [ "$HEADLINE" = 1 ]; then
  # The Tokasaurus workload alone: build, then bench_engine.py's headline test.
  : "${GPU_SH_STAGES:=env build bench}" "${GPU_SH_BENCH:=engine}" "${GPU_SH_BENCH_SELECT:=tokasaurus}"
  : "${GPU_SH_BUDGET:=590}" "${GPU_SH_BENCH_LIMIT:=540}" "${GPU_SH_BENCH_FILE_LIMIT:=540}"
  export GPU_SH_BENCH GPU_SH_BENCH_SELECT GPU_SH_BENCH_FILE_LIMIT
fi
if [ -z "${OUT:-}" ]; then
  OUT=/tmp/ttscale-gpu-out
  echo "[gpu.sh] OUT not set; writing to $OUT"
fi
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/ttscale-gpu.XXXXXX)
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ "$DRY_RUN" = 1 ] && [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
if [ "$DRY_RUN" = 1 ]; then
  : "${TTSCALE_CUDA:=OFF}"
  # The interpreter lets the Triton launch-shape rows check their kernels on the CPU.
  BENCH_ENV=(TTSCALE_BENCH_TINY=1 TTSCALE_BENCH_DEVICES=cpu TRITON_INTERPRET=1)
else
  : "${TTSCALE_CUDA:=ON}"
  BENCH_ENV=(TTSCALE_BENCH_DEVICES=cuda TTSCALE_BENCH_QUICK=1)
fi
: "${GPU_SH_BENCH:=$GPU_BENCH_FILES}"
export GPU_SH_BENCH
BUDGET=${GPU_SH_BUDGET:-270}
BENCH_MIN=${GPU_SH_BENCH_MIN:-100}
REPORT_RESERVE=15
export DRY_RUN OUT WORK PYTHON TTSCALE_CUDA
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
export PATH="/usr/local/cuda/bin:$PATH" CMAKE_BUILD_PARALLEL_LEVEL
export PIP_NO_INDEX=1 PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# Test files that need these are left out, with the reason logged, when they are missing.
export OPTIONAL_MODULES="hypothesis safetensors tokenizers math_verify transformers"

note() { echo "$*" >"$WORK/note.$STAGE"; }
export -f note

# ---------------------------------------------------------------------------------------------
# Stages. Each runs in its own bash under `timeout`; exit 0 passed, 77 skipped, else failed. A
# one-line note for the summary goes through `note`.

stage_env() {
  {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')   dry run: $DRY_RUN"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'no git checkout here')"
    git status --short 2>/dev/null | head -20
    echo
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi 2>&1
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit \
        --format=csv 2>&1
    else
      echo "nvidia-smi: not available"
    fi
    echo; nvcc --version 2>&1 | tail -2
    if command -v compute-sanitizer >/dev/null; then compute-sanitizer --version 2>&1 | head -2
    else echo "compute-sanitizer: not on PATH"; fi
    cmake --version 2>&1 | head -1; echo "ninja $(ninja --version 2>&1)"
    echo; "$PYTHON" - <<'PY'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ["triton", "numpy", "pytest", "pytest_benchmark", "pybind11", "scikit_build_core",
             "hypothesis", "safetensors", "tokenizers", "math_verify", "transformers"]:
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:
        print(name, "MISSING:", type(error).__name__, error)
PY
    echo; lscpu 2>&1 | grep -E "Model name|^CPU\(s\)"; free -g 2>&1 | head -2; df -h . 2>&1 | tail -1
  } >"$OUT/env.txt" 2>&1
  note "$(grep -m1 '^device' "$OUT/env.txt" || echo 'no CUDA device')"
}

install_wheels() {
  # Install only the wheels whose distributions are missing, without dependencies, so nothing
  # already there (torch above all) is replaced.
  [ -d .whl ] || { echo "no .whl/ folder: nothing to install"; return 0; }
  local missing
  missing=$("$PYTHON" - <<'PY'
import importlib.metadata as md, pathlib
for wheel in sorted(pathlib.Path(".whl").glob("*.whl")):
    try:
        md.version(wheel.name.split("-")[0])
    except md.PackageNotFoundError:
        print(wheel)
PY
)
  if [ -z "$missing" ]; then echo ".whl/: every distribution already installed"; return 0; fi
  if [ "$DRY_RUN" = 1 ]; then echo "dry run: would install from .whl/:" $missing; return 0; fi
  echo "installing from .whl/:" $missing
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install -q --no-deps $missing
}

build_with_pip() {
  "$PYTHON" -c "import scikit_build_core" 2>/dev/null || { echo "scikit-build-core missing: pip cannot build"; return 1; }
  "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
}

build_with_cmake() {
  # The same CMake project without pip: the module goes into a staged copy of the package.
  local build="$WORK/cmake-build" site="$WORK/site" generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DTTSCALE_CUDA="$TTSCALE_CUDA" \
    -DPython_EXECUTABLE="$("$PYTHON" -c 'import sys; print(sys.executable)')" \
    -Dpybind11_DIR="$("$PYTHON" -m pybind11 --cmakedir)" || return 1
  cmake --build "$build" || return 1
  mkdir -p "$site/ttscale"
  cp -r python/ttscale/. "$site/ttscale/"
  cp "$build"/_C*.so "$site/ttscale/"
  echo "$site" >"$WORK/pythonpath"
}

stage_build() {
  install_wheels || echo "installing wheels failed; going on"
  echo "TTSCALE_CUDA=$TTSCALE_CUDA"
  local how=pip
  if [ "${GPU_SH_BUILD:-pip}" = cmake ] || ! build_with_pip; then
    how=cmake
    echo "building with CMake directly"
    build_with_cmake || { note "build failed"; return 1; }
  fi
  if [ -f "$WORK/pythonpath" ]; then PYTHONPATH=$(cat "$WORK/pythonpath"); export PYTHONPATH; fi
  local built
  built=$("$PYTHON" -c "import ttscale._C as C; print('CUDA' if C.with_cuda else 'CPU only')") || {
    note "built with $how, but ttscale._C does not import"; return 1; }
  "$PYTHON" -c "import ttscale; print('ttscale imports from', ttscale.__path__[0])"
  note "built with $how: $built"
  [ "$TTSCALE_CUDA" != ON ] || [ "$built" = CUDA ]
}

stage_selfcheck() {
  "$PYTHON" -m ttscale.cli selfcheck
  local rc=$?
  note "$(grep -E 'checks passed' "$OUT/tests.log" | tail -1)"
  return $rc
}

pytest_args() {
  # The project's addopts name pytest-benchmark's options; without the plugin, drop them.
  echo "-p no:cacheprovider"
  "$PYTHON" -c "import pytest_benchmark" 2>/dev/null || echo "-o addopts=-ra"
}

stage_tests() {
  local workers=()
  [ "$DRY_RUN" = 1 ] || ! "$PYTHON" -c "import xdist" 2>/dev/null || workers=(-n "${GPU_SH_TEST_WORKERS:-8}")
  # shellcheck disable=SC2046
  "$PYTHON" -m pytest tests -m gpu -q -rfEs --continue-on-collection-errors $(pytest_args) "${workers[@]}" \
    --junitxml="$WORK/tests.xml"
  note "$("$PYTHON" bench/gpu_report.py junit "$WORK/tests.xml")"
  "$PYTHON" bench/gpu_report.py junit "$WORK/tests.xml" --check >/dev/null
}

stage_sanitizer() {
  # The first case of each CUDA-kernel test function (the caching allocator off, so that an
  # access past a tensor's end is caught rather than landing in a cached neighbour). Without a
  # GPU the chosen tests run without the sanitizer (they skip), which checks the selection.
  local ids sanitizer runner=()
  # shellcheck disable=SC2046
  ids=$("$PYTHON" -m pytest tests -m gpu -k cuda --collect-only -q $(pytest_args) 2>/dev/null \
    | grep '::' | awk -F'[' '!seen[$1]++' | head -n "${GPU_SH_SANITIZER_TESTS:-12}")
  echo "tests chosen:"; echo "${ids:-(none)}"
  [ -n "$ids" ] || { note "no CUDA-kernel tests collected"; return 77; }
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/compute-sanitizer/compute-sanitizer)
  local gpu=1
  "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || gpu=0
  if [ "$gpu" = 1 ] && [ ! -x "$sanitizer" ]; then note "skipped: compute-sanitizer not found"; return 77; fi
  [ "$gpu" = 1 ] && runner=("$sanitizer" --tool memcheck --error-exitcode 99 --print-limit 20)
  # shellcheck disable=SC2046,SC2086
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${runner[@]}" "$PYTHON" -m pytest -q -x -rfEs $(pytest_args) \
    --junitxml="$WORK/sanitizer.xml" $ids
  local rc=$?
  if [ "$gpu" = 0 ]; then
    note "skipped: no CUDA device; the $(echo "$ids" | wc -l) chosen tests ran without it (rc $rc)"
    return 77
  fi
  local errors
  errors=$(grep -E "ERROR SUMMARY" "$OUT/sanitizer.log" | tail -1)
  note "${errors:-no memcheck summary}; tests: $("$PYTHON" bench/gpu_report.py junit "$WORK/sanitizer.xml")"
  return $rc
}

stage_bench() {
  "$PYTHON" -c "import pytest_benchmark" 2>/dev/null || { note "skipped: pytest-benchmark missing"; return 77; }
  local files=() failed=0 passed=0 deadline=$(( SECONDS + ${STAGE_LIMIT:-600} - 5 )) file
  # bench_serve.py is a command-line script (it starts its own server), not a pytest file
  for file in bench/bench_*.py; do [ "$file" = bench/bench_serve.py ] || files+=("$file"); done
  if [ "${GPU_SH_BENCH:-all}" != all ]; then
    files=(); for name in $GPU_SH_BENCH; do files+=("bench/bench_${name}.py"); done
  fi
  local select=()
  [ -z "${GPU_SH_BENCH_SELECT:-}" ] || select=(-k "$GPU_SH_BENCH_SELECT")
  mkdir -p "$WORK/bench"
  for i in "${!files[@]}"; do
    # SIGINT first: pytest then stops cleanly and still prints its tables.
    local file=${files[$i]} name left limit
    name=$(basename "$file" .py)
    left=$(( ${#files[@]} - i - 1 ))
    limit=$(( deadline - SECONDS - 20 * left ))
    (( limit > ${GPU_SH_BENCH_FILE_LIMIT:-300} )) && limit=${GPU_SH_BENCH_FILE_LIMIT:-300}
    if (( limit < 10 )); then
      printf '%s\tskipped\t0\tno time left\n' "$name" >>"$WORK/bench/status.tsv"; continue
    fi
    echo "### $file (limit ${limit}s)"
    local start=$SECONDS
    # shellcheck disable=SC2046
    env "${BENCH_ENV[@]}" TTSCALE_BENCH_JSON="$WORK/bench/$name.json" timeout -s INT --kill-after=15 "$limit" \
      "$PYTHON" -m pytest "$file" "${select[@]}" --benchmark-enable -s -q -rfEs $(pytest_args)
    local rc=$? status=passed
    # 5: GPU_SH_BENCH_SELECT matched nothing in this file
    case $rc in 0) ;; 5) status=skipped ;; 124|137) status=timeout ;; *) status=failed ;; esac
    case $status in passed) passed=$((passed + 1)) ;; skipped) ;; *) failed=$((failed + 1)) ;; esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - start ))" "rc $rc" >>"$WORK/bench/status.tsv"
  done
  note "$passed of ${#files[@]} benchmark files passed"
  (( failed == 0 ))
}

export -f stage_env install_wheels build_with_pip build_with_cmake stage_build stage_selfcheck \
  pytest_args stage_tests stage_sanitizer stage_bench
export BENCH_ENV_STRING="${BENCH_ENV[*]}"

# ---------------------------------------------------------------------------------------------
# The runner.

run_stage() {  # name, cap in seconds, log file; the stage function is stage_<name>
  local name=$1 cap=$2 log=$3 keep=$4
  case " ${GPU_SH_STAGES:-env build tests bench selfcheck} " in
    *" $name "*) ;;
    *) printf '%s\tskipped\t0\tnot in GPU_SH_STAGES\n' "$name" >>"$WORK/stages.tsv"; return ;;
  esac
  local left=$(( BUDGET - SECONDS - REPORT_RESERVE - keep ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 5 )); then
    printf '%s\tskipped\t0\tno time left in the budget\n' "$name" >>"$WORK/stages.tsv"
    echo "[gpu.sh] $name: skipped, no time left"; return
  fi
  echo "[gpu.sh] $(date -u +%H:%M:%S) $name: up to ${limit}s -> $(basename "$log")"
  echo "### stage $name, $(date -u '+%H:%M:%S UTC'), limit ${limit}s" >>"$log"
  local start=$SECONDS
  STAGE=$name STAGE_LIMIT=$limit BENCH_ENV_STRING="$BENCH_ENV_STRING" \
    timeout --kill-after=10 "$limit" bash -c "set -uo pipefail; BENCH_ENV=(\$BENCH_ENV_STRING); stage_$name" >>"$log" 2>&1
  local rc=$? took=$(( SECONDS - start )) status note=""
  [ -f "$WORK/note.$name" ] && note=$(head -c 300 "$WORK/note.$name")
  case $rc in
    0) status=passed ;;
    77) status=skipped ;;
    124|137) status=timeout; note="killed after ${limit}s. $note" ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$note" >>"$WORK/stages.tsv"
  echo "[gpu.sh] $name: $status in ${took}s. $note"
  # The build decides where the package is imported from for every later stage.
  if [ "$name" = build ] && [ -f "$WORK/pythonpath" ]; then export PYTHONPATH; PYTHONPATH=$(cat "$WORK/pythonpath"); fi
}

echo "[gpu.sh] dry run: $DRY_RUN, headline: $HEADLINE, python: $PYTHON, TTSCALE_CUDA=$TTSCALE_CUDA, budget ${BUDGET}s, benchmarks: $GPU_SH_BENCH, out: $OUT"
: >"$OUT/tests.log"
run_stage env 20 "$WORK/env.log" "$BENCH_MIN"
run_stage build 180 "$OUT/build.log" "$BENCH_MIN"
# The whole GPU test set first: the code is verified on the GPU before anything is measured.
run_stage tests "${GPU_SH_TESTS_LIMIT:-110}" "$OUT/tests.log" "$BENCH_MIN"
run_stage sanitizer 75 "$OUT/sanitizer.log" "$BENCH_MIN"
run_stage bench "${GPU_SH_BENCH_LIMIT:-420}" "$OUT/bench.log" 0
# Last: it repeats what the GPU tests check, so it takes only the time the benchmarks left.
run_stage selfcheck "${GPU_SH_SELFCHECK_LIMIT:-60}" "$OUT/tests.log" 0

timeout 30 "$PYTHON" bench/gpu_report.py merge --work "$WORK" --out "$OUT" --dry-run "$DRY_RUN"
rc=$?
if (( rc > 1 )); then echo "[gpu.sh] the report itself failed (rc $rc); stages:"; cat "$WORK/stages.tsv"; fi
exit "$rc"
