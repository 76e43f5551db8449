"""The naive reference: materializes the full [tokens x vocab] logits and lets autograd do the rest.

Used by the tests (in float64) and the benchmarks as the baseline. Nothing else may call it:
it is the only code path allowed to allocate N x V logits.
"""
from __future__ import annotations

import math

import torch

from .sweep import RELEASE_EPS, RELEASE_LOG_FLOOR, RELEASE_TOP_K, LogitMap, check_approximation, release_k


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


_IDENTITY = LogitMap()


def _logits(hidden, weight, bias, temperature, dtype, logit_map=_IDENTITY):
    """The model's logits (soft cap and scale applied to the head's raw outputs) over the temperature."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logit_map.apply(logits) / temperature


def naive_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          logit_map=_IDENTITY):
    dtype = _compute_dtype(hidden, weight)
    log_probs = torch.log_softmax(_logits(hidden, weight, bias, temperature, dtype, logit_map), dim=-1)
    valid = targets != ignore_index
    picked = log_probs.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def _divergence_from_logprobs(log_p, log_q, kind, beta):
    """Per-row D between student log-probs ``log_p`` and teacher log-probs ``log_q``."""
    if kind == "forward_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if kind == "reverse_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "jsd":
        log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
        kl_teacher = (log_q.exp() * (log_q - log_m)).sum(-1)
        kl_student = (log_p.exp() * (log_p - log_m)).sum(-1)
        return beta * kl_teacher + (1 - beta) * kl_student
    raise ValueError(f"unknown divergence kind {kind!r}")


# approximation="release": the released ADPA code's formulas (``torch_rows._forward_kl_release`` and
# ``_advantage_release`` state them), with autograd through its clamps.

def _release_clamp(x):
    return x.clamp(RELEASE_EPS, 1.0 - RELEASE_EPS)


def _with_rest(x_k):
    """[..., k] kept probabilities → [..., k + 1] with the rest bin 1 − Σ x_k last, clamped."""
    return _release_clamp(torch.cat([x_k, 1.0 - x_k.sum(-1, keepdim=True)], -1))


def _teacher_top(log_q, top_k):
    q = log_q.exp()
    return q.topk(release_k(top_k, q.shape[-1]), dim=-1)


def _release_forward_kl(log_p, log_q, top_k):
    q_k, top = _teacher_top(log_q, top_k)
    q_kept, p_kept = _with_rest(q_k), _with_rest(log_p.exp().gather(-1, top))
    return (q_kept * (q_kept.log() - p_kept.log())).sum(-1)


def _release_advantage(log_p, log_t, log_r, top_k):
    q_k, top = _teacher_top(log_t, top_k)
    r = log_r.exp()
    ref_top = r.topk(top.shape[-1], dim=-1).indices
    in_ref_top = (top.unsqueeze(-1) == ref_top.unsqueeze(-2)).any(-1)
    r_k = torch.where(in_ref_top, r.gather(-1, top), q_k.amin(-1, keepdim=True))
    advantage = _release_clamp(q_k.clamp_min(RELEASE_LOG_FLOOR).log() - r_k.clamp_min(RELEASE_LOG_FLOOR).log())
    target = torch.cat([advantage, torch.full_like(advantage[..., :1], RELEASE_EPS)], -1)
    return (_with_rest(log_p.exp().gather(-1, top)) * target).sum(-1)


def naive_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
                            kind="forward_kl", beta=0.5, temperature=1.0, mask=None, targets=None,
                            ignore_index=-100, vocab_size=None, logp_temperature=1.0, student_map=_IDENTITY,
                            teacher_map=_IDENTITY, approximation="exact", top_k=RELEASE_TOP_K):
    check_approximation(approximation, top_k, kind)
    dtype = _compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
    vocab = student_weight.shape[0] if vocab_size is None else vocab_size
    student_logits = _logits(student_hidden, student_weight, None, 1.0, dtype, student_map)
    log_p = torch.log_softmax(student_logits[..., :vocab] / temperature, dim=-1)
    with torch.no_grad():
        log_q = torch.log_softmax(_logits(teacher_hidden, teacher_weight[:vocab], None, temperature, dtype,
                                          teacher_map), -1)
    if approximation == "release":
        div = _release_forward_kl(log_p, log_q, top_k)
    else:
        div = _divergence_from_logprobs(log_p, log_q, kind, beta)
    if mask is not None:
        div = torch.where(mask, div, torch.zeros_like(div))
    if targets is None:
        return div
    log_probs = torch.log_softmax(student_logits / logp_temperature, dim=-1)
    valid = targets != ignore_index
    picked = log_probs.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return div, torch.where(valid, picked, torch.zeros_like(picked))


def naive_linear_advantage(student_hidden, student_weight, teacher_hidden, teacher_weight, ref_hidden,
                           ref_weight, *, temperature=1.0, mask=None, vocab_size=None, student_map=_IDENTITY,
                           teacher_map=_IDENTITY, ref_map=_IDENTITY, approximation="exact", top_k=RELEASE_TOP_K):
    check_approximation(approximation, top_k, "advantage")
    dtype = _compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
    vocab = student_weight.shape[0] if vocab_size is None else vocab_size
    log_p = torch.log_softmax(_logits(student_hidden, student_weight[:vocab], None, temperature, dtype, student_map),
                              -1)
    with torch.no_grad():
        log_t = torch.log_softmax(_logits(teacher_hidden, teacher_weight[:vocab], None, temperature, dtype,
                                          teacher_map), -1)
        log_r = torch.log_softmax(_logits(ref_hidden, ref_weight[:vocab], None, temperature, dtype, ref_map), -1)
    if approximation == "release":
        adv = _release_advantage(log_p, log_t, log_r, top_k)
    else:
        adv = (log_p.exp() * (log_t - log_r)).sum(-1)
    if mask is not None:
        adv = torch.where(mask, adv, torch.zeros_like(adv))
    return adv
