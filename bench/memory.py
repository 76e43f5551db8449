"""Peak memory above the inputs: the one helper every benchmark uses, and the baseline check.

GPU: ``torch.cuda.max_memory_allocated`` above what is allocated just before the measured call
(inputs, weights, compiled code's constants), in the benchmark's own process.

CPU: the process's peak resident set size above its resident size just before the measured call,
in a fresh process per measurement. Fresh, because the peak RSS of a process is a high-water
mark over its lifetime, and because a long-lived process keeps freed heap pages, compiled graphs
and caches from earlier cases. The fresh processes are forked from a forkserver that has only
imported torch and this package (so a probe costs the work, not seconds of imports), and each
one measures a single call. Linux lets a process reset its high-water mark (``5`` written to
``/proc/self/clear_refs``), so each probe makes a warm-up call first (torch.compile compiles,
Liger compiles its chunk function, BLAS and OpenMP allocate their buffers once) and measures the
second, the steady state of a training loop, as on GPU; where the reset is refused, the probe
measures its only call and says so in ``method``.
"""
from __future__ import annotations

import ctypes
import gc
import json
import multiprocessing
import os
import re
import resource
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import torch


@dataclass
class MemoryResult:
    peak_bytes: int  # above the baseline
    baseline_bytes: int  # allocated (GPU) or resident (CPU) just before the measured call
    method: str
    loss: Optional[float] = None  # the measured call's loss: the probe computed the same thing


# --- resident set size (Linux) -------------------------------------------------------------------------------

def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            match = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is None:
        import psutil

        return psutil.Process().memory_info().rss
    return kib * 1024


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to its current RSS; False where Linux refuses."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Return freed heap pages to the OS, so the baseline is what is really in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- measuring one call ----------------------------------------------------------------------------------------

def measure_call(step: Callable[[], torch.Tensor], clear_grads: Callable[[], None], device: torch.device,
                 warm_up: bool) -> MemoryResult:
    """Peak memory of one ``step()`` above what is in use just before it (inputs included in the
    baseline; the gradients the step allocates included in the peak)."""
    if device.type == "cuda":
        if warm_up:
            step()
        clear_grads()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss = step()
        torch.cuda.synchronize(device)
        return MemoryResult(torch.cuda.max_memory_allocated(device) - baseline, baseline,
                            "torch.cuda.max_memory_allocated above the allocation before the call", float(loss))
    can_reset = reset_peak_rss()
    if warm_up and can_reset:
        step()
    clear_grads()
    trim_heap()
    baseline = rss_bytes()
    if can_reset:
        reset_peak_rss()
        method = "peak RSS (VmHWM, reset before the call) above RSS before the call, fresh process"
        if warm_up:
            method += ", after a warm-up call"
    else:
        # Without a reset the high-water mark may predate the inputs' last page; count from the
        # current RSS anyway: an underestimate only if setup peaked above inputs + the call.
        method = "peak RSS (ru_maxrss, process lifetime) above RSS before the call, fresh process, no warm-up"
    loss = step()
    return MemoryResult(peak_rss_bytes() - baseline, baseline, method, float(loss))


# --- a fresh process per CPU measurement ----------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeSpec:
    case: str
    implementation: str
    size: str
    tokens: int
    compile_enabled: bool  # quick mode switches torch.compile off everywhere (see conftest)


def _probe(spec: ProbeSpec) -> dict:
    """Runs in the fresh process: build the same inputs and implementation, measure one call."""
    from bench import registry

    if not spec.compile_enabled:
        torch.compiler.set_stance("force_eager")
    case, size = registry.CASES[spec.case], registry.SIZES[spec.size]
    implementation = registry.IMPLEMENTATIONS[spec.implementation]
    device = torch.device("cpu")
    inputs = registry.make_inputs(case, size, spec.tokens, device)
    compute_loss = implementation.build(case, inputs, device)

    def step():
        loss = compute_loss()
        loss.backward()
        return loss.detach()

    return asdict(measure_call(step, inputs.clear_grads, device, warm_up=True))


_CONTEXT = None


def _fresh_process_context():
    global _CONTEXT
    if _CONTEXT is None:
        methods = multiprocessing.get_all_start_methods()
        _CONTEXT = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if _CONTEXT.get_start_method() == "forkserver":
            # Imported once by the server; every probe forks from it with them already loaded (the
            # server skips those that fail to import). The peers take seconds to import.
            _CONTEXT.set_forkserver_preload(["torch", "torch._dynamo", "bench.registry", "fastdadpo.kernels",
                                             "fastdadpo.core.objectives", "liger_kernel.chunked_loss", "cut_cross_entropy"])
    return _CONTEXT


def measure_in_fresh_process(spec: ProbeSpec) -> MemoryResult:
    with ProcessPoolExecutor(max_workers=1, mp_context=_fresh_process_context()) as pool:
        return MemoryResult(**pool.submit(_probe, spec).result())


# --- the memory baseline (pytest-benchmark compares times only) ---------------------------------------------

class MemoryBaseline:
    """Peak bytes per benchmark (pytest node id), as a JSON file. ``check`` fails a benchmark whose
    peak exceeds its baseline by more than the tolerance; benchmarks absent from the file pass."""

    def __init__(self, compare_path: Optional[str], tolerance: float, save_path: Optional[str]):
        self.compare_path, self.tolerance, self.save_path = compare_path, tolerance, save_path
        self.baseline: Dict[str, int] = {}
        if compare_path:
            with open(compare_path, encoding="utf-8") as handle:
                self.baseline = json.load(handle)["peak_bytes"]
        self.measured: Dict[str, int] = {}

    def check(self, key: str, peak_bytes: int) -> Optional[str]:
        """Record a measurement; returns the failure message if it exceeds the baseline."""
        self.measured[key] = int(peak_bytes)
        allowed = self.baseline.get(key)
        if allowed is None:
            return None
        # Within 8 MiB always passes: a process's RSS moves by a few MiB between identical runs
        # (allocator arenas, thread stacks), which at the quick sizes is more than any tolerance.
        limit = max(allowed * (1.0 + self.tolerance), allowed + 8 * 2**20)
        if peak_bytes > limit:
            return (f"peak memory {peak_bytes / 2**20:.1f} MiB exceeds the baseline {allowed / 2**20:.1f} MiB "
                    f"by more than {self.tolerance:.0%} ({self.compare_path})")
        return None

    def save(self, machine: dict) -> None:
        if not self.save_path or not self.measured:
            return
        merged = {}
        if os.path.exists(self.save_path):
            with open(self.save_path, encoding="utf-8") as handle:
                merged = json.load(handle).get("peak_bytes", {})
        merged.update(self.measured)
        os.makedirs(os.path.dirname(os.path.abspath(self.save_path)), exist_ok=True)
        with open(self.save_path, "w", encoding="utf-8") as handle:
            json.dump({"machine": machine, "peak_bytes": dict(sorted(merged.items()))}, handle, indent=2)
            handle.write("\n")
