#!/usr/bin/env bash
# Installs what fastdadpo needs into the current Python, idempotently. Sourced by demo.sh and test.sh.
# torch is installed first and pinned: a bare `torch` requirement on a machine without torch
# pulls the newest CUDA build (several GB); 2.13.0 resolves to the local CPU build here.
set -euo pipefail
PYTHON=${PYTHON:-python3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch==${TORCH_VERSION:-2.13.0}"
    "$PYTHON" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
stamp="$root/.setup-stamp"
extras=${FASTDADPO_EXTRAS:-dev,bench}
if [ ! -f "$stamp" ] || [ "$root/setup.py" -nt "$stamp" ] || [ "$(cat "$stamp")" != "$extras" ] \
        || ! "$PYTHON" -c "import fastdadpo.kernels" >/dev/null 2>&1; then
    echo "[setup] installing fastdadpo[$extras] (editable)"
    "$PYTHON" -m pip install -q -e "$root[$extras]"
    echo "$extras" > "$stamp"
fi
