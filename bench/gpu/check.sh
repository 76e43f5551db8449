#!/usr/bin/env bash
# One prepared GPU check, run in a single device call (H100/H200, under 9 minutes):
#   1. install the carried wheels (.whl/, from gpu-wheels.sh) into /tmp/site, and this repo (-e);
#   2. correctness: the compiled kernels (chunked and tile-fused) in bf16 against float64 at N=8192,
#      H 2048/4096, V=128,256 and 151,936, values and gradients (bench/gpu/check.py correctness);
#   3. kernel benchmarks: fwd+bwd time and peak memory of ours (chunked, tile-fused), Liger, CCE,
#      naive and torch.compile at Liger's, CCE's and Qwen2.5's configs (the bench/ suite, N=8192);
#   4. one `fastdadpo train` step (dadpo_token, ZeRO-3, one GPU) with randomly initialised
#      Qwen2.5-shaped 7B teacher and 1.5B student at the largest micro-batch that fits, against
#      FASTDADPO_KERNEL_BACKEND=naive (bench/gpu/check.py train);
#   5. summary: $OUT/gpu-check.json and $OUT/gpu-check.md, plus each stage's JSON and log.
# The train step's models are built in the background while stages 2-3 run.
# Every stage runs under its own time limit, so one failing or slow stage still leaves the others'
# results. Exit status: 0 when every stage passed, 1 otherwise (the results say which).
#
# Usage:  bash bench/gpu/check.sh             (on the GPU machine; results under $OUT)
#         bash bench/gpu/check.sh --dry-run   (CPU, tiny sizes: checks the script's own code)
set -uo pipefail

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu/check.sh [--dry-run]" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root" || exit 2
out=${OUT:-$root/bench/gpu/out}
mkdir -p "$out"
# Total wall-clock allowance (the device call's limit is 600 s; the dry run on a shared CPU is slower).
# Stage limits are scaled by limit_scale: the dry run's interpreter and CPU start-ups are slower.
if (( dry_run )); then
  total_s=${FASTDADPO_GPU_CHECK_SECONDS:-1800}
  limit_scale=3
else
  total_s=${FASTDADPO_GPU_CHECK_SECONDS:-530}
  limit_scale=1
fi
started=$SECONDS
failed=0
stages_json="$out/stages.json"
echo "{}" > "$stages_json"

left() { echo $(( total_s - (SECONDS - started) )); }

# run_stage NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, logs to $out/NAME.log, records
# its exit status and duration in stages.json.
run_stage() {
  local name=$1 limit=$(( $2 * limit_scale ))
  shift 2
  local begin=$SECONDS rc
  if (( limit < 10 )); then
    echo "== $name: skipped (no time left)"
    rc=124
  else
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    tail -n 15 "$out/$name.log"
  fi
  (( rc != 0 )) && failed=1
  python3 - "$stages_json" "$name" "$rc" "$(( SECONDS - begin ))" <<'EOF'
import json, sys
path, name, rc, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open(path) as handle:
    stages = json.load(handle)
stages[name] = {"rc": rc, "seconds": seconds, "timed_out": rc in (124, 137)}
with open(path, "w") as handle:
    json.dump(stages, handle, indent=1)
EOF
  echo "== $name: exit $rc after $(( SECONDS - begin ))s"
}

# --- 1. environment ----------------------------------------------------------------------------------------
if (( dry_run )); then
  export TRITON_INTERPRET=1
  sizes=tiny
  tokens=N256
  bench_flags=(--bench-quick --benchmark-disable)
else
  # shellcheck disable=SC2016  # expanded by the inner bash
  run_stage install 120 bash -c '
    if compgen -G ".whl/*.whl" > /dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    else
      echo "no .whl/ carried: Liger, CCE and DeepSpeed will be missing (run ../shared/tools/gpu-wheels.sh first)"
    fi
    PYTHONPATH=/tmp/site:$PWD python3 -m pip install -q --no-deps --no-build-isolation -e .'
  export PYTHONPATH=/tmp/site:$root
  sizes=liger,cce,qwen2.5-7b-1.5b
  tokens=N8192
  bench_flags=(--bench-rounds 3 --bench-warmup 1 "--benchmark-json=$out/bench-kernels.json")
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

python_dry=()
(( dry_run )) && python_dry=(--dry-run)

# The train step's models (15 GB of teacher weights to write) are built in the background meanwhile;
# the train stage waits for them.
timeout --kill-after=10 $(( 300 * limit_scale )) python3 bench/gpu/check.py build-models --out "$out" \
  "${python_dry[@]}" > "$out/build-models.log" 2>&1 &
build_pid=$!

# --- 2. correctness ----------------------------------------------------------------------------------------
run_stage correctness "$(( $(left) < 110 ? $(left) : 110 ))" \
  python3 bench/gpu/check.py correctness --out "$out" "${python_dry[@]}"

# --- 3. kernel benchmarks (the bench/ suite, one case per config) -----------------------------------------------
# Liger's config with its own loss (JSD), CCE's with its own (cross-entropy), Qwen2.5's with a KD
# loss that also takes the token log-probs; every implementation but the duplicates of ours
# ("fastdadpo" is the chunked default on CUDA, "fastdadpo-no-hint" a variant).
selection="$tokens and (liger-$tokens-jsd- or cce-$tokens-logprobs- or qwen2.5-7b-1.5b-$tokens-kd_with_targets-"
selection+=" or tiny-$tokens-jsd- or tiny-$tokens-logprobs-)"
selection+=" and (fastdadpo-chunked or fastdadpo-tile-fused or jsd-liger or targets-liger or logprobs-cce or naive)"
bench_limit=$(( $(left) - 150 ))
(( bench_limit > 240 )) && bench_limit=240
run_stage bench "$bench_limit" \
  python3 -m pytest bench -q -p no:cacheprovider -m "not train" "--bench-sizes=$sizes" -k "$selection" \
    "${bench_flags[@]}"
if [[ -f "$out/bench-kernels.json" ]]; then
  run_stage report 30 python3 bench/report.py "$out/bench-kernels.json" --out "$out" --name gpu-kernels
fi

# --- 4. the train step ---------------------------------------------------------------------------------------
wait "$build_pid"
echo "== build-models: exit $? ($(tail -n 1 "$out/build-models.log"))"
train_limit=$(( $(left) - 15 ))
run_stage train "$train_limit" \
  python3 bench/gpu/check.py train --out "$out" --deadline-s "$(( train_limit * limit_scale - 10 ))" "${python_dry[@]}"

# --- 5. summary ----------------------------------------------------------------------------------------------
run_stage summary 15 python3 bench/gpu/check.py summary --out "$out"
echo "results: $out/gpu-check.md, $out/gpu-check.json (total $(( SECONDS - started ))s)"
exit "$failed"
