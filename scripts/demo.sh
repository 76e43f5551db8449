#!/usr/bin/env bash
# The main job of the README: installs what is missing (CPU torch pinned), then runs the embedded
# end-to-end distillation under runs/demo: a synthetic task with one-answer and several-answer families,
# the shipped teacher (fastdadpo/demo_data/teacher), per seed a 20%-pruned student, generate, dSFT, dDPO,
# daDPO, token-level daDPO, then the tables (per task kind and family, paired tests) and plots; one seed
# by default (~6 min), the README's table from --seeds 3 --beta2-sweep 0.005,0.05,0.2. Nothing is
# downloaded. Extra arguments go to `fastdadpo demo` (--fresh, --quick, --seed N, --seeds N,
# --beta2-sweep LIST, --threads N, --out DIR).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FASTDADPO_EXTRAS=${FASTDADPO_EXTRAS:-dev,bench,tensorboard,wandb} source "$root/scripts/setup.sh"
cd "$root"
export TOKENIZERS_PARALLELISM=false
"$PYTHON" -m fastdadpo demo "$@"
