#!/usr/bin/env bash
# Regenerates the demo's shipped teacher (fastdadpo/demo_data/teacher) from scratch: a 1M-parameter
# Qwen2 trained with `fastdadpo train` on the synthetic task (12,000 steps; 53 min on 2 CPU cores).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
cd "$root"
out=${1:-runs/demo-teacher}
"$PYTHON" -m fastdadpo demo --train-teacher --out "$out" --seeds 1 --beta2-sweep none
rm -rf fastdadpo/demo_data/teacher
mkdir -p fastdadpo/demo_data
cp -r "$out/teacher/final" fastdadpo/demo_data/teacher
echo "shipped teacher updated: fastdadpo/demo_data/teacher"
