#!/usr/bin/env bash
# The test command of the README: installs what is missing (scripts/setup.sh: the project's .venv, from
# the lock), then runs the CPU test suite (Triton kernels under the interpreter, DeepSpeed ZeRO-3 with
# two gloo ranks) and a quick run of the benchmark suite that only checks it runs.
#
#   bash scripts/test.sh            the full suite (CI's run)
#   bash scripts/test.sh --fast     the fast tier: every unit, kernel and objective check and the tiny
#                                   trainer runs; the tests marked `slow` (multi-rank runs, resumes, the
#                                   miniature demo and recipes, subprocess sweeps) are left out
# Further arguments go to pytest (tests/).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tier=full
if [ "${1:-}" = "--fast" ]; then
    tier=fast
    shift
fi
source "$root/scripts/setup.sh"
cd "$root"
markers=()
[ "$tier" = fast ] && markers=(-m "not slow")
echo "[test] tier: $tier"
"$PYTHON" -m pytest tests ${markers[@]+"${markers[@]}"} "$@"
# The benchmark suite in quick mode: every case, implementation and memory probe runs and agrees
# with the reference at tiny sizes; no timing is asserted (bench/README.md).
"$PYTHON" -m pytest bench -q --bench-quick --benchmark-disable -p no:cacheprovider ${markers[@]+"${markers[@]}"}
