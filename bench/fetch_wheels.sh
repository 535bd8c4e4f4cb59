#!/usr/bin/env bash
# Fill .whl/ with the wheels the GPU machine lacks (it has Python 3.12, torch, triton, pytest,
# pytest-benchmark, pybind11, cmake and ninja, and no internet): the build backend and the
# test-only packages, with their dependencies, for CPython 3.12 on x86_64 Linux. Never torch.
# Then carry it along: run(command="bash bench/gpu.sh", carry=[".whl"]). bench/gpu.sh installs
# only the wheels whose distributions are missing there, without dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
packages=("scikit-build-core>=0.10" hypothesis safetensors tokenizers "math-verify>=0.7" transformers)
# torch's own dependencies are on the GPU machine already; leave them (and torch) out.
already_there="torch triton nvidia sympy mpmath networkx jinja2 markupsafe filelock fsspec typing-extensions setuptools"
rm -rf .whl && mkdir -p .whl
"$python" -m pip download -q --dest .whl --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any "${packages[@]}"
for name in $already_there; do
  find .whl -iname "${name//-/_}-*.whl" -delete
done
ls -la .whl
du -sh .whl
