"""The budgeted row-chunk algorithm, the default on every device: every FLOP in GEMMs (cuBLAS, or
torch's on CPU), one row sweep per chunk.

Rows go in chunks of R (``chunk_plan.plan_chunks``). Per chunk: the student's (and teacher's,
reference's) float32 logit chunk from a GEMM into a reused buffer; one row sweep for everything
row-wise, the Triton kernel ``triton_rows.row_sweep_kernel`` on CUDA and the torch function
``torch_rows.row_sweep`` elsewhere, the same contract (soft caps and logit scales, normalizers, the
divergence, the target log-probs and, when asked, d(loss)/d(logits) written over the student's
logits); then, with gradients, two GEMMs: dh[rows] = G·W and dW += Gᵀ·X, into one dW buffer for
the whole call. The CPU therefore runs the algorithm CUDA runs, with torch in place of one kernel.
``approximation="release"`` (a per-row top-k the Triton kernel does not have) takes the torch row
sweep on every device.

FLOPs, F = 2·N·V: for an output the caller reduces with its row weights (``weights=``) the gradient
is formed in the forward sweep, so the teacher's logits are computed once: F·(Hs + Ht) + F·2·Hs =
F·(3·Hs + Ht). Per-row
log-probs (DPO's sequence sums): the forward keeps each row's log-normalizer and the
backward recomputes the student chunk only: F·Hs + F·3·Hs = F·4·Hs. A per-row divergence
recomputes both models in backward: F·(4·Hs + 2·Ht).

Precision: bf16/fp16 hidden states and heads go to cuBLAS as they are, logits come out in fp32
(``out_dtype``), the row kernel computes in fp32, and the gradient is written in the inputs' dtype
(it feeds the two gradient GEMMs, fp32-accumulated inside each). dh and dW are summed across
chunks in fp32 buffers where the memory budget holds them, which the GEMMs add into in their fp32
epilogue (``addmm(out_dtype=)``); autograd casts them to the inputs' dtype once. On CPU half inputs
are upcast to fp32 first, unless ``CUDA_PRECISION_ON_CPU``.

Why fp32 accumulation (``chunk_plan.GRAD_ACCUMULATION``): bench/results/cpu-bf16-accumulation.md, this
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
from typing import Optional

import torch

from . import torch_rows
from .autograd import Swept
from .chunk_plan import TORCH_ROW_BLOCK, plan_chunks
from .row_chunks import Workspace, accumulate_chunk_grads, logits_into, new_grads
from .sweep import SweepGrads, SweepInputs, SweepSpec

# Half inputs on CPU are upcast to fp32. True: they take the CUDA path instead (half GEMMs giving
# fp32 logits, computed in fp32 on CPU: ``row_chunks.logits_into``; the row sweep writing a half
# gradient; half gradient GEMMs), so that tests and bench/bf16_accumulation.py check the CUDA
# numerics without a GPU.
CUDA_PRECISION_ON_CPU = False
ROW_SWEEPS = ("triton", "torch")
_HALF = (torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # cuBLAS takes half inputs as they are; on CPU they are upcast, unless CUDA_PRECISION_ON_CPU
    # asks for the CUDA path.
    if t.device.type != "cuda" and t.dtype in _HALF and not CUDA_PRECISION_ON_CPU:
        return torch.float32
    return t.dtype


def _as(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype).contiguous()


def _grad_view(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The chunk's gradient over its (contiguous, float32) logits: the same tensor, or, for a
    narrower dtype, the first half of each row's bytes seen as that dtype (row stride 2·C)."""
    if logits.dtype == dtype:
        return logits
    return logits.view(dtype)[:, :logits.shape[1]]


class ChunkedBackend(Swept):
    """The budgeted row-chunk algorithm (``sweep``) with its memory budget and its row sweep:
    "triton" (the Triton row kernel: CUDA, or CPU under TRITON_INTERPRET=1) or "torch"
    (``torch_rows``, any device)."""

    forms_grads_in_forward = True

    def __init__(self, budget: int, row_sweep: str):
        if row_sweep not in ROW_SWEEPS:
            raise ValueError(f"row_sweep must be one of {', '.join(ROW_SWEEPS)}, got {row_sweep!r}")
        self.budget, self.row_sweep = budget, row_sweep

    def forward(self, spec: SweepSpec, inputs: SweepInputs, row_grads=None):
        div, logp, lse_lp, grads = sweep(spec, inputs, self.budget, self.row_sweep, row_grads)
        saved = {} if lse_lp is None else {"lse_lp": lse_lp}
        return div, logp, saved, grads

    def backward(self, spec: SweepSpec, inputs: SweepInputs, saved: dict, div, row_grads,
                 into: Optional[SweepGrads] = None) -> SweepGrads:
        # Log-probs alone: the forward's normalizers make the backward one pass over the student.
        lse_lp = saved.get("lse_lp") if not spec.has_div else None
        return sweep(spec, inputs, self.budget, self.row_sweep, row_grads, into=into, lse_lp=lse_lp)[3]


def sweep(spec: SweepSpec, inputs: SweepInputs, budget: int, row_sweep: str = "torch", row_grads=None,
          into: Optional[SweepGrads] = None, lse_lp: Optional[torch.Tensor] = None):
    """One pass over the rows in chunks. Returns (div, logp, lse_lp, grads).

    ``row_grads = (g_div, g_logp)``: the outputs' gradients (or the caller's reduction weights); a
    None entry means that output's gradient is zero; None altogether: no gradients. ``into``:
    gradients to add to. ``lse_lp``: the log-prob normalizers of a log-prob-only sweep, from its forward.
    """
    if spec.release:
        # The release's per-row top-k is not in the Triton row kernel: the torch row sweep does it,
        # on CUDA tensors too (torch ops run on any device; the plan then counts its scratch).
        row_sweep = "torch"
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
                       with_bias=bias is not None and spec.bias_grad, row_sweep=row_sweep)
    grads = None
    if want_grads:
        grads = into if into is not None else new_grads(n, s_weight, inputs.student_bias, plan.grad_dtype,
                                                        spec.weight_grad, spec.bias_grad)
    space = Workspace(plan.rows_per_chunk, logits_dtype, device,
                      scratch_rows=min(plan.rows_per_chunk, TORCH_ROW_BLOCK) if row_sweep == "torch" else 0)

    f32 = dict(dtype=torch.float32, device=device)
    div_out = torch.zeros(n, **f32) if spec.has_div else None
    logp_out = torch.zeros(n, **f32) if spec.with_logps else None
    lse_given = lse_lp is not None and not spec.has_div and want_grads
    lse_out = lse_lp.float().contiguous() if lse_given else (torch.empty(n, **f32) if spec.with_logps else None)
    g_div, g_logp = row_grads if want_grads else (None, None)
    g_div = g_div.float().contiguous() if g_div is not None and spec.has_div else None
    g_logp = g_logp.float().contiguous() if g_logp is not None and spec.with_logps else None
    # Without log-probs the row sweep never reads targets; an int64 stand-in keeps the Triton launch
    # on the specialization the compile report lists.
    targets = inputs.targets.contiguous() if spec.with_logps else torch.zeros(n, dtype=torch.int64, device=device)
    sweep_chunk = _triton_chunk_sweep(spec, n, want_grads, g_div, g_logp, div_out, logp_out, device) \
        if row_sweep == "triton" else None

    for start in range(0, n, plan.rows_per_chunk):
        rows = slice(start, min(n, start + plan.rows_per_chunk))
        count = rows.stop - rows.start
        x = s_hidden[rows].to(dtype)
        logits = logits_into(space.get("student", count, student_cols), x, s_weight[:student_cols])
        if bias is not None:
            logits += bias[:student_cols]
        teacher = ref = None
        if spec.needs_teacher:
            teacher = logits_into(space.get("teacher", count, vocab_div), inputs.teacher_hidden[rows].to(t_dtype),
                                  t_weight)
        if spec.needs_ref:
            ref = logits_into(space.get("ref", count, vocab_div), inputs.ref_hidden[rows].to(t_dtype), r_weight)

        def pick(vector):
            return None if vector is None else vector[rows]

        if sweep_chunk is not None:
            grad_logits = sweep_chunk(logits, teacher, ref, targets[rows], rows, lse_out, lse_given, dtype)
        else:
            torch_rows.row_sweep(spec, logits, teacher, ref, targets[rows], pick(g_div), pick(g_logp), pick(div_out),
                                 pick(logp_out), pick(lse_out), with_grad=want_grads, lse_given=lse_given,
                                 scratch=lambda name, block_rows, cols: space.get_scratch(name, block_rows, cols))
            grad_logits = logits
            if want_grads and dtype != logits_dtype:  # half GEMM operands: the gradient cast once
                grad_logits = space.get("grad_cast", count, student_cols, dtype).copy_(logits)
        if want_grads:
            accumulate_chunk_grads(grads, rows, grad_logits, x, s_weight)
    return div_out, logp_out, (lse_out if spec.with_logps else None), grads


def _triton_chunk_sweep(spec: SweepSpec, n: int, want_grads: bool, g_div, g_logp, div_out, logp_out, device):
    """The per-chunk launch of the Triton row kernel (imported here: Triton is needed only for it)."""
    import triton

    from . import triton_rows

    zeros = torch.zeros(n, dtype=torch.float32, device=device) if want_grads else None
    g_div = (g_div if g_div is not None else zeros) if spec.has_div else None
    g_logp = (g_logp if g_logp is not None else zeros) if spec.with_logps else None
    beta = spec.beta if spec.kind == "jsd" else 0.5
    scalars = dict(inv_temp=1.0 / spec.temperature, inv_lp_temp=1.0 / spec.logp_temperature, beta=beta,
                   log_beta=math.log(beta), log_one_minus_beta=math.log1p(-beta))
    for prefix, m in (("s", spec.student_map), ("t", spec.teacher_map), ("r", spec.ref_map)):
        scalars.update({f"{prefix}_scale": m.scale, f"{prefix}_cap": m.softcap or 0.0})
    dummy = div_out if div_out is not None else logp_out
    vocab_div = spec.vocab_size if spec.has_div else 0

    def run(logits, teacher, ref, targets, rows, lse_out, lse_given, dtype):
        count = rows.stop - rows.start
        # Absent operands stand in with the student's logits: their branches compile away.
        teacher = logits if teacher is None else teacher
        ref = logits if ref is None else ref
        grad_logits = _grad_view(logits, dtype) if want_grads else logits
        pick = (lambda t: dummy if t is None else t[rows])
        args, constexprs, options = triton_rows.launch(
            logits, teacher, ref, grad_logits, targets, pick(g_div), pick(g_logp), pick(div_out), pick(logp_out),
            pick(lse_out), count, logits.shape[1], vocab_div, scalars, kind=spec.kind, with_logps=spec.with_logps,
            with_grad=want_grads, lse_given=lse_given, interpreted=interpreting())
        triton_rows.row_sweep_kernel[(triton.cdiv(count, constexprs["BLOCK_R"]),)](*args, **constexprs, **options)
        return grad_logits

    return run
