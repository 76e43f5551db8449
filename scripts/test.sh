#!/usr/bin/env bash
# The test command of the README: installs what is missing, then runs the CPU test suite
# (Triton kernels under the interpreter, DeepSpeed ZeRO-3 with two gloo ranks) and a
# quick run of the benchmark suite that only checks it runs.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
cd "$root"
"$PYTHON" -m pytest tests "$@"
# The benchmark suite in quick mode: every case, implementation and memory probe runs and agrees
# with the reference at tiny sizes; no timing is asserted (bench/README.md).
"$PYTHON" -m pytest bench -q --bench-quick --benchmark-disable -p no:cacheprovider
