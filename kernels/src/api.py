"""Public entry points of ``fastdadpo.kernels``: validation, shapes and the choice of backend.

Hidden states may have any leading shape ([N, H], [B, T, H], ...); outputs have that leading
shape. Backends:

* ``chunked`` (the CUDA default): row chunks sized by a memory budget, logits and gradient GEMMs on
  cuBLAS, one fused Triton kernel per chunk for everything row-wise (``chunked_backend``);
* ``triton``: the tile-fused Triton kernels, logits never leave the chip (``triton_backend``);
* ``torch``: chunked PyTorch, the CPU default;
* ``naive``: materialized logits, the reference.

The Triton ones take CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
``FASTDADPO_KERNEL_BACKEND`` forces one; ``impl=`` on a call wins over both. ``chunk_budget_mb=``
(or ``FASTDADPO_CHUNK_BUDGET_MB``) is the chunked backend's memory budget; others ignore it.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch

from . import naive, torch_chunked
from .autograd import sweep_rows
from .sweep import DIVERGENCE_KINDS, SweepSpec, logit_map

BACKENDS = ("chunked", "triton", "torch", "naive")
_TRITON_BACKENDS = ("chunked", "triton")
_HALF_OR_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_backend():
    from . import triton_backend  # imported lazily: importing triton is slow and optional on CPU

    return triton_backend


def resolve_backend(device: torch.device, impl: Optional[str] = None) -> str:
    """The backend a call on ``device`` uses: ``impl``, else the environment, else by device."""
    name = impl or os.environ.get("FASTDADPO_KERNEL_BACKEND") or ""
    if name and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (FASTDADPO_KERNEL_BACKEND or impl=); "
                         f"choose one of {', '.join(BACKENDS)}")
    if not name:
        name = "chunked" if device.type == "cuda" else "torch"
    if name in _TRITON_BACKENDS and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"the {name} kernel backend needs CUDA tensors, or TRITON_INTERPRET=1 to run its "
                         f"kernels on CPU tensors under Triton's interpreter")
    return name


def _backend_module(name: str, chunk_budget_mb: Optional[float] = None):
    if name == "triton":
        return _triton_backend()
    if name == "chunked":
        from . import chunked_backend  # lazily, as triton_backend

        return chunked_backend.ChunkedBackend(chunked_backend.budget_bytes(chunk_budget_mb))
    return torch_chunked


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


# The backends that apply soft caps and logit scales (the tile-fused kernels do not yet).
_LOGIT_MAP_BACKENDS = ("chunked", "torch", "naive")


def _check_maps_supported(backend: str, maps: dict) -> None:
    used = [name for name, m in maps.items() if not m.identity]
    if used and backend not in _LOGIT_MAP_BACKENDS:
        raise ValueError(f"the {backend} kernel backend does not apply {', '.join(used)}; the "
                         f"{', '.join(_LOGIT_MAP_BACKENDS)} backends do (impl= or FASTDADPO_KERNEL_BACKEND)")


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


def _flat_mask(mask: Optional[torch.Tensor], lead: torch.Size, n: int, what: str = "mask"):
    if mask is None:
        return None
    if mask.shape != lead:
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, expected the hidden states' leading shape "
                         f"{tuple(lead)}")
    return mask.reshape(n).to(torch.bool)


def _flat_targets(targets, lead, n, ignore_index, vocab):
    if targets.shape != lead:
        raise ValueError(f"targets have shape {tuple(targets.shape)}, expected {tuple(lead)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    flat = targets.reshape(n).long()
    valid = flat != ignore_index
    if valid.any():
        chosen = flat[valid]
        if bool((chosen < 0).any()) or bool((chosen >= vocab).any()):
            raise ValueError(f"targets hold ids outside [0, {vocab}) other than ignore_index={ignore_index}")
    return flat, valid


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, temperature: float = 1.0, ignore_index: int = -100,
                          grad_weights: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                          logit_scale: float = 1.0, impl: Optional[str] = None,
                          chunk_budget_mb: Optional[float] = None) -> torch.Tensor:
    """float32 ``log_softmax(z / T)[target]`` per row, z = ``hidden @ weight.T`` (+ ``bias``), exactly
    0 where ``targets == ignore_index``; never materializes the [rows x vocab] logits.
    Differentiable in ``hidden``, ``weight`` and ``bias``.

    ``softcap`` / ``logit_scale``: the model's logits are z = cap·tanh(scale·x/cap) of the head's
    raw outputs x (z = scale·x without a cap), before the temperature: Gemma 2's
    ``final_logit_softcapping``, Cohere's ``logit_scale``. None / 1.0: off.

    ``grad_weights`` (optional, same shape as ``targets``): the weights w the caller will reduce the
    result with (loss = c·Σ w·out). Lets the torch backend form gradients during the forward sweep;
    any other gradient is still handled exactly.

    ``chunk_budget_mb``: the memory (MiB) the chunked backend may take above its inputs, gradients
    included (default ``FASTDADPO_CHUNK_BUDGET_MB``, else 1400); it sizes the row chunks. Half-precision
    heads get fp32 gradient accumulators where they and their final cast fit the budget, else
    accumulators in their own dtype (``chunked_backend.plan_chunks``).
    """
    _check_head("fused_linear_logprobs", hidden, weight)
    _check_temperature(temperature)
    lead = hidden.shape[:-1]
    n = lead.numel()
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    student_map = logit_map(softcap, logit_scale, "")
    backend = resolve_backend(hidden.device, impl)
    _check_maps_supported(backend, {"softcap/logit_scale": student_map})
    if backend == "naive":
        return naive.naive_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                           ignore_index=ignore_index, logit_map=student_map).float()
    flat_targets, valid = _flat_targets(targets, lead, n, ignore_index, weight.shape[0])
    spec = SweepSpec(kind="none", logp_temperature=temperature, with_logps=True, student_map=student_map)
    _, logp = sweep_rows(_backend_module(backend, chunk_budget_mb), spec, student_hidden=hidden.reshape(n, -1),
                         student_weight=weight,
                         student_bias=bias, targets=flat_targets, logp_rows=valid,
                         logp_hint=None if grad_weights is None else grad_weights.reshape(n).float())
    return logp.reshape(lead)


def fused_linear_divergence(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                            teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
                            kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                            mask: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None,
                            ignore_index: int = -100, vocab_size: Optional[int] = None,
                            logp_temperature: float = 1.0, grad_weights: Optional[torch.Tensor] = None,
                            logp_grad_weights: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                            logit_scale: float = 1.0, teacher_softcap: Optional[float] = None,
                            teacher_logit_scale: float = 1.0, impl: Optional[str] = None,
                            chunk_budget_mb: Optional[float] = None
                            ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
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
    ``grad_weights`` / ``logp_grad_weights``, ``chunk_budget_mb``, ``softcap`` / ``logit_scale``
    (the student's): see ``fused_linear_logprobs``; ``teacher_softcap`` / ``teacher_logit_scale``:
    the teacher's own.
    """
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; choose one of {', '.join(DIVERGENCE_KINDS)}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got beta={beta}")
    _check_temperature(temperature)
    _check_temperature(logp_temperature, "logp_temperature")
    _check_head("student", student_hidden, student_weight)
    lead = student_hidden.shape[:-1]
    _check_head("teacher", teacher_hidden, teacher_weight, lead)
    vocab = _resolve_vocab(vocab_size, student_weight, teacher_weight)
    n = lead.numel()
    flat_mask = _flat_mask(mask, lead, n)
    maps = dict(student_map=logit_map(softcap, logit_scale, ""),
                teacher_map=logit_map(teacher_softcap, teacher_logit_scale, "teacher_"))
    backend = resolve_backend(student_hidden.device, impl)
    _check_maps_supported(backend, {"softcap/logit_scale": maps["student_map"],
                                    "teacher_softcap/teacher_logit_scale": maps["teacher_map"]})
    if backend == "naive":
        out = naive.naive_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, kind=kind,
                                            beta=beta, temperature=temperature, mask=mask, targets=targets,
                                            ignore_index=ignore_index, vocab_size=vocab,
                                            logp_temperature=logp_temperature, **maps)
        return tuple(o.float() for o in out) if targets is not None else out.float()
    flat_targets = valid = None
    if targets is not None:
        flat_targets, valid = _flat_targets(targets, lead, n, ignore_index, student_weight.shape[0])
    spec = SweepSpec(kind=kind, beta=beta, temperature=temperature, logp_temperature=logp_temperature,
                     vocab_size=vocab, with_logps=targets is not None, **maps)
    div, logp = sweep_rows(
        _backend_module(backend, chunk_budget_mb), spec, student_hidden=student_hidden.reshape(n, -1),
        student_weight=student_weight,
        teacher_hidden=teacher_hidden.reshape(n, -1).detach(), teacher_weight=teacher_weight.detach(),
        targets=flat_targets, div_rows=flat_mask, logp_rows=valid,
        div_hint=None if grad_weights is None else grad_weights.reshape(n).float(),
        logp_hint=None if logp_grad_weights is None else logp_grad_weights.reshape(n).float())
    if targets is None:
        return div.reshape(lead)
    return div.reshape(lead), logp.reshape(lead)


def fused_linear_advantage(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                           teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                           ref_hidden: torch.Tensor, ref_weight: torch.Tensor, *, temperature: float = 1.0,
                           mask: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None,
                           grad_weights: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                           logit_scale: float = 1.0, teacher_softcap: Optional[float] = None,
                           teacher_logit_scale: float = 1.0, ref_softcap: Optional[float] = None,
                           ref_logit_scale: float = 1.0, impl: Optional[str] = None,
                           chunk_budget_mb: Optional[float] = None) -> torch.Tensor:
    """ADPA's per-row advantage Σ_a p_s(a)·(log p_t(a) − log p_r(a)) of the student's distribution
    under the teacher's log-ratio to its reference (the teacher before alignment). float32, 0
    where ``mask`` is False; gradient to the student only. ``grad_weights``, ``chunk_budget_mb``,
    ``softcap`` / ``logit_scale``: see ``fused_linear_logprobs``; ``teacher_...`` / ``ref_...``: the
    teacher's and the reference's own."""
    _check_temperature(temperature)
    _check_head("student", student_hidden, student_weight)
    lead = student_hidden.shape[:-1]
    _check_head("teacher", teacher_hidden, teacher_weight, lead)
    _check_head("reference teacher", ref_hidden, ref_weight, lead)
    vocab = _resolve_vocab(vocab_size, student_weight, teacher_weight, ref_weight)
    n = lead.numel()
    flat_mask = _flat_mask(mask, lead, n)
    maps = dict(student_map=logit_map(softcap, logit_scale, ""),
                teacher_map=logit_map(teacher_softcap, teacher_logit_scale, "teacher_"),
                ref_map=logit_map(ref_softcap, ref_logit_scale, "ref_"))
    backend = resolve_backend(student_hidden.device, impl)
    _check_maps_supported(backend, {"softcap/logit_scale": maps["student_map"],
                                    "teacher_softcap/teacher_logit_scale": maps["teacher_map"],
                                    "ref_softcap/ref_logit_scale": maps["ref_map"]})
    if backend == "naive":
        return naive.naive_linear_advantage(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                            ref_hidden, ref_weight, temperature=temperature, mask=mask,
                                            vocab_size=vocab, **maps).float()
    spec = SweepSpec(kind="advantage", temperature=temperature, vocab_size=vocab, **maps)
    adv, _ = sweep_rows(
        _backend_module(backend, chunk_budget_mb), spec, student_hidden=student_hidden.reshape(n, -1),
        student_weight=student_weight,
        teacher_hidden=teacher_hidden.reshape(n, -1).detach(), teacher_weight=teacher_weight.detach(),
        ref_hidden=ref_hidden.reshape(n, -1).detach(), ref_weight=ref_weight.detach(), div_rows=flat_mask,
        div_hint=None if grad_weights is None else grad_weights.reshape(n).float())
    return adv.reshape(lead)
