#!/usr/bin/env bash
# The main job of the README: installs what is missing (CPU torch pinned), then runs the embedded
# end-to-end distillation under runs/demo: a synthetic task with one-answer and several-answer families,
# the shipped teacher (fastdadpo/demo_data/teacher), per seed a 20%-pruned student, generate, dSFT, dDPO,
# daDPO, token-level daDPO; 3 seeds, a daDPO β2 sweep in the first, then mean ± std tables, paired tests
# and plots. Nothing is downloaded. Extra arguments go to `fastdadpo demo` (--fresh, --quick, --seed N,
# --seeds N, --beta2-sweep LIST, --threads N, --out DIR).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FASTDADPO_EXTRAS=${FASTDADPO_EXTRAS:-dev,bench} source "$root/scripts/setup.sh"
cd "$root"
export TOKENIZERS_PARALLELISM=false
"$PYTHON" -m fastdadpo demo "$@"
