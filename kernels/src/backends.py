"""The backend contract and the registry: ``{name: Registered}``, one line per backend.

A backend takes one sweep's compacted work and returns ``(loss, div, logp)`` (``run``). Backends
that sweep rows (the chunked algorithm, the tile-fused kernels) implement the smaller
``SweepBackend`` protocol, and ``autograd.Swept`` gives them ``run``: row compaction,
reduced outputs, gradients. The naive reference implements ``run`` itself with autograd.

Adding a backend: a module with a class implementing ``SweepBackend`` (or ``run``), and one line in
``BACKENDS``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Protocol

import torch

from . import naive
from .chunked_backend import ChunkedBackend
from .autograd import Swept, reduced_loss
from .chunk_plan import CHUNK_BUDGET_ENV, budget_bytes
from .sweep import SweepGrads, SweepInputs, SweepSpec

BACKEND_ENV = "FASTDADPO_KERNEL_BACKEND"
DEFAULT_BACKEND = "chunked"


class SweepBackend(Protocol):
    """One sweep over compacted rows (every row valid for every output it asks for)."""

    forms_grads_in_forward: bool  # whether ``forward`` can form gradients for given row weights

    def forward(self, spec: SweepSpec, inputs: SweepInputs, row_grads=None):
        """``(div, logp, saved, grads)``: per-row outputs, what backward needs, and, for
        ``row_grads = (w_div, w_logp)``, the gradients of Σ w_div·div + Σ w_logp·logp (None entries: 0)."""

    def backward(self, spec: SweepSpec, inputs: SweepInputs, saved: dict, div, row_grads,
                 into: Optional[SweepGrads] = None) -> SweepGrads:
        """The gradients of Σ g_div·div + Σ g_logp·logp for ``row_grads = (g_div, g_logp)``, added
        to ``into`` when given."""


class TileFused(Swept):
    """The tile-fused Triton kernels: logits never leave the chip, gradients recomputed in backward."""

    forms_grads_in_forward = False

    def __init__(self):
        from . import triton_backend  # imported lazily: importing Triton is slow and optional on CPU

        self._impl = triton_backend

    def forward(self, spec, inputs, row_grads=None):
        return self._impl.forward(spec, inputs)

    def backward(self, spec, inputs, saved, div, row_grads, into=None):
        grads = self._impl.backward(spec, inputs, saved, div, *row_grads)
        if into is not None:
            for mine, theirs in ((grads.hidden, into.hidden), (grads.weight, into.weight), (grads.bias, into.bias)):
                if mine is not None and theirs is not None:
                    theirs.add_(mine)
            return into
        return grads


class Naive:
    """The materialized reference: [rows x vocab] logits and autograd. Tests and benchmarks only."""

    def run(self, spec: SweepSpec, inputs: SweepInputs, *, div_rows=None, logp_rows=None, div_weights=None,
            logp_weights=None):
        maps = dict(student_map=spec.student_map, teacher_map=spec.teacher_map, approximation=spec.approximation,
                    top_k=spec.top_k)
        targets = None
        if spec.with_logps:
            targets = inputs.targets if logp_rows is None else torch.where(logp_rows, inputs.targets, -1)
        if spec.kind == "none":
            div = None
            logp = naive.naive_linear_logprobs(inputs.student_hidden, inputs.student_weight, targets,
                                               bias=inputs.student_bias, temperature=spec.logp_temperature,
                                               ignore_index=-1, logit_map=spec.student_map)
        elif spec.kind == "advantage":
            logp = None
            div = naive.naive_linear_advantage(inputs.student_hidden, inputs.student_weight, inputs.teacher_hidden,
                                               inputs.teacher_weight, inputs.ref_hidden, inputs.ref_weight,
                                               temperature=spec.temperature, mask=div_rows, vocab_size=spec.vocab_size,
                                               ref_map=spec.ref_map, **maps)
        else:
            out = naive.naive_linear_divergence(inputs.student_hidden, inputs.student_weight, inputs.teacher_hidden,
                                                inputs.teacher_weight, kind=spec.kind, beta=spec.beta,
                                                temperature=spec.temperature, mask=div_rows, targets=targets,
                                                ignore_index=-1, vocab_size=spec.vocab_size,
                                                logp_temperature=spec.logp_temperature, **maps)
            div, logp = out if spec.with_logps else (out, None)
        div = None if div is None else div.float()
        logp = None if logp is None else logp.float()
        loss = reduced_loss(div, logp, div_weights, logp_weights, like=inputs.student_hidden)
        div = div.detach() if div is not None and div_weights is not None else div
        logp = logp.detach() if logp is not None and logp_weights is not None else logp
        return loss, div, logp


@dataclass(frozen=True)
class Registered:
    build: Callable[[int, torch.device], object]  # (budget in bytes, device) → a backend with ``run``
    uses_triton: Callable[[torch.device], bool]  # whether it launches Triton kernels on that device
    summary: str
    logit_maps: bool = True  # applies soft caps and logit scales
    # computes approximation="release" (the released ADPA code's per-row top-k of the teacher)
    release_approximation: bool = True


def _on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


BACKENDS: Dict[str, Registered] = {
    "chunked": Registered(lambda budget, device: ChunkedBackend(budget, "triton" if _on_cuda(device) else "torch"),
                          _on_cuda, "the default: budgeted row chunks, GEMMs per chunk, the row sweep a Triton "
                                    "kernel on CUDA and torch elsewhere"),
    "chunked_triton": Registered(lambda budget, device: ChunkedBackend(budget, "triton"), lambda device: True,
                                 "the chunked algorithm with the Triton row kernel forced (CPU: TRITON_INTERPRET=1; "
                                 "approximation='release' still takes the torch row sweep)"),
    "torch": Registered(lambda budget, device: ChunkedBackend(budget, "torch"), lambda device: False,
                        "the chunked algorithm with the torch row sweep forced (no Triton anywhere)"),
    "triton": Registered(lambda budget, device: TileFused(), lambda device: True,
                         "the tile-fused Triton kernels (logits never leave the chip; recompute in backward)",
                         logit_maps=False, release_approximation=False),
    "naive": Registered(lambda budget, device: Naive(), lambda device: False,
                        "materialized logits and autograd: the reference"),
}


@dataclass(frozen=True)
class KernelSettings:
    """The kernels' two settings, as the training config's ``kernels:`` section gives them. None:
    the environment (``FASTDADPO_KERNEL_BACKEND``, ``FASTDADPO_CHUNK_BUDGET_MB``), else the defaults
    (``chunked``; ``chunk_plan.DEFAULT_CHUNK_BUDGET_MB`` of the device)."""

    backend: Optional[str] = None
    chunk_budget_mb: Optional[float] = None

    def call_options(self) -> dict:
        """The public functions' keyword arguments for these settings."""
        return dict(impl=self.backend, chunk_budget_mb=self.chunk_budget_mb)


def resolve_backend(device: torch.device, impl: Optional[str] = None) -> str:
    """The backend a call on ``device`` uses: ``impl``, else the environment, else ``chunked``."""
    name = impl or os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} ({BACKEND_ENV}, kernels.backend or impl=); "
                         f"choose one of {', '.join(BACKENDS)}")
    if BACKENDS[name].uses_triton(device) and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"the {name} kernel backend runs Triton kernels, which need CUDA tensors, or "
                         f"TRITON_INTERPRET=1 to run them on CPU tensors under Triton's interpreter")
    return name


def build_backend(name: str, device: torch.device, chunk_budget_mb: Optional[float] = None):
    return BACKENDS[name].build(budget_bytes(chunk_budget_mb, device), device)


__all__ = ["BACKENDS", "BACKEND_ENV", "CHUNK_BUDGET_ENV", "KernelSettings", "Registered", "SweepBackend",
           "build_backend", "resolve_backend"]
