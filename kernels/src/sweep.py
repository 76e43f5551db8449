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

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

# Targets equal to this are no target (a prompt or padding position): PyTorch's cross-entropy default.
IGNORE_INDEX = -100
DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "jsd")
# "advantage" is ADPA's Σ_a p_s(a)·(log p_t(a) − log p_r(a)); "none" is a log-prob-only sweep.
SWEEP_KINDS = ("none",) + DIVERGENCE_KINDS + ("advantage",)

# How the divergence (forward_kl only) and the advantage are computed: "exact", over the full
# vocabulary; or "release", the formulas of the ADPA authors' released code (Gao, Wan et al., ICLR
# 2025, arXiv 2502.17927: scripts/run_distill_dpo.py, utils/merge_logits_adpa_dataset.py,
# utils/compress_logits.py), over the aligned teacher's top_k tokens plus one bin for the rest, with
# their clamps (``torch_rows._forward_kl_release`` and ``_advantage_release`` give the formulas).
APPROXIMATIONS = ("exact", "release")
RELEASE_TOP_K = 50  # the release keeps the teacher's top 50 tokens per position
RELEASE_EPS = 1e-8  # the release's probability clamp [ε, 1 − ε]
RELEASE_LOG_FLOOR = 1e-7  # the release floors probabilities at this before their logs (the advantage)


@dataclass(frozen=True)
class LogitMap:
    """A model's logits z from its head's raw outputs x = h·Wᵀ (+ b): z = cap·tanh(scale·x/cap)
    with a soft cap (Gemma 2's ``final_logit_softcapping``), z = scale·x without (Cohere's
    ``logit_scale``). Applied before any temperature. dz/dx = scale·(1 − (z/cap)²), or scale."""

    softcap: Optional[float] = None
    scale: float = 1.0

    @property
    def identity(self) -> bool:
        return self.softcap is None and self.scale == 1.0

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """x ← z in place; returns x."""
        if self.softcap is not None:
            return x.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap)
        return x if self.scale == 1.0 else x.mul_(self.scale)

    def slope_into(self, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out ← dz/dx (soft-capped maps only) from the mapped logits z."""
        torch.mul(z, 1.0 / self.softcap, out=out)
        return out.square_().neg_().add_(1.0).mul_(self.scale)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """z out of place, differentiable (the naive reference)."""
        if self.softcap is not None:
            return self.softcap * torch.tanh(x * (self.scale / self.softcap))
        return x if self.scale == 1.0 else x * self.scale


def logit_map(softcap: Optional[float], scale: float, who: str) -> LogitMap:
    """The checked map of one model's logits; ``who`` names the keyword arguments in errors."""
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"{who}softcap must be None (off) or a positive finite number, got {softcap!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{who}logit_scale must be a positive finite number (1.0: off), got {scale!r}")
    return LogitMap(None if softcap is None else float(softcap), float(scale))


@dataclass(frozen=True)
class SweepSpec:
    kind: str = "none"
    beta: float = 0.5  # jsd mixture weight of the teacher: m = β·p_teacher + (1−β)·p_student
    temperature: float = 1.0
    logp_temperature: float = 1.0
    vocab_size: int = 0  # divergence columns; 0 for a log-prob-only sweep
    with_logps: bool = False
    # Each model's logits from its head's raw outputs (soft cap, scale), before the temperatures.
    student_map: LogitMap = field(default_factory=LogitMap)
    teacher_map: LogitMap = field(default_factory=LogitMap)
    ref_map: LogitMap = field(default_factory=LogitMap)
    # Whether the student's head weight / bias want gradients (the autograd layer sets these from
    # what autograd asks for). A frozen head (a LoRA student) then costs no [V, H] gradient buffer
    # and no weight-gradient GEMM.
    weight_grad: bool = True
    bias_grad: bool = True
    # "exact" or "release" (``APPROXIMATIONS``); ``top_k``: the release's kept teacher tokens per row
    # (the whole vocabulary where it has fewer: ``release_k``).
    approximation: str = "exact"
    top_k: int = RELEASE_TOP_K

    @property
    def has_div(self) -> bool:
        return self.kind != "none"

    @property
    def needs_teacher(self) -> bool:
        return self.kind != "none"

    @property
    def needs_ref(self) -> bool:
        return self.kind == "advantage"

    @property
    def release(self) -> bool:
        """Whether the divergence (or advantage) follows the released code's top-k formulas."""
        return self.has_div and self.approximation == "release"


def release_k(top_k: int, vocab: int) -> int:
    """The tokens the release keeps per row: ``top_k``, or the whole vocabulary where it is smaller
    (the release's ``torch.topk`` would refuse that; we keep every token and the rest bin is empty)."""
    return min(top_k, vocab)


def check_approximation(approximation: str, top_k: int, kind: str) -> None:
    """Refuses an unknown approximation, a top_k that is not a positive integer, a top_k other than the
    default without ``approximation="release"``, and the release with a divergence it does not define."""
    if approximation not in APPROXIMATIONS:
        raise ValueError(f"unknown approximation {approximation!r}; choose one of {', '.join(APPROXIMATIONS)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if approximation == "exact" and top_k != RELEASE_TOP_K:
        raise ValueError(f"top_k={top_k} applies to approximation='release' only (exact sums over the full "
                         f"vocabulary)")
    if approximation == "release" and kind not in ("forward_kl", "advantage"):
        raise ValueError(f"approximation='release' is defined for kind='forward_kl' only (the released code's "
                         f"KL), not kind={kind!r}; use approximation='exact' for {kind}")


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
    weight: Optional[torch.Tensor]  # None when the head is frozen (``SweepSpec.weight_grad``)
    bias: Optional[torch.Tensor]


def accumulation_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float32 accumulation everywhere; float64 inputs (the tests' references) keep float64."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32
