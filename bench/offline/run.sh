#!/usr/bin/env bash
# Node side, one command:  bash STAGE/batch_00/run.sh OUT [STAGE]
#
# STAGE (default: the folder above this script's batch_00) holds the batch folders made by
# bench/offline/stage.py. Joins split wheels and checks every sha256, installs the wheels
# into OUT/site (pip --target: the node's Python is not changed), unpacks the source into
# OUT/src, then runs bench/gpu_check.py from it with a budget that ends the whole command
# inside MAPET_DEADLINE_S seconds (default 540: well inside 10 minutes). gpu_check prints
# its results after every part and on SIGTERM, so the `timeout` backstop loses nothing.
# Writes OUT/install.json, OUT/gpu_check.txt (progress + table), OUT/gpu_check.stderr,
# OUT/gpu_check.json (the last JSON line). Environment: PYTHON (default python3),
# MAPET_DEADLINE_S, MAPET_CHECK_ARGS (extra gpu_check arguments, e.g. "--parts step,kmeans").
set -euo pipefail
T0=$(date +%s)
HERE=$(cd "$(dirname "$0")" && pwd)
if [ $# -lt 1 ]; then
    echo "usage: bash $0 OUT [STAGE]" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
STAGE=${2:-$(dirname "$HERE")}
PY=${PYTHON:-python3}
DEADLINE=${MAPET_DEADLINE_S:-540}

"$PY" "$HERE/node_install.py" "$STAGE" "$OUT" | tee "$OUT/install.log"
tail -n 1 "$OUT/install.log" > "$OUT/install.json"
SRC="$OUT/src"
[ -f "$SRC/bench/gpu_check.py" ] || SRC=$(cd "$HERE/../.." && pwd)  # run from a checkout, no tarball staged

# The staged site goes before the node's own: it holds only what the node lacks. Its
# nvidia/__init__.py (pkgutil-style, from the DALI/CUDA wheels) extends the namespace over
# the node's nvidia/* packages too.
export PYTHONPATH="$SRC:$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$OUT/site/bin:$PATH"  # the deepspeed launcher

ELAPSED=$(( $(date +%s) - T0 ))
BUDGET=$(( DEADLINE - ELAPSED - 60 ))  # 60 s: stop margin + interpreter start + writing results
if [ "$BUDGET" -lt 60 ]; then
    echo "error: only ${BUDGET}s left of MAPET_DEADLINE_S=${DEADLINE} after the install: raise it" >&2
    exit 2
fi
echo "installed in ${ELAPSED}s; gpu_check budget ${BUDGET}s"
RC=0
# shellcheck disable=SC2086  # MAPET_CHECK_ARGS is a list of arguments
timeout -k 10 $(( BUDGET + 50 )) "$PY" "$SRC/bench/gpu_check.py" --budget "$BUDGET" --stop-after $(( BUDGET + 35 )) \
    ${MAPET_CHECK_ARGS:-} 2> "$OUT/gpu_check.stderr" | tee "$OUT/gpu_check.txt" || RC=$?
grep '^{' "$OUT/gpu_check.txt" | tail -n 1 > "$OUT/gpu_check.json" || true
echo "gpu_check exit code $RC; results: $OUT/gpu_check.txt, $OUT/gpu_check.json ($(( $(date +%s) - T0 ))s in all)"
exit "$RC"
