"""The budgeted row-chunk algorithm's memory rule: how many rows one chunk takes, and in which dtype
the gradients are summed across chunks. Triton-free, so the planner (``fastdadpo.plan``) imports
it instead of restating it.

The budget is the memory one kernel call may take above its inputs, its gradients included:
``chunk_budget_mb=`` on a call, the training config's ``kernels.chunk_budget_mb``, else
``FASTDADPO_CHUNK_BUDGET_MB``, else the device's default below.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .sweep import SweepSpec

CHUNK_BUDGET_ENV = "FASTDADPO_CHUNK_BUDGET_MB"
# CUDA: 1400 MiB (1.47 GB) keeps a call within 1.5 GB at V = 128k–256k, the gradients summed in fp32
# where that fits (``plan_chunks``). Elsewhere (CPU): 192 MiB. The CPU's GEMMs still gain from larger
# chunks there (at the CPU anchor, V = 65,536, H = 256/512, fp32: forward KL 7.3 s at a 130 MiB
# budget, 5.9 s at 200, 5.3 s at 400, before the head-tiled logit GEMMs), and 192 MiB holds the
# 68 MiB of gradients, the row sweep's block scratch and ~230 rows of student and teacher logits:
# a call within 200 MiB of its inputs (191 MiB measured, bench/results/cpu-anchor.md).
DEFAULT_CHUNK_BUDGET_MB = {"cuda": 1400.0, "cpu": 192.0}
# How dh and dW of half-precision inputs are summed across row chunks: "float32" (the default:
# bench/results/cpu-bf16-accumulation.md gives the figures; chunked_backend's docstring the reasons),
# in fp32 buffers the GEMMs add into, cast to the inputs' dtype once at the end, wherever the memory
# budget holds them (else as "inputs"); or "inputs", in the inputs' dtype, one rounding per chunk.
GRAD_ACCUMULATION = "float32"
# Rows below which the chunk GEMMs waste their tiles (cuBLAS tiles are 64–256 rows, and the dW GEMM's
# inner dimension is R): a budget too small for this many is exceeded rather than honoured.
MIN_CHUNK_ROWS = 64
# The torch row sweep's elementwise work goes through a chunk in blocks of this many rows
# (``torch_rows``: the passes stay in cache, and its scratch is this many rows whatever the chunk;
# at the CPU anchor 32 beat 8, 16 and 64).
TORCH_ROW_BLOCK = 32

_HALF = (torch.float16, torch.bfloat16)


def default_budget_mb(device: torch.device) -> float:
    return DEFAULT_CHUNK_BUDGET_MB.get(device.type, DEFAULT_CHUNK_BUDGET_MB["cpu"])


def budget_bytes(chunk_budget_mb: Optional[float] = None, device: Optional[torch.device] = None) -> int:
    """The budget in bytes: the argument, else the environment, else the default of ``device``
    (CUDA's when no device is named)."""
    if chunk_budget_mb is None:
        text = os.environ.get(CHUNK_BUDGET_ENV, "")
        try:
            chunk_budget_mb = float(text) if text else default_budget_mb(device or torch.device("cuda"))
        except ValueError:
            raise ValueError(f"{CHUNK_BUDGET_ENV}={text!r} is not a number of MiB") from None
    if not (isinstance(chunk_budget_mb, (int, float)) and chunk_budget_mb > 0 and chunk_budget_mb != float("inf")):
        raise ValueError(f"the chunked kernels' memory budget must be a positive number of MiB, got {chunk_budget_mb}")
    return int(chunk_budget_mb * 2**20)


def grad_accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype dh and dW are summed in across row chunks, for inputs computed in ``dtype``
    (``GRAD_ACCUMULATION``); fp32 and fp64 inputs keep their own."""
    if GRAD_ACCUMULATION not in ("float32", "inputs"):
        raise ValueError(f"GRAD_ACCUMULATION must be 'float32' or 'inputs', got {GRAD_ACCUMULATION!r}")
    return torch.float32 if dtype in _HALF and GRAD_ACCUMULATION == "float32" else dtype


def shares_student_normalizer(spec: SweepSpec, vocab_student: int) -> bool:
    """Whether a divergence with log-probs can use one student softmax for both: the same
    temperature over the same columns (KD's and DCKD's usual case)."""
    return (spec.has_div and spec.with_logps and spec.temperature == spec.logp_temperature
            and spec.vocab_size == vocab_student)


def torch_row_scratch(spec: SweepSpec, vocab_student: int) -> int:
    """Scratch columns per row of a block the torch row sweep (``torch_rows``) needs beside the
    logit buffers, in the logits' dtype: a work buffer for an exact divergence (two for JSD; none for
    ``approximation="release"``, which works in place and in [rows, top_k] gathers), the log-prob
    softmax when it cannot share the divergence's, the soft cap's slope."""
    vocab_div = spec.vocab_size if spec.has_div else 0
    student_cols = vocab_student if spec.with_logps else vocab_div
    cols = 0 if spec.release else vocab_div * (2 if spec.kind == "jsd" else 1 if spec.has_div else 0)
    if spec.has_div and spec.with_logps and not shares_student_normalizer(spec, vocab_student):
        cols += student_cols
    if spec.student_map.softcap is not None:
        cols += student_cols
    return cols


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
    # The torch row sweep's block scratch (part of ``fixed_bytes``; 0 for the Triton row kernel).
    scratch_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        """The call's memory above its inputs under this plan."""
        return self.fixed_bytes + max(self.rows_per_chunk * self.row_bytes, self.cast_bytes)


def plan_chunks(spec: SweepSpec, rows: int, vocab_student: int, hidden_student: int, budget: int,
                input_dtype: torch.dtype = torch.bfloat16, logits_dtype: torch.dtype = torch.float32,
                with_bias: bool = False, row_sweep: str = "triton") -> ChunkPlan:
    """Rows per chunk from the memory budget, for a student head computed in ``input_dtype``, the
    row sweep done by ``row_sweep`` ("triton": no scratch; "torch": ``torch_row_scratch``).

    Fixed (does not scale with R; counted whether or not this sweep forms gradients, so forward and
    backward chunk alike):
      gradients  N·Hs + V·Hs in the accumulation dtype (``grad_accumulation_dtype``: fp32 for half
                 inputs by default; no V·Hs for a frozen head; + V fp32 for a bias, + V fp32 for its
                 per-chunk sum)
      per row    8 fp32 vectors of N (div, logp, log-normalizer, two weights, two incoming gradients, spare)
    Per row of a chunk (the R x V workspace; the gradient is written over the student's logits):
      student logits   C·4 bytes, C = V when log-probs are asked for (whole head) else vocab_size
      teacher logits   vocab_size·4 (divergences, advantage)
      reference logits vocab_size·4 (advantage)
      torch row sweep  C·2 for the gradient cast to half inputs (the Triton kernel writes it over
                       the logits in place); its scratch, ``torch_row_scratch``·4 for TORCH_ROW_BLOCK
                       rows, is fixed
    At the end, fp32 accumulators of half inputs are cast to the inputs' dtype (autograd's result),
    (N + V)·Hs·2 beside them once the workspace is freed: a workspace up to that size costs no peak.
    R = max((budget − fixed) / per-row, cast / per-row), at least MIN_CHUNK_ROWS, at most N; the
    peak is fixed + max(R·per-row, cast).

    The budget is the call's contract: fp32 accumulators (``GRAD_ACCUMULATION = "float32"``) are
    used when they, their cast and MIN_CHUNK_ROWS rows of workspace fit in it; otherwise the
    gradients are summed in the inputs' dtype, as if ``"inputs"`` (a larger budget buys fp32 back).
    E.g. bf16, N = 8192, the 1400 MiB CUDA default (1.468 GB): V = 151,936, Hs = 1536 (Qwen2.5-1.5B),
    forward KL with targets: fp32 would take 0.98 GB + 0.49 GB cast + 404 rows of 1.22 MB = 1.48 GB,
    just over, so bf16: fixed 0.49 GB, R = 802. V = 128,256, Hs = 2048 (Liger's config): fp32 would
    take 1.12 GB + 0.56 GB cast = 1.68 GB; bf16: fixed 0.56 GB, per row 1.03 MB, R = 885 (fp32 from a
    1700 MiB budget). V = 256,000, Hs = 2304 (Gemma-2 2B), cross-entropy: fp32 would need 3.65 GB;
    bf16: fixed 1.18 GB (dW) + 38 MB (dh) + 0.3 MB = 1.22 GB, per row 1.02 MB, R = 244, peak 1.468 GB.
    Smaller heads and batches (V·H + N·H under ~0.16 G elements at this budget) are summed in fp32.
    Fewer, larger chunks only pay up to the GEMMs' efficiency (R of a few hundred).
    """
    if row_sweep not in ("triton", "torch"):
        raise ValueError(f"row_sweep must be 'triton' or 'torch', got {row_sweep!r}")
    plan = _plan_for(spec, rows, vocab_student, hidden_student, budget, input_dtype, logits_dtype, with_bias,
                     grad_accumulation_dtype(input_dtype), row_sweep)
    if plan.grad_dtype != input_dtype and plan.peak_bytes > budget:
        plan = _plan_for(spec, rows, vocab_student, hidden_student, budget, input_dtype, logits_dtype, with_bias,
                         input_dtype, row_sweep)
    return plan


def _plan_for(spec: SweepSpec, rows: int, vocab_student: int, hidden_student: int, budget: int,
              input_dtype: torch.dtype, logits_dtype: torch.dtype, with_bias: bool,
              grad_dtype: torch.dtype, row_sweep: str = "triton") -> ChunkPlan:
    """``plan_chunks``'s arithmetic for gradients accumulated in ``grad_dtype``."""
    grad_elem = torch.finfo(grad_dtype).bits // 8
    logit_elem = torch.finfo(logits_dtype).bits // 8
    input_elem = torch.finfo(input_dtype).bits // 8
    vocab_div = spec.vocab_size if spec.has_div else 0
    student_cols = vocab_student if spec.with_logps else vocab_div
    grad_rows = rows + (vocab_student if spec.weight_grad else 0)
    fixed = grad_rows * hidden_student * grad_elem + 8 * rows * 4
    if with_bias:
        fixed += 2 * vocab_student * 4
    cast = 0 if grad_dtype == input_dtype else grad_rows * hidden_student * input_elem
    columns = student_cols + vocab_div * (1 if spec.needs_teacher else 0) + vocab_div * (1 if spec.needs_ref else 0)
    row_bytes = logit_elem * columns
    scratch = 0
    if row_sweep == "torch":
        scratch = min(rows, TORCH_ROW_BLOCK) * logit_elem * torch_row_scratch(spec, vocab_student)
        fixed += scratch
        if input_elem != logit_elem:
            row_bytes += input_elem * student_cols
    fit = (budget - fixed) // row_bytes if budget > fixed else 0
    chunk = max(1, min(rows, max(MIN_CHUNK_ROWS, fit, cast // row_bytes)))
    return ChunkPlan(rows_per_chunk=chunk, row_bytes=row_bytes, fixed_bytes=fixed, budget_bytes=budget,
                     cast_bytes=cast, grad_dtype=grad_dtype, scratch_bytes=scratch)
