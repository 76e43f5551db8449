#!/usr/bin/env bash
# One cell of the version matrix on a CPU machine, each in its own new virtual environment
# (.venv-matrix-CELL, rebuilt when its stack changes). The README's matrix table is these results.
#
#   bash scripts/matrix.sh lock        Python 3.11, the lock (requirements/lock-*.txt): the full suite (CI's run)
#   bash scripts/matrix.sh latest      python3, the newest release of every dependency (the machine's
#                                      torch cap lifted: torch from PyPI): the fast tier
#   bash scripts/matrix.sh gpu-stack   Python 3.12, requirements/matrix-gpu-stack.txt (the GPU machine's
#                                      torch 2.11, triton 3.6.0, transformers 5.17): import, CLI smoke, the
#                                      compile report (sm_90a, sm_80), the kernel tests
#   bash scripts/matrix.sh oldest      Python 3.10, requirements/matrix-oldest.txt (setup.py's floors): the
#                                      fast tier
#
# Extra arguments go to pytest. The last line printed is the README table's row; it is also written to
# runs/matrix/CELL.md.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cell=${1:-}
[ $# -gt 0 ] && shift

# python_for VERSION: an interpreter of that minor version (PATH first, then pyenv's installs).
python_for() {
    local candidate
    for candidate in "python$1" "$HOME"/.pyenv/versions/"$1".*/bin/python"$1"; do
        if "$candidate" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$1'.split('.')))" \
                >/dev/null 2>&1; then
            command -v "$candidate" || echo "$candidate"
            return
        fi
    done
    echo "no Python $1 found (PATH or ~/.pyenv/versions)" >&2
    exit 2
}

case "$cell" in
    lock) python=$(python_for 3.11); stack=lock; tier=full ;;
    latest) python=python3; stack=latest; tier=fast
        # This machine's pip config caps torch at the releases on its disk; the newest is on PyPI.
        export PIP_CONFIG_FILE=/dev/null ;;
    gpu-stack) python=$(python_for 3.12); stack=$root/requirements/matrix-gpu-stack.txt; tier=gpu-stack ;;
    oldest) python=$(python_for 3.10); stack=$root/requirements/matrix-oldest.txt; tier=fast ;;
    *) echo "usage: bash scripts/matrix.sh lock|latest|gpu-stack|oldest [pytest arguments]" >&2; exit 2 ;;
esac

export FASTDADPO_VENV=$root/.venv-matrix-$cell FASTDADPO_PYTHON=$python FASTDADPO_STACK=$stack
started=$(date +%s)
source "$root/scripts/setup.sh"
cd "$root"
versions=$("$PYTHON" - <<'PY'
import importlib.metadata as md, sys
parts = [f"Python {sys.version_info[0]}.{sys.version_info[1]}"]
for name in ("torch", "triton", "transformers", "deepspeed", "numpy"):
    try:
        parts.append(f"{name} {md.version(name).split('+')[0]}")
    except md.PackageNotFoundError:
        parts.append(f"{name} -")
print(", ".join(parts))
PY
)
log=$root/runs/matrix/$cell.log
mkdir -p "$root/runs/matrix"
set +e
case "$tier" in
    full) bash "$root/scripts/test.sh" "$@" 2>&1 | tee "$log" ;;
    fast) bash "$root/scripts/test.sh" --fast "$@" 2>&1 | tee "$log" ;;
    gpu-stack)
        {
            export TRITON_INTERPRET=1
            "$PYTHON" -c "import fastdadpo, fastdadpo.kernels, fastdadpo.commands.train, transformers.activations; print('import ok')" &&
            "$PYTHON" -m fastdadpo --help >/dev/null && echo "cli ok" &&
            "$PYTHON" bench/compile_report.py --out "$root/runs/matrix/gpu-stack-compile" &&
            "$PYTHON" -m pytest -p no:cacheprovider tests/test_kernels.py tests/test_kernels_chunked.py \
                tests/test_kernels_frozen_head.py tests/test_kernels_softcap.py tests/test_compile.py \
                tests/test_packaging.py "$@"
        } 2>&1 | tee "$log" ;;
esac
status=${PIPESTATUS[0]}
set -e
# pytest's closing lines (tests, then the benchmark suite), with or without their ==== borders.
summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error).* in [0-9.]+s" "$log" | sed -E 's/^=+ //; s/ =+$//' | paste -sd';' -)
[ -n "$summary" ] || summary="no pytest summary"
result=$([ "$status" = 0 ] && echo pass || echo "FAIL (exit $status)")
row="| $cell | $versions | $tier | $result: $summary ($(( ($(date +%s) - started) / 60 )) min with setup) | $(date -u +%Y-%m-%d) |"
echo "$row" > "$root/runs/matrix/$cell.md"
echo "$row"
exit "$status"
