"""fastdadpo.kernels: teacher-student divergences and token log-probs straight from hidden states
and LM-head weights, forward and backward, never materializing [tokens x vocab] logits.

Backends (``backends.BACKENDS``; ``impl=``, the training config's ``kernels.backend``, or
``FASTDADPO_KERNEL_BACKEND``): ``chunked``, the default on every device (row chunks sized by a
memory budget, GEMMs per chunk, one row sweep per chunk: the Triton kernel ``triton_rows`` on CUDA,
the torch function ``torch_rows`` elsewhere: ``chunked_backend``); ``chunked_triton`` and ``torch``,
the same with the row sweep forced; ``triton``, the tile-fused kernels (``triton_backend``);
``naive``, the materialized reference.

A library of its own: it imports nothing from the trainer.
"""
from .api import Reduced, fused_linear_advantage, fused_linear_divergence, fused_linear_logprobs
from .backends import BACKENDS, KernelSettings, resolve_backend
from .naive import naive_linear_advantage, naive_linear_divergence, naive_linear_logprobs
from .sweep import APPROXIMATIONS, DIVERGENCE_KINDS, IGNORE_INDEX, RELEASE_TOP_K

__all__ = [
    "APPROXIMATIONS", "BACKENDS", "DIVERGENCE_KINDS", "IGNORE_INDEX", "KernelSettings", "RELEASE_TOP_K", "Reduced",
    "fused_linear_advantage", "fused_linear_divergence", "fused_linear_logprobs", "naive_linear_advantage",
    "naive_linear_divergence", "naive_linear_logprobs", "resolve_backend",
]
