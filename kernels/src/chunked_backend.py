"""Host side of the chunked backend, the CUDA default: every FLOP on cuBLAS, one Triton kernel per chunk.

Rows go in chunks of R. Per chunk: the student's (and teacher's, reference's) float32 logit chunk
from a cuBLAS GEMM into a reused buffer; one launch of ``triton_rows.row_sweep_kernel`` for
everything row-wise (soft caps and logit scales, normalizers, the divergence, the target log-probs
and, when asked, d(loss)/d(logits) written over the student's logits); then, with gradients, two cuBLAS GEMMs:
dh[rows] = G·W and dW += Gᵀ·X, into one dW buffer for the whole call.

FLOPs, F = 2·N·V: with the caller's ``grad_weights`` hint the gradient is formed in the forward
sweep, so the teacher's logits are computed once: F·(Hs + Ht) + F·2·Hs = F·(3·Hs + Ht). Log-probs
without a hint (DPO's per-sequence weights): the forward keeps each row's log-normalizer and the
backward recomputes the student chunk only: F·Hs + F·3·Hs = F·4·Hs. A divergence without a hint
recomputes both models in backward: F·(4·Hs + 2·Ht).

Precision: bf16/fp16 hidden states and heads go to cuBLAS as they are, logits come out in fp32
(``out_dtype``), the row kernel computes in fp32, and the gradient is written in the inputs' dtype
(it feeds the two gradient GEMMs, fp32-accumulated inside each). dh and dW are summed across
chunks in fp32 buffers where the memory budget holds them, which the GEMMs add into in their fp32
epilogue (``addmm(out_dtype=)``); autograd casts them to the inputs' dtype once. On CPU (the interpreter's tests) half inputs are
upcast to fp32 first, unless ``CUDA_PRECISION_ON_CPU``.

Why fp32 accumulation (``GRAD_ACCUMULATION``): bench/results/cpu-bf16-accumulation.md, this
backend's bf16 path on CPU against float64 (V = 131,072 and 151,936, H = 256, N = 1,337 rows, a
mean KL + cross-entropy loss). Summed in bf16, dW is rounded once per chunk, and its error grows
with the chunk count, i.e. with N and a smaller budget: over the head rows no token targets (the
softmax's dense part, summed over every chunk) 5.7e-3 to 5.9e-3 relative (Frobenius) in 21
chunks, 9.7e-3 in 84, 1.5e-2 in 335; in fp32 3.5e-3 to 3.6e-3 whatever the chunking (the float64
gradient rounded to bf16: 1.7e-3; the rest is the bf16 d(loss)/d(logits)). Over the whole head,
whose norm the targets' one-hot terms dominate, 1.9e-3 to 2.7e-3 against 1.7e-3 to 1.8e-3 in 21
chunks. dh is the same both ways (each row's dh is one chunk's GEMM: 1.7e-3 to 1.9e-3), and so
are the values. The unchunked GEMM, a model's own backward, rounds dW once; fp32 accumulation
keeps that whatever N. The cost is memory, (N + V)·H·2 bytes more during the call and as much
again for the final cast, which the memory budget must hold: where it does not, the gradients are
summed in the inputs' dtype and the budget is kept (``plan_chunks``). At N = 8192 and the default
budget, fp32 would need 1.48 GB at Qwen2.5-1.5B's head (V = 151,936, H = 1536), 1.68 GB at
Liger's config (V = 128,256, H = 2048) and 3.65 GB at Gemma-2's (V = 256,000, H = 2304), so those
stay in bf16 unless ``chunk_budget_mb`` is raised (1600, 1700 and 3500 MiB); smaller heads and
batches get fp32 at the default. Each chunk's dW GEMM also reads and writes an fp32 dW.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from . import triton_rows
from .row_chunks import Workspace, accumulate_chunk_grads, logits_into, new_grads
from .sweep import SweepGrads, SweepInputs, SweepSpec

# The memory one call may take above its inputs, its gradients included, in MiB: the public
# functions' ``chunk_budget_mb=`` or this environment variable. 1400 MiB (1.47 GB) keeps a call
# within 1.5 GB at V = 128k–256k (the gradients summed in fp32 where that fits): see ``plan_chunks``.
CHUNK_BUDGET_ENV = "FASTDADPO_CHUNK_BUDGET_MB"
DEFAULT_CHUNK_BUDGET_MB = 1400.0
# How dh and dW of half-precision inputs are summed across row chunks: "float32" (the default: see
# the module's docstring for the figures), in fp32 buffers the GEMMs add into, cast to the inputs'
# dtype once at the end, wherever the memory budget holds them (else as "inputs"); or "inputs", in
# the inputs' dtype, one rounding per chunk (less memory).
GRAD_ACCUMULATION = "float32"
# Half inputs on CPU are upcast to fp32. True: they take the CUDA path instead (half GEMMs giving
# fp32 logits, computed in fp32 on CPU: ``row_chunks.logits_into``; the row kernel writing a half
# gradient over them; half gradient GEMMs), so that tests and bench/bf16_accumulation.py check
# the CUDA numerics without a GPU.
CUDA_PRECISION_ON_CPU = False
# Rows below which the chunk GEMMs waste their tiles (cuBLAS tiles are 64–256 rows, and the dW GEMM's
# inner dimension is R): a budget too small for this many is exceeded rather than honoured.
MIN_CHUNK_ROWS = 64


def budget_bytes(chunk_budget_mb: Optional[float] = None) -> int:
    if chunk_budget_mb is None:
        text = os.environ.get(CHUNK_BUDGET_ENV, "")
        try:
            chunk_budget_mb = float(text) if text else DEFAULT_CHUNK_BUDGET_MB
        except ValueError:
            raise ValueError(f"{CHUNK_BUDGET_ENV}={text!r} is not a number of MiB") from None
    if not chunk_budget_mb > 0:
        raise ValueError(f"the chunked backend's memory budget must be > 0 MiB, got {chunk_budget_mb}")
    return int(chunk_budget_mb * 2**20)


@dataclass(frozen=True)
class ChunkPlan:
    rows_per_chunk: int
    row_bytes: int  # workspace per row of a chunk
    fixed_bytes: int  # whatever does not scale with the chunk: gradient accumulators, per-row vectors
    budget_bytes: int
    # The gradients cast from fp32 accumulators to the inputs' dtype at the end of the call, beside
    # the accumulators, once the workspace is freed (0 when they are accumulated in that dtype).
    cast_bytes: int = 0
    # The dtype dh and dW are summed in across chunks (``grad_accumulation_dtype``, within the budget).
    grad_dtype: torch.dtype = torch.float32

    @property
    def peak_bytes(self) -> int:
        """The call's memory above its inputs under this plan."""
        return self.fixed_bytes + max(self.rows_per_chunk * self.row_bytes, self.cast_bytes)


def plan_chunks(spec: SweepSpec, rows: int, vocab_student: int, hidden_student: int, budget: int,
                input_dtype: torch.dtype = torch.bfloat16, logits_dtype: torch.dtype = torch.float32,
                with_bias: bool = False) -> ChunkPlan:
    """Rows per chunk from the memory budget, for a student head computed in ``input_dtype``.

    Fixed (does not scale with R; counted whether or not this sweep forms gradients, so forward and
    backward chunk alike):
      gradients  N·Hs + V·Hs in the accumulation dtype (``grad_accumulation_dtype``: fp32 for half
                 inputs by default; no V·Hs for a frozen head; + V fp32 for a bias, + V fp32 for its
                 per-chunk sum)
      per row    8 fp32 vectors of N (div, logp, log-normalizer, two hints, two incoming gradients, spare)
    Per row of a chunk (the R x V workspace; the gradient is written over the student's logits):
      student logits   C·4 bytes, C = V when log-probs are asked for (whole head) else vocab_size
      teacher logits   vocab_size·4 (divergences, advantage)
      reference logits vocab_size·4 (advantage)
    At the end, fp32 accumulators of half inputs are cast to the inputs' dtype (autograd's result),
    (N + V)·Hs·2 beside them once the workspace is freed: a workspace up to that size costs no peak.
    R = max((budget − fixed) / per-row, cast / per-row), at least MIN_CHUNK_ROWS, at most N; the
    peak is fixed + max(R·per-row, cast).

    The budget is the call's contract: fp32 accumulators (``GRAD_ACCUMULATION = "float32"``) are
    used when they, their cast and MIN_CHUNK_ROWS rows of workspace fit in it; otherwise the
    gradients are summed in the inputs' dtype, as if ``"inputs"`` (a larger ``chunk_budget_mb``
    buys fp32 back). E.g. bf16, N = 8192, the 1400 MiB default (1.468 GB): V = 151,936, Hs = 1536
    (Qwen2.5-1.5B), forward KL with targets: fp32 would take 0.98 GB + 0.49 GB cast + 404 rows of
    1.22 MB = 1.48 GB, just over, so bf16: fixed 0.49 GB, R = 802. V = 128,256, Hs = 2048 (Liger's
    config): fp32 would take 1.12 GB + 0.56 GB cast = 1.68 GB; bf16: fixed 0.56 GB, per row 1.03
    MB, R = 885 (fp32 from a 1700 MiB budget). V = 256,000, Hs = 2304 (Gemma-2 2B), cross-entropy:
    fp32 would need 3.65 GB; bf16: fixed 1.18 GB (dW) + 38 MB (dh) + 0.3 MB = 1.22 GB, per row
    1.02 MB, R = 244, peak 1.468 GB. Smaller heads and batches (V·H + N·H under ~0.16 G elements at
    this budget) are summed in fp32. Fewer, larger chunks only pay up to the GEMMs' efficiency (R of
    a few hundred).
    """
    plan = _plan_for(spec, rows, vocab_student, hidden_student, budget, input_dtype, logits_dtype, with_bias,
                     grad_accumulation_dtype(input_dtype))
    if plan.grad_dtype != input_dtype and plan.peak_bytes > budget:
        plan = _plan_for(spec, rows, vocab_student, hidden_student, budget, input_dtype, logits_dtype, with_bias,
                         input_dtype)
    return plan


def _plan_for(spec: SweepSpec, rows: int, vocab_student: int, hidden_student: int, budget: int,
              input_dtype: torch.dtype, logits_dtype: torch.dtype, with_bias: bool,
              grad_dtype: torch.dtype) -> ChunkPlan:
    """``plan_chunks``'s arithmetic for gradients accumulated in ``grad_dtype``."""
    grad_elem = torch.finfo(grad_dtype).bits // 8
    logit_elem = torch.finfo(logits_dtype).bits // 8
    vocab_div = spec.vocab_size if spec.has_div else 0
    student_cols = vocab_student if spec.with_logps else vocab_div
    grad_rows = rows + (vocab_student if spec.weight_grad else 0)
    fixed = grad_rows * hidden_student * grad_elem + 8 * rows * 4
    if with_bias:
        fixed += 2 * vocab_student * 4
    cast = 0 if grad_dtype == input_dtype else grad_rows * hidden_student * (torch.finfo(input_dtype).bits // 8)
    row_bytes = logit_elem * (student_cols + vocab_div * (1 if spec.needs_teacher else 0)
                              + vocab_div * (1 if spec.needs_ref else 0))
    fit = (budget - fixed) // row_bytes if budget > fixed else 0
    chunk = max(1, min(rows, max(MIN_CHUNK_ROWS, fit, cast // row_bytes)))
    return ChunkPlan(rows_per_chunk=chunk, row_bytes=row_bytes, fixed_bytes=fixed, budget_bytes=budget,
                     cast_bytes=cast, grad_dtype=grad_dtype)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # cuBLAS takes half inputs as they are; on CPU (the interpreter's tests) they are upcast,
    # unless CUDA_PRECISION_ON_CPU asks for the CUDA path.
    if t.device.type != "cuda" and t.dtype in _HALF and not CUDA_PRECISION_ON_CPU:
        return torch.float32
    return t.dtype


def grad_accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype dh and dW are summed in across row chunks, for inputs computed in ``dtype``
    (``GRAD_ACCUMULATION``); fp32 and fp64 inputs keep their own."""
    if GRAD_ACCUMULATION not in ("float32", "inputs"):
        raise ValueError(f"GRAD_ACCUMULATION must be 'float32' or 'inputs', got {GRAD_ACCUMULATION!r}")
    return torch.float32 if dtype in _HALF and GRAD_ACCUMULATION == "float32" else dtype


def _as(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype).contiguous()


def _grad_view(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The chunk's gradient over its (contiguous, float32) logits: the same tensor, or, for a
    narrower dtype, the first half of each row's bytes seen as that dtype (row stride 2·C)."""
    if logits.dtype == dtype:
        return logits
    return logits.view(dtype)[:, :logits.shape[1]]


class ChunkedBackend:
    """The backend object the autograd layer drives (``forward`` / ``backward``), carrying its memory budget."""

    supports_eager_grads = True

    def __init__(self, budget: int):
        self.budget = budget

    def forward(self, spec: SweepSpec, inputs: SweepInputs, row_grads=None):
        div, logp, lse_lp, grads = sweep(spec, inputs, self.budget, row_grads)
        saved = {} if lse_lp is None else {"lse_lp": lse_lp}
        return div, logp, saved, grads

    def backward(self, spec: SweepSpec, inputs: SweepInputs, saved: dict, div, grad_div, grad_logp,
                 into: Optional[SweepGrads] = None) -> SweepGrads:
        # Log-probs alone: the forward's normalizers make the backward one pass over the student.
        lse_lp = saved.get("lse_lp") if not spec.has_div else None
        return sweep(spec, inputs, self.budget, (grad_div, grad_logp), into=into, lse_lp=lse_lp)[3]


def sweep(spec: SweepSpec, inputs: SweepInputs, budget: int, row_grads=None, into: Optional[SweepGrads] = None,
          lse_lp: Optional[torch.Tensor] = None):
    """One pass over the rows in chunks. Returns (div, logp, lse_lp, grads).

    ``row_grads = (g_div, g_logp)``: the outputs' gradients (or the caller's reduction weights); a
    None entry means that output's gradient is zero; None altogether: no gradients. ``into``:
    gradients to add to. ``lse_lp``: the log-prob normalizers of a log-prob-only sweep, from its forward.
    """
    s_hidden, s_weight = inputs.student_hidden, inputs.student_weight
    device = s_weight.device
    dtype = _compute_dtype(s_weight)
    logits_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    n = inputs.rows
    vocab_student, hidden_student = s_weight.shape
    vocab_div = spec.vocab_size if spec.has_div else 0
    student_cols = vocab_student if spec.with_logps else vocab_div
    s_weight = _as(s_weight, dtype)
    bias = _as(inputs.student_bias, logits_dtype)
    t_dtype = _compute_dtype(inputs.teacher_weight) if spec.needs_teacher else dtype
    t_weight = _as(inputs.teacher_weight[:vocab_div], t_dtype) if spec.needs_teacher else None
    r_weight = _as(inputs.ref_weight[:vocab_div], t_dtype) if spec.needs_ref else None

    want_grads = row_grads is not None
    plan = plan_chunks(spec, n, vocab_student, hidden_student, budget, input_dtype=dtype, logits_dtype=logits_dtype,
                       with_bias=bias is not None and spec.bias_grad)
    grads = None
    if want_grads:
        grads = into if into is not None else new_grads(n, s_weight, inputs.student_bias, plan.grad_dtype,
                                                        spec.weight_grad, spec.bias_grad)
    space = Workspace(plan.rows_per_chunk, logits_dtype, device)

    f32 = dict(dtype=torch.float32, device=device)
    div_out = torch.zeros(n, **f32) if spec.has_div else None
    logp_out = torch.zeros(n, **f32) if spec.with_logps else None
    lse_given = lse_lp is not None and not spec.has_div and want_grads
    lse_out = lse_lp.float().contiguous() if lse_given else (torch.empty(n, **f32) if spec.with_logps else None)
    g_div, g_logp = row_grads if want_grads else (None, None)
    zeros = None
    if want_grads and ((spec.has_div and g_div is None) or (spec.with_logps and g_logp is None)):
        zeros = torch.zeros(n, **f32)
    g_div = (g_div.float().contiguous() if g_div is not None else zeros) if spec.has_div else None
    g_logp = (g_logp.float().contiguous() if g_logp is not None else zeros) if spec.with_logps else None
    # Without log-probs the kernel never reads targets; an int64 stand-in keeps the launch on the
    # specialization the compile report lists.
    targets = inputs.targets.contiguous() if spec.with_logps else torch.zeros(n, dtype=torch.int64, device=device)

    beta = spec.beta if spec.kind == "jsd" else 0.5
    scalars = dict(inv_temp=1.0 / spec.temperature, inv_lp_temp=1.0 / spec.logp_temperature, beta=beta,
                   log_beta=math.log(beta), log_one_minus_beta=math.log1p(-beta))
    for prefix, m in (("s", spec.student_map), ("t", spec.teacher_map), ("r", spec.ref_map)):
        scalars.update({f"{prefix}_scale": m.scale, f"{prefix}_cap": m.softcap or 0.0})
    dummy = div_out if div_out is not None else logp_out

    for start in range(0, n, plan.rows_per_chunk):
        rows = slice(start, min(n, start + plan.rows_per_chunk))
        count = rows.stop - rows.start
        x = s_hidden[rows].to(dtype)
        logits = logits_into(space.get("student", count, student_cols), x, s_weight[:student_cols])
        if bias is not None:
            logits += bias[:student_cols]
        teacher = ref = logits  # placeholders for absent operands: their branches compile away
        if spec.needs_teacher:
            teacher = logits_into(space.get("teacher", count, vocab_div), inputs.teacher_hidden[rows].to(t_dtype),
                                  t_weight)
        if spec.needs_ref:
            ref = logits_into(space.get("ref", count, vocab_div), inputs.ref_hidden[rows].to(t_dtype), r_weight)
        grad_logits = _grad_view(logits, dtype) if want_grads else logits
        pick = (lambda t: dummy if t is None else t[rows])
        args, constexprs, options = triton_rows.launch(
            logits, teacher, ref, grad_logits, targets[rows], pick(g_div), pick(g_logp), pick(div_out),
            pick(logp_out), pick(lse_out), count, student_cols, vocab_div, scalars, kind=spec.kind,
            with_logps=spec.with_logps, with_grad=want_grads, lse_given=lse_given, interpreted=interpreting())
        triton_rows.row_sweep_kernel[(triton.cdiv(count, constexprs["BLOCK_R"]),)](*args, **constexprs, **options)
        if want_grads:
            accumulate_chunk_grads(grads, rows, grad_logits, x, s_weight)
    return div_out, logp_out, (lse_out if spec.with_logps else None), grads
