#!/usr/bin/env bash
# Create .venv with ttscale installed from this checkout (editable), plus the extras named in $1
# (for example "test" or "demo"). Safe to run again: it reuses what is there.
#
# Torch: where the system Python already has torch (a GPU machine), the venv sees it and pip
# keeps it. Otherwise the CPU build torch==2.13.0 is installed first, so that nothing can pull a
# multi-GB CUDA build. Either way a constraints file pins torch and triton for every pip call.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
venv=.venv

if [ ! -x "$venv/bin/python" ]; then
  if "$python" -c "import torch" 2>/dev/null; then
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" install -q "torch==2.13.0"
fi
constraints="$venv/constraints.txt"
"$venv/bin/python" - >"$constraints" <<'PY'
import importlib.metadata as md
import torch
print(f"torch=={torch.__version__}")
try:
    print(f"triton=={md.version('triton')}")
except md.PackageNotFoundError:
    print("triton==3.7.1")  # the version the CUDA build of torch 2.13.0 pins (TOOLCHAIN.md)
PY

# Build requirements in the venv, so that rebuilds skip build isolation (seconds, not minutes).
"${pip[@]}" install -q -c "$constraints" "scikit-build-core>=0.10" "pybind11>=2.13" ninja cmake
spec="."
[ -n "$extras" ] && spec=".[$extras]"
"${pip[@]}" install -q -c "$constraints" --no-build-isolation -e "$spec" 2>&1 | grep -v "is ignored" || true
"$venv/bin/python" -c "import ttscale, ttscale._C; print('ttscale', ttscale.__version__, 'installed; CUDA kernels built:', ttscale._C.with_cuda)"
