"""One ``fastdadpo train`` run with every host sync of its second optimizer step recorded.

    python bench/gpu/sync_probe.py CONFIG.yaml OUT.json

The first step warms up (allocations, compilation, DeepSpeed's first-step work); the second runs
under ``torch.cuda.set_sync_debug_mode("warn")``, which makes every synchronizing CUDA call warn,
and each warning is recorded with the innermost frames of this repository and of the library that
issued it. On CPU (the check's dry run) a ``TorchDispatchMode`` counting
``aten._local_scalar_dense`` (what ``.item()``, ``bool(tensor)`` dispatch to) stands in. Writes
``{"device", "syncs": [{"where", "count", "message"}], "total"}``, grouped by where they come from:
the kernels' own calls should show only their one ``nonzero`` per call.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

_OURS = (os.path.join(ROOT, "fastdadpo"), os.path.join(ROOT, "kernels"))


def _where(stack) -> str:
    """The innermost frame of this repository, and the innermost frame of the library that issued
    the sync (torch's own wrappers skipped: they only pass the call on), as 'file:line'."""
    frames = [f for f in stack if "sync_probe" not in f.filename and "warnings" not in os.path.basename(f.filename)
              and f"{os.sep}torch{os.sep}" not in f.filename]
    ours = [f for f in frames if f.filename.startswith(_OURS)]
    pick = []
    if ours:
        pick.append(f"{os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno} ({ours[-1].name})")
    if frames and (not ours or frames[-1] is not ours[-1]):
        last = frames[-1]
        pick.append(f"{'/'.join(last.filename.split(os.sep)[-2:])}:{last.lineno} ({last.name})")
    return " <- ".join(reversed(pick)) or "?"


class _Recorder:
    def __init__(self):
        self.syncs = collections.OrderedDict()

    def add(self, where: str, message: str) -> None:
        entry = self.syncs.setdefault(where, {"where": where, "count": 0, "message": message[:200]})
        entry["count"] += 1


class _CpuSyncs(TorchDispatchMode):
    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            self.recorder.add(_where(traceback.extract_stack()), "aten._local_scalar_dense")
        return func(*args, **(kwargs or {}))


def main(argv) -> int:
    config_path, out_path = argv
    from fastdadpo.commands import train as trainer_module
    from fastdadpo.cli import main as cli_main

    recorder = _Recorder()
    cuda = torch.cuda.is_available()
    original = trainer_module.Trainer._optimizer_step
    steps = {"n": 0}

    def recorded_step(self, step, stop):
        steps["n"] += 1
        if steps["n"] != 2:
            return original(self, step, stop)
        if not cuda:
            with _CpuSyncs(recorder):
                return original(self, step, stop)
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message).lower():
                recorder.add(_where(traceback.extract_stack()), str(message))
            else:
                previous(message, category, filename, lineno, file, line)

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(self, step, stop)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = previous

    trainer_module.Trainer._optimizer_step = recorded_step
    status = cli_main(["train", config_path])
    syncs = sorted(recorder.syncs.values(), key=lambda s: -s["count"])
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump({"device": "cuda" if cuda else "cpu", "steps": steps["n"], "exit_status": status,
                   "total": sum(s["count"] for s in syncs), "syncs": syncs}, handle, indent=1)
    print(f"sync probe: {sum(s['count'] for s in syncs)} host syncs in step 2 ({len(syncs)} places)")
    for entry in syncs[:25]:
        print(f"  {entry['count']:4d}  {entry['where']}")
    return status or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
