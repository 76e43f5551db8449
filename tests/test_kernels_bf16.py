"""The chunked backend's CUDA precision path, run on CPU (``chunked_backend.CUDA_PRECISION_ON_CPU``):
bf16 hidden states and heads, fp32 logits from the bf16 operands, the Triton row kernel (under
TRITON_INTERPRET=1) writing the bf16 d(loss)/d(logits) over them, bf16 gradient GEMMs adding into
fp32 dh and dW accumulators (``GRAD_ACCUMULATION``). Against the naive float64 functions on the same
bf16 values: at V = 131,072 in 21 row chunks, where fp32 accumulation keeps dW's error under a
bound that bf16 accumulation exceeds (bench/results/cpu-bf16-accumulation.md has the figures);
and at small sizes every kind with irregular rows, masks, temperatures, padded heads and a bias.
Also the pieces: the CPU stand-ins for cuBLAS's mixed-dtype GEMMs, which path the switch selects,
and the planner's copy of the chunk rule.
"""
import dataclasses

import pytest
import torch

from kernel_grads import run_with_grads

from fastdadpo.kernels import (chunk_plan, chunked_backend, fused_linear_advantage, fused_linear_divergence,
                               fused_linear_logprobs, naive_linear_advantage, naive_linear_divergence,
                               naive_linear_logprobs, row_chunks, triton_rows)
from fastdadpo.kernels.sweep import SweepSpec


@pytest.fixture(autouse=True)
def cuda_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(chunked_backend, "CUDA_PRECISION_ON_CPU", True)


def _force_chunk_rows(monkeypatch, rows):
    """Chunks of exactly ``rows`` rows, whatever the budget rule says (with fp32 accumulators it
    takes chunks as large as their final cast, which costs no peak)."""
    plan_chunks = chunked_backend.plan_chunks
    monkeypatch.setattr(chunked_backend, "plan_chunks",
                        lambda *args, **kwargs: dataclasses.replace(plan_chunks(*args, **kwargs), rows_per_chunk=rows))


def _bf16_inputs(seed, n, hs, ht, vs, vt):
    """bf16 values (the float64 reference upcasts the same numbers); logits of a few units."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).bfloat16()

    targets = torch.randint(0, vs, (n,), generator=g)
    targets[::5] = -100
    return dict(student_hidden=normal(n, hs), student_weight=normal(vs, hs, std=2 / hs**0.5),
                teacher_hidden=normal(n, ht), teacher_weight=normal(vt, ht, std=3 / ht**0.5),
                ref_hidden=normal(n, ht), ref_weight=normal(vt, ht, std=3 / ht**0.5), bias=normal(vs, std=0.3),
                targets=targets, mask=torch.rand(n, generator=g) > 0.3,
                upstream=torch.randn(n, generator=g, dtype=torch.float64),
                upstream2=torch.randn(n, generator=g, dtype=torch.float64))


def _rel(actual, expected, rows=None):
    diff = actual.double() - expected
    if rows is not None:
        diff, expected = diff[rows], expected[rows]
    return float(diff.norm() / expected.norm())


def _check(fused, naive, leaves, upstreams, value_atol=5e-5, grad_rel=1e-2):
    """Values within ``value_atol`` (fp32 logits of exact products: fp32 rounding only), gradients
    of the bf16 leaves in bf16 within ``grad_rel`` relative Frobenius of float64."""
    outs, grads = run_with_grads(fused, leaves, upstreams, torch.bfloat16)
    ref_outs, ref_grads = run_with_grads(naive, leaves, upstreams, torch.float64)
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b.detach(), atol=value_atol, rtol=0, msg=lambda m: f"output {i}: {m}")
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
        assert _rel(a, b) < grad_rel, f"gradient {i}: relative error {_rel(a, b):.2e}"
    return outs


# --- V = 131,072 in 21 row chunks ------------------------------------------------------------------------

def test_bf16_at_128k_vocab_in_21_chunks(monkeypatch):
    """Forward KL with the target log-probs, a training loss (mean KL − mean log p, reduced in the
    path), 84 rows in chunks of 4. Values at fp32 precision; dh and dW near the bf16 floor; dW of
    the head rows no token targets (the softmax's dense part, summed over all 21 chunks) under
    3.9e-3 with fp32 accumulation (3.6e-3 measured; the float64 gradient rounded to bf16 is
    1.6e-3) and over it with bf16 accumulation (4.4e-3)."""
    vocab, rows, chunk = 131072, 84, 4
    _force_chunk_rows(monkeypatch, chunk)
    # One program per chunk, 8 tiles per row: the interpreter's cost is per tile and per launch.
    monkeypatch.setattr(triton_rows, "INTERPRETER_BLOCK_R", chunk)
    monkeypatch.setattr(triton_rows, "INTERPRETER_BLOCK_V", 16384)
    t = _bf16_inputs(0, n=rows, hs=16, ht=16, vs=vocab, vt=vocab)
    targets = t["targets"]
    mean = torch.full((rows,), 1.0 / rows, dtype=torch.float64)
    upstreams = [mean, -mean]
    launches, launch = [], triton_rows.launch  # the rows of every row-kernel launch
    monkeypatch.setattr(triton_rows, "launch", lambda *args, **kw: launches.append(args[10]) or launch(*args, **kw))

    def fused(h, w):
        return fused_linear_divergence(h, w, t["teacher_hidden"], t["teacher_weight"], targets=targets,
                                       impl="chunked_triton", weights=mean.float(), logp_weights=-mean.float())

    leaves = [t["student_hidden"], t["student_weight"]]
    ref_outs, (ref_dh, ref_dw) = run_with_grads(
        lambda h, w: naive_linear_divergence(h, w, t["teacher_hidden"].double(), t["teacher_weight"].double(),
                                             targets=targets), leaves, upstreams, torch.float64)
    untargeted = torch.ones(vocab, dtype=torch.bool)
    untargeted[targets[targets >= 0]] = False
    dw_untargeted = {}
    for accumulation in ("float32", "inputs"):
        monkeypatch.setattr(chunk_plan, "GRAD_ACCUMULATION", accumulation)
        outs, (dh, dw) = run_with_grads(fused, leaves, upstreams, torch.bfloat16)
        for a, b in zip(outs, ref_outs):
            torch.testing.assert_close(a.double(), b.detach(), atol=2e-5, rtol=0)
        assert dh.dtype == dw.dtype == torch.bfloat16
        assert _rel(dh, ref_dh) < 3.5e-3  # 2.7e-3: each row's dh is one chunk's GEMM, rounded once
        assert _rel(dw, ref_dw) < 2.5e-3  # 1.8e-3 (fp32), 1.9e-3 (bf16): the targeted rows dominate
        dw_untargeted[accumulation] = _rel(dw, ref_dw, untargeted)
    assert launches == [chunk] * 21 * 2  # 21 chunks, one sweep (reduced outputs), each accumulation
    assert dw_untargeted["float32"] < 3.9e-3 < dw_untargeted["inputs"], dw_untargeted


# --- small sizes: kinds, masks, temperatures, padded heads -------------------------------------------------

@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows: several, and a ragged last one."""
    _force_chunk_rows(monkeypatch, 7)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduced", [False, True])
def test_divergence_bf16_padded_heads(kind, reduced, small_chunks):
    # Student head 131 rows, teacher's 139 (padded), the shared vocabulary 127; 45 rows (6 chunks
    # of 7 and a ragged 3), a mask, both temperatures off 1, targets over the whole student head.
    t = _bf16_inputs(1, n=45, hs=24, ht=40, vs=131, vt=139)
    kwargs = dict(kind=kind, beta=0.3, temperature=1.7, mask=t["mask"], vocab_size=127, targets=t["targets"],
                  logp_temperature=0.8)
    weights = dict(weights=t["upstream"].float(), logp_weights=t["upstream2"].float()) if reduced else {}
    teacher = (t["teacher_hidden"], t["teacher_weight"])
    outs = _check(lambda h, w: fused_linear_divergence(h, w, *teacher, impl="chunked_triton", **kwargs, **weights),
                  lambda h, w: naive_linear_divergence(h, w, *(x.double() for x in teacher), **kwargs),
                  [t["student_hidden"], t["student_weight"]], [t["upstream"], t["upstream2"]])
    assert torch.all(outs[0][~t["mask"]] == 0) and torch.all(outs[1][t["targets"] == -100] == 0)


def test_logprobs_bf16_with_bias(small_chunks):
    t = _bf16_inputs(2, n=40, hs=24, ht=8, vs=101, vt=101)
    kwargs = dict(temperature=1.3)
    _check(lambda h, w, b: fused_linear_logprobs(h, w, t["targets"], bias=b, impl="chunked_triton", **kwargs),
           lambda h, w, b: naive_linear_logprobs(h, w, t["targets"], bias=b, **kwargs),
           [t["student_hidden"], t["student_weight"], t["bias"]], [t["upstream"]])


def test_advantage_bf16(small_chunks):
    t = _bf16_inputs(3, n=30, hs=16, ht=24, vs=53, vt=59)
    kwargs = dict(temperature=0.7, mask=t["mask"], vocab_size=53)
    frozen = [t[k] for k in ("teacher_hidden", "teacher_weight", "ref_hidden", "ref_weight")]
    _check(lambda h, w: fused_linear_advantage(h, w, *frozen, impl="chunked_triton", weights=t["upstream"].float(),
                                               **kwargs),
           lambda h, w: naive_linear_advantage(h, w, *(x.double() for x in frozen), **kwargs),
           [t["student_hidden"], t["student_weight"]], [t["upstream"]])


# --- the pieces ----------------------------------------------------------------------------------------------

def _spy_gradient_dtypes(monkeypatch):
    """(d(loss)/d(logits), dh accumulator, dW accumulator) dtypes of every chunk's gradient GEMMs."""
    seen = []
    original = chunked_backend.accumulate_chunk_grads

    def spy(grads, rows, grad_logits, student_rows, student_weight):
        seen.append((grad_logits.dtype, grads.hidden.dtype, grads.weight.dtype))
        return original(grads, rows, grad_logits, student_rows, student_weight)

    monkeypatch.setattr(chunked_backend, "accumulate_chunk_grads", spy)
    return seen


@pytest.mark.parametrize("switch,accumulation,expected", [
    (True, "float32", (torch.bfloat16, torch.float32, torch.float32)),
    (True, "inputs", (torch.bfloat16, torch.bfloat16, torch.bfloat16)),
    (False, "float32", (torch.float32, torch.float32, torch.float32)),  # the CPU default: upcast first
])
def test_switches_select_the_path(switch, accumulation, expected, monkeypatch):
    monkeypatch.setattr(chunked_backend, "CUDA_PRECISION_ON_CPU", switch)
    monkeypatch.setattr(chunk_plan, "GRAD_ACCUMULATION", accumulation)
    seen = _spy_gradient_dtypes(monkeypatch)
    t = _bf16_inputs(4, n=9, hs=8, ht=8, vs=33, vt=33)
    h, w = t["student_hidden"].clone().requires_grad_(), t["student_weight"].clone().requires_grad_()
    fused_linear_logprobs(h, w, t["targets"], impl="chunked_triton").sum().backward()
    assert seen and set(seen) == {expected}
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16


def test_unknown_accumulation_is_refused(monkeypatch):
    monkeypatch.setattr(chunk_plan, "GRAD_ACCUMULATION", "bf16")
    with pytest.raises(ValueError, match="GRAD_ACCUMULATION"):
        chunk_plan.grad_accumulation_dtype(torch.bfloat16)


def test_mixed_gemms_on_cpu_compute_in_fp32():
    """CPU torch has no ``out_dtype`` GEMM: the stand-ins compute in fp32 on the upcast halves
    (exact products, fp32 sums, as cuBLAS does), never through half-precision results, and the
    fallback is remembered for the CPU only."""
    g = torch.Generator().manual_seed(5)
    rows, weight = torch.randn(6, 64, generator=g).bfloat16(), (torch.randn(300, 64, generator=g) * 3).bfloat16()
    exact = rows.double() @ weight.double().T
    out = row_chunks.logits_into(torch.empty(6, 300), rows, weight)
    assert "cpu" in row_chunks._NO_MIXED_GEMM and "cuda" not in row_chunks._NO_MIXED_GEMM
    torch.testing.assert_close(out, rows.float() @ weight.float().T, atol=0, rtol=0)
    assert (out.double() - exact).abs().max() < 1e-4 < (torch.mm(rows, weight.T).double() - exact).abs().max()
    acc = torch.ones(300, 6)
    row_chunks.addmm_into(acc, weight, rows.T)  # acc += W·Xᵀ into fp32, as dW += Gᵀ·X
    expected = 1 + weight.double() @ rows.double().T
    assert (acc.double() - expected).abs().max() < 1e-4
    assert (torch.ones(300, 6).bfloat16().addmm_(weight, rows.T).double() - expected).abs().max() > 1e-3


def test_planner_uses_the_kernels_chunk_rule(monkeypatch):
    """fastdadpo.commands.plan imports the kernels' rule (chunk_plan, Triton-free) and gives the chunked
    backend's chunks, accumulators and peak at its default CUDA budget, for bf16 heads of 128k–256k rows (bf16 accumulators there:
    fp32 ones and their cast do not fit 1400 MiB at N = 8192), and at a budget that holds fp32."""
    from fastdadpo.commands import architectures
    from fastdadpo.commands import memory_terms

    monkeypatch.delenv(chunk_plan.CHUNK_BUDGET_ENV, raising=False)
    assert chunk_plan.grad_accumulation_dtype(torch.bfloat16) == torch.float32
    assert memory_terms.plan_chunks is chunk_plan.plan_chunks  # one rule, not a restatement
    accumulators = {}
    for vocab, hidden, teachers in ((256000, 2304, 0), (128256, 2048, 1), (151936, 1536, 1)):
        arch = architectures.Architecture(hidden=hidden, layers=1, heads=1, kv_heads=1, head_dim=hidden, intermediate=hidden,
                                 vocab=vocab, tied=True)
        setting = memory_terms.Setting(ranks=1, device="gpu", dtype_bytes=2, zero_stage=0, micro_batch=1, sequences=1,
                               max_length=8192)
        sweep = memory_terms.KernelSweep(rows=8192, teachers=teachers)
        spec = SweepSpec(kind="forward_kl" if teachers else "none", vocab_size=vocab if teachers else 0,
                         with_logps=True)
        ours = chunk_plan.plan_chunks(spec, 8192, vocab, hidden, chunk_plan.budget_bytes(None))
        assert memory_terms._chunk_plan(sweep, arch, setting, vocab if teachers else 0).rows_per_chunk == ours.rows_per_chunk
        assert memory_terms._grad_bytes(sweep, arch, setting, vocab if teachers else 0) == ours.grad_dtype.itemsize
        planned = (memory_terms.kernel_workspace_bytes(sweep, arch, setting, vocab)
                   + memory_terms.kernel_gradient_bytes(sweep, arch, setting, vocab) - 8192 * hidden * 2)  # less the kept rows
        assert planned == ours.peak_bytes
        accumulators[vocab] = ours.grad_dtype
    assert set(accumulators.values()) == {torch.bfloat16}
    # With room for them (the same heads at N = 1024 and 3500 MiB), fp32 accumulators, and the same plan.
    monkeypatch.setenv(chunk_plan.CHUNK_BUDGET_ENV, "3500")
    for vocab, hidden in ((256000, 2304), (151936, 1536)):
        arch = architectures.Architecture(hidden=hidden, layers=1, heads=1, kv_heads=1, head_dim=hidden, intermediate=hidden,
                                 vocab=vocab, tied=True)
        setting = memory_terms.Setting(ranks=1, device="gpu", dtype_bytes=2, zero_stage=0, micro_batch=1, sequences=1,
                               max_length=1024, chunk_budget_mb=3500.0)
        sweep = memory_terms.KernelSweep(rows=1024, teachers=0)
        ours = chunk_plan.plan_chunks(SweepSpec(kind="none", vocab_size=0, with_logps=True), 1024, vocab, hidden,
                                           chunk_plan.budget_bytes(None))
        assert ours.grad_dtype == torch.float32 and ours.peak_bytes <= ours.budget_bytes
        assert memory_terms._grad_bytes(sweep, arch, setting, 0) == 4
        assert memory_terms._chunk_plan(sweep, arch, setting, 0).rows_per_chunk == ours.rows_per_chunk
