#!/usr/bin/env bash
# Installs what fastdadpo needs, idempotently, into the project's virtual environment; sourced by
# demo.sh, test.sh and the matrix. Sets PYTHON to that environment's interpreter.
#
#   FASTDADPO_VENV      the environment (default: .venv in the repository root; created if missing)
#   FASTDADPO_STACK     lock (default): the exact tested versions, requirements/lock-*.txt;
#                       latest: the newest release of every dependency that setup.py's ranges admit;
#                       or the path of a constraints file (a matrix cell: requirements/matrix-*.txt)
#   FASTDADPO_EXTRAS    setup.py extras to install (default: dev,bench,tensorboard,wandb)
#   FASTDADPO_PYTHON    the interpreter that creates the environment (default: python3)
#
# torch comes first, pinned: a bare `torch` requirement on a machine without torch pulls the newest
# CUDA build (several GB); where a CPU build of the pinned version is on the pip's find-links (as on
# our CPU machines), pip takes it. Nothing else from the calling environment is used: a package the
# machine happens to have cannot make a run pass or fail.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${FASTDADPO_VENV:-$root/.venv}
stack=${FASTDADPO_STACK:-lock}
extras=${FASTDADPO_EXTRAS:-dev,bench,tensorboard,wandb}

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating the virtual environment $venv (${FASTDADPO_PYTHON:-python3})"
    "${FASTDADPO_PYTHON:-python3}" -m venv "$venv"
fi
PYTHON=$venv/bin/python
if [ "$stack" = lock ] && ! "$PYTHON" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then
    echo "[setup] $venv has Python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'); the lock" \
        "(requirements/lock-*.txt) is resolved for Python 3.11 and newer. Point FASTDADPO_PYTHON at a" \
        "Python 3.11+ (and remove $venv), or take setup.py's ranges with FASTDADPO_STACK=latest." >&2
    exit 2
fi

case "$stack" in
    lock) constraints=("$root/requirements/lock-cpu.txt" "$root/requirements/lock-bench.txt") ;;
    latest) constraints=() ;;
    *) [ -f "$stack" ] || { echo "[setup] FASTDADPO_STACK=$stack: neither lock, latest nor a constraints file" >&2; exit 2; }
       constraints=("$stack") ;;
esac
# pip, without the notes some machines' pip configuration prints for every index entry it skips.
pip_install() {
    "$PYTHON" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}
constraint_args=()
for file in ${constraints[@]+"${constraints[@]}"}; do constraint_args+=(-c "$file"); done

# The stamp records what the environment was built from; any change (setup.py, a lock, the stack,
# the extras) reinstalls. `latest` always re-resolves: a newer release is the point.
digest=$(cat "$root/setup.py" ${constraints[@]+"${constraints[@]}"} | sha256sum | cut -c1-16)
want="$stack $extras $digest"
stamp="$venv/.fastdadpo-stamp"
# (Once per command: a script that sources this twice, as the matrix does through test.sh, resolves once.)
if { [ "$stack" = latest ] && [ "${FASTDADPO_SET_UP:-}" != "$venv $want" ]; } || [ ! -f "$stamp" ] \
        || [ "$(cat "$stamp")" != "$want" ] || ! "$PYTHON" -c "import fastdadpo.kernels" >/dev/null 2>&1; then
    upgrade=()
    [ "$stack" = latest ] && upgrade=(--upgrade --upgrade-strategy eager)
    # The stack's torch pin; a stack without one takes the lock's (latest: the newest release).
    torch_pin=torch
    if [ "$stack" != latest ]; then
        torch_pin=$(awk '/^torch==/ {print; exit}' ${constraints[@]+"${constraints[@]}"} "$root/requirements/lock-cpu.txt")
    fi
    echo "[setup] installing $torch_pin into $venv"
    pip_install ${upgrade[@]+"${upgrade[@]}"} ${constraint_args[@]+"${constraint_args[@]}"} "$torch_pin"
    echo "[setup] installing fastdadpo[$extras] (editable; stack: $stack)"
    pip_install ${upgrade[@]+"${upgrade[@]}"} ${constraint_args[@]+"${constraint_args[@]}"} -e "$root[$extras]"
    "$PYTHON" -m pip check
    echo "$want" > "$stamp"
fi
"$PYTHON" - <<'PY'
import importlib.metadata as md
names = ["torch", "triton", "transformers", "deepspeed", "numpy", "kernels", "trl", "liger-kernel"]
found = []
for name in names:
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
import sys
print(f"[setup] Python {sys.version.split()[0]}: " + ", ".join(found))
PY
FASTDADPO_SET_UP="$venv $want"
export PYTHON FASTDADPO_SET_UP
