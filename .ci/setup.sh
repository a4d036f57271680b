#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) on a fresh machine.
# Idempotent: a stamp holding the hash of the install inputs skips the work when
# nothing changed. Override the location with MAPET_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MAPET_VENV:-.venv}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp="$VENV/.mapet_stamp"
want=$(cat pyproject.toml .ci/constraints.txt .ci/setup.sh | sha256sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] building $VENV (a few minutes on a fresh machine)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c .ci/constraints.txt "$@"; }
pip_install setuptools wheel ninja
# torch first: DeepSpeed's setup.py imports it, so DeepSpeed builds without isolation.
pip_install torch torchvision
# DeepSpeed ops are JIT-built on first use; prebuild the CPU shared-memory comm op
# here (once, ~5 min) so the first distributed run does not stall on a compile.
if ! "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
  DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 \
    pip_install --no-build-isolation --no-cache-dir deepspeed
fi
pip_install -e ".[dev]"
echo "$want" > "$stamp"
echo "[setup] done" >&2
