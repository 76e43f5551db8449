"""The budgeted row-chunk algorithm's row sweep in torch: everything row-wise about one chunk of
logits, the ground truth beside the Triton row kernel (``triton_rows``), and the row sweep on every
device without CUDA.

Same contract as the Triton kernel: the chunk's raw head outputs x come in R x V buffers (the
student's, the teacher's, the reference's); out go the divergence (or ADPA's advantage), the target
log-probs and their normalizer, and, with gradients, d(Σ g_div·div + Σ g_logp·logp)/dx written over
the student's buffer.

How it is fast on a CPU, measured at the CPU anchor (V = 65,536): the rows go through in blocks of
``ROW_BLOCK`` (``chunk_plan.TORCH_ROW_BLOCK``, 32 rows: 8 MB per buffer, so the dozen elementwise
passes a divergence makes stay in cache; 8 and 64 rows measured slower), and the scratch they need
is ``ROW_BLOCK`` rows whatever the chunk, which leaves the memory budget to larger chunks and
faster GEMMs (90 % of the time); every op works in place where the math
allows; exponentials are base 2 (``exp2`` on logits scaled by log2(e)/T is ~2.7x faster than
``exp`` in torch's CPU kernels, at the same 1-ulp accuracy), the results converted back to nats
once per row. A divergence with log-probs at one temperature over the whole head (KD, DCKD)
computes the student's softmax once for both (``chunk_plan.shares_student_normalizer``).

d/d(student logit z), per output, before the 1/T of the temperature (as in ``triton_rows``):
  log-prob       g·(onehot(target) − softmax)
  forward KL     g·(p − q)
  reverse KL     g·p·(log p − log q − KL(p‖q))
  JSD(β)         g·(1−β)·p·(log p − log m − KL(p‖m))
  advantage      g·p·(a − A),  a = log p_t − log p_r,  A = Σ p·a
  release        g·p·(d − Σ_w p_w·d_w),  d = ∂value/∂p, nonzero on the teacher's top-k only
                 (``approximation="release"``: ``_forward_kl_release``, ``_advantage_release``)
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .chunk_plan import TORCH_ROW_BLOCK as ROW_BLOCK
from .chunk_plan import shares_student_normalizer
from .sweep import RELEASE_EPS, RELEASE_LOG_FLOOR, SweepSpec, release_k

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[r, v]·b[r, v] without an R x V temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.unsqueeze(1)


def _to_base2(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x ← (x − max_row(x))·scale in place: shifted logits in base-2 units (scale = log2(e)/T);
    returns the row maxima."""
    top = x.amax(dim=1)
    x.sub_(_col(top)).mul_(scale)
    return top


def _exp2_sum(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out ← 2^x; returns Σ_row 2^x."""
    torch.exp2(x, out=out)
    return out.sum(dim=1)


def row_sweep(spec: SweepSpec, student: torch.Tensor, teacher: Optional[torch.Tensor], ref: Optional[torch.Tensor],
              targets: Optional[torch.Tensor], g_div: Optional[torch.Tensor], g_logp: Optional[torch.Tensor],
              div_out: Optional[torch.Tensor], logp_out: Optional[torch.Tensor], lse_out: Optional[torch.Tensor], *,
              with_grad: bool, lse_given: bool, scratch: Callable[[str, int, int], torch.Tensor]) -> None:
    """One chunk. ``student`` [R, C] (C = the whole head with log-probs, else the divergence's
    columns), ``teacher`` / ``ref`` [R, vocab_size]: raw head outputs, clobbered. ``g_div`` /
    ``g_logp``: the outputs' row weights (None: zero). ``div_out``, ``logp_out``, ``lse_out``: the
    chunk's rows of the outputs; with ``lse_given`` (log-probs alone) ``lse_out`` holds the
    normalizers a forward sweep stored. ``scratch(name, rows, cols)``: a [rows, cols] buffer of the
    logits' dtype, rows ≤ ``ROW_BLOCK``, reused across blocks and chunks (``chunk_plan`` counts them)."""
    rows = student.shape[0]
    if with_grad:
        zeros = torch.zeros(rows, dtype=student.dtype, device=student.device)
        g_div = zeros if g_div is None else g_div.to(student.dtype)
        g_logp = zeros if g_logp is None else g_logp.to(student.dtype)
    for start in range(0, rows, ROW_BLOCK):
        block = slice(start, min(rows, start + ROW_BLOCK))

        def pick(t):
            return None if t is None else t[block]

        _block(spec, student[block], pick(teacher), pick(ref), pick(targets), pick(g_div), pick(g_logp),
               pick(div_out), pick(logp_out), pick(lse_out), with_grad, lse_given,
               lambda name, cols: scratch(name, block.stop - block.start, cols))


def _block(spec, student, teacher, ref, targets, g_div, g_logp, div_out, logp_out, lse_out, with_grad, lse_given,
           scratch):
    columns = student.shape[1]
    smap = spec.student_map
    smap.apply_(student)
    slope = smap.slope_into(student, scratch("slope", columns)) if with_grad and smap.softcap is not None else None
    if spec.has_div:
        spec.teacher_map.apply_(teacher)
    if spec.needs_ref:
        spec.ref_map.apply_(ref)
    inv_lp = 1.0 / spec.logp_temperature
    picked = student.gather(1, _col(targets)).squeeze(1) * inv_lp if spec.with_logps else None
    shared = shares_student_normalizer(spec, columns)

    logp_grad = None
    if spec.with_logps and not shared:
        # The divergence still needs the student's logits: then the log-probs work on a copy.
        logp_grad = scratch("logp", columns).copy_(student) if spec.has_div else student
        _logprobs(logp_grad, inv_lp, picked, targets, g_logp * inv_lp if with_grad else None, logp_out, lse_out,
                  lse_given, scratch)

    if spec.has_div:
        vocab = spec.vocab_size
        s = student[:, :vocab]
        inv_t = 1.0 / spec.temperature
        g = g_div * inv_t if with_grad else None
        g_shared = (g_logp * inv_lp if shared else torch.zeros_like(g)) if with_grad else None
        divergence = _RELEASE[spec.kind] if spec.release else _DIVERGENCES[spec.kind]
        div, lse_s = divergence(spec, s, teacher, ref, g, g_shared, _LOG2E * inv_t, scratch)
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


def _logprobs(x: torch.Tensor, inv_t: float, picked: torch.Tensor, targets: torch.Tensor, g: Optional[torch.Tensor],
              logp_out: torch.Tensor, lse_out: Optional[torch.Tensor], lse_given: bool, scratch) -> None:
    """Log-probs of the targets from raw logits x (``picked``: the target's, over the temperature);
    with ``g`` (already over the temperature), d(Σ g·logp)/dx written over x."""
    if lse_given:
        lse = lse_out
        if g is not None:  # softmax = 2^(x·log2(e)/T − lse·log2(e))
            x.mul_(_LOG2E * inv_t).sub_(_col(lse * _LOG2E)).exp2_()
    else:
        top = x.amax(dim=1)
        x.sub_(_col(top)).mul_(_LOG2E * inv_t)
        x.exp2_()
        total = x.sum(dim=1)
        lse = top * inv_t + total.log()
        if g is not None:
            x.mul_(_col(1.0 / total))
        if lse_out is not None:
            lse_out.copy_(lse)
    logp_out.copy_(picked - lse)
    if g is not None:
        x.mul_(_col(-g)).scatter_add_(1, _col(targets), _col(g))


# Each divergence: (spec, s, t, r, g, g_logp, scale, scratch) → (div, the student's log-normalizer
# over the temperature). s, t, r: raw logits (clobbered); scale = log2(e)/T; g: the divergence's row
# weights over the temperature, g_logp: those of log-probs sharing the student's softmax (their
# one-hot is added by the caller); with g, the gradient of Σ g·div − Σ g_logp·softmax is left in s.

def _student_lse(s_top: torch.Tensor, log2_z_s: torch.Tensor, scale: float) -> torch.Tensor:
    """log Σ exp(z/T) in nats from the row max of z and log2 of the shifted base-2 sum."""
    return (s_top * scale + log2_z_s) * _LN2


def _forward_kl(spec, s, t, r, g, g_logp, scale, scratch):
    # KL(q‖p) = E_q[t − s] − log Z_t + log Z_s over shifted logits; ∂/∂s = p − q.
    s_top = _to_base2(s, scale)
    _to_base2(t, scale)
    work = torch.sub(t, s, out=scratch("work", s.shape[1]))
    t.exp2_()
    z_t = t.sum(dim=1)
    s.exp2_()
    z_s = s.sum(dim=1)
    log2_z_s = z_s.log2()
    div = (_row_dot(t, work) / z_t - z_t.log2() + log2_z_s) * _LN2
    if g is not None:
        s.mul_(_col((g - g_logp) / z_s)).addcmul_(t, _col(-g / z_t))
    return div, _student_lse(s_top, log2_z_s, scale)


def _reverse_kl(spec, s, t, r, g, g_logp, scale, scratch):
    # KL(p‖q) = E_p[s − t] − log Z_s + log Z_t; ∂/∂s = p·(log p − log q − KL).
    s_top = _to_base2(s, scale)
    _to_base2(t, scale)
    work = torch.sub(s, t, out=scratch("work", s.shape[1]))
    s.exp2_()
    z_s = s.sum(dim=1)
    log2_z_s = z_s.log2()
    log2_z_t = t.exp2_().sum(dim=1).log2_()
    div2 = _row_dot(s, work) / z_s - log2_z_s + log2_z_t  # in bits
    if g is not None:
        # p·[g·ln2·(s − t − log2 Z_s + log2 Z_t − KL/ln2) − g_logp], p = 2^s/Z_s
        work.add_(_col(log2_z_t - log2_z_s - div2)).mul_(_col(g * _LN2 / z_s)).sub_(_col(g_logp / z_s))
        s.mul_(work)
    return div2 * _LN2, _student_lse(s_top, log2_z_s, scale)


def _jsd(spec, s, t, r, g, g_logp, scale, scratch):
    beta = spec.beta
    vocab = s.shape[1]
    work, work2 = scratch("work", vocab), scratch("work2", vocab)
    s_top = _to_base2(s, scale)
    log2_z_s = _exp2_sum(s, work).log2_()
    _to_base2(t, scale)
    log2_z_t = _exp2_sum(t, work).log2_()
    s.sub_(_col(log2_z_s))  # log2 p
    t.sub_(_col(log2_z_t))  # log2 q
    # log2 m = logaddexp2(log2 β + log2 q, log2(1−β) + log2 p), built in ``work``.
    torch.add(t, math.log2(beta), out=work)
    torch.add(s, math.log2(1.0 - beta), out=work2)
    torch.logaddexp2(work, work2, out=work)
    t.sub_(work)  # log2 q − log2 m
    torch.add(t, work, out=work2).exp2_()  # q
    kl_teacher = _row_dot(work2, t)
    s.sub_(work)  # log2 p − log2 m
    torch.add(s, work, out=work2).exp2_()  # p
    kl_student = _row_dot(work2, s)  # bits
    div = (beta * kl_teacher + (1.0 - beta) * kl_student) * _LN2
    if g is not None:
        # p·[(1−β)·g·ln2·(log2 p − log2 m − KL(p‖m) in bits) − g_logp]
        s.sub_(_col(kl_student)).mul_(_col((1.0 - beta) * _LN2 * g)).sub_(_col(g_logp)).mul_(work2)
    return div, _student_lse(s_top, log2_z_s, scale)


def _advantage(spec, s, t, r, g, g_logp, scale, scratch):
    # A = E_p[log q_t − log q_r] = E_p[t − r] − log Z_t + log Z_r; ∂/∂s = p·(a − A).
    work = scratch("work", s.shape[1])
    _to_base2(t, scale)
    log2_z_t = _exp2_sum(t, work).log2_()
    _to_base2(r, scale)
    log2_z_r = _exp2_sum(r, work).log2_()
    t.sub_(r)
    s_top = _to_base2(s, scale)
    s.exp2_()
    z_s = s.sum(dim=1)
    s.mul_(_col(1.0 / z_s))  # p
    offset = log2_z_r - log2_z_t
    adv2 = _row_dot(s, t) + offset  # bits
    if g is not None:
        s.mul_(t.add_(_col(offset - adv2)).mul_(_col(g * _LN2)))
    return adv2 * _LN2, _student_lse(s_top, z_s.log2(), scale)


_DIVERGENCES = {"forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "jsd": _jsd, "advantage": _advantage}


# --- approximation="release": the ADPA authors' released formulas ----------------------------------------
# Per row: p, q, r the student's, the (aligned) teacher's and the reference teacher's softmax(z/T)
# over the vocabulary; K the indices of q's top_k probabilities (``torch.topk``: ties broken as it
# breaks them; the whole vocabulary where it has fewer than top_k tokens); ε = RELEASE_EPS;
# clamp(x) = min(max(x, ε), 1 − ε). Gradients follow torch.clamp's: zero where a clamp is active
# (x outside [ε, 1 − ε]), passed on at the bounds. Everything is in place in the logit buffers, plus
# [R, top_k] gathers: no scratch.

def _probs_(x: torch.Tensor, scale: float):
    """x ← softmax(x/T) in place (scale = log2(e)/T); returns the row max and the shifted base-2
    sum, for ``_student_lse``."""
    top = _to_base2(x, scale)
    total = x.exp2_().sum(dim=1)
    x.mul_(_col(1.0 / total))
    return top, total


def _passes(x: torch.Tensor) -> torch.Tensor:
    """Where torch.clamp(x, ε, 1 − ε) passes the gradient on (1.0) and where it stops it (0.0)."""
    return ((x >= RELEASE_EPS) & (x <= 1.0 - RELEASE_EPS)).to(x.dtype)


def _clamped_with_rest(x_k: torch.Tensor):
    """clamp(x_k) and clamp(1 − Σ_K x): the release's kept probabilities and its bin for the rest,
    with the unclamped rest (for its gradient mask)."""
    rest = 1.0 - x_k.sum(dim=1)
    return x_k.clamp(RELEASE_EPS, 1.0 - RELEASE_EPS), rest.clamp(RELEASE_EPS, 1.0 - RELEASE_EPS), rest


def _release_grad_(p: torch.Tensor, top: torch.Tensor, d_k: torch.Tensor, g: torch.Tensor, g_logp: torch.Tensor):
    """p ← d(Σ g·value − Σ g_logp·softmax)/dz in place, from the student's probabilities p and
    d_k = ∂value/∂p at the kept tokens ``top`` (0 elsewhere): g·p_u·(d_u − Σ_w p_w·d_w) − g_logp·p_u,
    i.e. p ← −(g·Σ p_K·d_K + g_logp)·p, then g·p_K·d_K added at K."""
    weighted = p.gather(1, top).mul_(d_k)
    p.mul_(_col(-(g * weighted.sum(dim=1) + g_logp)))
    p.scatter_add_(1, top, weighted.mul_(_col(g)))


def _forward_kl_release(spec, s, t, r, g, g_logp, scale, scratch):
    """DCKD's KL as released: q̃_v = clamp(q_v), p̃_v = clamp(p_v) for v ∈ K (the teacher's top-k,
    the student gathered at the same tokens), q̃_rest = clamp(1 − Σ_K q), p̃_rest = clamp(1 − Σ_K p);
    value = Σ_{v ∈ K ∪ rest} q̃·(log q̃ − log p̃).
    ∂value/∂p_v = −q̃_v/p̃_v·[p_v unclamped] + q̃_rest/p̃_rest·[1 − Σ_K p unclamped], v ∈ K."""
    s_top, z_s = _probs_(s, scale)
    _probs_(t, scale)
    q_k, top = t.topk(release_k(spec.top_k, t.shape[1]), dim=1)
    q_c, q_rest, _ = _clamped_with_rest(q_k)
    p_k = s.gather(1, top)
    p_c, p_rest, p_rest_raw = _clamped_with_rest(p_k)
    div = (q_c * (q_c.log() - p_c.log())).sum(dim=1) + q_rest * (q_rest.log() - p_rest.log())
    if g is not None:
        d_k = (q_c / p_c).mul_(_passes(p_k)).neg_().add_(_col(q_rest / p_rest * _passes(p_rest_raw)))
        _release_grad_(s, top, d_k, g, g_logp)
    return div, _student_lse(s_top, z_s.log2(), scale)


def _release_ref_probs(q_k: torch.Tensor, top: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """r̃ at the teacher's top-k tokens, as the release fills it: r_v where v is among the reference's
    own top-k tokens, else the smallest of the teacher's top-k probabilities, min_K q."""
    k = top.shape[1]
    ref_top = r.topk(k, dim=1).indices.sort(dim=1).values
    # Membership by binary search in the reference's sorted top-k indices: [R, k], no [R, k, k].
    at = torch.searchsorted(ref_top, top.contiguous()).clamp_(max=k - 1)
    found = ref_top.gather(1, at) == top
    return torch.where(found, r.gather(1, top), q_k.amin(dim=1, keepdim=True))


def _advantage_release(spec, s, t, r, g, g_logp, scale, scratch):
    """ADPA's advantage as released: A_v = log(max(q_v, 1e-7)/max(r̃_v, 1e-7)) for v ∈ K (r̃:
    ``_release_ref_probs``), Â = clamp(A) (the release's probability clamp applied to the target too:
    negative advantages become ε, those above 1 become 1 − ε); s_v = clamp(p_v), s_rest =
    clamp(1 − Σ_K p); value = Σ_K s·Â + s_rest·ε.
    ∂value/∂p_v = Â_v·[p_v unclamped] − ε·[1 − Σ_K p unclamped], v ∈ K (the teachers get none)."""
    s_top, z_s = _probs_(s, scale)
    _probs_(t, scale)
    _probs_(r, scale)
    q_k, top = t.topk(release_k(spec.top_k, t.shape[1]), dim=1)
    floor = RELEASE_LOG_FLOOR
    adv = q_k.clamp_min(floor).log_().sub_(_release_ref_probs(q_k, top, r).clamp_min_(floor).log_())
    adv.clamp_(RELEASE_EPS, 1.0 - RELEASE_EPS)
    p_k = s.gather(1, top)
    p_c, p_rest, p_rest_raw = _clamped_with_rest(p_k)
    value = (p_c * adv).sum(dim=1) + p_rest * RELEASE_EPS
    if g is not None:
        d_k = adv.mul_(_passes(p_k)).sub_(_col(RELEASE_EPS * _passes(p_rest_raw)))
        _release_grad_(s, top, d_k, g, g_logp)
    return value, _student_lse(s_top, z_s.log2(), scale)


_RELEASE = {"forward_kl": _forward_kl_release, "advantage": _advantage_release}
