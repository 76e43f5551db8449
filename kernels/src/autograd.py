"""The autograd layer shared by the Triton and torch backends.

``sweep_rows`` takes flat rows, drops the rows no output needs (prompt and padding positions cost
no FLOPs), runs one backend sweep over the rest and scatters the results back.

Gradients: by default the backward recomputes the logits (the backend's ``backward``). When the
caller states how an output will be reduced (``grad_weights``: loss = c·Σ w·out for some scalar
c) and the backend can form gradients in its forward sweep, that output's gradients are formed
there and the backward only scales them by c. The incoming gradient is checked to really be c·w;
any other gradient falls back to recomputation (logged once per process), so results never
depend on the hint being right.

One output hinted and the other not (dadpo_token: a hinted divergence, DPO's log-probs): the
divergence's gradients come from the forward and the backward recomputes the student's log-probs
only, never the teacher, which pays when the teacher is the wider model (see ``_partial_pays``).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

import torch

from .sweep import SweepInputs, SweepSpec

_log = logging.getLogger("fastdadpo.kernels")
_warned_rejected_hint = False

# Relative tolerance for "the incoming gradient is proportional to the stated weights".
_PROPORTIONAL_RTOL = 1e-5


def _proportional_scale(pairs) -> Optional[float]:
    """The scalar c with g ≈ c·w for every (g, w) pair, or None if there is none."""
    numerator = denominator = 0.0
    for g, w in pairs:
        numerator += float((g.double() * w.double()).sum())
        denominator += float((w.double() * w.double()).sum())
    scale = numerator / denominator if denominator > 0 else 0.0
    for g, w in pairs:
        expected = scale * w.double()
        tolerance = _PROPORTIONAL_RTOL * max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-30)
        if g.numel() and float((g.double() - expected).abs().max()) > tolerance:
            return None
    return scale


def _warn_rejected_hint() -> None:
    global _warned_rejected_hint
    if not _warned_rejected_hint:
        _warned_rejected_hint = True
        _log.warning("fastdadpo.kernels: the incoming gradient is not proportional to grad_weights / "
                     "logp_grad_weights, so the gradients formed in the forward sweep were dropped and the "
                     "logits recomputed (correct, but the hint's saving is lost; logged once per process)")


def _partial_pays(spec: SweepSpec, student_hidden, teacher_hidden, ref_hidden) -> bool:
    """One output hinted, the other not: forming the hinted output's gradients in the forward costs
    one more student pass in backward (recompute, dh and dW of the unhinted part: F·3·Hs against the
    F·Hs recompute a joint backward shares), and saves recomputing the teacher (F·Ht, F·Hr)."""
    teacher_width = sum(t.shape[1] for t in (teacher_hidden, ref_hidden) if t is not None)
    return teacher_width > 2 * student_hidden.shape[1]


class _SweepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, spec: SweepSpec, student_hidden, student_weight, student_bias,
                teacher_hidden, teacher_weight, ref_hidden, ref_weight, targets, div_hint, logp_hint):
        inputs = SweepInputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                             ref_hidden, ref_weight, targets)
        needs_grad = any(ctx.needs_input_grad[2:5])
        # A frozen head (a LoRA student's) gets no weight gradient: the backend then never
        # allocates the [V, H] buffer nor runs the dW GEMM, in the forward's eager gradients or in backward.
        spec = replace(spec, weight_grad=ctx.needs_input_grad[3],
                       bias_grad=student_bias is not None and ctx.needs_input_grad[4])
        div_hint = div_hint if spec.has_div else None
        logp_hint = logp_hint if spec.with_logps else None
        hinted = [h is not None for h, on in ((div_hint, spec.has_div), (logp_hint, spec.with_logps)) if on]
        eager = needs_grad and backend.supports_eager_grads and any(hinted)
        if eager and not all(hinted):
            eager = _partial_pays(spec, student_hidden, teacher_hidden, ref_hidden)
        row_grads = (div_hint, logp_hint) if eager else None
        div, logp, saved, grads = backend.forward(spec, inputs, row_grads)
        ctx.backend, ctx.spec, ctx.saved, ctx.grads, ctx.hints = backend, spec, saved, grads, (div_hint, logp_hint)
        ctx.input_dtypes = (student_hidden.dtype, student_weight.dtype,
                            None if student_bias is None else student_bias.dtype)
        ctx.save_for_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                              ref_hidden, ref_weight, targets, div)
        empty = student_hidden.new_empty(0, dtype=torch.float32)
        return (empty if div is None else div.float()), (empty if logp is None else logp.float())

    @staticmethod
    def backward(ctx, grad_div, grad_logp):
        (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, ref_hidden, ref_weight,
         targets, div) = ctx.saved_tensors
        spec = ctx.spec
        grad_div = grad_div if spec.has_div else None
        grad_logp = grad_logp if spec.with_logps else None
        inputs = SweepInputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                             ref_hidden, ref_weight, targets)
        grads = None
        if ctx.grads is not None:
            pairs = [(g, w) for g, w in zip((grad_div, grad_logp), ctx.hints) if w is not None]
            scale = _proportional_scale(pairs)
            if scale is None:
                _warn_rejected_hint()
                ctx.grads = None  # freed before the recompute allocates its own
            else:
                grads = ctx.grads
                for grad in (grads.hidden, grads.weight, grads.bias):
                    if grad is not None:
                        grad.mul_(scale)
                # The output without a hint (if any) still needs its gradient: a sweep over that
                # output alone, added to the ones the forward formed.
                rest_div = grad_div if ctx.hints[0] is None else None
                rest_logp = grad_logp if ctx.hints[1] is None else None
                if rest_div is not None or rest_logp is not None:
                    rest = (replace(spec, with_logps=False) if rest_logp is None else
                            replace(spec, kind="none", vocab_size=0, with_logps=True)
                            if rest_div is None else spec)
                    grads = ctx.backend.backward(rest, inputs, ctx.saved, div, rest_div, rest_logp, into=grads)
        if grads is None:
            grads = ctx.backend.backward(spec, inputs, ctx.saved, div, grad_div, grad_logp)
        ctx.grads = ctx.saved = None
        hidden_dtype, weight_dtype, bias_dtype = ctx.input_dtypes
        grad_hidden = grads.hidden.to(hidden_dtype) if ctx.needs_input_grad[2] else None
        grad_weight = grads.weight.to(weight_dtype) if (ctx.needs_input_grad[3] and grads.weight is not None) else None
        grad_bias = grads.bias.to(bias_dtype) if (ctx.needs_input_grad[4] and grads.bias is not None) else None
        return (None, None, grad_hidden, grad_weight, grad_bias) + (None,) * 7


def _masked(values: Optional[torch.Tensor], rows: Optional[torch.Tensor]):
    if values is None or rows is None:
        return values
    return torch.where(rows, values, torch.zeros_like(values))


def _take(t: Optional[torch.Tensor], index: Optional[torch.Tensor]):
    if t is None or index is None:
        return t
    return t.index_select(0, index)


def sweep_rows(backend, spec: SweepSpec, *, student_hidden, student_weight, student_bias=None,
               teacher_hidden=None, teacher_weight=None, ref_hidden=None, ref_weight=None,
               targets=None, div_rows=None, logp_rows=None, div_hint=None, logp_hint=None):
    """Run one sweep over flat rows ([N, H] hidden states); returns float32 ``(div, logp)`` of
    length N (None for outputs the spec does not ask for), exactly 0 on rows not asked for.

    ``div_rows`` / ``logp_rows``: bool [N], the rows that want each output (None: all rows).
    ``targets`` may hold anything on rows outside ``logp_rows``.
    """
    n = student_hidden.shape[0]
    wanted = [rows for rows, on in ((div_rows, spec.has_div), (logp_rows, spec.with_logps)) if on]
    needed = None
    if all(rows is not None for rows in wanted):
        needed = wanted[0] if len(wanted) == 1 else wanted[0] | wanted[1]
    index = None if needed is None or bool(needed.all()) else needed.nonzero().squeeze(1)
    div_keep = _take(div_rows, index) if spec.has_div else None
    logp_keep = _take(logp_rows, index) if spec.with_logps else None

    if index is not None and index.numel() == 0:
        # Nothing to compute; stay connected to the graph so that every rank's backward (and
        # ZeRO-3's gradient hooks) still sees the head, with a zero gradient.
        anchor = (student_hidden.reshape(-1)[:0].sum() + student_weight.reshape(-1)[:0].sum()).float()
        if student_bias is not None:
            anchor = anchor + student_bias[:0].sum().float()
        zeros = anchor.expand(n)
        return (zeros if spec.has_div else None), (zeros if spec.with_logps else None)

    compact_targets = _take(targets, index)
    if logp_keep is not None:
        compact_targets = torch.where(logp_keep, compact_targets, torch.zeros_like(compact_targets))
    div, logp = _SweepFunction.apply(
        backend, spec, _take(student_hidden, index), student_weight, student_bias,
        _take(teacher_hidden, index), teacher_weight, _take(ref_hidden, index), ref_weight, compact_targets,
        _masked(_take(div_hint, index), div_keep), _masked(_take(logp_hint, index), logp_keep))
    results = []
    for out, keep, on in ((div, div_keep, spec.has_div), (logp, logp_keep, spec.with_logps)):
        if not on:
            results.append(None)
            continue
        out = _masked(out, keep)
        if index is not None:
            out = out.new_zeros(n).index_copy(0, index, out)
        results.append(out)
    return tuple(results)
