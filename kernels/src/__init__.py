"""fastdadpo.kernels: teacher-student divergences and token log-probs straight from hidden states
and LM-head weights, forward and backward, never materializing [tokens x vocab] logits.

Backends (``impl=`` or ``FASTDADPO_KERNEL_BACKEND``): ``chunked``, the CUDA default (row chunks
sized by a memory budget, GEMMs on cuBLAS, one Triton row kernel per chunk: ``chunked_backend``,
``triton_rows``); ``triton``, the tile-fused kernels (``triton_backend``); ``torch``, chunked
PyTorch, the CPU default (``torch_chunked``); ``naive``, the materialized reference.

A library of its own: it imports nothing from the trainer.
"""
from .api import (BACKENDS, fused_linear_advantage, fused_linear_divergence, fused_linear_logprobs,
                  resolve_backend)
from .naive import naive_linear_advantage, naive_linear_divergence, naive_linear_logprobs
from .sweep import DIVERGENCE_KINDS

__all__ = [
    "BACKENDS", "DIVERGENCE_KINDS", "fused_linear_advantage", "fused_linear_divergence", "fused_linear_logprobs",
    "naive_linear_advantage", "naive_linear_divergence", "naive_linear_logprobs", "resolve_backend",
]
