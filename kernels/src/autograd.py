"""The autograd layer of the sweep backends (the chunked algorithm, the tile-fused kernels).

``sweep_rows`` takes flat rows, drops the rows no output needs (one ``nonzero``, the call's one
data-dependent shape: prompt and padding positions cost no FLOPs), runs one backend sweep over the
rest and scatters the results back.

An output comes back one of two ways:

* per row (``div``, ``logp``), differentiable for any downstream use: the backward recomputes the
  logits (the backend's ``backward`` with the incoming row gradients);
* reduced into the returned scalar ``loss`` = Σ w_div·div + Σ w_logp·logp for the caller's row
  weights. The gradient of a reduced output is c·w for the incoming scalar c, known before the
  loss is, so a backend that forms gradients in its forward sweep (``forms_grads_in_forward``) does
  so, and the backward only multiplies them by c: correct by construction, nothing to check and no
  host sync. A reduced output's per-row values come back detached, for metrics.

One output reduced and the other per row (dadpo_token: a weighted divergence, DPO's per-row
log-probs): the divergence's gradients come from the forward and the backward recomputes the
student's log-probs only, never the teacher, when that pays (``_partial_pays``); otherwise one
backward sweep recomputes both.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Tuple

import torch

from .sweep import SweepInputs, SweepSpec


def _partial_pays(spec: SweepSpec, student_hidden, teacher_hidden, ref_hidden) -> bool:
    """One output reduced, the other per row: forming the reduced output's gradients in the
    forward costs one more student pass in backward (recompute, dh and dW of the per-row part:
    F·3·Hs against the F·Hs recompute a joint backward shares), and saves recomputing the teacher
    (F·Ht, F·Hr). Shapes only: no sync."""
    teacher_width = sum(t.shape[1] for t in (teacher_hidden, ref_hidden) if t is not None)
    return teacher_width > 2 * student_hidden.shape[1]


def reduced_loss(div, logp, div_weights, logp_weights, like: torch.Tensor) -> torch.Tensor:
    """The float32 scalar Σ div_weights·div + Σ logp_weights·logp over the outputs given weights
    (0, on ``like``'s device, when none are)."""
    terms = [(values.float() * weights.float()).sum() for values, weights in ((div, div_weights), (logp, logp_weights))
             if values is not None and weights is not None]
    return torch.stack(terms).sum() if terms else like.new_zeros((), dtype=torch.float32)


class _SweepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, spec: SweepSpec, student_hidden, student_weight, student_bias,
                teacher_hidden, teacher_weight, ref_hidden, ref_weight, targets, div_weights, logp_weights):
        inputs = SweepInputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                             ref_hidden, ref_weight, targets)
        needs_grad = any(ctx.needs_input_grad[2:5])
        # A frozen head (a LoRA student's) gets no weight gradient: the backend then never
        # allocates the [V, H] buffer nor runs the dW GEMM, in the forward's gradients or in backward.
        spec = replace(spec, weight_grad=ctx.needs_input_grad[3],
                       bias_grad=student_bias is not None and ctx.needs_input_grad[4])
        weights = (div_weights if spec.has_div else None, logp_weights if spec.with_logps else None)
        reduced = [w is not None for w, on in zip(weights, (spec.has_div, spec.with_logps)) if on]
        eager = needs_grad and backend.forms_grads_in_forward and any(reduced)
        if eager and not all(reduced):
            eager = _partial_pays(spec, student_hidden, teacher_hidden, ref_hidden)
        div, logp, saved, grads = backend.forward(spec, inputs, weights if eager else None)
        loss = reduced_loss(div, logp, *weights, like=student_hidden)
        ctx.backend, ctx.spec, ctx.saved, ctx.grads, ctx.weights = backend, spec, saved, grads, weights
        ctx.input_dtypes = (student_hidden.dtype, student_weight.dtype,
                            None if student_bias is None else student_bias.dtype)
        ctx.save_for_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                              ref_hidden, ref_weight, targets, div)
        empty = student_hidden.new_empty(0, dtype=torch.float32)
        div_out = empty if div is None else div.float()
        logp_out = empty if logp is None else logp.float()
        detached = [out for out, w in ((div_out, weights[0]), (logp_out, weights[1])) if w is not None]
        if detached:
            ctx.mark_non_differentiable(*detached)
        return loss.float(), div_out, logp_out

    @staticmethod
    def backward(ctx, grad_loss, grad_div, grad_logp):
        (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, ref_hidden, ref_weight,
         targets, div) = ctx.saved_tensors
        spec, (div_weights, logp_weights) = ctx.spec, ctx.weights
        inputs = SweepInputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                             ref_hidden, ref_weight, targets)
        # Per-row outputs carry their incoming gradients; reduced ones c·w, c the loss's (a tensor
        # product: the scalar never leaves the device).
        per_row_div = grad_div if spec.has_div and div_weights is None else None
        per_row_logp = grad_logp if spec.with_logps and logp_weights is None else None
        grads = ctx.grads
        if grads is not None:
            for grad in (grads.hidden, grads.weight, grads.bias):
                if grad is not None:
                    grad.mul_(grad_loss.to(grad.dtype))
            if per_row_div is not None or per_row_logp is not None:
                # The per-row output still needs its gradient: a sweep over that output alone,
                # added to the ones the forward formed.
                rest = (replace(spec, with_logps=False) if per_row_logp is None else
                        replace(spec, kind="none", vocab_size=0, with_logps=True) if per_row_div is None else spec)
                grads = ctx.backend.backward(rest, inputs, ctx.saved, div, (per_row_div, per_row_logp), into=grads)
        else:
            row_grads: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (
                per_row_div if div_weights is None else grad_loss * div_weights,
                per_row_logp if logp_weights is None else grad_loss * logp_weights)
            grads = ctx.backend.backward(spec, inputs, ctx.saved, div, row_grads)
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
               targets=None, div_rows=None, logp_rows=None, div_weights=None, logp_weights=None):
    """Run one sweep over flat rows ([N, H] hidden states); returns ``(loss, div, logp)``: the
    float32 scalar Σ div_weights·div + Σ logp_weights·logp (0 when neither is given) and the
    float32 per-row outputs of length N (None for outputs the spec does not ask for; detached where
    reduced), exactly 0 on rows not asked for.

    ``div_rows`` / ``logp_rows``: bool [N], the rows that want each output (None: all rows).
    ``targets`` may hold anything on rows outside ``logp_rows``.
    """
    n = student_hidden.shape[0]
    wanted = [rows for rows, on in ((div_rows, spec.has_div), (logp_rows, spec.with_logps)) if on]
    index = None
    if wanted and all(rows is not None for rows in wanted):
        needed = wanted[0] if len(wanted) == 1 else wanted[0] | wanted[1]
        index = needed.nonzero().squeeze(1)  # the call's one host sync: a data-dependent row count
        if index.numel() == n:
            index = None
    div_keep = _take(div_rows, index) if spec.has_div else None
    logp_keep = _take(logp_rows, index) if spec.with_logps else None

    if index is not None and index.numel() == 0:
        # Nothing to compute; stay connected to the graph so that every rank's backward (and
        # ZeRO-3's gradient hooks) still sees the head, with a zero gradient.
        anchor = (student_hidden.reshape(-1)[:0].sum() + student_weight.reshape(-1)[:0].sum()).float()
        if student_bias is not None:
            anchor = anchor + student_bias[:0].sum().float()
        zeros = anchor.expand(n)
        return anchor, (zeros if spec.has_div else None), (zeros if spec.with_logps else None)

    compact_targets = _take(targets, index)
    if logp_keep is not None:
        compact_targets = torch.where(logp_keep, compact_targets, torch.zeros_like(compact_targets))
    loss, div, logp = _SweepFunction.apply(
        backend, spec, _take(student_hidden, index), student_weight, student_bias,
        _take(teacher_hidden, index), teacher_weight, _take(ref_hidden, index), ref_weight, compact_targets,
        _masked(_take(div_weights, index), div_keep), _masked(_take(logp_weights, index), logp_keep))
    results = []
    for out, keep, on in ((div, div_keep, spec.has_div), (logp, logp_keep, spec.with_logps)):
        if not on:
            results.append(None)
            continue
        out = _masked(out, keep)
        if index is not None:
            out = out.new_zeros(n).index_copy(0, index, out)
        results.append(out)
    return (loss,) + tuple(results)


class Swept:
    """``run`` for a backend implementing ``backends.SweepBackend`` (``forward``, ``backward``)."""

    def run(self, spec: SweepSpec, inputs: SweepInputs, **rows) -> Tuple[torch.Tensor, ...]:
        return sweep_rows(self, spec, student_hidden=inputs.student_hidden, student_weight=inputs.student_weight,
                          student_bias=inputs.student_bias, teacher_hidden=inputs.teacher_hidden,
                          teacher_weight=inputs.teacher_weight, ref_hidden=inputs.ref_hidden,
                          ref_weight=inputs.ref_weight, targets=inputs.targets, **rows)
