"""Host side of the Triton backend: launch configuration, merging split statistics, gradients.

The forward saves only per-row statistics ([rows] float32 each) between forward and backward,
and the backward recomputes the logit tiles. Why recompute rather than form the gradients in the
forward (as Liger's fused JSD does): a tiled kernel cannot normalize a tile's probabilities until
the whole row is swept, so gradients in the forward would need a second sweep anyway (the same
FLOPs as recomputing) or a [rows x vocab] buffer (Liger's Triton JSD keeps one); and the weight
gradient computed early would have to be held in float32 ([V, H], 1 GB at V=128k, H=2048) from
forward to backward. Recomputing holds nothing but the statistics, produces the weight gradient
inside backward where ZeRO-3's gradient hooks expect it, and needs the gathered LM head in
backward, which ZeRO-3 provides by re-gathering the parameter for the module's backward.
"""
from __future__ import annotations

import math
import os

import torch
import triton

from .sweep import SweepGrads, SweepInputs, SweepSpec
from .tl_utils import KIND_CODES
from .triton_backward import sweep_backward_kernel
from .triton_forward import (NUM_STATS, STAT_ACC, STAT_KL_STUDENT, STAT_KL_TEACHER, STAT_M_LP, STAT_M_R, STAT_M_S,
                             STAT_M_T, STAT_TARGET, STAT_Z_LP, STAT_Z_R, STAT_Z_S, STAT_Z_T, sweep_forward_kernel)

supports_eager_grads = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_config(dtype: torch.dtype):
    if interpreting():  # small tiles: the interpreter runs every program in numpy
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16), dict()
    block_h = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=block_h), dict(num_warps=8, num_stages=3)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are computed exactly (no TF32 rounding); half inputs ignore this setting.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _splits(row_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Vocabulary splits so that a few waves of programs cover the GPU even for few rows."""
    if interpreting() or device.type != "cuda":
        return min(2, n_tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, math.ceil(4 * sms / row_blocks)))


def _contig(t):
    return None if t is None else t.contiguous()


def _merge(m: torch.Tensor, z: torch.Tensor):
    """Merge per-split (max, Σexp) into the row's log-sum-exp, its Σexp relative to the global
    max M, and the per-split weights e^{m_k − M} that bring split accumulators to that max."""
    top = m.max(dim=0).values
    weights = torch.exp(m - top)
    total = (z * weights).sum(dim=0)
    return top + torch.log(total), total, weights


def _prepare(spec: SweepSpec, inputs: SweepInputs):
    s_hidden, s_weight = _contig(inputs.student_hidden), _contig(inputs.student_weight)
    t_hidden, t_weight = _contig(inputs.teacher_hidden), _contig(inputs.teacher_weight)
    r_hidden, r_weight = _contig(inputs.ref_hidden), _contig(inputs.ref_weight)
    # Dummy pointers for absent operands: never dereferenced (their branches compile away).
    t_hidden, t_weight = (t_hidden, t_weight) if t_hidden is not None else (s_hidden, s_weight)
    r_hidden, r_weight = (r_hidden, r_weight) if r_hidden is not None else (s_hidden, s_weight)
    bias = _contig(inputs.student_bias)
    targets = _contig(inputs.targets) if spec.with_logps else s_weight
    return s_hidden, s_weight, bias, t_hidden, t_weight, r_hidden, r_weight, targets


def _columns(spec: SweepSpec, vocab_student: int) -> int:
    return vocab_student if spec.with_logps else spec.vocab_size


def _scalars(spec: SweepSpec):
    beta = spec.beta if spec.kind == "jsd" else 0.5
    return dict(inv_temp=1.0 / spec.temperature, inv_lp_temp=1.0 / spec.logp_temperature,
                log_beta=math.log(beta), log_one_minus_beta=math.log1p(-beta))


def forward(spec: SweepSpec, inputs: SweepInputs, row_grads=None):
    assert row_grads is None, "the Triton backend recomputes in backward"
    s_hidden, s_weight, bias, t_hidden, t_weight, r_hidden, r_weight, targets = _prepare(spec, inputs)
    n = s_hidden.shape[0]
    vocab_student, hs_size = s_weight.shape
    blocks, launch = _launch_config(s_weight.dtype)
    n_tiles = triton.cdiv(_columns(spec, vocab_student), blocks["BLOCK_V"])
    row_blocks = triton.cdiv(n, blocks["BLOCK_N"])
    splits = _splits(row_blocks, n_tiles, s_hidden.device)
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    stats = torch.zeros(NUM_STATS, splits, n, dtype=torch.float32, device=s_hidden.device)
    scalars = _scalars(spec)
    common = dict(n_rows=n, vocab_student=vocab_student, vocab_div=spec.vocab_size, hs_size=hs_size,
                  ht_size=t_hidden.shape[1], hr_size=r_hidden.shape[1], n_tiles=n_tiles,
                  tiles_per_split=tiles_per_split, **scalars, KIND=KIND_CODES[spec.kind],
                  WITH_LOGPS=spec.with_logps, HAS_BIAS=bias is not None,
                  DOT_PRECISION=_dot_precision(s_weight.dtype), **blocks, **launch)
    grid = (row_blocks, splits)
    no_lse = stats  # placeholder pointers for the first pass
    sweep_forward_kernel[grid](s_hidden, s_weight, bias if bias is not None else s_weight, t_hidden, t_weight,
                               r_hidden, r_weight, targets, no_lse, no_lse, stats, PASS=1, **common)

    saved = {}
    div = logp = None
    if spec.with_logps:
        saved["lse_lp"] = _merge(stats[STAT_M_LP], stats[STAT_Z_LP])[0]
        logp = stats[STAT_TARGET].sum(dim=0) - saved["lse_lp"]
    if spec.has_div:
        lse_s, z_s, w_s = _merge(stats[STAT_M_S], stats[STAT_Z_S])
        lse_t, z_t, w_t = _merge(stats[STAT_M_T], stats[STAT_Z_T])
        saved.update(lse_s=lse_s, lse_t=lse_t)
        if spec.kind == "forward_kl":  # E_q[t − s] − lse_t + lse_s
            div = (stats[STAT_ACC] * w_t).sum(dim=0) / z_t - lse_t + lse_s
        elif spec.kind == "reverse_kl":  # E_p[s − t] − lse_s + lse_t
            div = (stats[STAT_ACC] * w_s).sum(dim=0) / z_s - lse_s + lse_t
        elif spec.kind == "advantage":  # E_p[t − r] − lse_t + lse_r
            lse_r = _merge(stats[STAT_M_R], stats[STAT_Z_R])[0]
            saved["lse_r"] = lse_r
            div = (stats[STAT_ACC] * w_s).sum(dim=0) / z_s - lse_t + lse_r
        else:  # jsd: second pass with both normalizers known
            jsd_common = dict(common, WITH_LOGPS=False)
            sweep_forward_kernel[grid](s_hidden, s_weight, bias if bias is not None else s_weight, t_hidden,
                                       t_weight, r_hidden, r_weight, targets, lse_s.contiguous(),
                                       lse_t.contiguous(), stats, PASS=2, **jsd_common)
            kl_teacher = stats[STAT_KL_TEACHER].sum(dim=0)
            saved["kl_student"] = stats[STAT_KL_STUDENT].sum(dim=0)
            div = spec.beta * kl_teacher + (1.0 - spec.beta) * saved["kl_student"]
    return div, logp, saved, None


def backward(spec: SweepSpec, inputs: SweepInputs, saved: dict, div, grad_div, grad_logp) -> SweepGrads:
    s_hidden, s_weight, bias, t_hidden, t_weight, r_hidden, r_weight, targets = _prepare(spec, inputs)
    n = s_hidden.shape[0]
    vocab_student, hs_size = s_weight.shape
    device = s_hidden.device
    grad_hidden = torch.zeros(n, hs_size, dtype=torch.float32, device=device)
    grad_weight = torch.zeros(vocab_student, hs_size, dtype=torch.float32, device=device)
    grad_bias = torch.zeros(vocab_student, dtype=torch.float32, device=device) if bias is not None else None
    blocks, launch = _launch_config(s_weight.dtype)
    grid = (triton.cdiv(n, blocks["BLOCK_N"]), triton.cdiv(_columns(spec, vocab_student), blocks["BLOCK_V"]))
    zeros = torch.zeros(n, dtype=torch.float32, device=device)

    def row(name):
        value = saved.get(name)
        return zeros if value is None else value.float().contiguous()

    def grad(g):
        return zeros if g is None else g.float().contiguous()

    scalars = _scalars(spec)
    sweep_backward_kernel[grid](
        s_hidden, s_weight, bias if bias is not None else s_weight, t_hidden, t_weight, r_hidden, r_weight, targets,
        row("lse_lp"), row("lse_s"), row("lse_t"), row("lse_r"), zeros if div is None else div.float().contiguous(),
        row("kl_student"), grad(grad_div), grad(grad_logp), grad_hidden, grad_weight,
        grad_bias if grad_bias is not None else grad_weight,
        n, vocab_student, spec.vocab_size, hs_size, t_hidden.shape[1], r_hidden.shape[1],
        scalars["inv_temp"], scalars["inv_lp_temp"], spec.beta, scalars["log_beta"], scalars["log_one_minus_beta"],
        KIND=KIND_CODES[spec.kind], WITH_LOGPS=spec.with_logps, HAS_BIAS=bias is not None,
        DOT_PRECISION=_dot_precision(s_weight.dtype), **blocks, **launch)
    return SweepGrads(grad_hidden, grad_weight, grad_bias)
