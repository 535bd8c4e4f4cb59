#!/usr/bin/env bash
# Create a virtual environment with ttscale installed from this checkout (editable), plus the
# extras named in $1 (for example "test" or "demo"). Safe to run again: it reuses what is there.
#
#   scripts/setup_env.sh EXTRAS constraints.txt  .venv, every package at the version the file pins
#   scripts/setup_env.sh EXTRAS --latest         .venv-latest, the newest release of every package
#
# The pinned environment is what `make test`, `make demo` and CI use, so that an upstream release
# cannot turn them red overnight; `make test-latest` uses the latest one, so that drift is found on
# purpose. README.md ("Pinned versions") says how to refresh constraints.txt.
#
# Torch and Triton are not pinned in constraints.txt: where the system Python already has torch
# (a GPU machine), the venv sees it and pip keeps it. Otherwise the CPU build torch==2.13.0 is
# installed first, so that nothing can pull a multi-GB CUDA build. Either way a second constraints
# file, derived here, holds torch and triton at the installed versions for every pip call.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
mode="${2:-constraints.txt}"
python="${PYTHON:-python3}"
if [ "$mode" = --latest ]; then
  venv=.venv-latest; pins=()
elif [ -f "$mode" ]; then
  venv=.venv; pins=(-c "$mode")
else
  echo "setup_env.sh: expected a constraints file or --latest, got '$mode'" >&2; exit 2
fi

if [ ! -x "$venv/bin/python" ]; then
  if "$python" -c "import torch" 2>/dev/null; then
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi

# pip, without the "Location ... is ignored" lines that a find-links folder missing on this kind
# of machine makes pip print for every package (harmless, and alarming to a new user).
pip() {
  "$venv/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -e "is ignored: it is neither a file nor a directory" -e "^$" || true; }
}

# numpy before torch: torch warns at import ("Failed to initialize NumPy") when numpy is missing.
pip install -q "${pins[@]}" numpy
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  pip install -q "torch==2.13.0"
fi
derived="$venv/torch-constraints.txt"
"$venv/bin/python" - >"$derived" <<'PY'
import importlib.metadata as md
import torch
print(f"torch=={torch.__version__}")
try:
    print(f"triton=={md.version('triton')}")
except md.PackageNotFoundError:
    print("triton==3.7.1")  # the version the CUDA build of torch 2.13.0 pins (TOOLCHAIN.md)
PY

upgrade=()
[ "$mode" = --latest ] && upgrade=(--upgrade --upgrade-strategy eager)
# Build requirements in the venv, so that rebuilds skip build isolation (seconds, not minutes).
pip install -q "${upgrade[@]}" -c "$derived" "${pins[@]}" \
  "scikit-build-core>=0.10" "pybind11>=2.13" ninja cmake
spec="."
[ -n "$extras" ] && spec=".[$extras]"
pip install -q "${upgrade[@]}" -c "$derived" "${pins[@]}" --no-build-isolation -e "$spec"
"$venv/bin/python" -c "import ttscale, ttscale._C; print('ttscale', ttscale.__version__, 'installed in $venv; CUDA kernels built:', ttscale._C.with_cuda)"
