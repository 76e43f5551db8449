"""Kernel benchmarks, forward + backward: fastdadpo's fused kernels (the loss reduced in the call,
and from per-token outputs) against the materialized reference, its torch.compile, Liger-Kernel's chunked losses and Cut
Cross-Entropy, on the same inputs computing the same loss (checked), at the sizes of
``bench.registry.SIZES``. Each records its peak memory above the inputs (``bench.memory``)."""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from bench import registry
from bench.memory import ProbeSpec, measure_call, measure_in_fresh_process
from bench.settings import BenchSettings


class KernelBenchmark(NamedTuple):
    case: registry.Case
    implementation: registry.Implementation
    size: registry.Size
    tokens: int


def _skip_reason(bench: KernelBenchmark):
    if bench.size.device == "cuda" and not torch.cuda.is_available():
        return f"size {bench.size.name!r} is a GPU size: needs CUDA (never estimated on CPU)"
    missing = registry.missing_module(bench.implementation)
    if missing:
        return f"{bench.implementation.label}: {missing} is not installed"
    return None


def pytest_generate_tests(metafunc):
    if "kernel" not in metafunc.fixturenames:
        return
    settings = BenchSettings.of(metafunc.config)
    params = []
    for size in (registry.SIZES[name] for name in settings.sizes):
        for tokens in size.tokens:
            for case in registry.cases_for(size):
                for implementation in registry.implementations_for(case):
                    bench = KernelBenchmark(case, implementation, size, tokens)
                    marks = [pytest.mark.gpu if size.device == "cuda" else pytest.mark.cpu]
                    reason = _skip_reason(bench)
                    if reason:
                        marks.append(pytest.mark.skip(reason=reason))
                    params.append(pytest.param(bench, marks=marks, id=f"{size.name}-N{tokens}-{case.name}-"
                                                                       f"{implementation.name}"))
    metafunc.parametrize("kernel", params)


_reference_losses = {}


def _reference_loss(bench: KernelBenchmark, inputs: registry.Inputs) -> float:
    """Computed once per (case, size, tokens), shared by that case's implementations."""
    key = (bench.case.name, bench.size.name, bench.tokens)
    if key not in _reference_losses:
        _reference_losses.clear()  # parameters come grouped: only the current case's is needed
        _reference_losses[key] = registry.reference_loss(bench.case, inputs)
    return _reference_losses[key]


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def test_kernel(benchmark, kernel: KernelBenchmark, request):
    settings = BenchSettings.of(request.config)
    case, implementation, size, tokens = kernel
    device = registry.size_device(size)
    inputs = registry.make_inputs(case, size, tokens, device)
    if implementation.compiles:
        # A clean compile state per benchmark, as in a fresh process: many shapes in one process would
        # otherwise reach dynamo's recompile limit and silently fall back to eager.
        torch._dynamo.reset()
    compute_loss = implementation.build(case, inputs, device)

    def step():
        loss = compute_loss()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss.detach()

    benchmark.group = f"{case.name} {size.name} N={tokens}"
    benchmark.extra_info.update(
        case=case.name, loss_definition=case.loss, implementation=implementation.name, label=implementation.label,
        detail=implementation.detail(device), ours=implementation.ours, size=size.name, tokens=tokens,
        vocab=size.vocab, student_hidden=size.student_hidden, teacher_hidden=size.teacher_hidden,
        dtype=str(size.dtype).replace("torch.", ""), device=device.type)
    try:
        loss = benchmark.pedantic(step, setup=inputs.clear_grads, rounds=settings.rounds,
                                  warmup_rounds=settings.warmup_rounds)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
        if not _is_out_of_memory(error):
            raise
        pytest.skip(f"out of memory at {size.name} N={tokens}: {str(error).splitlines()[0]}")

    reference = _reference_loss(kernel, inputs)
    rtol, atol = registry.agreement_tolerance(size.dtype)
    benchmark.extra_info.update(loss=float(loss), reference_loss=reference)
    if float(loss) != pytest.approx(reference, rel=rtol, abs=atol):
        _fail(benchmark, f"{implementation.label} computes a different loss than the reference for {case.name}: "
                         f"{float(loss)!r} against {reference!r}")

    if device.type == "cuda":
        memory = measure_call(step, inputs.clear_grads, device, warm_up=False)
    else:
        memory = measure_in_fresh_process(ProbeSpec(case.name, implementation.name, size.name, tokens,
                                                     settings.compile_enabled))
        if memory.loss != pytest.approx(reference, rel=rtol, abs=atol):
            _fail(benchmark, f"the memory probe computed another loss: {memory.loss!r} against {reference!r}")
    benchmark.extra_info.update(peak_memory_bytes=memory.peak_bytes, memory_baseline_bytes=memory.baseline_bytes,
                                memory_method=memory.method)
    failure = settings.memory_baseline.check(request.node.nodeid, memory.peak_bytes)
    if failure:
        _fail(benchmark, failure)


def _fail(benchmark, message: str) -> None:
    """Fail the test and keep the benchmark out of the results JSON and saved baselines
    (pytest-benchmark drops runs marked in error), so a wrong row never reaches a report."""
    benchmark.has_error = True
    pytest.fail(message)
