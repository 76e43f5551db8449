#!/usr/bin/env bash
# The main job of the README: installs what is missing (CPU torch pinned), then runs the embedded
# end-to-end distillation (synthetic task, the shipped teacher (fastdadpo/demo_data/teacher), 20%-pruned student, generate,
# dSFT, dDPO, daDPO, token-level daDPO, comparison table and plots) under runs/demo. Nothing is downloaded.
# Extra arguments go to `fastdadpo demo` (--fresh, --quick, --seed N, --out DIR).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FASTDADPO_EXTRAS=${FASTDADPO_EXTRAS:-dev,bench} source "$root/scripts/setup.sh"
cd "$root"
export TOKENIZERS_PARALLELISM=false
"$PYTHON" -m fastdadpo demo "$@"
