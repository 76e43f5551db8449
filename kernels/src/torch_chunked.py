"""Chunked PyTorch backend: the CPU path (and a fallback anywhere).

Rows are processed in chunks of R rows with the whole vocabulary in memory for that chunk only,
so the peak is a few R x V buffers (R chosen to keep each near ``FASTDADPO_CHUNK_MB``), never
N x V. With the whole row in hand the softmax is exact in one pass, which lets the sweep also
produce the gradients in the same pass when the caller says how the outputs will be reduced
(``row_grads``): no logits are recomputed in backward then. Otherwise the backward is the same
sweep again with the incoming gradient as ``row_grads``.

Every buffer below is written in place where the math allows: on CPU each extra pass over an
R x V buffer costs about as much as a quarter of a matmul. The workspace and the gradient GEMMs are
shared with the CUDA chunked backend (``row_chunks``); the row-wise math here is torch's own, the
ground truth beside that backend's Triton row kernel.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from .row_chunks import Workspace, accumulate_chunk_grads, logits_into, new_grads
from .sweep import SweepInputs, SweepSpec, accumulation_dtype

_CHUNK_BYTES = int(float(os.environ.get("FASTDADPO_CHUNK_MB", "32")) * 2**20)


def chunk_rows(vocab: int, dtype: torch.dtype, rows: int) -> int:
    elem = torch.finfo(dtype).bits // 8
    return max(1, min(rows, _CHUNK_BYTES // (vocab * elem)))


def _upcast(t: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[r, v]·b[r, v] without an R x V temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _shift_and_normalizer(x: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """In place x ← x − max_row(x); returns log Σ exp(x) of the shifted rows (uses ``work``)."""
    x.sub_(x.amax(dim=1, keepdim=True))
    torch.exp(x, out=work)
    return work.sum(dim=1).log_()


def _divergence_chunk(spec: SweepSpec, s: torch.Tensor, t: torch.Tensor, r: Optional[torch.Tensor],
                      g: Optional[torch.Tensor], work: torch.Tensor, work2: Optional[torch.Tensor]
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-row divergence of a chunk and, if ``g`` is given, d(Σ g·div)/d(raw student logits).

    ``s``, ``t``, ``r`` are the chunk's raw logits over the divergence columns; they and the
    ``work`` buffers are clobbered. The returned gradient aliases one of them.
    """
    inv_t = 1.0 / spec.temperature
    if spec.temperature != 1.0:
        s.mul_(inv_t)
        t.mul_(inv_t)
        if r is not None:
            r.mul_(inv_t)
    log_zs = _shift_and_normalizer(s, work)  # s ← s − max; log p = s − log_zs
    log_zt = _shift_and_normalizer(t, work)
    kind = spec.kind
    if kind == "forward_kl":
        # KL(q‖p) = E_q[t − s] − log Z_t + log Z_s (shifted logits); ∂/∂s = p − q.
        torch.sub(t, s, out=work)
        t.exp_()
        div = _row_dot(t, work) / t.sum(dim=1) - log_zt + log_zs
        if g is None:
            return div, None
        s.sub_(log_zs.unsqueeze(1)).exp_()  # p
        t.mul_(torch.exp(-log_zt).unsqueeze(1))  # q
        return div, s.sub_(t).mul_((g * inv_t).unsqueeze(1))
    if kind == "reverse_kl":
        # KL(p‖q) = E_p[s − t] − log Z_s + log Z_t; ∂/∂s = p·(log p − log q − KL).
        torch.sub(s, t, out=work)
        s.sub_(log_zs.unsqueeze(1)).exp_()  # p
        div = _row_dot(s, work) - log_zs + log_zt
        if g is None:
            return div, None
        work.sub_((log_zs - log_zt + div).unsqueeze(1)).mul_(s)
        return div, work.mul_((g * inv_t).unsqueeze(1))
    if kind == "jsd":
        beta = spec.beta
        s.sub_(log_zs.unsqueeze(1))  # log p
        t.sub_(log_zt.unsqueeze(1))  # log q
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
        if g is None:
            return div, None
        # ∂JSD/∂s = (1−β)·p·(log p − log m − KL(p‖m))
        s.sub_(kl_student.unsqueeze(1)).mul_(work2)
        return div, s.mul_(((1.0 - beta) * inv_t * g).unsqueeze(1))
    if kind == "advantage":
        # A = E_p[log q_t − log q_r] = E_p[t − r] − log Z_t + log Z_r; ∂/∂s = p·(a − A).
        log_zr = _shift_and_normalizer(r, work)
        t.sub_(r)
        s.sub_(log_zs.unsqueeze(1)).exp_()  # p
        offset = log_zr - log_zt
        div = _row_dot(s, t) + offset
        if g is None:
            return div, None
        t.add_((offset - div).unsqueeze(1)).mul_(s)
        return div, t.mul_((g * inv_t).unsqueeze(1))
    raise ValueError(f"unknown sweep kind {kind!r}")


def _logp_chunk(spec: SweepSpec, logits: torch.Tensor, targets: torch.Tensor, g: Optional[torch.Tensor],
                work: torch.Tensor):
    """Token log-probs of a chunk; with ``g``, d(Σ g·logp)/d(raw logits) (aliases ``logits``,
    which is clobbered)."""
    inv_t = 1.0 / spec.logp_temperature
    if spec.logp_temperature != 1.0:
        logits.mul_(inv_t)
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    top = logits.amax(dim=1)
    log_z = _shift_and_normalizer(logits, work)
    logp = picked - top - log_z
    if g is None:
        return logp, None
    # ∂logp/∂z = onehot − softmax(z)
    probs = logits.sub_(log_z.unsqueeze(1)).exp_()
    probs.mul_((-g * inv_t).unsqueeze(1))
    probs.scatter_add_(1, targets.unsqueeze(1), (g * inv_t).unsqueeze(1).to(probs.dtype))
    return logp, probs


def sweep(spec: SweepSpec, inputs: SweepInputs,
          row_grads: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = None, into=None):
    """One pass over the rows. Returns (div, logp, grads); ``grads`` only when ``row_grads`` is set.

    ``row_grads = (g_div, g_logp)``: the gradients (or the caller's reduction weights) of the
    outputs; a None entry means that output's gradient is zero. ``into``: gradients to add to
    (else fresh ones).
    """
    acc = accumulation_dtype(inputs.student_hidden, inputs.student_weight, inputs.teacher_hidden)
    n = inputs.rows
    device = inputs.student_weight.device
    student_weight = _upcast(inputs.student_weight, acc)
    student_bias = _upcast(inputs.student_bias, acc)
    vocab_student, hidden_size = student_weight.shape
    vocab = spec.vocab_size if spec.has_div else vocab_student
    teacher_weight = _upcast(inputs.teacher_weight[:vocab], acc) if spec.needs_teacher else None
    ref_weight = _upcast(inputs.ref_weight[:vocab], acc) if spec.needs_ref else None

    div_out = torch.empty(n, dtype=acc, device=device) if spec.has_div else None
    logp_out = torch.empty(n, dtype=acc, device=device) if spec.with_logps else None
    g_div, g_logp = row_grads if row_grads is not None else (None, None)
    want_grads = row_grads is not None
    grads = None
    if want_grads:
        grads = into if into is not None else new_grads(n, student_weight, student_bias, acc, spec.weight_grad,
                                                        spec.bias_grad)

    rows_per_chunk = chunk_rows(vocab_student, acc, n)
    space = Workspace(rows_per_chunk, acc, device)
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, min(n, start + rows_per_chunk))
        count = rows.stop - rows.start
        student_rows = inputs.student_hidden[rows].to(acc)
        logits = logits_into(space.get("student", count, vocab_student), student_rows, student_weight)
        if student_bias is not None:
            logits += student_bias
        spec.student_map.apply_(logits)
        # dz/dx of a soft cap, kept before the sweep clobbers z (a scale alone is one factor).
        slope = None
        if want_grads and spec.student_map.softcap is not None:
            slope = spec.student_map.slope_into(logits, space.get("slope", count, vocab_student))
        grad_logits = None
        if spec.with_logps:
            g = None if g_logp is None else g_logp[rows].to(acc)
            lp_logits = space.get("logp", count, vocab_student).copy_(logits) if spec.has_div else logits
            logp_out[rows], grad_logits = _logp_chunk(spec, lp_logits, inputs.targets[rows], g,
                                                      space.get("work", count, vocab_student))
        if spec.has_div:
            g = None if g_div is None else g_div[rows].to(acc)
            teacher_logits = spec.teacher_map.apply_(logits_into(
                space.get("teacher", count, vocab), inputs.teacher_hidden[rows].to(acc), teacher_weight))
            ref_logits = None
            if spec.needs_ref:
                ref_logits = spec.ref_map.apply_(logits_into(space.get("ref", count, vocab),
                                                             inputs.ref_hidden[rows].to(acc), ref_weight))
            work2 = space.get("work2", count, vocab) if spec.kind == "jsd" else None
            div_out[rows], grad_div_logits = _divergence_chunk(
                spec, logits[:, :vocab], teacher_logits, ref_logits, g, space.get("work", count, vocab), work2)
            if grad_div_logits is not None:
                if grad_logits is None and vocab == vocab_student:
                    grad_logits = grad_div_logits
                elif grad_logits is None:
                    grad_logits = space.get("grad", count, vocab_student).zero_()
                    grad_logits[:, :vocab] = grad_div_logits
                else:
                    grad_logits[:, :vocab] += grad_div_logits
        if want_grads and grad_logits is not None:
            if slope is not None:
                grad_logits.mul_(slope[:, :grad_logits.shape[1]])
            elif spec.student_map.scale != 1.0:
                grad_logits.mul_(spec.student_map.scale)
            accumulate_chunk_grads(grads, rows, grad_logits, student_rows, student_weight)
    return div_out, logp_out, grads


# The autograd layer calls these two; the Triton backend offers the same pair.
supports_eager_grads = True


def forward(spec: SweepSpec, inputs: SweepInputs, row_grads=None):
    div, logp, grads = sweep(spec, inputs, row_grads)
    return div, logp, {}, grads


def backward(spec: SweepSpec, inputs: SweepInputs, saved: dict, div, grad_div, grad_logp, into=None):
    return sweep(spec, inputs, (grad_div, grad_logp), into=into)[2]
