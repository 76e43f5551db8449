"""The budgeted row-chunk algorithm's row sweep in torch: everything row-wise about one chunk of
logits, the ground truth beside the Triton row kernel (``triton_rows``), and the row sweep on every
device without CUDA.

Same contract as the Triton kernel: the chunk's raw head outputs x come in R x V buffers (the
student's, the teacher's, the reference's); out go the divergence (or ADPA's advantage), the target
log-probs and their normalizer, and, with gradients, d(Σ g_div·div + Σ g_logp·logp)/dx written over
the student's buffer. Every op works in place where the math allows: on CPU a pass over an R x V
buffer costs about a quarter of the chunk's GEMM, so the passes are what this module minimizes.
A divergence with log-probs at one temperature over the whole head (KD, DCKD) computes the
student's softmax once for both (``chunk_plan.shares_student_normalizer``).

d/d(student logit z), per output, before the 1/T of the temperature (as in ``triton_rows``):
  log-prob       g·(onehot(target) − softmax)
  forward KL     g·(p − q)
  reverse KL     g·p·(log p − log q − KL(p‖q))
  JSD(β)         g·(1−β)·p·(log p − log m − KL(p‖m))
  advantage      g·p·(a − A),  a = log p_t − log p_r,  A = Σ p·a
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .chunk_plan import shares_student_normalizer
from .sweep import SweepSpec


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[r, v]·b[r, v] without an R x V temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.unsqueeze(1)


def _shift(x: torch.Tensor) -> torch.Tensor:
    """x ← x − max_row(x) in place; returns the maxima."""
    top = x.amax(dim=1)
    x.sub_(_col(top))
    return top


def _log_sum_exp_shifted(x: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """log Σ exp(x) of already-shifted rows, exp(x) left in ``work``."""
    torch.exp(x, out=work)
    return work.sum(dim=1).log_()


def row_sweep(spec: SweepSpec, student: torch.Tensor, teacher: Optional[torch.Tensor], ref: Optional[torch.Tensor],
              targets: Optional[torch.Tensor], g_div: Optional[torch.Tensor], g_logp: Optional[torch.Tensor],
              div_out: Optional[torch.Tensor], logp_out: Optional[torch.Tensor], lse_out: Optional[torch.Tensor], *,
              with_grad: bool, lse_given: bool, scratch: Callable[[str, int], torch.Tensor]) -> None:
    """One chunk. ``student`` [R, C] (C = the whole head with log-probs, else the divergence's
    columns), ``teacher`` / ``ref`` [R, vocab_size]: raw head outputs, clobbered. ``g_div`` /
    ``g_logp``: the outputs' row weights (None: zero). ``div_out``, ``logp_out``, ``lse_out``: the
    chunk's rows of the outputs; with ``lse_given`` (log-probs alone) ``lse_out`` holds the
    normalizers a forward sweep stored. ``scratch(name, cols)``: an [R, cols] buffer of the logits'
    dtype, reused across chunks (``chunk_plan.torch_row_scratch`` counts them)."""
    rows, columns = student.shape
    smap = spec.student_map
    smap.apply_(student)
    slope = smap.slope_into(student, scratch("slope", columns)) if with_grad and smap.softcap is not None else None
    if spec.has_div:
        spec.teacher_map.apply_(teacher)
    if spec.needs_ref:
        spec.ref_map.apply_(ref)
    if with_grad:
        zeros = torch.zeros(rows, dtype=student.dtype, device=student.device)
        g_div = zeros if g_div is None else g_div.to(student.dtype)
        g_logp = zeros if g_logp is None else g_logp.to(student.dtype)
    inv_lp = 1.0 / spec.logp_temperature
    picked = student.gather(1, _col(targets)).squeeze(1) * inv_lp if spec.with_logps else None
    shared = shares_student_normalizer(spec, columns)

    logp_grad = None
    if spec.with_logps and not shared:
        if spec.has_div:  # the divergence still needs the student's logits: the log-probs work on a copy
            logp_grad = torch.mul(student, inv_lp, out=scratch("logp", columns))
        else:
            logp_grad = student.mul_(inv_lp) if inv_lp != 1.0 else student
        _logprobs(logp_grad, picked, targets, None if not with_grad else g_logp * inv_lp, logp_out, lse_out,
                  lse_given)

    if spec.has_div:
        vocab = spec.vocab_size
        s = student[:, :vocab]
        inv_t = 1.0 / spec.temperature
        if inv_t != 1.0:
            s.mul_(inv_t)
            teacher.mul_(inv_t)
            if ref is not None:
                ref.mul_(inv_t)
        g = g_div * inv_t if with_grad else None
        g_shared = (g_logp * inv_lp if shared else torch.zeros_like(g)) if with_grad else None
        work = scratch("work", vocab)
        div, lse_s = _DIVERGENCES[spec.kind](spec, s, teacher, ref, g, g_shared, work, scratch)
        div_out.copy_(div)
        if shared:
            logp_out.copy_(picked - lse_s)
            if lse_out is not None:
                lse_out.copy_(lse_s)
            if with_grad:
                s.scatter_add_(1, _col(targets), _col(g_shared))
        if logp_grad is not None and with_grad:
            s.add_(logp_grad[:, :vocab])
            student[:, vocab:].copy_(logp_grad[:, vocab:])

    if with_grad:
        if slope is not None:
            student.mul_(slope)
        elif smap.scale != 1.0:
            student.mul_(smap.scale)


def _logprobs(x: torch.Tensor, picked: torch.Tensor, targets: torch.Tensor, g: Optional[torch.Tensor],
              logp_out: torch.Tensor, lse_out: Optional[torch.Tensor], lse_given: bool) -> None:
    """Log-probs of the targets from logits x already over their temperature (``picked``: the
    target's); with ``g`` (already over the temperature), d(Σ g·logp)/dx written over x."""
    if lse_given:
        lse = lse_out
        if g is not None:
            x.sub_(_col(lse)).exp_()  # softmax
    else:
        top = _shift(x)
        x.exp_()
        total = x.sum(dim=1)
        lse = top + total.log()
        if g is not None:
            x.mul_(_col(1.0 / total))
        if lse_out is not None:
            lse_out.copy_(lse)
    logp_out.copy_(picked - lse)
    if g is not None:
        x.mul_(_col(-g)).scatter_add_(1, _col(targets), _col(g))


# Each divergence: (spec, s, t, r, g, g_logp, work, scratch) → (div, the student's log-normalizer).
# s, t, r: logits over the temperature (clobbered); g: the divergence's row weights over the
# temperature, g_logp: those of log-probs sharing the student's softmax (their one-hot is added by
# the caller); with g, the gradient of Σ g·div − Σ g_logp·softmax is left in s.

def _forward_kl(spec, s, t, r, g, g_logp, work, scratch):
    # KL(q‖p) = E_q[t − s] − log Z_t + log Z_s over shifted logits; ∂/∂s = p − q.
    top_s, _ = _shift(s), _shift(t)
    torch.sub(t, s, out=work)
    t.exp_()
    z_t = t.sum(dim=1)
    s.exp_()
    z_s = s.sum(dim=1)
    log_z_s = z_s.log()
    div = _row_dot(t, work) / z_t - z_t.log() + log_z_s
    if g is not None:
        s.mul_(_col((g - g_logp) / z_s)).addcmul_(t, _col(-g / z_t))
    return div, top_s + log_z_s


def _reverse_kl(spec, s, t, r, g, g_logp, work, scratch):
    # KL(p‖q) = E_p[s − t] − log Z_s + log Z_t; ∂/∂s = p·(log p − log q − KL).
    top_s, _ = _shift(s), _shift(t)
    torch.sub(s, t, out=work)
    s.exp_()
    z_s = s.sum(dim=1)
    log_z_s = z_s.log()
    log_z_t = t.exp_().sum(dim=1).log_()
    div = _row_dot(s, work) / z_s - log_z_s + log_z_t
    if g is not None:
        # p·[g·(s − t − log Z_s + log Z_t − KL) − g_logp], p = exp(s)/Z_s
        work.add_(_col(log_z_t - log_z_s - div)).mul_(_col(g / z_s)).sub_(_col(g_logp / z_s))
        s.mul_(work)
    return div, top_s + log_z_s


def _jsd(spec, s, t, r, g, g_logp, work, scratch):
    beta = spec.beta
    work2 = scratch("work2", s.shape[1])
    top_s = _shift(s)
    log_z_s = _log_sum_exp_shifted(s, work)
    _shift(t)
    log_z_t = _log_sum_exp_shifted(t, work)
    s.sub_(_col(log_z_s))  # log p
    t.sub_(_col(log_z_t))  # log q
    # log m = logaddexp(log β + log q, log(1−β) + log p), built in ``work``.
    torch.add(t, math.log(beta), out=work)
    torch.add(s, math.log1p(-beta), out=work2)
    torch.logaddexp(work, work2, out=work)
    t.sub_(work)  # log q − log m
    torch.add(t, work, out=work2).exp_()  # q
    kl_teacher = _row_dot(work2, t)
    s.sub_(work)  # log p − log m
    torch.add(s, work, out=work2).exp_()  # p
    kl_student = _row_dot(work2, s)
    div = beta * kl_teacher + (1.0 - beta) * kl_student
    if g is not None:
        # p·[(1−β)·g·(log p − log m − KL(p‖m)) − g_logp]
        s.sub_(_col(kl_student)).mul_(_col((1.0 - beta) * g)).sub_(_col(g_logp)).mul_(work2)
    return div, top_s + log_z_s


def _advantage(spec, s, t, r, g, g_logp, work, scratch):
    # A = E_p[log q_t − log q_r] = E_p[t − r] − log Z_t + log Z_r; ∂/∂s = p·(a − A).
    top_s = _shift(s)
    log_z_s = _log_sum_exp_shifted(s, work)
    _shift(t)
    log_z_t = _log_sum_exp_shifted(t, work)
    _shift(r)
    log_z_r = _log_sum_exp_shifted(r, work)
    t.sub_(r)
    s.sub_(_col(log_z_s)).exp_()  # p
    offset = log_z_r - log_z_t
    div = _row_dot(s, t) + offset
    if g is not None:
        s.mul_(t.add_(_col(offset - div)).mul_(_col(g)))
    return div, top_s + log_z_s


_DIVERGENCES = {"forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "jsd": _jsd, "advantage": _advantage}
