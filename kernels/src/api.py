"""Public entry points of ``fastdadpo.kernels``: validation, shapes, and one dispatch on the backend.

Hidden states may have any leading shape ([N, H], [B, T, H], ...); per-row outputs have that
leading shape. Backends (``backends.BACKENDS``): ``chunked`` (the default on every device),
``chunked_triton``, ``torch``, ``triton`` (tile-fused), ``naive``. ``impl=`` on a call wins over
``FASTDADPO_KERNEL_BACKEND``; ``chunk_budget_mb=`` over ``FASTDADPO_CHUNK_BUDGET_MB`` (the trainer
passes its config's ``kernels:`` section as both).

Outputs come per row (differentiable for any use; the backward recomputes the logits), or reduced:
``weights=`` (and ``logp_weights=``) ask for Σ w·out, returned as ``Reduced.loss`` with its gradient
formed in the forward sweep where the backend can, and the per-row values detached for metrics.

No host sync inside a call: argument checks that need the data (target ids in range) are
device-side asserts (``torch._assert_async``); dropping rows a mask excludes is one ``nonzero``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

from .backends import BACKENDS, build_backend, resolve_backend
from .sweep import (DIVERGENCE_KINDS, IGNORE_INDEX, RELEASE_TOP_K, LogitMap, SweepInputs, SweepSpec,
                    check_approximation, logit_map)

_HALF_OR_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Reduced(NamedTuple):
    """A reduced call's result."""

    loss: torch.Tensor  # float32 scalar Σ weights·values (+ Σ logp_weights·logps), differentiable
    values: torch.Tensor  # the per-row outputs (log-probs, divergence or advantage), detached
    # The divergence's target log-probs when ``targets`` were given: detached when ``logp_weights``
    # reduced them into ``loss``, else per row and differentiable (recomputed in backward).
    logps: Optional[torch.Tensor] = None


def _check_head(name: str, hidden: torch.Tensor, weight: torch.Tensor, lead: Optional[torch.Size] = None):
    if hidden.dtype not in _HALF_OR_FLOAT or weight.dtype not in _HALF_OR_FLOAT:
        raise TypeError(f"{name}: hidden states and weight must be floating point, got {hidden.dtype} and "
                        f"{weight.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{name}: hidden states ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: hidden size {hidden.shape[-1]} does not match weight of shape "
                         f"{tuple(weight.shape)} (expected [vocab, {hidden.shape[-1]}])")
    if lead is not None and hidden.shape[:-1] != lead:
        raise ValueError(f"{name}: hidden states have leading shape {tuple(hidden.shape[:-1])}, the student's "
                         f"are {tuple(lead)}; rows must align token for token")
    if hidden.device != weight.device:
        raise ValueError(f"{name}: hidden states on {hidden.device}, weight on {weight.device}")


def _check_temperature(temperature: float, name: str = "temperature"):
    if not temperature > 0:
        raise ValueError(f"{name} must be > 0, got {temperature}")


def _resolve_vocab(vocab_size: Optional[int], *weights: torch.Tensor) -> int:
    rows = [w.shape[0] for w in weights]
    if vocab_size is None:
        if len(set(rows)) != 1:
            raise ValueError(f"LM heads have different row counts {rows}: pass vocab_size= (the shared "
                             f"tokenizer's vocabulary, e.g. for a padded teacher head) to compare the first "
                             f"vocab_size rows of each")
        return rows[0]
    if not 0 < vocab_size <= min(rows):
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {min(rows)}] (the smallest head has "
                         f"{min(rows)} rows)")
    return vocab_size


def _flat_rows(values: Optional[torch.Tensor], lead: torch.Size, n: int, what: str, dtype: torch.dtype):
    if values is None:
        return None
    if values.shape != lead:
        raise ValueError(f"{what} has shape {tuple(values.shape)}, expected the hidden states' leading shape "
                         f"{tuple(lead)}")
    if dtype == torch.bool:
        return values.reshape(n).to(torch.bool)
    if not values.is_floating_point():
        raise TypeError(f"{what} must be floating point, got {values.dtype}")
    return values.reshape(n).float()


def _flat_targets(targets, lead, n, ignore_index, vocab):
    if targets.shape != lead:
        raise ValueError(f"targets have shape {tuple(targets.shape)}, expected {tuple(lead)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    flat = targets.reshape(n).long()
    valid = flat != ignore_index
    # A device-side assert, not a host check: raised at once on CPU, asynchronously on CUDA (as an
    # out-of-range class index in torch's cross-entropy is).
    torch._assert_async(((flat >= 0) & (flat < vocab) | ~valid).all(),
                        f"targets hold ids outside [0, {vocab}) other than ignore_index={ignore_index}")
    return flat, valid


class _Model(NamedTuple):
    """One model's inputs to a call, checked: its hidden rows as [n, H], its LM head, its logit map."""

    role: str  # "student", "teacher" or "ref": the SweepSpec map it fills and its keywords' prefix
    hidden: torch.Tensor
    weight: torch.Tensor
    logit_map: LogitMap

    @property
    def keywords(self) -> str:
        prefix = "" if self.role == "student" else f"{self.role}_"
        return f"{prefix}softcap/{prefix}logit_scale"


_NAMES = {"student": "student", "teacher": "teacher", "ref": "reference teacher"}


def _model(role: str, hidden: torch.Tensor, weight: torch.Tensor, softcap: Optional[float], logit_scale: float,
           lead: Optional[torch.Size] = None) -> _Model:
    _check_head(_NAMES[role], hidden, weight, lead)
    prefix = "" if role == "student" else f"{role}_"
    frozen = role != "student"  # teachers get no gradient
    return _Model(role, (hidden.detach() if frozen else hidden).reshape(-1, hidden.shape[-1]),
                  weight.detach() if frozen else weight, logit_map(softcap, logit_scale, prefix))


def _maps(models) -> dict:
    return {f"{m.role}_map": m.logit_map for m in models}


def _inputs(models, bias=None, targets=None) -> SweepInputs:
    heads = {m.role: m for m in models}
    teacher, ref = heads.get("teacher"), heads.get("ref")
    return SweepInputs(heads["student"].hidden, heads["student"].weight, bias,
                       None if teacher is None else teacher.hidden, None if teacher is None else teacher.weight,
                       None if ref is None else ref.hidden, None if ref is None else ref.weight, targets)


def _backend(device: torch.device, impl: Optional[str], chunk_budget_mb: Optional[float], models,
             approximation: str = "exact"):
    name = resolve_backend(device, impl)
    used = [m.keywords for m in models if not m.logit_map.identity]
    if used and not BACKENDS[name].logit_maps:
        able = ", ".join(n for n, entry in BACKENDS.items() if entry.logit_maps)
        raise ValueError(f"the {name} kernel backend does not apply {', '.join(used)}; the {able} backends do "
                         f"(impl=, kernels.backend or FASTDADPO_KERNEL_BACKEND)")
    if approximation == "release" and not BACKENDS[name].release_approximation:
        able = ", ".join(n for n, entry in BACKENDS.items() if entry.release_approximation)
        raise ValueError(f"the {name} kernel backend does not compute approximation='release' (the released "
                         f"ADPA code's per-row top-k of the teacher); the {able} backends do (impl=, "
                         f"kernels.backend or FASTDADPO_KERNEL_BACKEND), or use approximation='exact'")
    return build_backend(name, device, chunk_budget_mb)


def _result(loss, values, lead, logps=None, reduced=False):
    values = values.reshape(lead)
    logps = None if logps is None else logps.reshape(lead)
    if reduced:
        return Reduced(loss, values, logps)
    return values if logps is None else (values, logps)


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                          ignore_index: int = IGNORE_INDEX, weights: Optional[torch.Tensor] = None,
                          softcap: Optional[float] = None, logit_scale: float = 1.0, impl: Optional[str] = None,
                          chunk_budget_mb: Optional[float] = None) -> Union[torch.Tensor, Reduced]:
    """float32 ``log_softmax(z / T)[target]`` per row, z = ``hidden @ weight.T`` (+ ``bias``), exactly
    0 where ``targets == ignore_index``; never materializes the [rows x vocab] logits.
    Differentiable in ``hidden``, ``weight`` and ``bias``.

    ``weights`` (same shape as ``targets``): return ``Reduced(loss=Σ weights·logp, values=logp
    detached)`` instead, the gradient formed in the forward sweep (a cross-entropy is
    ``weights = −1/n`` on its rows).

    ``softcap`` / ``logit_scale``: the model's logits are z = cap·tanh(scale·x/cap) of the head's
    raw outputs x (z = scale·x without a cap), before the temperature: Gemma 2's
    ``final_logit_softcapping``, Cohere's ``logit_scale``. None / 1.0: off.

    ``chunk_budget_mb``: the memory (MiB) the chunked algorithm may take above its inputs, gradients
    included (default ``FASTDADPO_CHUNK_BUDGET_MB``, else 1400 on CUDA and 192 elsewhere); it sizes
    the row chunks. Half-precision heads get fp32 gradient accumulators where they and their final
    cast fit the budget, else accumulators in their own dtype (``chunk_plan.plan_chunks``).
    """
    student = _model("student", hidden, weight, softcap, logit_scale)
    _check_temperature(temperature)
    lead = hidden.shape[:-1]
    n = lead.numel()
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    backend = _backend(hidden.device, impl, chunk_budget_mb, [student])
    flat_targets, valid = _flat_targets(targets, lead, n, ignore_index, weight.shape[0])
    spec = SweepSpec(kind="none", logp_temperature=temperature, with_logps=True, **_maps([student]))
    loss, _, logp = backend.run(spec, _inputs([student], bias, flat_targets), logp_rows=valid,
                                logp_weights=_flat_rows(weights, lead, n, "weights", torch.float32))
    return _result(loss, logp, lead, reduced=weights is not None)


def fused_linear_divergence(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                            teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
                            kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                            mask: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None,
                            ignore_index: int = IGNORE_INDEX, vocab_size: Optional[int] = None,
                            logp_temperature: float = 1.0, weights: Optional[torch.Tensor] = None,
                            logp_weights: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                            logit_scale: float = 1.0, teacher_softcap: Optional[float] = None,
                            teacher_logit_scale: float = 1.0, impl: Optional[str] = None,
                            chunk_budget_mb: Optional[float] = None, approximation: str = "exact",
                            top_k: int = RELEASE_TOP_K
                            ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], Reduced]:
    """Per-row divergence between the teacher's and the student's next-token distributions,
    computed from hidden states and LM heads without materializing logits.

    ``kind``: ``forward_kl`` KL(teacher‖student), ``reverse_kl`` KL(student‖teacher), ``jsd``
    β·KL(teacher‖m) + (1−β)·KL(student‖m) with m = β·teacher + (1−β)·student, 0 < β < 1. Both
    models' logits are divided by ``temperature``. Distributions are over the first ``vocab_size``
    rows of each head (default: the row count, which must then be equal).

    Returns float32 divergences (0 where ``mask`` is False). With ``targets``, returns
    ``(divergence, token_logps)`` from the same sweep: the student's log-probs of the targets over
    its whole head at ``logp_temperature`` (1 by default, the model's own distribution, as CE and
    DPO terms want), 0 where ``targets == ignore_index``. Teacher inputs get no gradient.

    ``weights`` (and, with ``targets``, ``logp_weights``): return ``Reduced(loss = Σ weights·div
    + Σ logp_weights·logp, values = div detached, logps)``, the gradient formed in the forward sweep;
    without ``logp_weights`` the log-probs stay per row and differentiable (DPO's sequence sums).
    ``chunk_budget_mb``, ``softcap`` / ``logit_scale`` (the student's): see ``fused_linear_logprobs``;
    ``teacher_softcap`` / ``teacher_logit_scale``: the teacher's own.

    ``approximation``: ``"exact"`` (the default), or ``"release"``, the released ADPA code's KL
    (``kind="forward_kl"`` only) over the teacher's ``top_k`` tokens plus a bin for the rest, both
    distributions clamped to [1e-8, 1 − 1e-8] (``torch_rows._forward_kl_release``); the log-probs
    stay exact. Not in the tile-fused ``triton`` backend.
    """
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; choose one of {', '.join(DIVERGENCE_KINDS)}")
    check_approximation(approximation, top_k, kind)
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got beta={beta}")
    if logp_weights is not None and (weights is None or targets is None):
        raise ValueError("logp_weights needs targets= (the log-probs it weights) and weights= (the divergence's "
                         "own weights, zeros to leave it out of the loss)")
    _check_temperature(temperature)
    _check_temperature(logp_temperature, "logp_temperature")
    lead = student_hidden.shape[:-1]
    models = [_model("student", student_hidden, student_weight, softcap, logit_scale),
              _model("teacher", teacher_hidden, teacher_weight, teacher_softcap, teacher_logit_scale, lead)]
    vocab = _resolve_vocab(vocab_size, student_weight, teacher_weight)
    n = lead.numel()
    flat_mask = _flat_rows(mask, lead, n, "mask", torch.bool)
    backend = _backend(student_hidden.device, impl, chunk_budget_mb, models, approximation)
    flat_targets = valid = None
    if targets is not None:
        flat_targets, valid = _flat_targets(targets, lead, n, ignore_index, student_weight.shape[0])
    spec = SweepSpec(kind=kind, beta=beta, temperature=temperature, logp_temperature=logp_temperature,
                     vocab_size=vocab, with_logps=targets is not None, approximation=approximation, top_k=top_k,
                     **_maps(models))
    loss, div, logp = backend.run(spec, _inputs(models, targets=flat_targets), div_rows=flat_mask, logp_rows=valid,
                                  div_weights=_flat_rows(weights, lead, n, "weights", torch.float32),
                                  logp_weights=_flat_rows(logp_weights, lead, n, "logp_weights", torch.float32))
    return _result(loss, div, lead, logp, reduced=weights is not None)


def fused_linear_advantage(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                           teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                           ref_hidden: torch.Tensor, ref_weight: torch.Tensor, *, temperature: float = 1.0,
                           mask: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None,
                           weights: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                           logit_scale: float = 1.0, teacher_softcap: Optional[float] = None,
                           teacher_logit_scale: float = 1.0, ref_softcap: Optional[float] = None,
                           ref_logit_scale: float = 1.0, impl: Optional[str] = None,
                           chunk_budget_mb: Optional[float] = None, approximation: str = "exact",
                           top_k: int = RELEASE_TOP_K) -> Union[torch.Tensor, Reduced]:
    """ADPA's per-row advantage Σ_a p_s(a)·(log p_t(a) − log p_r(a)) of the student's distribution
    under the teacher's log-ratio to its reference (the teacher before alignment). float32, 0
    where ``mask`` is False; gradient to the student only. ``weights``, ``chunk_budget_mb``,
    ``softcap`` / ``logit_scale``: see ``fused_linear_logprobs``; ``teacher_...`` / ``ref_...``: the
    teacher's and the reference's own.

    ``approximation``: ``"exact"`` (the default), or ``"release"``, the released ADPA code's
    advantage: Σ over the teacher's ``top_k`` tokens of clamp(p_s)·clamp(log p_t − log p̃_r), plus
    clamp(1 − Σ p_s)·1e-8 for the rest, clamp to [1e-8, 1 − 1e-8]; the reference's probability
    p̃_r is replaced by the smallest kept teacher probability where the token is not among the
    reference's own top_k (``torch_rows._advantage_release``). Not in the tile-fused ``triton``
    backend."""
    check_approximation(approximation, top_k, "advantage")
    _check_temperature(temperature)
    lead = student_hidden.shape[:-1]
    models = [_model("student", student_hidden, student_weight, softcap, logit_scale),
              _model("teacher", teacher_hidden, teacher_weight, teacher_softcap, teacher_logit_scale, lead),
              _model("ref", ref_hidden, ref_weight, ref_softcap, ref_logit_scale, lead)]
    vocab = _resolve_vocab(vocab_size, student_weight, teacher_weight, ref_weight)
    n = lead.numel()
    flat_mask = _flat_rows(mask, lead, n, "mask", torch.bool)
    backend = _backend(student_hidden.device, impl, chunk_budget_mb, models, approximation)
    spec = SweepSpec(kind="advantage", temperature=temperature, vocab_size=vocab, approximation=approximation,
                     top_k=top_k, **_maps(models))
    loss, adv, _ = backend.run(spec, _inputs(models), div_rows=flat_mask,
                               div_weights=_flat_rows(weights, lead, n, "weights", torch.float32))
    return _result(loss, adv, lead, reduced=weights is not None)
