"""What an objective is given for one micro-batch (``StepInputs``) and returns (``ObjectiveOutput``),
and what it needs, declared once (``Needs``): the models online every step, the sequence log-prob
tables cached before training, the data fields it reads, and the kernel calls of one micro-batch.
The trainer, the precompute, the planner, the recipe runner and the config read ``Needs`` and
nothing else."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from fastdadpo.core.batch import Batch
from fastdadpo.kernels import KernelSettings


@dataclass
class Head:
    """A model's final hidden states for the micro-batch, its LM-head weight, and how its logits come
    from the head's raw outputs x (z = cap·tanh(scale·x/cap); None / 1.0: off), from its config."""

    hidden: torch.Tensor
    weight: torch.Tensor
    softcap: Optional[float] = None
    logit_scale: float = 1.0

    def logit_options(self, prefix: str = "") -> dict:
        """The kernels' keyword arguments for this model's logits: ``softcap``/``logit_scale`` for
        the student, ``teacher_softcap``/... with ``prefix`` "teacher_" or "ref_"."""
        return {f"{prefix}softcap": self.softcap, f"{prefix}logit_scale": self.logit_scale}


@dataclass
class Normalizers:
    """Counts over the whole optimizer step (all micro-batches, all ranks)."""

    pairs: float = 1.0
    chosen_tokens: float = 1.0
    rejected_tokens: float = 1.0

    @property
    def response_tokens(self) -> float:
        return self.chosen_tokens + self.rejected_tokens


@dataclass
class StepInputs:
    student: Head
    batch: Batch  # targets, the pair layout, response lengths
    normalizers: Normalizers
    vocab_size: int  # the shared tokenizer's vocabulary (divergences are over its rows)
    teacher: Optional[Head] = None
    teacher_reference: Optional[Head] = None
    reference_logps: Optional[torch.Tensor] = None  # [S] cached Σ log π_ref per sequence
    teacher_logps: Optional[torch.Tensor] = None  # [S] cached Σ log π_te per sequence
    kernels: KernelSettings = field(default_factory=KernelSettings)  # the config's kernels: section

    def student_options(self) -> dict:
        """The kernels' keyword arguments every call on the student takes: its logit map, the backend
        and the chunk budget."""
        return {**self.student.logit_options(), **self.kernels.call_options()}


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # this micro-batch's contribution to the step's loss (differentiable)
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)  # contributions, detached


@dataclass(frozen=True)
class KernelCall:
    """One fused-kernel call an objective makes per micro-batch, as the planner sizes it."""

    rows: str = "chosen"  # whose tokens: "chosen" or "rejected" (one sequence a pair), "both"
    with_logps: bool = True  # the student's target log-probs (over its whole head)
    teachers: int = 0  # 0; 1: a divergence against the teacher; 2: ADPA's advantage (teacher and its reference)
    reduced: bool = False  # ``weights=``: gradients formed in the forward sweep and held until backward
    jsd: bool = False  # a JSD (its row sweep needs a second work buffer)

    def __post_init__(self):
        if self.rows not in ("chosen", "rejected", "both"):
            raise ValueError(f"KernelCall.rows must be chosen, rejected or both, got {self.rows!r}")
        if self.teachers not in (0, 1, 2):
            raise ValueError(f"KernelCall.teachers must be 0, 1 or 2, got {self.teachers!r}")


ONLINE_MODELS = ("teacher", "teacher_reference")  # run every step, sharded and frozen


CACHED_TABLES = ("reference", "teacher")  # Σ log π per sequence, computed once before training


@dataclass(frozen=True)
class Needs:
    """Everything an objective needs, in one value."""

    online: Tuple[str, ...] = ()  # ``model.*`` keys whose hidden states it reads every step (ONLINE_MODELS)
    cached: Tuple[str, ...] = ()  # sequence log-prob tables it reads (CACHED_TABLES): π_ref's, π_te's
    fields: Tuple[str, ...] = ("chosen", "rejected")  # the data fields its batches carry
    kernel_calls: Tuple[KernelCall, ...] = ()  # per micro-batch, for ``fastdadpo plan``

    def __post_init__(self):
        for what, values, allowed in (("online", self.online, ONLINE_MODELS), ("cached", self.cached, CACHED_TABLES),
                                      ("fields", self.fields, ("chosen", "rejected"))):
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ValueError(f"Needs.{what}: {unknown} not among {allowed}")
        if "chosen" not in self.fields:
            raise ValueError("Needs.fields must include chosen")

    @property
    def uses_rejected(self) -> bool:
        return "rejected" in self.fields

    @property
    def models(self) -> Tuple[str, ...]:
        """The ``model.*`` keys it cannot run without (π_ref defaults to the starting student)."""
        keys = list(self.online) + [key for key in self.cached if key != "reference"]
        return tuple(dict.fromkeys(keys))

    @property
    def vocabulary_models(self) -> Tuple[str, ...]:
        """The ``model.*`` keys whose tokenizer must map tokens as the student's does."""
        return tuple(dict.fromkeys(list(self.online) + list(self.cached)))
