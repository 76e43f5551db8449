"""Compile every Triton kernel specialization fastdadpo can launch for Hopper and Ampere, on a
machine without a GPU, and report what the compiler made of it.

    python bench/compile_report.py [--arch 90 80] [--out bench/results] [--jobs N] [-k SUBSTRING]

For each specialization (the ``launch_specializations()`` of every ``fastdadpo.kernels`` module
that has one, built by the same code the dispatch launches with) and each target: Triton compiles
it to PTX (``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``), the Triton
wheel's own ``ptxas-blackwell -v`` assembles it (its plain ``ptxas`` is too old for the PTX Triton
3.9 writes for sm_90a), and one line reports registers per thread, spill bytes (stores/loads),
stack frame, shared memory, and static instruction counts in the PTX: ``wgmma.mma_async``,
``mma.sync``, ``cp.async`` (non-bulk copies), TMA copies (``cp.async.bulk.tensor``) and global
atomics (``red``/``atom``). Writes ``<out>/compile-sm90.md`` (and ``compile-sm80.md``).

``tests/test_compile.py`` imports ``collect`` and ``compile_all`` from here, so the report and the
CI check compile the same set the same way.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARCHES = (90, 80)
# ptxas flags: Triton's own (``--regAllocOptLevel=2`` works around a ptxas 13 bug, so the
# runtime's register counts are these), plus -v for the resource report.
_PTXAS_FLAGS = ("-v", "--regAllocOptLevel=2")


def arch_name(arch: int) -> str:
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def ptxas_path() -> Optional[str]:
    """The Triton wheel's ptxas-blackwell (a CUDA 13 ptxas), or None if the wheel lacks it."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    return path if os.access(path, os.X_OK) else None


# --- the set -----------------------------------------------------------------------------------------------

def collect(substring: str = "") -> List[dict]:
    """Every kernel specialization of every ``fastdadpo.kernels`` module with a
    ``launch_specializations()`` (dicts: name, fn, signature, constexprs, num_warps, num_stages,
    optionally attrs), names prefixed by the module's."""
    import fastdadpo.kernels as package

    found = []
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        specializations = getattr(module, "launch_specializations", None)
        if specializations is None:
            continue
        for spec in specializations():
            spec = dict(spec, name=f"{module_info.name}: {spec['name']}")
            if substring in spec["name"]:
                found.append(spec)
    return found


# --- one compile -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Compiled:
    name: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    wgmma: int
    mma_sync: int
    cp_async: int
    tma: int
    atomics: int
    seconds: float

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


# An instruction line of PTX: an optional predicate (@%p1, @!%p1), then the opcode.
_OPCODE = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)", re.MULTILINE)


def ptx_counts(ptx: str) -> Dict[str, int]:
    """Static counts of the instructions the report tracks, by opcode (not by substring:
    ``cp.async.cg.shared.global`` contains ``red.global``)."""
    counts = dict(wgmma=0, mma_sync=0, cp_async=0, tma=0, atomics=0)
    for opcode in _OPCODE.findall(ptx):
        parts = opcode.split(".")
        if opcode.startswith("wgmma.mma_async"):
            counts["wgmma"] += 1
        elif opcode.startswith("mma.sync"):
            counts["mma_sync"] += 1
        elif opcode.startswith("cp.async.bulk.tensor"):
            counts["tma"] += 1
        elif opcode.startswith(("cp.async.ca", "cp.async.cg")):  # not commit/wait_group, not bulk
            counts["cp_async"] += 1
        elif parts[0] in ("red", "atom") and "global" in parts:
            counts["atomics"] += 1
    return counts


_RESOURCES = {
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
}


def parse_ptxas(log: str) -> Dict[str, int]:
    values = {}
    for key, pattern in _RESOURCES.items():
        found = pattern.search(log)
        if found is None:
            raise RuntimeError(f"ptxas -v printed no {key!r}:\n{log}")
        values[key] = int(found.group(1))
    return values


def _assemble(ptx: str, arch: int, ptxas: str) -> tuple:
    """ptxas -v on the PTX: (cubin bytes, the resource log)."""
    with tempfile.TemporaryDirectory() as folder:
        source, binary = os.path.join(folder, "kernel.ptx"), os.path.join(folder, "kernel.cubin")
        with open(source, "w", encoding="utf-8") as handle:
            handle.write(ptx)
        done = subprocess.run([ptxas, *_PTXAS_FLAGS, f"-arch={arch_name(arch)}", source, "-o", binary],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ptxas failed for {arch_name(arch)}:\n{done.stderr}")
        with open(binary, "rb") as handle:
            return handle.read(), done.stderr + done.stdout


@contextlib.contextmanager
def _own_assembler(arch: int, ptxas: str, logs: list):
    """Make Triton's last stage (PTX -> cubin) our ptxas -v call, so each kernel is assembled
    once and its resource log is kept."""
    from triton import knobs

    def hook(*args):
        if not args:  # asked for a cache key
            return "fastdadpo-compile-report", "fastdadpo-compile-report"
        stages = args[1]

        def cubin(src, metadata):
            binary, log = _assemble(src, arch, ptxas)
            logs.append(log)
            return binary

        stages["cubin"] = cubin

    previous = knobs.runtime.add_stages_inspection_hook
    knobs.runtime.add_stages_inspection_hook = hook
    try:
        yield
    finally:
        knobs.runtime.add_stages_inspection_hook = previous


def compile_one(spec: dict, arch: int, ptxas: str) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    started = time.perf_counter()
    logs: list = []
    source = ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec.get("attrs"))
    with _own_assembler(arch, ptxas, logs):
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
    resources = parse_ptxas(logs[-1])
    return Compiled(name=spec["name"], arch=arch, num_warps=spec["num_warps"], num_stages=spec["num_stages"],
                    shared=int(kernel.metadata.shared), seconds=time.perf_counter() - started,
                    **resources, **ptx_counts(kernel.asm["ptx"]))


# --- all of them -------------------------------------------------------------------------------------------

_SPECS: List[dict] = []  # in each worker: the specializations, collected there (JITFunctions do not pickle)


def _init_worker(substring: str) -> None:
    _SPECS[:] = collect(substring)


def _names() -> List[str]:
    return [spec["name"] for spec in _SPECS]


def _work(index: int, arch: int) -> Compiled:
    return compile_one(_SPECS[index], arch, ptxas_path())


def compile_all(substring: str = "", arches: Sequence[int] = ARCHES, jobs: Optional[int] = None,
                progress: bool = False) -> Tuple[List[str], List[Compiled]]:
    """Compile every specialization whose name holds ``substring`` for every arch, ``jobs``
    processes at a time (default: the CPU count), in a fresh Triton cache (nothing is reused
    between runs); returns (the specializations' names, the results). ``progress``: a line per
    compile on stderr as it finishes.

    The work runs in freshly spawned processes without ``TRITON_INTERPRET``: a process that has
    imported the kernels under the interpreter (the kernel tests) holds interpreted functions,
    which do not compile."""
    if ptxas_path() is None:
        raise FileNotFoundError("the Triton wheel has no backends/nvidia/bin/ptxas-blackwell")
    jobs = jobs or os.cpu_count() or 1
    saved = {key: os.environ.get(key) for key in ("TRITON_CACHE_DIR", "TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
        try:
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_init_worker, initargs=(substring,)) as pool:
                names = pool.submit(_names).result()
                futures = [pool.submit(_work, index, arch) for arch in arches for index in range(len(names))]
                if progress:
                    for done, future in enumerate(as_completed(futures), 1):
                        c = future.result()
                        print(f"[{done}/{len(futures)}] {arch_name(c.arch)} {c.name}: {c.registers} registers, "
                              f"{c.spills} spill bytes, {c.seconds:.1f} s", file=sys.stderr, flush=True)
                return names, [future.result() for future in futures]
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# --- the report --------------------------------------------------------------------------------------------

HEADER = ["specialization", "warps", "stages", "registers", "spill bytes (st/ld)", "stack", "shared", "wgmma",
          "mma.sync", "cp.async", "TMA", "atomics"]


def row(c: Compiled) -> List[str]:
    return [c.name, str(c.num_warps), str(c.num_stages), str(c.registers), f"{c.spill_stores}/{c.spill_loads}",
            str(c.stack), f"{c.shared:,}", str(c.wgmma), str(c.mma_sync), str(c.cp_async), str(c.tma), str(c.atomics)]


def markdown(results: List[Compiled], arch: int, command: str, seconds: float) -> str:
    import triton

    mine = [c for c in results if c.arch == arch]
    spilling = [c for c in mine if c.spills]
    lines = [f"# Triton kernels compiled for {arch_name(arch)}", "",
             f"`{command}` (Triton {triton.__version__}, ptxas-blackwell from its wheel, "
             f"{' '.join(_PTXAS_FLAGS)}; no GPU needed). {len(mine)} specializations, "
             f"{len(spilling)} with register spills; whole run (both targets) {seconds:.0f} s on {os.cpu_count()} "
             f"CPU cores.", "",
             "Registers per thread; spill, stack and shared memory in bytes (shared: Triton's dynamic shared "
             "memory per program). Instruction columns are static counts in the PTX, not executed counts: "
             "`cp.async` are asynchronous global-to-shared copies (what Triton's software pipeliner emits for "
             "loads it overlaps with the matmuls), TMA are `cp.async.bulk.tensor` copies, atomics are global "
             "`red`/`atom` instructions.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(row(c)) + " |" for c in mine]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHES), help="compute capabilities (90 80)")
    parser.add_argument("--out", default="bench/results", help="folder for compile-sm<arch>.md")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    parser.add_argument("-k", default="", help="only specializations whose name contains this")
    args = parser.parse_args(argv)
    if ptxas_path() is None:
        print("compile_report: the Triton wheel has no backends/nvidia/bin/ptxas-blackwell; nothing to do",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    _, results = compile_all(args.k, args.arch, args.jobs, progress=True)
    seconds = time.perf_counter() - started
    widths = [max(len(h), *(len(r[i]) for r in map(row, results))) for i, h in enumerate(HEADER)]
    for arch in args.arch:
        print(f"\n{arch_name(arch)}")
        print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)))
        for c in results:
            if c.arch == arch:
                print("  ".join(v.ljust(w) for v, w in zip(row(c), widths)))
    command = "python bench/compile_report.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    os.makedirs(args.out, exist_ok=True)
    for arch in args.arch:
        path = os.path.join(args.out, f"compile-sm{arch}.md")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(markdown(results, arch, command.strip(), seconds))
        print(f"wrote {path}")
    spilling = sum(1 for c in results if c.spills)
    print(f"{len(results)} compiles in {seconds:.0f} s; {spilling} with spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
