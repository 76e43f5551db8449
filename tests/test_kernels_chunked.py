"""The chunked algorithm with its Triton row kernel (``chunked_triton``: GEMMs + one Triton row kernel
per chunk) against the naive float64 reference: values and gradients (hidden, weight, bias) of every
function and kind, per row and reduced (``weights=``), one output reduced and the other per row; its
Triton kernel runs
under TRITON_INTERPRET=1 in fp32 (the interpreter computes tl.dot on bf16 wrongly), its GEMMs in torch
on CPU. Irregular shapes (prime vocabularies, rows no chunk or block divides, teacher hidden sizes
that differ, padded teacher heads), masks, ignore_index, temperatures. And the chunk-size rule:
peak bytes from the rule against the budget at V=256,000.
"""
import logging

import pytest
import torch

from kernel_grads import run_with_grads

from fastdadpo.kernels import (fused_linear_advantage, fused_linear_divergence, fused_linear_logprobs,
                               naive_linear_advantage, naive_linear_divergence, naive_linear_logprobs,
                               resolve_backend)

KINDS = ("forward_kl", "reverse_kl", "jsd")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows (the budget is tiny and the floor lowered): several chunks and a ragged last
    one, each smaller than the interpreter's 16-row programs."""
    from fastdadpo.kernels import chunk_plan, chunked_backend

    monkeypatch.setattr(chunk_plan, "MIN_CHUNK_ROWS", 7)
    return 1e-6


def _tensors(seed, n, hs, ht, vs, vt, scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    return dict(
        student_hidden=randn(n, hs), student_weight=randn(vs, hs, std=scale * 2 / hs**0.5),
        teacher_hidden=randn(n, ht), teacher_weight=randn(vt, ht, std=scale * 2 / ht**0.5),
        ref_hidden=randn(n, ht), ref_weight=randn(vt, ht, std=scale * 2 / ht**0.5),
        bias=randn(vs, std=0.3), upstream=randn(n), upstream2=randn(n),
        mask=torch.rand(n, generator=g) > 0.3, targets=torch.randint(0, vs, (n,), generator=g),
    )


def _assert_close(actual, expected, what, atol=2e-5, rtol=2e-4):
    assert actual is not None, f"{what}: no gradient"
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _compare(fused, naive, leaves, upstreams, names=("hidden", "weight", "bias")):
    fused_out, fused_grads = run_with_grads(fused, leaves, upstreams, torch.float32)
    naive_out, naive_grads = run_with_grads(naive, leaves, upstreams, torch.float64)
    for i, (a, b) in enumerate(zip(fused_out, naive_out)):
        assert a.dtype == torch.float32
        _assert_close(a, b, f"output {i}")
    for name, a, b in zip(names, fused_grads, naive_grads):
        _assert_close(a, b, f"d {name}")
    return fused_out


@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("reduced", [False, True])
def test_logprobs_match_reference(temperature, with_bias, reduced, small_chunks):
    t = _tensors(0, n=23, hs=24, ht=8, vs=101, vt=101)
    targets = t["targets"].clone()
    targets[::4] = -100
    leaves = [t["student_hidden"], t["student_weight"]] + ([t["bias"]] if with_bias else [])
    weights = t["upstream"].float() if reduced else None

    def fused(h, w, *b):
        return fused_linear_logprobs(h, w, targets, bias=b[0] if b else None, temperature=temperature,
                                     weights=weights, impl="chunked_triton", chunk_budget_mb=small_chunks)

    def naive(h, w, *b):
        return naive_linear_logprobs(h, w, targets, bias=b[0] if b else None, temperature=temperature)

    out = _compare(fused, naive, leaves, [t["upstream"]])
    assert torch.all(out[0][::4] == 0), "ignore_index rows must be exactly 0"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_targets", [False, True])
@pytest.mark.parametrize("reduced", [False, True])
def test_divergence_matches_reference(kind, with_targets, reduced):
    # Teacher head padded (109 rows) and wider hidden size; the shared vocabulary is 97 < 101.
    t = _tensors(1, n=19, hs=24, ht=40, vs=101, vt=109)
    targets = t["targets"].clone()
    targets[::5] = -100
    kwargs = dict(kind=kind, beta=0.3, temperature=2.3, mask=t["mask"], vocab_size=97)
    if with_targets:
        kwargs.update(targets=targets, logp_temperature=1.3)
    weights = {}
    if reduced:
        weights = dict(weights=t["upstream"].float())
        if with_targets:
            weights.update(logp_weights=t["upstream2"].float())
    teacher = (t["teacher_hidden"], t["teacher_weight"])

    def fused(h, w):
        return fused_linear_divergence(h, w, teacher[0].float(), teacher[1].float(), impl="chunked_triton", **kwargs,
                                       **weights)

    def naive(h, w):
        return naive_linear_divergence(h, w, *teacher, **kwargs)

    out = _compare(fused, naive, [t["student_hidden"], t["student_weight"]], [t["upstream"], t["upstream2"]])
    assert torch.all(out[0][~t["mask"]] == 0), "masked rows must be exactly 0"


def test_divergence_at_temperature_one_in_several_chunks(small_chunks):
    t = _tensors(2, n=31, hs=16, ht=16, vs=67, vt=67)
    teacher = (t["teacher_hidden"], t["teacher_weight"])
    kwargs = dict(kind="forward_kl", targets=t["targets"])
    _compare(lambda h, w: fused_linear_divergence(h, w, teacher[0].float(), teacher[1].float(), impl="chunked_triton",
                                                  chunk_budget_mb=small_chunks, weights=t["upstream"].float(),
                                                  logp_weights=t["upstream2"].float(), **kwargs),
             lambda h, w: naive_linear_divergence(h, w, *teacher, **kwargs),
             [t["student_hidden"], t["student_weight"]], [t["upstream"], t["upstream2"]])


@pytest.mark.parametrize("reduced", [False, True])
def test_advantage_matches_reference(reduced, small_chunks):
    t = _tensors(3, n=17, hs=16, ht=24, vs=53, vt=59)
    kwargs = dict(temperature=0.7, mask=t["mask"], vocab_size=53)
    frozen = [t[k] for k in ("teacher_hidden", "teacher_weight", "ref_hidden", "ref_weight")]
    weights = t["upstream"].float() if reduced else None
    _compare(lambda h, w: fused_linear_advantage(h, w, *(x.float() for x in frozen), impl="chunked_triton",
                                                 weights=weights, chunk_budget_mb=small_chunks, **kwargs),
             lambda h, w: naive_linear_advantage(h, w, *frozen, **kwargs),
             [t["student_hidden"], t["student_weight"]], [t["upstream"]])


def test_huge_logits_stay_finite_and_exact():
    """Logits of magnitude 1e4 (teacher probabilities underflow to exact zeros)."""
    t = _tensors(4, n=13, hs=16, ht=16, vs=67, vt=67, scale=3e3)
    teacher = (t["teacher_hidden"], t["teacher_weight"])
    kwargs = dict(kind="reverse_kl", targets=t["targets"])
    assert (torch.softmax((teacher[0] @ teacher[1].T).float(), -1) == 0).any()
    fused_out, fused_grads = run_with_grads(lambda h, w: fused_linear_divergence(h, w, teacher[0].float(), teacher[1].float(),
                                                                       impl="chunked_triton", **kwargs),
                                  [t["student_hidden"], t["student_weight"]], [t["upstream"], t["upstream2"]],
                                  torch.float32)
    naive_out, naive_grads = run_with_grads(lambda h, w: naive_linear_divergence(h, w, *teacher, **kwargs),
                                  [t["student_hidden"], t["student_weight"]], [t["upstream"], t["upstream2"]],
                                  torch.float64)
    for out in fused_out + tuple(fused_grads):
        assert torch.isfinite(out).all()
    # fp32 logits of 1e4 carry absolute rounding of ~1e-3; compare at that scale.
    _assert_close(fused_out[0], naive_out[0], "divergence", atol=5e-2, rtol=1e-3)
    _assert_close(fused_out[1], naive_out[1], "logps", atol=5e-2, rtol=1e-3)
    _assert_close(fused_grads[0], naive_grads[0], "d hidden", atol=5e-2 * 3e3 / 4, rtol=1e-3)


def _spy_sweeps(monkeypatch):
    """Record (kind, with_logps, forms gradients) of every chunked sweep."""
    from fastdadpo.kernels import chunk_plan, chunked_backend

    calls = []
    original = chunked_backend.sweep

    def spy(spec, inputs, budget, row_sweep="torch", row_grads=None, **kwargs):
        calls.append((spec.kind, spec.with_logps, row_grads is not None))
        return original(spec, inputs, budget, row_sweep, row_grads, **kwargs)

    monkeypatch.setattr(chunked_backend, "sweep", spy)
    return calls


def test_reduced_divergence_with_per_row_logps_recomputes_the_student_only(monkeypatch):
    """dadpo_token's shape: a reduced divergence and DPO's per-row log-probs, the teacher twice as
    wide as the student. The forward forms the divergence's gradients (teacher once); the backward
    is a log-prob sweep of the student alone. Exact either way."""
    t = _tensors(5, n=21, hs=8, ht=24, vs=61, vt=61)
    calls = _spy_sweeps(monkeypatch)
    teacher = (t["teacher_hidden"], t["teacher_weight"])
    kwargs = dict(kind="jsd", targets=t["targets"], mask=t["mask"])
    _compare(lambda h, w: fused_linear_divergence(h, w, teacher[0].float(), teacher[1].float(), impl="chunked_triton",
                                                  weights=t["upstream"].float(), **kwargs),
             lambda h, w: naive_linear_divergence(h, w, *teacher, **kwargs),
             [t["student_hidden"], t["student_weight"]], [t["upstream"], t["upstream2"]])
    assert calls == [("jsd", True, True), ("none", True, True)], calls


def test_per_row_logprobs_backward_is_one_student_sweep(monkeypatch):
    t = _tensors(6, n=15, hs=8, ht=8, vs=37, vt=37)
    calls = _spy_sweeps(monkeypatch)
    _compare(lambda h, w: fused_linear_logprobs(h, w, t["targets"], impl="chunked_triton"),
             lambda h, w: naive_linear_logprobs(h, w, t["targets"]),
             [t["student_hidden"], t["student_weight"]], [t["upstream"]])
    assert calls == [("none", True, False), ("none", True, True)], calls


def test_fully_masked_batch_stays_in_graph():
    t = _tensors(8, n=11, hs=16, ht=16, vs=31, vt=31)
    h, w = (t[k].float().requires_grad_() for k in ("student_hidden", "student_weight"))
    out = fused_linear_divergence(h, w, t["teacher_hidden"].float(), t["teacher_weight"].float(),
                                  mask=torch.zeros(11, dtype=torch.bool), impl="chunked_triton")
    assert torch.all(out == 0) and out.requires_grad
    out.sum().backward()
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_narrow_gradient_written_over_wide_logits():
    """On CUDA the row kernel writes a bf16 gradient over the first half of each fp32 logit row's
    bytes; run that aliasing here and compare with the kernel's fp32 gradient."""
    import triton

    from fastdadpo.kernels import triton_rows

    g = torch.Generator().manual_seed(9)
    rows, cols = 5, 77
    logits = torch.randn(rows, cols, generator=g) * 3
    targets = torch.randint(0, cols, (rows,), generator=g)
    weights = torch.randn(rows, generator=g)

    def run(grad_of):
        chunk = logits.clone()
        grad = grad_of(chunk)
        outs = [torch.zeros(rows) for _ in range(3)]
        triton_rows.row_sweep_kernel[(triton.cdiv(rows, triton_rows.INTERPRETER_BLOCK_R),)](
            chunk, chunk.stride(0), chunk, chunk.stride(0), chunk, chunk.stride(0), grad, grad.stride(0),
            targets, weights, weights, *outs, rows, cols, cols, 1.0, 1.0, 0.5, -0.69, -0.69, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0,
            KIND=0, WITH_LOGPS=True, WITH_GRAD=True, LSE_GIVEN=False,
            BLOCK_R=triton_rows.INTERPRETER_BLOCK_R, BLOCK_V=triton_rows.INTERPRETER_BLOCK_V)
        return grad.float()

    wide = run(lambda chunk: chunk)
    narrow = run(lambda chunk: chunk.view(torch.bfloat16)[:, :cols])
    expected = weights[:, None] * (torch.nn.functional.one_hot(targets, cols) - torch.softmax(logits, -1))
    torch.testing.assert_close(wide, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(narrow, expected.bfloat16().float(), atol=1e-2, rtol=1e-2)


# --- the chunk-size rule -----------------------------------------------------------------------------------

def _plan(kind, with_logps, vocab, hidden, tokens=8192, budget_mb=None):
    from fastdadpo.kernels import chunk_plan, chunked_backend
    from fastdadpo.kernels.sweep import SweepSpec

    spec = SweepSpec(kind=kind, vocab_size=0 if kind == "none" else vocab, with_logps=with_logps)
    return chunk_plan.plan_chunks(spec, tokens, vocab, hidden, chunk_plan.budget_bytes(budget_mb))


@pytest.mark.parametrize("kind,with_logps", [("none", True), ("forward_kl", True), ("jsd", False),
                                             ("advantage", False)])
@pytest.mark.parametrize("vocab,hidden", [(256000, 2304), (128256, 2048), (151936, 1536)])
@pytest.mark.parametrize("accumulation", ["float32", "inputs"])
def test_default_budget_bounds_a_call(kind, with_logps, vocab, hidden, accumulation, monkeypatch):
    """The default plan at V=128k–256k (CCE's, Liger's, Qwen2.5's heads, N=8192, bf16): the peak
    above the inputs (gradients included) within the budget, itself within 1.5 GB, whichever
    accumulation is asked for: fp32 accumulators (the default) where they, their final cast to bf16
    and the chunks fit, else the inputs' dtype. Chunks of at least the GEMM-friendly minimum, and
    the rule tight."""
    import torch

    from fastdadpo.kernels import chunk_plan, chunked_backend

    monkeypatch.delenv(chunk_plan.CHUNK_BUDGET_ENV, raising=False)
    monkeypatch.setattr(chunk_plan, "GRAD_ACCUMULATION", accumulation)
    tokens = 8192
    plan = _plan(kind, with_logps, vocab, hidden, tokens=tokens)
    gradients = (tokens + vocab) * hidden
    in_fp32 = plan.grad_dtype == torch.float32
    assert in_fp32 or plan.grad_dtype == torch.bfloat16
    assert accumulation == "float32" or not in_fp32
    assert plan.fixed_bytes == gradients * (4 if in_fp32 else 2) + 8 * tokens * 4
    assert plan.cast_bytes == (gradients * 2 if in_fp32 else 0)
    assert plan.budget_bytes <= 1.5e9
    assert plan.peak_bytes <= plan.budget_bytes, plan
    assert plan.rows_per_chunk >= chunk_plan.MIN_CHUNK_ROWS
    # The rule is tight: one more row per chunk would break the budget.
    assert plan.fixed_bytes + (plan.rows_per_chunk + 1) * plan.row_bytes > plan.budget_bytes
    if accumulation == "float32" and not in_fp32:  # bf16 only because fp32 would not fit
        fp32_need = gradients * 4 + 8 * tokens * 4 + max(gradients * 2, 64 * plan.row_bytes)
        assert fp32_need > plan.budget_bytes


def test_budget_from_argument_and_environment(monkeypatch):
    from fastdadpo.kernels import chunk_plan, chunked_backend

    monkeypatch.setenv(chunk_plan.CHUNK_BUDGET_ENV, "6000")
    assert chunk_plan.budget_bytes() == 6000 * 2**20
    assert chunk_plan.budget_bytes(500) == 500 * 2**20
    assert _plan("forward_kl", True, 256000, 2304).rows_per_chunk > _plan("forward_kl", True, 256000, 2304,
                                                                         budget_mb=1400).rows_per_chunk
    monkeypatch.setenv(chunk_plan.CHUNK_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="FASTDADPO_CHUNK_BUDGET_MB"):
        chunk_plan.budget_bytes()
    with pytest.raises(ValueError, match="positive number of MiB"):
        chunk_plan.budget_bytes(0)
    monkeypatch.delenv(chunk_plan.CHUNK_BUDGET_ENV)
    assert chunk_plan.budget_bytes(None, torch.device("cuda")) == 1400 * 2**20
    assert chunk_plan.budget_bytes(None, torch.device("cpu")) == 192 * 2**20


def test_workspace_is_what_the_rule_counts(monkeypatch):
    """The buffers a sweep really allocates are the per-row bytes the rule charges."""
    from fastdadpo.kernels import chunk_plan, chunked_backend, row_chunks

    allocated = []
    original_get = row_chunks.Workspace.get

    def get(self, name, rows, cols, dtype=None):
        out = original_get(self, name, rows, cols, dtype)
        allocated.append((name, self.buffers[name].numel() * self.buffers[name].element_size()))
        return out

    monkeypatch.setattr(row_chunks.Workspace, "get", get)
    monkeypatch.setattr(chunk_plan, "MIN_CHUNK_ROWS", 4)
    t = _tensors(10, n=20, hs=8, ht=8, vs=45, vt=45)
    frozen = [t[k].float() for k in ("teacher_hidden", "teacher_weight", "ref_hidden", "ref_weight")]
    budget_mb = 0.005
    fused_linear_advantage(t["student_hidden"].float(), t["student_weight"].float(), *frozen, vocab_size=41,
                           impl="chunked_triton", chunk_budget_mb=budget_mb)
    from fastdadpo.kernels.sweep import SweepSpec

    # No input wants a gradient, so the weight's counts as frozen (no [V, H] term in the plan).
    plan = chunk_plan.plan_chunks(SweepSpec(kind="advantage", vocab_size=41, weight_grad=False), 20, 45, 8,
                                       chunk_plan.budget_bytes(budget_mb), input_dtype=torch.float32)
    assert 1 < plan.rows_per_chunk < 20
    assert sum(dict(allocated).values()) == plan.rows_per_chunk * plan.row_bytes


# --- dispatch ------------------------------------------------------------------------------------------------

def test_chunked_is_the_default_everywhere_and_the_others_stay_selectable(monkeypatch):
    """One algorithm on every device: ``chunked`` by default, its row sweep Triton on CUDA and torch
    elsewhere (so the CPU default needs no Triton); the forced variants, the tile-fused kernels and
    the reference by name."""
    from fastdadpo.kernels.backends import build_backend

    monkeypatch.delenv("FASTDADPO_KERNEL_BACKEND", raising=False)
    assert resolve_backend(torch.device("cuda")) == "chunked"
    assert resolve_backend(torch.device("cpu")) == "chunked"
    assert build_backend("chunked", torch.device("cuda")).row_sweep == "triton"
    assert build_backend("chunked", torch.device("cpu")).row_sweep == "torch"
    assert build_backend("torch", torch.device("cuda")).row_sweep == "torch"
    assert build_backend("chunked_triton", torch.device("cpu")).row_sweep == "triton"
    assert resolve_backend(torch.device("cuda"), "triton") == "triton"
    monkeypatch.setenv("FASTDADPO_KERNEL_BACKEND", "triton")
    assert resolve_backend(torch.device("cuda")) == "triton"
    assert resolve_backend(torch.device("cuda"), "naive") == "naive"  # impl= wins over the environment
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.delenv("FASTDADPO_KERNEL_BACKEND")
    assert resolve_backend(torch.device("cpu")) == "chunked"  # no Triton needed
    for name in ("chunked_triton", "triton"):
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            resolve_backend(torch.device("cpu"), name)



def test_launch_specializations_cover_the_dispatch():
    from fastdadpo.kernels import triton_rows

    specs = triton_rows.launch_specializations()
    names = [s["name"] for s in specs]
    assert len(names) == len(set(names))
    # kinds x with/without targets x with/without grad (+ the backward's log-prob pass) x 3 dtypes
    assert len(specs) == 3 * len(triton_rows.specialization_flags())
    for spec in specs:
        assert {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"} <= set(spec) <= {
            "name", "fn", "signature", "constexprs", "num_warps", "num_stages", "attrs"}
        assert list(spec["signature"]) == spec["fn"].arg_names
        constexpr_names = [spec["fn"].arg_names[k[0]] if isinstance(k, tuple) else k for k in spec["constexprs"]]
        assert all(spec["signature"][name] == "constexpr" for name in constexpr_names)
    grad_types = {s["signature"]["grad_ptr"] for s in specs}
    assert grad_types == {"*bf16", "*fp16", "*fp32"}
