"""Host code shared by the two row-chunked backends (``torch_chunked`` on CPU, ``chunked_backend``
on CUDA): reused R x V workspace buffers, logit GEMMs into them, and the two gradient GEMMs that
push a chunk's d(loss)/d(logits) into the hidden-state and weight gradients."""
from __future__ import annotations

from typing import Optional

import torch

from .sweep import SweepGrads


class Workspace:
    """R x V buffers allocated once per sweep and reused by every chunk: fresh large tensors cost
    page faults on every allocation on CPU, about as much as the arithmetic done in them, and on
    CUDA they would leave the caching allocator to find a new block per chunk."""

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.dtype, self.device, self.buffers = rows, dtype, device, {}

    def get(self, name: str, rows: int, cols: int) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape[1] != cols:
            buffer = self.buffers[name] = torch.empty(self.rows, cols, dtype=self.dtype, device=self.device)
        return buffer[:rows]


_MIXED_GEMM_UNAVAILABLE = False


def logits_into(out: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out ← rows @ weight.T into a workspace buffer. Half-precision rows and weights give float32
    logits straight from cuBLAS (``out_dtype``: fp32 accumulate, no rounding to bf16 between the
    GEMM and the softmax)."""
    global _MIXED_GEMM_UNAVAILABLE
    if rows.dtype == out.dtype:
        return torch.mm(rows, weight.T, out=out)
    if not _MIXED_GEMM_UNAVAILABLE:
        try:
            return torch.mm(rows, weight.T, out_dtype=out.dtype, out=out)
        except (RuntimeError, TypeError, NotImplementedError):
            # Older torch (no out_dtype) or a device without it: same math through a
            # half-precision temporary, one chunk large.
            _MIXED_GEMM_UNAVAILABLE = True
    return out.copy_(torch.mm(rows, weight.T))


def new_grads(rows: int, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype,
              weight_grad: bool = True, bias_grad: bool = True) -> SweepGrads:
    """Zeroed gradients; a frozen weight (``weight_grad`` False) or bias gets none."""
    vocab, hidden = weight.shape
    return SweepGrads(hidden=torch.zeros(rows, hidden, dtype=dtype, device=weight.device),
                      weight=torch.zeros(vocab, hidden, dtype=dtype, device=weight.device) if weight_grad else None,
                      bias=None if bias is None or not bias_grad else
                      torch.zeros(vocab, dtype=_bias_dtype(dtype), device=weight.device))


def _bias_dtype(dtype: torch.dtype) -> torch.dtype:
    # A sum over every row of the batch: float32 at least, float64 for float64 references.
    return torch.float64 if dtype == torch.float64 else torch.float32


def accumulate_chunk_grads(grads: SweepGrads, rows: slice, grad_logits: torch.Tensor, student_rows: torch.Tensor,
                           student_weight: torch.Tensor) -> None:
    """grads += the chunk's share: dh[rows] += G·W, dW[:C] += Gᵀ·X, db[:C] += Σ_rows G, for the chunk's
    [R, C] logit gradient G over the first C rows of the head. Accumulating (not assigning) the
    hidden rows lets a backward add to gradients a forward sweep already formed. A frozen head
    (``grads.weight`` None) skips the dW GEMM."""
    columns = grad_logits.shape[1]
    weight = student_weight[:columns]
    grads.hidden[rows].addmm_(grad_logits, weight)
    if grads.weight is not None:
        grads.weight[:columns].addmm_(grad_logits.T, student_rows)
    if grads.bias is not None:
        grads.bias[:columns] += grad_logits.sum(dim=0, dtype=grads.bias.dtype)
