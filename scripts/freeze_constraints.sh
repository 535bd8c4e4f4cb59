#!/usr/bin/env bash
# Print constraints.txt for the environment in $1 (default .venv-latest): every installed package
# at its installed version, except torch and triton (setup_env.sh derives those from the machine:
# the CPU build here, the system's torch on a GPU machine) and ttscale itself.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-latest}"
echo "# The versions \`make test\` was last green with (scripts/freeze_constraints.sh $venv, $(date -u +%F))."
echo "# torch and triton are derived by scripts/setup_env.sh, not pinned here."
"$venv/bin/python" -m pip --disable-pip-version-check freeze --local --exclude-editable 2>/dev/null \
  | grep -v -i -e "^torch==" -e "^triton==" -e "^nvidia-" -e "^ttscale" -e "^#" | LC_ALL=C sort -f
