"""Host code of the budgeted row-chunk algorithm (``chunked_backend``): reused R x V workspace
buffers, logit GEMMs into them, and the two gradient GEMMs that push a chunk's d(loss)/d(logits)
into the hidden-state and weight gradients."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .sweep import SweepGrads


class Workspace:
    """R x V buffers allocated once per sweep and reused by every chunk: fresh large tensors cost
    page faults on every allocation on CPU, about as much as the arithmetic done in them, and on
    CUDA they would leave the caching allocator to find a new block per chunk."""

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device, scratch_rows: int = 0):
        self.rows, self.dtype, self.device, self.buffers = rows, dtype, device, {}
        self.scratch_rows = scratch_rows

    def get_scratch(self, name: str, rows: int, cols: int) -> torch.Tensor:
        """A [rows, cols] buffer of at most ``scratch_rows`` rows (a row sweep's per-block scratch)."""
        key = "scratch:" + name
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape[1] != cols:
            buffer = self.buffers[key] = torch.empty(self.scratch_rows, cols, dtype=self.dtype, device=self.device)
        return buffer[:rows]

    def get(self, name: str, rows: int, cols: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape[1] != cols or buffer.dtype != dtype:
            buffer = self.buffers[name] = torch.empty(self.rows, cols, dtype=dtype, device=self.device)
        return buffer[:rows]


# Head rows per logit GEMM on CPU (``logits_into``).
CPU_LOGIT_TILE = 2048

# Device types whose torch has no mixed-dtype GEMM (``out_dtype``: half inputs, fp32 output): CPU.
_NO_MIXED_GEMM = set()


def _mixed_gemm(gemm, device: torch.device, fallback, *args, **kwargs) -> torch.Tensor:
    """``gemm(*args, out_dtype=..., **kwargs)`` where the device has it, else ``fallback()``;
    remembered per device type, so a CPU call never sends a later CUDA one down the fallback."""
    if device.type not in _NO_MIXED_GEMM:
        try:
            return gemm(*args, **kwargs)
        except (RuntimeError, TypeError, NotImplementedError) as error:
            _NO_MIXED_GEMM.add(device.type)
            if device.type != "cpu":  # expected on CPU; elsewhere the fallback's fp32 copies cost memory and time
                logging.getLogger("fastdadpo.kernels").warning(
                    "fastdadpo.kernels: no mixed-dtype GEMM (out_dtype) on %s (%s); computing in fp32 on "
                    "upcast copies instead", device.type, error)
    return fallback()


def logits_into(out: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out ← rows @ weight.T into a workspace buffer. Half-precision rows and weights give float32
    logits straight from cuBLAS (``out_dtype``: fp32 accumulate, no rounding to bf16 between the
    GEMM and the softmax). Without that GEMM (CPU) the same math: the operands upcast to fp32,
    where products of two halves are exact and the sums fp32, never logits rounded to half."""
    if rows.dtype == out.dtype:
        if out.device.type == "cpu":
            # In vocabulary tiles: each tile of the head is packed by the BLAS while it sits in cache
            # (4–8 % faster at the CPU anchor than one GEMM over the whole head, 64–128 MB of it).
            for start in range(0, weight.shape[0], CPU_LOGIT_TILE):
                tile = slice(start, start + CPU_LOGIT_TILE)
                torch.mm(rows, weight[tile].T, out=out[:, tile])
            return out
        return torch.mm(rows, weight.T, out=out)
    return _mixed_gemm(torch.mm, out.device,
                       lambda: torch.mm(rows.to(out.dtype), weight.to(out.dtype).T, out=out),
                       rows, weight.T, out_dtype=out.dtype, out=out)


def addmm_into(acc: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    """acc += mat1 @ mat2, for an accumulator wider than its half operands too (an fp32 dW from
    bf16 chunks): one GEMM whose fp32 epilogue adds into acc, no half-precision rounding. Without
    that GEMM (CPU) the same math on operands upcast to fp32."""
    if mat1.dtype == acc.dtype:
        return acc.addmm_(mat1, mat2)
    return _mixed_gemm(torch.addmm, acc.device,
                       lambda: acc.addmm_(mat1.to(acc.dtype), mat2.to(acc.dtype)),
                       acc, mat1, mat2, out_dtype=acc.dtype, out=acc)


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
    hidden rows lets a backward add to gradients a forward sweep already formed. The gradients may
    be wider than G (fp32 accumulators for half inputs: ``addmm_into``). A frozen head
    (``grads.weight`` None) skips the dW GEMM."""
    columns = grad_logits.shape[1]
    weight = student_weight[:columns]
    addmm_into(grads.hidden[rows], grad_logits, weight)
    if grads.weight is not None:
        addmm_into(grads.weight[:columns], grad_logits.T, student_rows)
    if grads.bias is not None:
        grads.bias[:columns] += grad_logits.sum(dim=0, dtype=grads.bias.dtype)
