"""Every Triton kernel specialization the package launches on a GPU, compiled for Hopper (sm_90a)
and Ampere (sm_80) on this CPU machine, must fit in the register file: a spill turns the
kernel's inner loop into local-memory traffic. The set is each kernels module's
``launch_specializations()``, built by the code its dispatch launches with; compiled afresh (no
cache) by ``bench/compile_report.py``'s functions, so the report and this test cannot disagree.
"""
import os
import time

import pytest

from bench import compile_report


@pytest.fixture(scope="module")
def compiled():
    if compile_report.ptxas_path() is None:
        pytest.skip("the Triton wheel has no backends/nvidia/bin/ptxas-blackwell to assemble the PTX with")
    started = time.perf_counter()
    names, results = compile_report.compile_all("", compile_report.ARCHES)
    print(f"\n{len(results)} compiles ({len(names)} specializations x {len(compile_report.ARCHES)} targets) "
          f"in {time.perf_counter() - started:.0f} s on {os.cpu_count()} cores")
    return names, results


def test_every_specialization_compiles_for_both_targets(compiled):
    names, results = compiled
    assert names, "no kernels module exposes launch_specializations()"
    done = {(c.name, c.arch) for c in results}
    assert done == {(name, arch) for name in names for arch in compile_report.ARCHES}


def test_no_register_spills(compiled):
    _, results = compiled
    spilling = [f"{c.name} on {compile_report.arch_name(c.arch)}: {c.spill_stores} bytes spill stores, "
                f"{c.spill_loads} bytes spill loads ({c.registers} registers, {c.num_warps} warps)"
                for c in results if c.spills]
    assert not spilling, "register spills:\n" + "\n".join(spilling)


def test_report_parsing_counts_opcodes_not_substrings():
    ptx = "\n".join(["\tcp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, %r2;",  # holds "red.global"
                     "\tcp.async.commit_group;", "\t@%p1 red.global.gpu.add.f32 [%rd2], %f1;",
                     "\t@!%p2 atom.global.gpu.acq_rel.add.f32 %f2, [%rd3], %f3;",
                     "\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f4}, %rd4, %rd5, 1, 1, 1, 0, 1;",
                     "\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r3], [%rd6];",
                     "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f5}, {%r4}, {%r5}, {%f6};"])
    assert compile_report.ptx_counts(ptx) == dict(wgmma=1, mma_sync=1, cp_async=1, tma=1, atomics=2)
    log = ("ptxas info    : Function properties for k\n    8 bytes stack frame, 16 bytes spill stores, "
           "24 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers")
    assert compile_report.parse_ptxas(log) == dict(stack=8, spill_stores=16, spill_loads=24, registers=255)
