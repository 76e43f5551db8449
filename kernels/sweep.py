"""What one sweep over the vocabulary computes, shared by every backend.

A sweep reads the student's hidden rows and LM head (and, for a divergence or ADPA's advantage,
the teacher's and the reference teacher's) and yields per-row quantities:

* ``div``  -- the divergence (or the advantage) over the first ``vocab_size`` rows of each head,
  both models' logits divided by ``temperature``;
* ``logp`` -- the student's log-probability of ``targets`` over *all* rows of its head, logits
  divided by ``logp_temperature`` (the model's own token distribution, what CE and DPO use).

Rows arriving here are already compacted: every row is valid for every quantity it asks for
(the autograd layer drops masked rows and zero-weights rows valid for only one quantity).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "jsd")
# "advantage" is ADPA's Σ_a p_s(a)·(log p_t(a) − log p_r(a)); "none" is a log-prob-only sweep.
SWEEP_KINDS = ("none",) + DIVERGENCE_KINDS + ("advantage",)


@dataclass(frozen=True)
class SweepSpec:
    kind: str = "none"
    beta: float = 0.5  # jsd mixture weight of the teacher: m = β·p_teacher + (1−β)·p_student
    temperature: float = 1.0
    logp_temperature: float = 1.0
    vocab_size: int = 0  # divergence columns; 0 for a log-prob-only sweep
    with_logps: bool = False

    @property
    def has_div(self) -> bool:
        return self.kind != "none"

    @property
    def needs_teacher(self) -> bool:
        return self.kind != "none"

    @property
    def needs_ref(self) -> bool:
        return self.kind == "advantage"


@dataclass
class SweepInputs:
    """Compacted rows. Hidden states are [n, H]; weights [V_head, H]; targets [n] (valid ids)."""

    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    student_bias: Optional[torch.Tensor] = None
    teacher_hidden: Optional[torch.Tensor] = None
    teacher_weight: Optional[torch.Tensor] = None
    ref_hidden: Optional[torch.Tensor] = None
    ref_weight: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None

    @property
    def rows(self) -> int:
        return self.student_hidden.shape[0]


@dataclass
class SweepGrads:
    """Gradients of the student's inputs, accumulated in float32."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]


def accumulation_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float32 accumulation everywhere; float64 inputs (the tests' references) keep float64."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32
