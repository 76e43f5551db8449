"""DeepSpeed engines for the student (trained) and the teachers (frozen), built for the fused kernels.

The student's loss runs inside its engine's forward: the module below computes the final hidden
states and hands them, with the LM-head weight, to a function (the objective). Under ZeRO-3 the
head's shards are gathered for that forward and again for its backward because the head weight is
registered as an external parameter of this module; reading ``lm_head.weight`` outside the engine
would see an empty shard (the peers' recurring bug), and computing the loss outside the engine's
forward would escape ZeRO's gradient-reduction hooks. Tied embeddings are the same parameter.

A frozen model runs its decoder in a ZeRO-3 engine too (so a teacher is sharded over the same
ranks), but its head never changes: it is gathered once, at build time, into a plain tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import models
from .ds_config import inference_config, student_config, teacher_extra


class StudentWithObjective(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, compute: Callable):
        hidden = models.final_hidden_states(self.model, input_ids, attention_mask, position_ids)
        return compute(hidden, models.head_weight(self.model))


class HiddenStates(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        return models.final_hidden_states(self.model, input_ids, attention_mask, position_ids)


def _is_zero3(parameter) -> bool:
    return hasattr(parameter, "ds_id")


def gathered_copy(parameter: torch.Tensor) -> torch.Tensor:
    """A full, detached copy of a (possibly ZeRO-3-partitioned) parameter."""
    if not _is_zero3(parameter):
        return parameter.detach()
    import deepspeed

    with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
        return parameter.detach().clone()


def warmup_cosine(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_student_engine(model, *, zero_stage: int, micro_batch_size: int, grad_accum: int, max_grad_norm: float,
                         lr: float, weight_decay: float, total_steps: int, warmup_ratio: float, dtype: torch.dtype,
                         extra: dict, source: str):
    import deepspeed

    wrapper = StudentWithObjective(model)
    head = models.head_weight(model)
    if _is_zero3(head):
        deepspeed.zero.register_external_parameter(wrapper, head)
    config = student_config(zero_stage=zero_stage, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                            max_grad_norm=max_grad_norm, dtype=dtype, extra=extra, source=source)
    params = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8,
                                  fused=torch.cuda.is_available() or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_ratio))
    engine, _, _, _ = deepspeed.initialize(model=wrapper, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config)
    return engine


@dataclass
class FrozenModel:
    engine: object
    head: torch.Tensor  # the full LM-head weight
    softcap: Optional[float] = None  # its logits from the head's raw outputs (``models.head_logit_options``)
    logit_scale: float = 1.0

    @torch.no_grad()
    def hidden(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        return self.engine(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    def release(self) -> None:
        """Free the shards, the hooks and the gathered head now (DeepSpeed's engine keeps its module
        reachable after the last reference to it goes; ``destroy`` unhooks it)."""
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()
        self.engine = self.head = None
        models.release_memory()


def build_frozen(path: str, *, key: str, dtype: torch.dtype, device: torch.device, offload: bool,
                 extra: Optional[dict], liger_kernels=False) -> FrozenModel:
    config = inference_config(dtype, offload=offload, extra=teacher_extra(extra))
    model = models.load_causal_lm(path, dtype=dtype, device=device, ds_config=config, key=key,
                                  liger_kernels=liger_kernels)
    head = gathered_copy(models.head_weight(model)).to(device)
    engine = models.frozen_engine(HiddenStates(model), config)
    return FrozenModel(engine=engine, head=head, **models.head_logit_options(model.config, key))


def grad_norm_before_step(engine, zero_stage: int) -> Optional[float]:
    """Under ZeRO stage 0 DeepSpeed reports no gradient norm, and clips a non-finite gradient into
    NaN weights: the norm of the reduced gradients, before the step. Other stages: None (their
    optimizer computes it in the step, and skips the update when it is not finite)."""
    if zero_stage != 0:
        return None
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else None


def grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)
